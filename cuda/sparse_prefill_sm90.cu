// KV-outer block-sparse attention for prefill on Hopper (sm_90a): sparse_prefill.cu's kernel
// (same work items, inputs and partial outputs; its header says what they are) with both
// products on wgmma, for D = BK = 128.
//
// A partial covers exactly one key block, so there is no online softmax: per query tile a
// warpgroup computes S = Q K^T (64 rows x 128 keys, wgmma with Q from registers and K from
// shared memory), masks and exponentiates it in registers, and O = P V (P from registers,
// V read MN-major from shared memory: the same swizzled [key][D] tile, transposed by the
// descriptor).  CTA: WGS warpgroups, each on its own 64-row part of a query tile of
// 64 * WGS rows; K and V stay in shared memory for the CTA's whole item.
#include "attention.cuh"
#include "wgmma.cuh"

template <typename T, int D, int G, int BK, int WGS, int STAGES>
__global__ void __launch_bounds__(128 * WGS, WGS == 1 ? 2 : 1)
sparse_prefill_sm90_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const int* __restrict__ items, const int* __restrict__ list_q,
                           const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                           const int* __restrict__ block_off, int n_seq,
                           T* __restrict__ part_o, float* __restrict__ part_lse,
                           int n_blocks_total, int n_heads_q, int n_heads_kv, int causal, float scale_log2,
                           const int* __restrict__ block_table, int max_pages, int page_size) {
    static_assert(D == 128 && BK == 128, "wgmma tiles: m64n128 over D = BK = 128");
    constexpr int THREADS = 128 * WGS;
    constexpr int M = 64 * WGS;          // rows of one query tile
    constexpr int TQ = M / G;            // query tokens per tile
    constexpr int KS = D / 16;           // k16 steps of Q K^T
    constexpr int JS = BK / 16;          // k16 steps of P V
    static_assert(M % G == 0 && TQ >= 1, "a tile holds whole tokens");
    static_assert(STAGES >= 2, "at least one query tile in flight while one is computed");

    PrefillItem it;
    if (!it.init(items, block_off, n_seq, cu_q, cu_k, n_blocks_total, KeyRows{block_table, max_pages, page_size})) return;
    const int count = it.count, start = it.start;
    const bool partly_visible = it.template partly_visible<BK>(list_q, causal);
    __shared__ unsigned nonfinite_v[BK / 32];  // keys whose V row held NaN or Inf (partly visible items)

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));  // [BK x D]
    T* Vs = Ks + BK * D;                                       // [BK x D]
    T* Qs = Vs + BK * D;                                       // [STAGES][M x D]
    int* lim_s = reinterpret_cast<int*>(Qs + STAGES * M * D);  // [STAGES][TQ] visible keys of the block per token

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = warp >> 2, wq = warp & 3;
    const int grp = lane >> 2, quad = lane & 3;
    if (tid < BK / 32) nonfinite_v[tid] = 0;

    it.template load_kv<D, BK, THREADS>(Ks, Vs, k, v, n_heads_kv, [](int row, int ch) { return swizzled_panel<D, BK>(row, ch); });
    const int n_tiles = (count + TQ - 1) / TQ;
    auto load_q_tile = [&](int tile, int buf) {
        it.template load_q_tile<D, M, G, BK, THREADS>(Qs + buf * M * D, lim_s + buf * TQ, q, list_q, n_heads_q, causal, tile,
                                                    [](int row, int ch) { return swizzled_panel<D, M>(row, ch); });
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {  // K, V and the first STAGES - 1 query tiles
        if (st < n_tiles) load_q_tile(st, st);
        cp_async_commit();
    }
    const unsigned k_base = smem_addr(Ks), v_base = smem_addr(Vs);

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int buf = tile % STAGES;
        if (tile + STAGES - 1 < n_tiles) load_q_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();  // this tile's group (and K, V) have landed
        fence_proxy_async();
        __syncthreads();
        if (tile == 0 && partly_visible) {
            zero_nonfinite_v<D, BK, THREADS>(Vs, nonfinite_v, [](int row, int ch) { return swizzled_panel<D, BK>(row, ch); });
            fence_proxy_async();  // generic-proxy writes to V, read next by wgmma
            __syncthreads();
        }

        // every warpgroup computes, padding rows too (zero-filled, never stored): a wgmma
        // under a branch the compiler cannot prove warpgroup-uniform is serialized
        const T* Qt = Qs + buf * M * D;
        const int r0 = wg * 64 + wq * 16;  // this warp's first tile row
        unsigned qa[KS][4];
#pragma unroll
        for (int kk = 0; kk < KS; ++kk)
            ldmatrix_x4(qa[kk], Qt + swizzled_panel<D, M>(r0 + (lane & 15), kk * 2 + (lane >> 4)));
        int lim[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) lim[h] = lim_s[buf * TQ + (r0 + grp + 8 * h) / G];

        float s[64];  // S = Q K^T: rows r0 + grp (+8), keys 8 * (i / 4) + 2 * quad + i % 2
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KS; ++kk)  // K-major K: panel kk / 4, 32 bytes per k16 step
            wgmma_m64n128k16<T>(s, qa[kk], wgmma_desc_sw128(k_base + (kk >> 2) * (BK * 128) + (kk & 3) * 32), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(s);

        // softmax over the block in the log2 domain; masked keys -> -inf -> p = 0
        float mx[2] = {MSA_NEG_INF, MSA_NEG_INF}, sum[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 64; ++i) {
            const int h = (i >> 1) & 1, col = 8 * (i >> 2) + 2 * quad + (i & 1);
            s[i] = col < lim[h] ? s[i] * scale_log2 : MSA_NEG_INF;
            mx[h] = fmax_nan(mx[h], s[i]);
        }
        float base[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            mx[h] = fmax_nan(mx[h], __shfl_xor_sync(MSA_FULL_MASK, mx[h], 1));
            mx[h] = fmax_nan(mx[h], __shfl_xor_sync(MSA_FULL_MASK, mx[h], 2));
            base[h] = mx[h] == MSA_NEG_INF ? 0.f : mx[h];
        }
        unsigned pa[JS][4];  // P as the A operand of P V: k16 step j = keys 16j.. (S n-tiles 2j, 2j+1)
#pragma unroll
        for (int i = 0; i < 64; ++i) {
            const int h = (i >> 1) & 1;
            s[i] = exp2f(s[i] - base[h]);
            sum[h] += s[i];
        }
#pragma unroll
        for (int j = 0; j < JS; ++j) pack_p<T>(pa[j], reinterpret_cast<const float(&)[BK / 8][4]>(s), j);

        float o[64];  // O = P V: rows as S, columns d = 8 * (i / 4) + 2 * quad + i % 2
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < JS; ++j)  // MN-major V: 16 keys = two 1024-byte atoms per step, panels 16 KB apart
            wgmma_m64n128k16<T, 1>(o, pa[j], wgmma_desc_sw128(v_base + j * 2048, BK * 128, 1024), j > 0);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(o);
        if (partly_visible) {  // the NaN and Inf of V zeroed above, for the rows that see them
            for (int w = 0; w < BK / 32; ++w) {
                for (unsigned bits = nonfinite_v[w]; bits; bits &= bits - 1) {
                    const int key = w * 32 + __ffs(bits) - 1;
                    add_back_nonfinite_v<D, BK / 8>(  // p from the packed A operand of P V
                        it.kv_row<D, BK>(v, key, n_heads_kv), key, key, lim,
                        [&](int n, int h, int e) { return packed_p<T>(pa, n, h, e); },
                        [&](int n, int h, int e, float x) { o[4 * n + 2 * h + e] += x; });
                }
            }
        }

        const i64 row0 = ((i64)start + tile * TQ) * G;  // partial row of tile row 0
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float lt = sum[h];
            lt += __shfl_xor_sync(MSA_FULL_MASK, lt, 1);
            lt += __shfl_xor_sync(MSA_FULL_MASK, lt, 2);
            const int r = r0 + grp + 8 * h;
            if (tile * TQ + r / G >= count) continue;
            // lt = 0: no weight (no seen key, or every seen score -inf), lse -inf; NaN lt
            // (a NaN or +inf score): NaN o and lse
            const float inv = lt == 0.f ? 0.f : 1.f / lt;
            T* dst = part_o + (row0 + r) * D + 2 * quad;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) store2<T>(dst + n * 8, o[4 * n + 2 * h] * inv, o[4 * n + 2 * h + 1] * inv);
            if (quad == 0) part_lse[row0 + r] = row_lse(base[h], lt);
        }
        __syncthreads();  // a later prefetch overwrites this tile's buffer
    }
}
