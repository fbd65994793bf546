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
// (zero_nonfinite_v, add_back_nonfinite_v), as in the KV-outer kernel.  The tile, its union and
// its chunks: tile_outer.cuh (shared with the wgmma version, sparse_prefill_tile_sm90.cu).
//
// Grid: n_tiles (an upper bound of the chunk's tiles, tile_schedule.cu) x Hkv CTAs,
// blockIdx.x = g * n_tiles + tile: neighbouring tiles of one head run together and find
// their shared blocks in L2.  row_mode (nullable): per (row - q_begin, g), nonzero where the
// tile runs here (classify_query_tiles); a CTA of another tile exits at once.
//
// Shared memory: STAGES x (K chunk, V chunk) of KC x D, rows XOR-swizzled (the query tile is
// staged in the last one before the walk, its fragments then held in registers), then the
// union: masks (u64), block ids, the tile's picks and first-occurrence flags, TT * top_k each.
#include "tile_outer.cuh"

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
    constexpr int DK = D / 16, DN = D / 8;
    constexpr int CPB = BK / KC;       // chunks per key block
    constexpr int STAGE = 2 * KC * D;  // elements of one buffer: K chunk, V chunk
    static_assert(M % G == 0 && TT >= 1 && TT <= 64, "whole tokens, at most 64 (a mask bit each)");
    static_assert(BK % KC == 0, "block size must be a multiple of 64");
    static_assert(M * D <= STAGE, "the query tile is staged in one K/V buffer");
    static_assert(STAGES >= 2, "at least one chunk in flight while one is computed");

    const int g = blockIdx.x / n_tiles;
    QueryTile tile;
    if (!tile.init(blockIdx.x - g * n_tiles, tile_off, cu_q, cu_k, n_seq, q_begin, rows, TT) ||
        !tile.runs_tile_outer(row_mode, q_begin, g, n_heads_kv))
        return;
    const int count = tile.count;
    const KeyRows key_rows{block_table, max_pages, page_size};

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* bufs = reinterpret_cast<T*>(smem_raw);  // [STAGES][K | V], then the union
    TileUnion u(reinterpret_cast<unsigned char*>(bufs + STAGES * STAGE), TT * top_k);
    // keys whose V row held NaN or Inf, chunk c's in slot c % (STAGES + 1): a slot is cleared one
    // barrier before the chunk that next uses it marks it
    __shared__ unsigned nonfinite_v[STAGES + 1][KC / 32];
    __shared__ int n_union;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid < (STAGES + 1) * (KC / 32)) nonfinite_v[tid / (KC / 32)][tid % (KC / 32)] = 0;

    // the query tile (rows past the tile's tokens zero), staged in the last buffer
    T* Qs = bufs + (STAGES - 1) * STAGE;
    tile.template load_queries<D, M, G, THREADS>(Qs, q, g, n_heads_q, [](int row, int ch) { return swizzled<D>(row, ch); });
    cp_async_commit();
    const int n_chunks = u.template build<THREADS>(tile, block_indices, q_begin, g, n_heads_kv, top_k, TT, n_union) * CPB;
    const TileRows tr = TileRows::template make<G>(tile, causal);

    auto chunk_key0 = [&](int c) { return u.block[c / CPB] * BK + (c % CPB) * KC; };
    auto load_chunk = [&](int c, int buf) {
        T* Ks = bufs + buf * STAGE;
        tile.template load_keys<D, KC, THREADS>(Ks, Ks + KC * D, k, v, key_rows, chunk_key0(c), u.block[c / CPB] * BK,
                                                tr.key_end, g, n_heads_kv,
                                                [](int row, int ch) { return swizzled<D>(row, ch); });
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
        const int buf = c % STAGES, marks = c % (STAGES + 1);
        const int key0 = chunk_key0(c);
        const unsigned long long mask = u.mask[c / CPB];
        const int loaded = min(key0 + KC, tr.key_end) - key0;  // keys of the chunk read (the rest zero)
        // a row of the tile that does not see a loaded key: its p = 0 must not meet that key's V
        const bool partly = tr.partly(mask, key0, loaded);
        T* Ks = bufs + buf * STAGE;
        T* Vs = Ks + KC * D;
        cp_async_wait<STAGES - 2>();  // chunk c has landed, for this thread
        if (partly)  // what this thread copied
            zero_nonfinite_v<D, KC, THREADS>(Vs, nonfinite_v[marks], [](int row, int ch) { return swizzled<D>(row, ch); });
        __syncthreads();  // chunk c for every thread; and every warp is done with chunk c - 1 (and the query tile)
        if (c + STAGES - 1 < n_chunks) load_chunk(c + STAGES - 1, (c + STAGES - 1) % STAGES);
        cp_async_commit();
        if (tid < KC / 32) nonfinite_v[(c + STAGES) % (STAGES + 1)][tid] = 0;  // chunk c - 1's slot, next used by c + STAGES
        int lim[1][2];  // keys of the chunk each of this lane's rows sees
        tr.limits(lim[0], mask, key0);
        if (__all_sync(MSA_FULL_MASK, lim[0][0] <= 0 && lim[0][1] <= 0)) continue;  // warp-uniform skip
        float s[1][NT][4];
        qk_product<T, D, 1, NT>(s, qa, Ks, 0);
        softmax_step<NT, DN>(s[0], lim[0], scale_log2, m[0], l[0], o[0]);
        pv_product<T, D, 1, NT>(o, s, Vs, 0);
        if (partly)  // the NaN and Inf of V zeroed above, for the rows that see them
            for_each_marked<KC>(nonfinite_v[marks], [&](int col) {
                const T* v_row = v + (key_rows.row(tile.seq, tile.k_start, key0 + col) * n_heads_kv + g) * D;
                add_back_nonfinite_v<D, NT>(
                    v_row, col, col, lim[0], [&](int nn, int h, int e) { return s[0][nn][2 * h + e]; },
                    [&](int nn, int h, int e, float x) { o[0][nn][2 * h + e] += x; });
            });
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float lt = row_weight(l[0][h]);
        if (tr.tok[h] >= count) continue;
        const i64 row = (i64)(tile.t0 + tr.tok[h]) * n_heads_q + g * G + (warp * 16 + (lane >> 2) + 8 * h) % G;
        store_row<T, DN>(out + row * D, lse_out + row, o[0], h, m[0][h], lt, true);
    }
}
