// The tile-outer prefill's work that does not depend on the tensor-core instructions, shared
// by sparse_prefill_tile.cu (mma.sync, chunks of 64 keys) and sparse_prefill_tile_sm90.cu
// (wgmma, a whole 128-key block per chunk), and the query tiles of tile_schedule.cu: a
// query tile's tokens, the union of their picks, its chunks of keys and which rows see them.
#pragma once
#include "attention.cuh"

// A query tile: up to tt consecutive tokens of one sequence inside the chunk of query rows
// [q_begin, q_begin + rows).  The tokens of sequence s in the chunk are cut into tiles of tt
// from the first; tile_off[s] numbers the first of them (query_tile_offsets), tile_off[n_seq]
// counts all.  The tile's rows are its tokens x the G heads of KV head g (a token's heads on
// consecutive rows): row r holds token r / G.
struct QueryTile {
    int seq, t0, count, q_start, n_q, k_start, n_k;  // t0: first token (global row), count: tokens

    // false for an index past the chunk's tiles (the grid is an upper bound)
    __device__ __forceinline__ bool init(int x, const int* __restrict__ tile_off, const int* __restrict__ cu_q,
                                         const int* __restrict__ cu_k, int n_seq, int q_begin, int rows, int tt) {
        if (x >= tile_off[n_seq]) return false;
        seq = sequence_of(tile_off, n_seq, x);  // largest s with tile_off[s] <= x: sequences without tiles skipped
        q_start = cu_q[seq];
        n_q = cu_q[seq + 1] - q_start;
        k_start = cu_k[seq];
        n_k = cu_k[seq + 1] - k_start;
        t0 = max(q_start, q_begin) + (x - tile_off[seq]) * tt;
        count = min(tt, min(q_start + n_q, q_begin + rows) - t0);
        return count > 0;
    }

    // False for a tile the classification sent KV-outer for KV head g: row_mode (nullable,
    // classify_query_tiles) marks the rows of tile-outer tiles 1.
    __device__ __forceinline__ bool runs_tile_outer(const unsigned char* __restrict__ row_mode, int q_begin, int g,
                                                    int n_heads_kv) const {
        return row_mode == nullptr || row_mode[(i64)(t0 - q_begin) * n_heads_kv + g];
    }

    // Keys token t of the tile sees (visible_keys; <= 0 past the tile's tokens: none).
    __device__ __forceinline__ int visible(int t, int causal) const {
        return t < count ? visible_keys(n_q, n_k, t0 - q_start + t, causal) : 0;
    }

    // The M = TT x G rows of the tile (rows past its tokens zero) into dst, 16-byte chunks
    // placed by offset(row, chunk).  cp.async: the caller commits.
    template <int D, int M, int G, int THREADS, typename T, typename Offset>
    __device__ __forceinline__ void load_queries(T* dst, const T* __restrict__ q, int g, int n_heads_q,
                                                 Offset offset) const {
        constexpr int CH = D / 8;
        for (int c = threadIdx.x; c < M * CH; c += THREADS) {
            const int row = c / CH, ch = c % CH, t = row / G;
            const bool ok = t < count;
            const i64 off = ((i64)(t0 + (ok ? t : 0)) * n_heads_q + g * G + row % G) * D + ch * 8;
            cp_async_16(dst + offset(row, ch), q + off, ok ? 16 : 0);
        }
    }

    // Keys key0 .. key0 + KC of KV head g into Ks and Vs (KC x D; keys >= key_end zero-filled,
    // their address the valid key `safe`), by THREADS threads, this one the tid-th of them.
    // cp.async: the caller commits.
    template <int D, int KC, int THREADS, typename T, typename Offset>
    __device__ __forceinline__ void load_keys(T* Ks, T* Vs, const T* __restrict__ k, const T* __restrict__ v,
                                              const KeyRows& key_rows, int key0, int safe, int key_end, int g,
                                              int n_heads_kv, Offset offset, int tid = threadIdx.x) const {
        constexpr int CH = D / 8;
        for (int x = tid; x < KC * CH; x += THREADS) {
            const int row = x / CH, ch = x % CH, key = key0 + row;
            const bool ok = key < key_end;
            const i64 off = (key_rows.row(seq, k_start, ok ? key : safe) * n_heads_kv + g) * D + ch * 8;
            cp_async_16(Ks + offset(row, ch), k + off, ok ? 16 : 0);
            cp_async_16(Vs + offset(row, ch), v + off, ok ? 16 : 0);
        }
    }
};

