// What the index-branch selection kernels (select.cu: mma.sync, select_sm90.cu: wgmma) share:
// which rows and key tiles a CTA owns, the key/query tile loads, and the per-row epilogue
// (block score out, or a running top-k).
//
// Rows.  A CTA owns BM rows of one sequence.  With a shared index_k (1 head) a row is a
// (query, group) pair taken in memory order (q * Hkv + g): all groups read the same keys, so
// one key tile feeds Hkv groups (decode reads the index keys once).  With per-group index_k
// (Hkv heads) a CTA holds one group (grid.y) and its rows are queries.
// Grid: x = sequence * q_tiles + row tile (heaviest causal tiles first), y = group (per-group
// index_k) or 1, z = split of the CTA's key range (split-K for decode: each split writes a
// partial list, and the last split of a row tile to finish merges them, merge_splits).  Keys
// stream in KEY_TILE-key tiles; causal CTAs visit only the tiles up to their last row's position.
#pragma once
#include "common.cuh"
#include "mma.cuh"
#include "warp_topk.cuh"

constexpr int KEY_TILE = 128;
constexpr int EPI_SCORES = 0;
constexpr int EPI_TOPK = 1;

template <int BM>
struct SelectRows {
    int seq, q_start, nq, k_start, nk;
    KeyRows key_rows;
    int rows_per_q, g0, k_head, n_heads, k_heads, causal;
    int row0, rows_here;
    int t_begin, t_end, n_tiles, n_vis_min;

    // false when the CTA has no rows (a row tile past its sequence's end)
    __device__ __forceinline__ bool init(const int* cu_q, const int* cu_k, int n_heads_, int k_heads_,
                                         int q_tiles, int causal_, int n_splits, KeyRows key_rows_) {
        seq = blockIdx.x / q_tiles;
        key_rows = key_rows_;
        const int tile = q_tiles - 1 - (int)(blockIdx.x % q_tiles);
        q_start = cu_q[seq];
        nq = cu_q[seq + 1] - q_start;
        k_start = cu_k[seq];
        nk = cu_k[seq + 1] - k_start;
        n_heads = n_heads_;
        k_heads = k_heads_;
        causal = causal_;
        const bool shared_k = (k_heads == 1);
        rows_per_q = shared_k ? n_heads : 1;
        g0 = shared_k ? 0 : (int)blockIdx.y;
        k_head = shared_k ? 0 : g0;
        row0 = tile * BM;
        const int seq_rows = nq * rows_per_q;
        if (row0 >= seq_rows) return false;
        rows_here = min(BM, seq_rows - row0);
        n_vis_min = n_visible(0);
        n_tiles = (n_visible(rows_here - 1) + KEY_TILE - 1) / KEY_TILE;
        t_begin = (int)((i64)blockIdx.z * n_tiles / n_splits);
        t_end = (int)((i64)(blockIdx.z + 1) * n_tiles / n_splits);
        return true;
    }
    __device__ __forceinline__ int position(int r) const { return query_position(nq, nk, (row0 + r) / rows_per_q); }
    __device__ __forceinline__ int n_visible(int r) const {  // visible keys of local row r
        return causal ? min(max(position(r) + 1, 0), nk) : nk;
    }
    __device__ __forceinline__ i64 global_row(int r) const {  // row index into (total_q * Hkv)
        const int fr = row0 + r;
        return (i64)(q_start + fr / rows_per_q) * n_heads + g0 + fr % rows_per_q;
    }

    // Key tile t -> dst ([KEY_TILE][DI] in swizzled panels), zero past the sequence's end, by
    // THREADS threads, this one the tid-th.
    template <int DI, int THREADS, typename T>
    __device__ __forceinline__ void load_keys(T* dst, const T* index_k, int t, int tid = threadIdx.x) const {
        constexpr int CH = DI / 8;
        for (int c = tid; c < KEY_TILE * CH; c += THREADS) {
            const int kr = c / CH, ch = c % CH;
            const int key = t * KEY_TILE + kr;
            const bool in = key < nk;
            const T* src = in ? index_k + (key_rows.row(seq, k_start, key) * k_heads + k_head) * DI + ch * 8 : index_k;
            cp_async_16(dst + swizzled_panel<DI, KEY_TILE>(kr, ch), src, in ? 16 : 0);
        }
    }
    // The CTA's query rows -> dst ([BM][DI] in swizzled panels), zero past rows_here.
    template <int DI, int THREADS, typename T>
    __device__ __forceinline__ void load_rows(T* dst, const T* index_q) const {
        constexpr int CH = DI / 8;
        for (int c = threadIdx.x; c < BM * CH; c += THREADS) {
            const int r = c / CH, ch = c % CH;
            const bool in = r < rows_here;
            const T* src = in ? index_q + global_row(r) * DI + ch * 8 : index_q;
            cp_async_16(dst + swizzled_panel<DI, BM>(r, ch), src, in ? 16 : 0);
        }
    }
};

// Block maxima mx[mt][h][b] of accumulator rows (m-tile mt, half h) are partial over the 4
// lanes of a quad (each holds 2 of every 8 columns): reduce them across the quad.
template <int MT, int NB>
__device__ __forceinline__ void quad_max(float (&mx)[MT][2][NB]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                float v = mx[mt][h][b];
                v = fmaxf(v, __shfl_xor_sync(MSA_FULL_MASK, v, 1));
                v = fmaxf(v, __shfl_xor_sync(MSA_FULL_MASK, v, 2));
                mx[mt][h][b] = v;
            }
}
// After quad_max: lane `quad` of the quad owns row (mt, h) = (quad / 2, quad % 2); its value.
template <int NB>
__device__ __forceinline__ float owned_max(const float (&mx)[2][2][NB], int b, int quad) {
    return quad == 0 ? mx[0][0][b] : quad == 1 ? mx[0][1][b] : quad == 2 ? mx[1][0][b] : mx[1][1][b];
}

