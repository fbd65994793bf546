// Decode (few queries per sequence, long caches): query-outer split-K attention.
//
// One CTA per entry e = (query row, KV head g, slot) of block_indices, read directly: no
// reverse index, no sort, no schedule kernel (with 1-16 queries per sequence there is almost
// no key block shared between queries to reuse, and K * Hkv CTAs per query token keep the card
// busy even at batch 1).  Each distinct pick makes a partial (o, lse); unused (-1) and
// repeated slots none.  The row's partials are combined into out and lse (combine.cuh), in slot
// order, inside this launch: on sm_90 by the cluster of the (row, g)'s top_k CTAs through
// distributed shared memory, elsewhere by the CTA that finishes last (a counter per (row, g)).
// No combine launch, whose latency would cost as much as the attention itself at batch 1.
#include "combine.cuh"

// Split-K decode attention of one pick: WARPS warps; warp w owns keys
// [w * BK / WARPS, (w + 1) * BK / WARPS) of the block and the G query heads of the token (one
// m16 tile: rows >= G are zero and never written).  Keys the token does not see are never
// loaded (zero-filled), so a NaN or Inf in them cannot reach it.  Each warp loads
// its own K/V slice and its own copy of the query with cp.async and waits only for its own
// copies, so loads of all warps overlap and no CTA barrier sits between load and math; the
// WARPS partial softmax states (m, l, O) are merged once through shared memory.  Decode is
// bound by the bytes of the selected K/V: the split keeps 4x more loads in flight per CTA
// than one warp would, and the math of one warp shrinks to a quarter.
template <typename T, int D, int G, int BK, int WARPS>
__device__ __forceinline__ void decode_pick(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, int block, int seq, int k_start, int n_k,
                                            int visible, int token, int g, int n_heads_q, int n_heads_kv,
                                            T* __restrict__ pick_o, float* __restrict__ pick_lse,
                                            float scale_log2, const KeyRows& key_rows) {
    constexpr int KW = BK / WARPS;   // keys per warp
    constexpr int CH = D / 8;        // 16-byte chunks per row
    constexpr int NT = KW / 8;       // n-tiles of S per warp
    constexpr int DK = D / 16, DN = D / 8;
    static_assert(KW % 16 == 0 && G <= 16, "warp key slice must be a multiple of 16, G <= 16");

    const int key0 = block * BK;
    const int lim = visible - key0;  // visible keys of the block

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    T* Ks = reinterpret_cast<T*>(smem_raw) + warp * (2 * KW * D + 16 * D);
    T* Vs = Ks + KW * D;
    T* Qs = Vs + KW * D;
    const int kw0 = warp * KW;  // first key of this warp within the block
    for (int c = lane; c < KW * CH; c += 32) {
        const int row = c / CH, ch = c % CH;
        const int key = key0 + kw0 + row;
        const bool ok = key < n_k && kw0 + row < lim;  // invisible keys are masked: skip their bytes
        const i64 off = (key_rows.row(seq, k_start, ok ? key : key0) * n_heads_kv + g) * D + ch * 8;
        cp_async_16(Ks + swizzled<D>(row, ch), k + off, ok ? 16 : 0);
        cp_async_16(Vs + swizzled<D>(row, ch), v + off, ok ? 16 : 0);
    }
    for (int c = lane; c < 16 * CH; c += 32) {
        const int row = c / CH, ch = c % CH;
        const bool ok = row < G;
        const i64 off = ((i64)token * n_heads_q + g * G + (ok ? row : 0)) * D + ch * 8;
        cp_async_16(Qs + swizzled<D>(row, ch), q + off, ok ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();

    const int grp = lane >> 2, quad = lane & 3;
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) {
        unsigned a[4];
        ldmatrix_x4(a, Qs + swizzled<D>(lane & 15, kk * 2 + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            unsigned b[4];
            ldmatrix_x4(b, Ks + swizzled<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma_16x8x16<T>(s[2 * np], a, b0);
            mma_16x8x16<T>(s[2 * np + 1], a, b1);
        }
    }
    float m_a = MSA_NEG_INF, m_b = MSA_NEG_INF;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int col = kw0 + n * 8 + 2 * quad;
        s[n][0] = col < lim ? s[n][0] * scale_log2 : MSA_NEG_INF;
        s[n][1] = col + 1 < lim ? s[n][1] * scale_log2 : MSA_NEG_INF;
        s[n][2] = col < lim ? s[n][2] * scale_log2 : MSA_NEG_INF;
        s[n][3] = col + 1 < lim ? s[n][3] * scale_log2 : MSA_NEG_INF;
        m_a = fmax_nan(m_a, fmax_nan(s[n][0], s[n][1]));
        m_b = fmax_nan(m_b, fmax_nan(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        m_a = fmax_nan(m_a, __shfl_xor_sync(MSA_FULL_MASK, m_a, off));
        m_b = fmax_nan(m_b, __shfl_xor_sync(MSA_FULL_MASK, m_b, off));
    }
    const float base_a = m_a == MSA_NEG_INF ? 0.f : m_a, base_b = m_b == MSA_NEG_INF ? 0.f : m_b;
    float l_a = 0.f, l_b = 0.f;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        s[n][0] = exp2f(s[n][0] - base_a); s[n][1] = exp2f(s[n][1] - base_a);
        s[n][2] = exp2f(s[n][2] - base_b); s[n][3] = exp2f(s[n][3] - base_b);
        l_a += s[n][0] + s[n][1];
        l_b += s[n][2] + s[n][3];
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(MSA_FULL_MASK, l_a, off);
        l_b += __shfl_xor_sync(MSA_FULL_MASK, l_b, off);
    }
    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
#pragma unroll
    for (int j = 0; j < KW / 16; ++j) {
        unsigned pa[4];
        pack_p<T>(pa, s, j);
        const int key = j * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned b[4];
            ldmatrix_x4_trans(b, Vs + swizzled<D>(key, dp * 2 + (lane >> 4)));
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
            mma_16x8x16<T>(o[2 * dp], pa, b0);
            mma_16x8x16<T>(o[2 * dp + 1], pa, b1);
        }
    }
    // merge the WARPS states through shared memory: (m, l) per row, then each warp stores its
    // O rows rescaled to the common max; the sum over warps runs in fixed order (deterministic)
    __syncthreads();  // every warp is done with its K/V slice: reuse the space
    float* m_s = reinterpret_cast<float*>(smem_raw);       // [WARPS][16]
    float* l_s = m_s + WARPS * 16;                         // [WARPS][16]
    float* o_s = l_s + WARPS * 16;                         // [WARPS][16][D]
    if (quad == 0) {
        m_s[warp * 16 + grp] = m_a; m_s[warp * 16 + grp + 8] = m_b;
        l_s[warp * 16 + grp] = l_a; l_s[warp * 16 + grp + 8] = l_b;
    }
    __syncthreads();
    float mt_a = MSA_NEG_INF, mt_b = MSA_NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        mt_a = fmax_nan(mt_a, m_s[w * 16 + grp]);
        mt_b = fmax_nan(mt_b, m_s[w * 16 + grp + 8]);
    }
    const float sc_a = m_a == MSA_NEG_INF ? 0.f : exp2f(m_a - mt_a);
    const float sc_b = m_b == MSA_NEG_INF ? 0.f : exp2f(m_b - mt_b);
    float* ow = o_s + warp * 16 * D;
#pragma unroll
    for (int n = 0; n < DN; ++n) {
        const int col = n * 8 + 2 * quad;
        *reinterpret_cast<float2*>(ow + grp * D + col) = make_float2(o[n][0] * sc_a, o[n][1] * sc_a);
        *reinterpret_cast<float2*>(ow + (grp + 8) * D + col) = make_float2(o[n][2] * sc_b, o[n][3] * sc_b);
    }
    __syncthreads();
    // rows < G: sum the warps, normalise, write the pick's partial (o, lse): G rows at pick_o,
    // G values at pick_lse (global memory, or beyond the merge space in shared memory)
    for (int i = threadIdx.x; i < G * D / 2; i += WARPS * 32) {
        const int row = (2 * i) / D, col = (2 * i) % D;
        float mt = MSA_NEG_INF, lt = 0.f, x0 = 0.f, x1 = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mt = fmax_nan(mt, m_s[w * 16 + row]);
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float mw = m_s[w * 16 + row];
            if (mw != MSA_NEG_INF) lt += l_s[w * 16 + row] * exp2f(mw - mt);
            const float2 x = *reinterpret_cast<const float2*>(o_s + (w * 16 + row) * D + col);
            x0 += x.x;
            x1 += x.y;
        }
        // lt = 0: no weight (no seen key, or every seen score -inf), lse -inf; NaN lt
        // (a NaN or +inf score): NaN o and lse
        const float inv = lt == 0.f ? 0.f : 1.f / lt;
        store2<T>(pick_o + row * D + col, x0 * inv, x1 * inv);
        if (col == 0) pick_lse[row] = row_lse(mt, lt);
    }
}

