// KV-outer block-sparse attention (MSA main branch, prefill): one CTA per work item
// (KV head g, key block B, a run of <= max_queries tokens of the list of queries that picked
// B, from reverse_index.cu).  The CTA loads the BK x D key and value block of head g into
// shared memory once and streams its queries through tensor cores in tiles of
// M = 16 * MT * WARPS rows: TQ = M / G query tokens x the G query heads of group g (the G
// heads of one token are contiguous in q, so a token's rows are one G*D run of memory).  With
// G = 16 a query-outer kernel would have only 16 rows per token to feed the mma; here every
// tile is full whatever G is.
//
// Per warp: MT m16 row tiles; S = Q K^T over key sub-tiles of KT keys (mma.sync m16n8k16,
// fp32 accumulators; Q fragments held in registers for the whole tile), online softmax over
// the BK / KT sub-tiles in the log2 domain, P fed from registers into O += P V (the step
// functions of attention.cuh, shared with the tile-outer kernel).  Keys past the
// query's position (causal) or past the sequence end are masked by a per-row key limit, and a
// warp stops at the first sub-tile that none of its rows can see; a row that sees no key of
// the block gets o = 0, lse = -inf.  Masked keys never reach a row: their scores are replaced
// (a select), and in a partly visible block (the causal diagonal) NaN and Inf of V are taken
// out of the tensor-core product and added back for the rows that see them
// (zero_nonfinite_v, attention.cuh).
//
// Output: per (list position p, head hh of the group) the normalised partial output o (T,
// the input dtype) and its natural-log lse, at partial row p * G + hh: the pick's own slot
// (slot_pos in the reverse index), so no atomics and a deterministic result.  combine.cu
// merges the <= K partials of each (query, head).
//
// Shared memory: K, V (BK x D each) + STAGES query tile buffers (M x D; STAGES - 1 tiles in
// flight with cp.async while one is computed), rows XOR-swizzled for conflict-free ldmatrix.
// Default (sparse.py): WARPS = 4, MT = 1, STAGES = 2: 96 KiB at D = BK = 128, so two CTAs
// share an SM and one's K/V load overlaps the other's math (measured on H200: +12% over one
// CTA of 8 warps; MT = 2 spills at D = 128 and STAGES = 3 gained nothing).
#include "attention.cuh"