// Split-K: the merge of a row tile's partial lists (n_splits lists of top_k keys per row, each
// list's best key first) into ids, a warp per row.  A split whose best key is not among the
// top_k best keys of all splits holds nothing of the row's top-k (its other keys are smaller
// still), so the warp reads the splits' best keys, keeps their top_k, and reads whole lists
// only of those top_k splits: 2 x top_k lists, not n_splits (4,096 keys at batch 1 over 128K).
// Split z's list holds the blocks of key tiles [z n / S, (z + 1) n / S) (n tiles, S splits):
// tile t is in split ceil((t + 1) S / n) - 1.
template <int BS, int BM, int THREADS>
__device__ __forceinline__ void merge_splits(const SelectRows<BM>& s, const u64* partial, int* ids_out,
                                             int n_splits, int top_k) {
    constexpr int PER_LANE = 8;  // keys in flight per lane
    constexpr int TB = KEY_TILE / BS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    for (int r = warp; r < s.rows_here; r += THREADS / 32) {
        const i64 row = s.global_row(r);
        const u64* lists = partial + row * n_splits * top_k;
        WarpTopK best;
        best.init(top_k, lane);
        for (int z0 = 0; z0 < n_splits; z0 += 32 * PER_LANE) {
            u64 c[PER_LANE];
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                const int z = z0 + j * 32 + lane;
                c[j] = z < n_splits ? load_cg(lists + (i64)z * top_k) : 0ull;
            }
            best.offer_batch(c);
        }
        // lane i < top_k: the split of the i-th best key (-1: none)
        const u64 mine = lane < top_k ? best.entry : 0ull;
        const int tile = msa_key_block(mine) / TB;
        const int split = mine == 0ull ? -1 : (int)(((i64)(tile + 1) * n_splits + s.n_tiles - 1) / s.n_tiles) - 1;
        for (int f0 = 0; f0 < top_k * top_k; f0 += 32 * PER_LANE) {  // (list i, position p) = f
            u64 c[PER_LANE];
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                const int f = f0 + j * 32 + lane, i = f / top_k, p = f % top_k;
                const int z = __shfl_sync(MSA_FULL_MASK, split, i & 31);
                // position 0 is the best key, already offered
                c[j] = (f < top_k * top_k && p > 0 && z >= 0) ? load_cg(lists + (i64)z * top_k + p) : 0ull;
            }
            best.offer_batch(c);
        }
        best.write_sorted(ids_out + row * top_k);
    }
}

// The epilogue of one row, run by the thread that owns it: every block score of the row
// passes through consume(); finish() writes the ids (or the split's partial list).
template <int BS, int EPI>
struct SelectRowOwner {
    bool owner;
    i64 row;
    int vis, local;
    ThreadTopK best;

    // `own`: the local row this thread owns (>= BM: none); lists: [top_k][BM] in shared memory
    template <int BM>
    __device__ __forceinline__ void init(const SelectRows<BM>& s, int own, u64* lists, int top_k) {
        owner = own < s.rows_here;
        row = owner ? s.global_row(own) : 0;
        vis = owner ? s.n_visible(own) : 0;
        local = min(max(s.position(own), 0), max(s.nk - 1, 0)) / BS;
        if (EPI == EPI_TOPK && own < BM) best.init(lists + own, BM, top_k);
    }
    // block score m of block blk for the owned row (owner threads only)
    __device__ __forceinline__ void consume(int blk, float m, float* scores_out, int width, int local_blocks,
                                            int sink_blocks) {
        if (EPI == EPI_SCORES) {
            if (blk < width) scores_out[row * width + blk] = m;
        } else if (blk * BS < vis) {
            best.offer(msa_block_key(m, blk, msa_is_forced(blk, local, local_blocks, sink_blocks)));
        }
    }
    // after the last key tile: ids (one split), or this split's partial keys (top-k) and, in the
    // split that finishes last, the merge of the tile's lists into ids; for scores, the blocks
    // after the CTA's key range get -inf (written by the last split).  A CTA with no rows exits
    // early, which lets the next launch start as well.
    template <int BM, int THREADS>
    __device__ __forceinline__ void finish(const SelectRows<BM>& s, float* scores_out, int* ids_out,
                                           u64* partial_out, unsigned* counters, int width, int top_k,
                                           int n_splits) {
        let_next_launch_start();  // the key stream is done: the attention may start its prologue
        if (EPI == EPI_SCORES) {
            if (blockIdx.z == n_splits - 1) {
                const int fill0 = min(s.n_tiles * (KEY_TILE / BS), width);
                const int count = width - fill0;
                for (int i = threadIdx.x; i < s.rows_here * count; i += THREADS) {
                    const int r = i / count, blk = fill0 + i % count;
                    scores_out[s.global_row(r) * width + blk] = MSA_NEG_INF;
                }
            }
        } else if (n_splits == 1) {
            if (owner) best.write_sorted(ids_out + row * top_k);
        } else {
            if (owner) best.write_keys(partial_out + (row * n_splits + blockIdx.z) * top_k);
            if (last_to_arrive(counters + (i64)blockIdx.y * gridDim.x + blockIdx.x, n_splits))
                merge_splits<BS, BM, THREADS>(s, partial_out, ids_out, n_splits, top_k);
        }
    }
};
