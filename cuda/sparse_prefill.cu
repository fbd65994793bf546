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
// the BK / KT sub-tiles in the log2 domain, P fed from registers into O += P V.  Keys past the
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

    const int grp = lane >> 2, quad = lane & 3;
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
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < DK; ++kk) {
#pragma unroll
                    for (int np = 0; np < NT / 2; ++np) {
                        unsigned b[4];  // one K fragment load feeds all MT m-tiles
                        const int key = kt * KT + np * 16 + (lane & 7) + ((lane >> 4) << 3);
                        ldmatrix_x4(b, Ks + swizzled<D>(key, kk * 2 + ((lane >> 3) & 1)));
                        const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_16x8x16<T>(s[mt][2 * np], qa[mt][kk], b0);
                            mma_16x8x16<T>(s[mt][2 * np + 1], qa[mt][kk], b1);
                        }
                    }
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    // scale to log2 units, mask, running max, rescale
                    float mx[2] = {MSA_NEG_INF, MSA_NEG_INF};
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int col = kt * KT + n * 8 + 2 * quad + (e & 1);
                            s[mt][n][e] = col < lim[mt][e >> 1] ? s[mt][n][e] * scale_log2 : MSA_NEG_INF;
                            mx[e >> 1] = fmax_nan(mx[e >> 1], s[mt][n][e]);
                        }
                    }
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
#pragma unroll
                        for (int off = 1; off < 4; off <<= 1)
                            mx[h] = fmax_nan(mx[h], __shfl_xor_sync(MSA_FULL_MASK, mx[h], off));
                        const float new_m = fmax_nan(m[mt][h], mx[h]);
                        const float base = new_m == MSA_NEG_INF ? 0.f : new_m;
                        const float alpha = exp2f(m[mt][h] - base);
                        m[mt][h] = new_m;
                        float sum = 0.f;
#pragma unroll
                        for (int n = 0; n < NT; ++n) {
                            s[mt][n][2 * h] = exp2f(s[mt][n][2 * h] - base);
                            s[mt][n][2 * h + 1] = exp2f(s[mt][n][2 * h + 1] - base);
                            sum += s[mt][n][2 * h] + s[mt][n][2 * h + 1];
                        }
                        l[mt][h] = l[mt][h] * alpha + sum;
#pragma unroll
                        for (int n = 0; n < DN; ++n) {
                            o[mt][n][2 * h] *= alpha;
                            o[mt][n][2 * h + 1] *= alpha;
                        }
                    }
                }
                // O += P V, P from registers (the S accumulator layout is the A layout)
#pragma unroll
                for (int j = 0; j < KT / 16; ++j) {
                    unsigned pa[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        pa[mt][0] = pack2<T>(s[mt][2 * j][0], s[mt][2 * j][1]);
                        pa[mt][1] = pack2<T>(s[mt][2 * j][2], s[mt][2 * j][3]);
                        pa[mt][2] = pack2<T>(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
                        pa[mt][3] = pack2<T>(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
                    }
                    const int key = kt * KT + j * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
                    for (int dp = 0; dp < D / 16; ++dp) {
                        unsigned b[4];  // one V fragment load feeds all MT m-tiles
                        ldmatrix_x4_trans(b, Vs + swizzled<D>(key, dp * 2 + (lane >> 4)));
                        const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_16x8x16<T>(o[mt][2 * dp], pa[mt], b0);
                            mma_16x8x16<T>(o[mt][2 * dp + 1], pa[mt], b1);
                        }
                    }
                }
                if (partly_visible) {  // the NaN and Inf of V zeroed above, for the rows that see them
#pragma unroll
                    for (int w = 0; w < KT / 32; ++w) {
                        for (unsigned bits = nonfinite_v[kt * (KT / 32) + w]; bits; bits &= bits - 1) {
                            const int col = w * 32 + __ffs(bits) - 1, key = kt * KT + col;
                            const T* v_row = v + ((i64)(it.k_start + it.block * BK + key) * n_heads_kv + it.g) * D;
#pragma unroll
                            for (int mt = 0; mt < MT; ++mt)
                                add_back_nonfinite_v<D, NT>(
                                    v_row, key, col, lim[mt], [&](int n, int h, int e) { return s[mt][n][2 * h + e]; },
                                    [&](int n, int h, int e, float x) { o[mt][n][2 * h + e] += x; });
                        }
                    }
                }
            }
            const i64 row0 = ((i64)start + tile * TQ) * G;  // partial row of tile row 0
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float lt = l[mt][h];
#pragma unroll
                    for (int off = 1; off < 4; off <<= 1) lt += __shfl_xor_sync(MSA_FULL_MASK, lt, off);
                    const int r = r0 + mt * 16 + grp + 8 * h;
                    if (tile * TQ + r / G >= count) continue;
                    // lt = 0: no weight (no seen key, or every seen score -inf), lse -inf; NaN lt
                    // (a NaN or +inf score): NaN o and lse
                    const float inv = lt == 0.f ? 0.f : 1.f / lt;
                    T* dst = part_o + (row0 + r) * D + 2 * quad;
#pragma unroll
                    for (int n = 0; n < DN; ++n) store2<T>(dst + n * 8, o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
                    if (quad == 0) part_lse[row0 + r] = lt == 0.f ? MSA_NEG_INF : (m[mt][h] + __log2f(lt)) * MSA_LN2;
                }
            }
        }
        __syncthreads();  // a later prefetch overwrites this tile's buffer
    }
}