template <typename T, int D, int G, int BK, int WARPS, int STAGES, int MT>
__global__ void __launch_bounds__(WARPS * 32, 1)
sparse_prefill_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const int* __restrict__ items, const int* __restrict__ list_q,
                      const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                      const int* __restrict__ block_off, int n_seq,
                      T* __restrict__ part_o, float* __restrict__ part_lse,
                      int n_blocks_total, int n_heads_q, int n_heads_kv, int causal, float scale_log2,
                      const int* __restrict__ block_table, int max_pages, int page_size) {
    constexpr int THREADS = WARPS * 32;
    constexpr int M = 16 * MT * WARPS;   // rows of one query tile (MT m16 tiles per warp)
    constexpr int TQ = M / G;            // query tokens per tile
    constexpr int KT = MT == 1 ? 64 : 32;  // keys per online-softmax step (S registers: MT * KT / 2)
    constexpr int NT = KT / 8;           // n-tiles of S per step
    constexpr int DK = D / 16;           // k-steps of Q K^T
    constexpr int DN = D / 8;            // n-tiles of O
    static_assert(M % G == 0 && TQ >= 1, "a tile holds whole tokens");
    static_assert(BK % KT == 0, "block size must be a multiple of 64");
    static_assert(STAGES >= 2, "at least one query tile in flight while one is computed");

    PrefillItem it;
    if (!it.init(items, block_off, n_seq, cu_q, cu_k, n_blocks_total, KeyRows{block_table, max_pages, page_size})) return;
    const int count = it.count, start = it.start;
    const bool partly_visible = it.template partly_visible<BK>(list_q, causal);
    __shared__ unsigned nonfinite_v[BK / 32];  // keys whose V row held NaN or Inf (partly visible items)

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw);
    T* Vs = Ks + BK * D;
    T* Qs = Vs + BK * D;                                       // [STAGES][M * D]
    int* lim_s = reinterpret_cast<int*>(Qs + STAGES * M * D);  // [STAGES][TQ] visible keys of the block per token

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid < BK / 32) nonfinite_v[tid] = 0;

    // K and V block (rows past the sequence end are zero-filled and masked).
    it.template load_kv<D, BK, THREADS>(Ks, Vs, k, v, n_heads_kv, [](int row, int ch) { return swizzled<D>(row, ch); });
    const int n_tiles = (count + TQ - 1) / TQ;
    auto load_q_tile = [&](int tile, int buf) {
        it.template load_q_tile<D, M, G, BK, THREADS>(Qs + buf * M * D, lim_s + buf * TQ, q, list_q, n_heads_q, causal, tile,
                                                    [](int row, int ch) { return swizzled<D>(row, ch); });
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {  // K, V and the first STAGES - 1 query tiles
        if (st < n_tiles) load_q_tile(st, st);
        cp_async_commit();
    }

    const int grp = lane >> 2;
    for (int tile = 0; tile < n_tiles; ++tile) {
        const int buf = tile % STAGES;
        if (tile + STAGES - 1 < n_tiles) load_q_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();  // this tile's group (and K, V) have landed
        __syncthreads();
        if (tile == 0 && partly_visible) {
            zero_nonfinite_v<D, BK, THREADS>(Vs, nonfinite_v, [](int row, int ch) { return swizzled<D>(row, ch); });
            __syncthreads();
        }

        const int r0 = warp * 16 * MT;  // first tile row of this warp
        if (tile * TQ + r0 / G < count) {  // this warp has at least one real row
            const T* Qt = Qs + buf * M * D;
            unsigned qa[MT][DK][4];
            int lim[MT][2];      // visible keys of the block, rows grp and grp + 8 of each m-tile
            float m[MT][2], l[MT][2];
            float o[MT][DN][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int kk = 0; kk < DK; ++kk)
                    ldmatrix_x4(qa[mt][kk], Qt + swizzled<D>(r0 + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    lim[mt][h] = lim_s[buf * TQ + (r0 + mt * 16 + grp + 8 * h) / G];
                    m[mt][h] = MSA_NEG_INF;
                    l[mt][h] = 0.f;
                }
#pragma unroll
                for (int n = 0; n < DN; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
            }
            int lim_max = 0;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) lim_max = max(lim_max, max(lim[mt][0], lim[mt][1]));

#pragma unroll 1
            for (int kt = 0; kt < BK / KT; ++kt) {
                if (__all_sync(MSA_FULL_MASK, kt * KT >= lim_max))
                    break;  // every row of the warp is past its visible keys (warp-uniform exit)
                float s[MT][NT][4];
                qk_product<T, D, MT, NT>(s, qa, Ks, kt * KT);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int step_lim[2] = {lim[mt][0] - kt * KT, lim[mt][1] - kt * KT};
                    softmax_step<NT, DN>(s[mt], step_lim, scale_log2, m[mt], l[mt], o[mt]);
                }
                pv_product<T, D, MT, NT>(o, s, Vs, kt * KT);
                if (partly_visible) {  // the NaN and Inf of V zeroed above, for the rows that see them
                    for_each_marked<KT>(nonfinite_v + kt * (KT / 32), [&](int col) {
                        const int key = kt * KT + col;
                        const T* v_row = it.kv_row<D, BK>(v, key, n_heads_kv);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt)
                            add_back_nonfinite_v<D, NT>(
                                v_row, key, col, lim[mt], [&](int n, int h, int e) { return s[mt][n][2 * h + e]; },
                                [&](int n, int h, int e, float x) { o[mt][n][2 * h + e] += x; });
                    });
                }
            }
            const i64 row0 = ((i64)start + tile * TQ) * G;  // partial row of tile row 0
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float lt = row_weight(l[mt][h]);
                    const int r = r0 + mt * 16 + grp + 8 * h;
                    if (tile * TQ + r / G >= count) continue;
                    store_row<T, DN>(part_o + (row0 + r) * D, part_lse + row0 + r, o[mt], h, m[mt][h], lt, false);
                }
            }
        }
        __syncthreads();  // a later prefetch overwrites this tile's buffer
    }
}