template <int D, int WARPS>
constexpr int decode_merge_bytes() { return (2 * WARPS * 16 + WARPS * 16 * D) * 4; }  // decode_pick's m_s, l_s, o_s

// Compile-time cluster dims where clusters exist (sm_90): CLUSTER CTAs, or 1 (each CTA its own).
#if __CUDA_ARCH__ >= 900
#define MSA_DECODE_CLUSTER_DIMS(n) __cluster_dims__((n) > 0 ? (n) : 1, 1, 1)
#else
#define MSA_DECODE_CLUSTER_DIMS(n)
#endif

// Split-K decode attention of one pick per CTA (decode_pick), then the combine of its
// (row, g) into out and lse.  Rows at or past cu_q[n_seq] (a plan's rows past the step's tokens)
// are not combined: their out and lse are left alone.  Two ways to combine (CLUSTER):
// - 0: the CTA that finishes last (counters: one per (row, g) of the launch, zero before it and
//   after it) combines the partials, which every pick wrote to part_o / part_lse.  It is one
//   CTA's latency at batch 1, so it makes one trip to L2 where it can: the (row, g)'s picks are
//   read before the arrival; then every used slot's G partial rows (cp.async) and lse values are
//   staged in the K/V space at once (in chunks of slots when they do not fit: BK = 64 with
//   D = 128 and G = 16), and the half-warps combine from shared memory.
// - CLUSTER = top_k (sm_90): the top_k CTAs of a (row, g) are one thread-block cluster; each
//   keeps its partial in its own shared memory, and after a cluster barrier CTA s combines heads
//   s, s + CLUSTER, ... reading the slots' rows from the other CTAs' shared memory: no partials
//   in global memory, no counter, and the combine spread over the cluster instead of one CTA.
//   The same sums in the same order as CLUSTER = 0 (PairCombine over the slots in order, the
//   partials rounded to T alike): the two give the same bits.
// (at least 4 CTAs of 4 warps per SM, as shared memory allows for BK = 64: at most 128
// registers; left to itself ptxas chose 72 and spilled)
template <typename T, int D, int G, int BK, int WARPS, int CLUSTER>
__global__ void MSA_DECODE_CLUSTER_DIMS(CLUSTER) __launch_bounds__(WARPS * 32, 4)
sparse_decode_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     const int* block_indices, const int* __restrict__ cu_q,
                     const int* __restrict__ cu_k, int n_seq, int q_begin, int n_heads_q, int n_heads_kv,
                     int top_k, T* __restrict__ part_o, float* __restrict__ part_lse, unsigned* __restrict__ counters,
                     T* __restrict__ out, float* __restrict__ lse_out, int causal, float scale_log2,
                     const int* __restrict__ block_table, int max_pages, int page_size) {
    constexpr int THREADS = WARPS * 32;
    constexpr int HALF_WARPS = THREADS / COMBINE_LANES;
    const i64 entry = blockIdx.x;  // partial row block of this pick: entry * G + head
    const int slot = (int)(entry % top_k);  // with CLUSTER: the CTA's rank in its cluster
    const i64 row_g = entry - slot;  // first entry of this (row, g)
    const int* picks = block_indices + row_g;
    const int g = (int)((entry / top_k) % n_heads_kv);
    const int token = q_begin + (int)(entry / ((i64)top_k * n_heads_kv));
    // the step's lengths are inputs of the step, not the selection's: read before waiting for the
    // selection (launched programmatically, this kernel may start while the selection finishes).
    // block_indices, which the selection writes, is not __restrict__: ptxas may move read-only
    // (ld.global.nc) loads above griddepcontrol.wait, and on an H100 it did (stale picks).
    const int seq = sequence_of(cu_q, n_seq, token);
    const int q_start = cu_q[seq], n_q = cu_q[seq + 1] - q_start;
    const int k_start = cu_k[seq], n_k = cu_k[seq + 1] - k_start;
    const bool live = token < cu_q[n_seq];
    wait_for_previous_launch();
    const bool used = first_occurrence(picks, slot);
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // CLUSTER: the pick's partial beyond decode_pick's merge space (the host sizes for it)
    T* pick_o = CLUSTER ? reinterpret_cast<T*>(smem_raw + decode_merge_bytes<D, WARPS>()) : part_o + entry * G * D;
    float* pick_lse = CLUSTER ? reinterpret_cast<float*>(pick_o + G * D) : part_lse + entry * G;
    if (used)
        decode_pick<T, D, G, BK, WARPS>(q, k, v, picks[slot], seq, k_start, n_k,
                                        visible_keys(n_q, n_k, token - q_start, causal), token, g, n_heads_q,
                                        n_heads_kv, pick_o, pick_lse, scale_log2,
                                        KeyRows{block_table, max_pages, page_size});
    if constexpr (CLUSTER == 0) {
        const int pick = threadIdx.x < top_k ? picks[threadIdx.x] : -1;  // in flight during the arrival
        if (!last_to_arrive(counters + row_g / top_k, top_k) || !live) return;

        // shared memory (the K/V space is free): ids [top_k], has_partial [top_k] (the first
        // occurrence of its id), lse [top_k][G] (-inf for unused slots), the staged rows
        int* ids = reinterpret_cast<int*>(smem_raw);
        int* has_partial = ids + top_k;
        float* lse_s = reinterpret_cast<float*>(has_partial + top_k);
        const int header = ((2 * top_k + top_k * G) * 4 + 15) & ~15;
        T* rows_s = reinterpret_cast<T*>(smem_raw + header);
        unsigned smem_bytes;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
        const int chunk = ((int)smem_bytes - header) / (G * D * (int)sizeof(T));  // slots staged at once (>= 1)
        for (int s = threadIdx.x; s < top_k; s += THREADS) ids[s] = s < THREADS ? pick : picks[s];
        __syncthreads();
        for (int s = threadIdx.x; s < top_k; s += THREADS) has_partial[s] = first_occurrence(ids, s);
        __syncthreads();
        auto stage = [&](int c0) {  // the G partial rows of the used slots [c0, c0 + chunk)
            constexpr int CH = G * D * (int)sizeof(T) / 16;  // 16-byte pieces of a slot's rows
            const int c1 = min(c0 + chunk, top_k);
            for (int i = threadIdx.x; i < (c1 - c0) * CH; i += THREADS) {
                const int s = c0 + i / CH, piece = i % CH;
                if (has_partial[s])
                    cp_async_16(rows_s + (i64)(s - c0) * G * D + piece * 8, part_o + (row_g + s) * G * D + piece * 8);
            }
            cp_async_commit();
        };
        stage(0);
        for (int i = threadIdx.x; i < top_k * G; i += THREADS) {  // issued behind the rows: one trip for both
            const int s = i / G;
            lse_s[i] = has_partial[s] ? load_cg(part_lse + (row_g + s) * G + i % G) : MSA_NEG_INF;
        }
        cp_async_wait<0>();
        __syncthreads();

        // half-warp w combines heads w, w + HALF_WARPS, ... of the group (G < HALF_WARPS: some idle,
        // with no slot: they only join the shuffles)
        constexpr int HP = (G + HALF_WARPS - 1) / HALF_WARPS;  // heads per half-warp
        const int hw = (int)threadIdx.x / COMBINE_LANES;
        PairCombine<T, D, G> pc[HP];
#pragma unroll
        for (int j = 0; j < HP; ++j) {
            const int hh = min(hw + j * HALF_WARPS, G - 1);
            const bool mine = hw + j * HALF_WARPS < G;
            pc[j].weigh([&](int s) { return mine ? lse_s[s * G + hh] : MSA_NEG_INF; }, top_k);
        }
        for (int c0 = 0; c0 < top_k; c0 += chunk) {
            if (c0 > 0) {
                __syncthreads();  // every half-warp is done with the previous chunk
                stage(c0);
                cp_async_wait<0>();
                __syncthreads();
            }
#pragma unroll
            for (int j = 0; j < HP; ++j) {
                const int hh = min(hw + j * HALF_WARPS, G - 1);
                const bool mine = hw + j * HALF_WARPS < G;
                pc[j].add(rows_s, [&](int s) { return mine && has_partial[s] ? s - c0 : -1; },
                          [&](int s) { return lse_s[s * G + hh]; }, hh, c0, min(c0 + chunk, top_k));
            }
        }
#pragma unroll
        for (int j = 0; j < HP; ++j) {
            const int hh = hw + j * HALF_WARPS;
            const i64 dst = (i64)token * n_heads_q + g * G + hh;
            if (hh < G) pc[j].store(out + dst * D, lse_out + dst);
        }
    } else {
#if __CUDA_ARCH__ >= 900
        int* pick_used = reinterpret_cast<int*>(pick_lse + G);
        if (!used && (int)threadIdx.x < G) pick_lse[threadIdx.x] = MSA_NEG_INF;
        if (threadIdx.x == 0) *pick_used = used;
        cluster_sync();  // every pick's partial is in its CTA's shared memory
        // heads slot, slot + CLUSTER, ... of the group, half-warp j the j-th (its warp's other
        // half-warp, idle or not, joins the shuffles)
        constexpr int HEADS = (G + CLUSTER - 1) / CLUSTER;
        static_assert(HEADS <= HALF_WARPS, "a half-warp per head of the CTA");
        const int hw = (int)threadIdx.x / COMBINE_LANES;
        const int hh = slot + hw * CLUSTER;
        const bool mine = hw < HEADS && hh < G;
        if (live && (int)threadIdx.x / 32 < (HEADS + 1) / 2) {
            const int h = mine ? hh : 0;
            auto lse_of = [&](int s) { return cluster_map(pick_lse, s)[h]; };
            PairCombine<T, D, G> pc;
            pc.weigh([&](int s) { return mine ? lse_of(s) : MSA_NEG_INF; }, top_k);
            pc.add_blocks([&](int s) { return static_cast<const T*>(cluster_map(pick_o, s)); },
                          [&](int s) { return mine && *cluster_map(pick_used, s) ? s : -1; }, lse_of, h, 0, top_k);
            const i64 dst = (i64)token * n_heads_q + g * G + h;
            if (mine) pc.store(out + dst * D, lse_out + dst);
        }
        cluster_sync();  // no CTA leaves while the others read its shared memory
#endif
    }
}

#undef MSA_DECODE_CLUSTER_DIMS