// The union of the blocks a query tile's tokens picked (KV head g), ascending, in shared
// memory: block[u] and mask[u] (bit t: token t picked it), with the scratch of building it,
// n = tile tokens x top_k entries per array.
struct TileUnion {
    unsigned long long* mask;
    int *block, *ids;       // ids: the tile's picks, entry e = (token e / top_k, slot)
    unsigned char* first;  // first[e]: ids[e] is valid and not in an earlier entry

    // The four arrays from smem (8-byte aligned), 17 bytes an entry.
    __device__ __forceinline__ explicit TileUnion(unsigned char* smem, int n) {
        mask = reinterpret_cast<unsigned long long*>(smem);
        block = reinterpret_cast<int*>(mask + n);
        ids = block + n;
        first = reinterpret_cast<unsigned char*>(ids + n);
    }

    // Every thread calls it; returns the union's size (size: a shared int).  A first entry's
    // rank among the first entries by id is its place in the union; deduplication by
    // comparison (quadratic in the tile's picks: the host bounds them).
    template <int THREADS>
    __device__ __forceinline__ int build(const QueryTile& tile, const int* __restrict__ block_indices, int q_begin,
                                         int g, int n_heads_kv, int top_k, int tt, int& size) {
        const int tid = threadIdx.x, n = tt * top_k, count = tile.count;
        if (tid == 0) size = 0;
        for (int e = tid; e < n; e += THREADS) {
            const int t = e / top_k;
            ids[e] = t < count ? block_indices[((i64)(tile.t0 - q_begin + t) * n_heads_kv + g) * top_k + (e - t * top_k)]
                               : -1;
        }
        __syncthreads();
        for (int e = tid; e < n; e += THREADS) {
            const int id = ids[e];
            bool f = id >= 0;
            for (int e2 = 0; f && e2 < e; ++e2) f = ids[e2] != id;
            first[e] = f;
        }
        __syncthreads();
        int mine = 0;
        for (int e = tid; e < n; e += THREADS) {
            if (!first[e]) continue;
            const int id = ids[e];
            int rank = 0;
            unsigned long long m = 0;
            for (int t = 0, e2 = 0; t < count; ++t) {
                for (int slot = 0; slot < top_k; ++slot, ++e2) {
                    const int id2 = ids[e2];
                    rank += first[e2] && id2 < id;
                    m |= (unsigned long long)(id2 == id) << t;
                }
            }
            block[rank] = id;
            mask[rank] = m;
            ++mine;
        }
        if (mine) atomicAdd(&size, mine);  // a count: its value does not depend on the order
        __syncthreads();
        return size;
    }
};

// Which keys of a chunk the tile's rows see: this lane's rows r = 16 warp + grp + 8 h (mma
// and wgmma accumulator layouts alike) hold tokens tok[h] = r / G, which see vis[h] keys.
struct TileRows {
    int vis_first, key_end;  // keys the tile's first token sees; keys read (what its last one sees)
    unsigned long long all_tokens;
    int tok[2], vis[2];

    template <int G>
    static __device__ __forceinline__ TileRows make(const QueryTile& tile, int causal) {
        const int lane = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16 + (lane >> 2);
        TileRows tr;
        tr.vis_first = tile.visible(0, causal);
        tr.key_end = min(tile.n_k, tile.visible(tile.count - 1, causal));
        tr.all_tokens = tile.count == 64 ? ~0ull : (1ull << tile.count) - 1;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            tr.tok[h] = (r0 + 8 * h) / G;
            tr.vis[h] = tile.visible(tr.tok[h], causal);
        }
        return tr;
    }

    // Keys of the chunk at key0 (union block mask `mask`) that each of this lane's rows sees.
    __device__ __forceinline__ void limits(int (&lim)[2], unsigned long long mask, int key0) const {
#pragma unroll
        for (int h = 0; h < 2; ++h) lim[h] = (mask >> tok[h]) & 1 ? vis[h] - key0 : 0;
    }

    // True when a row of the tile does not see a key of the chunk that was read (`loaded` keys
    // from key0): its p = 0 must not meet that key's V (zero_nonfinite_v).
    __device__ __forceinline__ bool partly(unsigned long long mask, int key0, int loaded) const {
        return loaded > 0 && (mask != all_tokens || vis_first < key0 + loaded);
    }
};
