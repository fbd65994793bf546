// Query-tile-outer block-sparse attention (MSA main branch, prefill), for selections that
// neighbouring queries share: one CTA per (query tile, KV head g).  A tile is TT = M / G
// consecutive tokens of one sequence x the G query heads of group g, M = 16 * WARPS rows (one
// m16 row tile per warp, a token's G heads on consecutive rows as in sparse_prefill.cu).
//
// The CTA builds the union of the blocks its tokens picked, ascending, each with a bit mask
// of the tokens that picked it (block_indices rows in shared memory, deduplicated by
// comparison: TT * top_k ids), then walks it in chunks of KC = 64 keys: K and V chunks in
// STAGES cp.async buffers (STAGES - 1 in flight), S = Q K^T, a per-row mask (the row's
// token picked the block; causal visibility), online softmax in registers across the whole
// union, O += P V, and out and lse written once per row: no partial results, no combine.  The
// step is attention.cuh's (qk_product, softmax_step, pv_product, store_row), the KV-outer
// kernel's math step for step, with the same visibility rule (visible_keys).
//
// A warp whose rows see none of a chunk's keys (their tokens did not pick its block, or are
// before it) skips the chunk's math: with G = 16 a warp is one token, so tensor-core time goes
// to its own picks only, while the tile shares the K/V loads.  Keys no row of the tile sees
// are not read (zero-filled).  In a chunk that some row of the tile does not fully see, NaN
// and Inf of V are taken out of the product and added back for the rows that see them
// (zero_nonfinite_v, add_back_nonfinite_v), as in the KV-outer kernel.
//
// Grid: n_tiles (an upper bound of the chunk's tiles, tile_schedule.cu) x Hkv CTAs,
// blockIdx.x = g * n_tiles + tile: neighbouring tiles of one head run together and find
// their shared blocks in L2.  row_mode (nullable): per (row - q_begin, g), nonzero where the
// tile runs here (classify_query_tiles); a CTA of another tile exits at once.
//
// Shared memory: STAGES x (K chunk, V chunk) of KC x D, rows XOR-swizzled (the query tile is
// staged in the last one before the walk, its fragments then held in registers), then the
// union: masks (u64), block ids, the tile's picks and first-occurrence flags, TT * top_k each.
#include "attention.cuh"

template <typename T, int D, int G, int BK, int WARPS, int STAGES>
__global__ void __launch_bounds__(WARPS * 32, 1)
sparse_prefill_tile_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const int* __restrict__ block_indices, const int* __restrict__ cu_q,
                           const int* __restrict__ cu_k, const int* __restrict__ tile_off, int n_seq, int q_begin,
                           int rows, int n_tiles, const unsigned char* __restrict__ row_mode, int top_k,
                           T* __restrict__ out, float* __restrict__ lse_out, int n_heads_q, int n_heads_kv,
                           int causal, float scale_log2, const int* __restrict__ block_table, int max_pages,
                           int page_size) {
    constexpr int THREADS = WARPS * 32;
    constexpr int M = 16 * WARPS;      // rows of the tile
    constexpr int TT = M / G;          // tokens of the tile
    constexpr int KC = 64;             // keys per chunk: one online-softmax step
    constexpr int NT = KC / 8;         // n-tiles of S per step
    constexpr int DK = D / 16, DN = D / 8, CH = D / 8;
    constexpr int CPB = BK / KC;       // chunks per key block
    constexpr int STAGE = 2 * KC * D;  // elements of one buffer: K chunk, V chunk
    static_assert(M % G == 0 && TT >= 1 && TT <= 64, "whole tokens, at most 64 (a mask bit each)");
    static_assert(BK % KC == 0, "block size must be a multiple of 64");
    static_assert(M * D <= STAGE, "the query tile is staged in one K/V buffer");
    static_assert(STAGES >= 2, "at least one chunk in flight while one is computed");

    const int g = blockIdx.x / n_tiles;
    QueryTile tile;
    if (!tile.init(blockIdx.x - g * n_tiles, tile_off, cu_q, cu_k, n_seq, q_begin, rows, TT)) return;
    if (row_mode != nullptr && !row_mode[(i64)(tile.t0 - q_begin) * n_heads_kv + g]) return;  // a KV-outer tile
    const int count = tile.count, n = TT * top_k;
    const KeyRows key_rows{block_table, max_pages, page_size};

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* bufs = reinterpret_cast<T*>(smem_raw);                                                 // [STAGES][K | V]
    unsigned long long* umask = reinterpret_cast<unsigned long long*>(bufs + STAGES * STAGE);  // [n] tokens per union block
    int* ublk = reinterpret_cast<int*>(umask + n);                                            // [n] union, ascending
    int* ids = ublk + n;                                                                      // [n] the tile's picks
    unsigned char* first = reinterpret_cast<unsigned char*>(ids + n);                         // [n]
    __shared__ unsigned nonfinite_v[STAGES][KC / 32];  // per buffer: keys whose V row held NaN or Inf
    __shared__ int n_union;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, grp = lane >> 2;
    if (tid < STAGES * (KC / 32)) nonfinite_v[tid / (KC / 32)][tid % (KC / 32)] = 0;
    if (tid == 0) n_union = 0;

    // the query tile (rows past the tile's tokens zero), staged in the last buffer
    T* Qs = bufs + (STAGES - 1) * STAGE;
    for (int c = tid; c < M * CH; c += THREADS) {
        const int row = c / CH, ch = c % CH, t = row / G;
        const bool ok = t < count;
        const i64 off = ((i64)(tile.t0 + (ok ? t : 0)) * n_heads_q + g * G + row % G) * D + ch * 8;
        cp_async_16(Qs + swizzled<D>(row, ch), q + off, ok ? 16 : 0);
    }
    cp_async_commit();

    // the union of the tile's picks: entry e = (token e / top_k, slot); first[e] when its id
    // is valid and not in an earlier entry; a first entry's rank among the first entries by id
    // is its place in the union, and its mask has bit t when token t picked the id
    for (int e = tid; e < n; e += THREADS) {
        const int t = e / top_k;
        ids[e] = t < count ? block_indices[((i64)(tile.t0 - q_begin + t) * n_heads_kv + g) * top_k + (e - t * top_k)] : -1;
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
        unsigned long long mask = 0;
        for (int t = 0, e2 = 0; t < count; ++t) {
            for (int slot = 0; slot < top_k; ++slot, ++e2) {
                const int id2 = ids[e2];
                rank += first[e2] && id2 < id;
                mask |= (unsigned long long)(id2 == id) << t;
            }
        }
        ublk[rank] = id;
        umask[rank] = mask;
        ++mine;
    }
    if (mine) atomicAdd(&n_union, mine);  // a count: its value does not depend on the order
    __syncthreads();
    const int n_chunks = n_union * CPB;

    // visibility: this lane's rows r = 16 warp + grp + 8 h belong to tokens r / G
    const int i0 = tile.t0 - tile.q_start;  // the tile's first query in its sequence
    const int vis_first = visible_keys(tile.n_q, tile.n_k, i0, causal);
    const int key_end = min(tile.n_k, visible_keys(tile.n_q, tile.n_k, i0 + count - 1, causal));  // keys read
    const unsigned long long all_tokens = count == 64 ? ~0ull : (1ull << count) - 1;
    int tok[2], vis[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        tok[h] = (warp * 16 + grp + 8 * h) / G;
        vis[h] = tok[h] < count ? visible_keys(tile.n_q, tile.n_k, i0 + tok[h], causal) : 0;
    }

    auto chunk_key0 = [&](int c) { return ublk[c / CPB] * BK + (c % CPB) * KC; };
    auto load_chunk = [&](int c, int buf) {
        const int key0 = chunk_key0(c), safe = ublk[c / CPB] * BK;  // a key of the block: a valid row
        T* Ks = bufs + buf * STAGE;
        T* Vs = Ks + KC * D;
        for (int x = tid; x < KC * CH; x += THREADS) {
            const int row = x / CH, ch = x % CH, key = key0 + row;
            const bool ok = key < key_end;
            const i64 off = (key_rows.row(tile.seq, tile.k_start, ok ? key : safe) * n_heads_kv + g) * D + ch * 8;
            cp_async_16(Ks + swizzled<D>(row, ch), k + off, ok ? 16 : 0);
            cp_async_16(Vs + swizzled<D>(row, ch), v + off, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {  // the first STAGES - 1 chunks (buffers 0 .. STAGES - 2)
        if (st < n_chunks) load_chunk(st, st);
        cp_async_commit();
    }

    unsigned qa[1][DK][4];
    cp_async_wait<STAGES - 1>();  // the query tile has landed (the chunks may still be in flight)
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) ldmatrix_x4(qa[0][kk], Qs + swizzled<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    float m[1][2] = {{MSA_NEG_INF, MSA_NEG_INF}}, l[1][2] = {{0.f, 0.f}};
    float o[1][DN][4];
#pragma unroll
    for (int nn = 0; nn < DN; ++nn) o[0][nn][0] = o[0][nn][1] = o[0][nn][2] = o[0][nn][3] = 0.f;

#pragma unroll 1
    for (int c = 0; c < n_chunks; ++c) {
        const int buf = c % STAGES;
        cp_async_wait<STAGES - 2>();  // chunk c has landed
        __syncthreads();  // for every thread; and every warp is done with chunk c - 1 (and the query tile)
        if (c + STAGES - 1 < n_chunks) load_chunk(c + STAGES - 1, (c + STAGES - 1) % STAGES);
        cp_async_commit();
        if (tid < KC / 32) nonfinite_v[(c + STAGES - 1) % STAGES][tid] = 0;  // chunk c - 1's buffer, next used by c + STAGES - 1

        const int key0 = chunk_key0(c);
        const unsigned long long mask = umask[c / CPB];
        const int loaded = min(key0 + KC, key_end) - key0;  // keys of the chunk read (the rest zero)
        // a row of the tile that does not see a loaded key: its p = 0 must not meet that key's V
        const bool partly = loaded > 0 && (mask != all_tokens || vis_first < key0 + loaded);
        T* Ks = bufs + buf * STAGE;
        T* Vs = Ks + KC * D;
        if (partly) {
            zero_nonfinite_v<D, KC, THREADS>(Vs, nonfinite_v[buf], [](int row, int ch) { return swizzled<D>(row, ch); });
            __syncthreads();
        }
        int lim[1][2];  // keys of the chunk each of this lane's rows sees
#pragma unroll
        for (int h = 0; h < 2; ++h) lim[0][h] = tok[h] < count && ((mask >> tok[h]) & 1) ? vis[h] - key0 : 0;
        if (__all_sync(MSA_FULL_MASK, lim[0][0] <= 0 && lim[0][1] <= 0)) continue;  // warp-uniform skip
        float s[1][NT][4];
        qk_product<T, D, 1, NT>(s, qa, Ks, 0);
        softmax_step<NT, DN>(s[0], lim[0], scale_log2, m[0], l[0], o[0]);
        pv_product<T, D, 1, NT>(o, s, Vs, 0);
        if (partly) {  // the NaN and Inf of V zeroed above, for the rows that see them
#pragma unroll
            for (int w = 0; w < KC / 32; ++w) {
                for (unsigned bits = nonfinite_v[buf][w]; bits; bits &= bits - 1) {
                    const int col = w * 32 + __ffs(bits) - 1;
                    const T* v_row = v + (key_rows.row(tile.seq, tile.k_start, key0 + col) * n_heads_kv + g) * D;
                    add_back_nonfinite_v<D, NT>(
                        v_row, col, col, lim[0], [&](int nn, int h, int e) { return s[0][nn][2 * h + e]; },
                        [&](int nn, int h, int e, float x) { o[0][nn][2 * h + e] += x; });
                }
            }
        }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float lt = row_weight(l[0][h]);
        if (tok[h] >= count) continue;
        const i64 row = (i64)(tile.t0 + tok[h]) * n_heads_q + g * G + (warp * 16 + grp + 8 * h) % G;
        store_row<T, DN>(out + row * D, lse_out + row, o[0], h, m[0][h], lt, true);
    }
}
