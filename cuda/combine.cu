// Log-sum-exp combine of the per-pick partial results of sparse attention.
//
// One half-warp (LANES = 16 lanes) per (query token, query head h): group g = h / G, head in
// group hh = h % G.  slot_pos[(row, g, slot)] is the partial row (list position) of each
// distinct pick, -1 for unused or repeated slots (decode: derived from block_indices).
// With lse_s and normalised o_s of the picks:
//     lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s
// Lane s reads slot s's position and lse (16 slots per pass, independent loads), the
// half-warp reduces max and weight sum with shuffles, then the partial rows are accumulated
// in slot order (deterministic).  Each lane owns D / 16 consecutive dims: a 256-byte bf16 row
// is one 16-byte load per lane.  This kernel is bound by reading the partials (K rows of G*D
// values per query and group).  No pick, or only empty ones: out = 0, lse = -inf.  Rows that
// the tile-outer kernel owns (row_mode, nullable: per (row, g), tile_schedule.cu) are left
// alone: that kernel writes their out and lse.  So are rows at or past cu_q[n_seq].
#include "attention.cuh"

template <typename T, int N> struct Partial;  // N consecutive partial values of one lane
template <typename T> struct Partial<T, 8> {  // 16-bit payloads: one 16-byte load
    float x[8];
    __device__ __forceinline__ void load(const T* src) {
        const uint4 u = *reinterpret_cast<const uint4*>(src);
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            T lo, hi;
            lo.bits = w[i] & 0xffff;
            hi.bits = w[i] >> 16;
            x[2 * i] = to_float(lo);
            x[2 * i + 1] = to_float(hi);
        }
    }
};
template <typename T> struct Partial<T, 4> {  // 16-bit payloads: one 8-byte load
    float x[4];
    __device__ __forceinline__ void load(const T* src) {
        const uint2 u = *reinterpret_cast<const uint2*>(src);
        T h[4];
        h[0].bits = u.x & 0xffff; h[1].bits = u.x >> 16; h[2].bits = u.y & 0xffff; h[3].bits = u.y >> 16;
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = to_float(h[i]);
    }
};

template <typename T, int D, int G, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
sparse_combine_kernel(const T* __restrict__ part_o, const float* __restrict__ part_lse,
                      const int* __restrict__ slot_pos, const int* __restrict__ block_indices,
                      int slots_from_indices, const unsigned char* __restrict__ row_mode,
                      const int* __restrict__ cu_q, int n_seq, int q_begin, int rows, int n_heads_q, int top_k,
                      T* __restrict__ out, float* __restrict__ lse_out) {
    constexpr int LANES = 16;
    constexpr int PER_LANE = D / LANES;
    static_assert(PER_LANE == 4 || PER_LANE == 8, "D must be 64 or 128");
    const int lane = threadIdx.x & (LANES - 1);
    const i64 pair = ((i64)blockIdx.x * WARPS * 32 + threadIdx.x) / LANES;
    // dead half-warps still join the shuffles; rows past the last query token (a prefill plan's
    // q rows past the step's tokens) are not the step's: left alone
    const bool live = pair < (i64)min(rows, cu_q[n_seq] - q_begin) * n_heads_q;
    const int row = live ? (int)(pair / n_heads_q) : 0, h = live ? (int)(pair % n_heads_q) : 0;
    const int n_heads_kv = n_heads_q / G, g = h / G, hh = h % G;
    const i64 row_g = ((i64)row * n_heads_kv + g) * top_k;  // first entry of this (query, group)
    const bool tile_row = live && row_mode != nullptr && row_mode[(i64)row * n_heads_kv + g];  // written by the tile kernel
    // partial row of slot s: slot_pos (prefill: list position) or, for decode, the entry
    // itself when it is the first occurrence of its block id (decode.cu's CTA mapping)
    auto partial_row = [&](int s) -> int {
        if (!live || tile_row || s >= top_k) return -1;
        if (slots_from_indices) return first_occurrence(block_indices + row_g, s) ? (int)(row_g + s) : -1;
        return slot_pos[row_g + s];
    };

    float mx = MSA_NEG_INF;  // NaN if a partial's lse is NaN (a NaN or +inf score)
    for (int s0 = 0; s0 < top_k; s0 += LANES) {
        const int p = partial_row(s0 + lane);
        if (p >= 0) mx = fmax_nan(mx, part_lse[(i64)p * G + hh]);
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) mx = fmax_nan(mx, __shfl_xor_sync(MSA_FULL_MASK, mx, off, LANES));
    // mx = -inf: no partial has weight (no seen key, or every seen score -inf): out 0, lse -inf.
    // Otherwise every used partial enters, weight 0 included: such a partial holds 0, or the
    // NaN that a seen key's non-finite v gives at weight 0, as in dense attention.
    const bool empty = mx == MSA_NEG_INF;

    float acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) acc[i] = 0.f;
    float total = 0.f;
    for (int s0 = 0; s0 < top_k; s0 += LANES) {  // uniform trip count across the warp
        const int p = partial_row(s0 + lane);
        const float w = p >= 0 && !empty ? __expf(part_lse[(i64)p * G + hh] - mx) : 0.f;
        total += w;
        const int n = min(LANES, top_k - s0);
#pragma unroll 4
        for (int j = 0; j < n; ++j) {
            const int pj = __shfl_sync(MSA_FULL_MASK, p, j, LANES);
            const float wj = __shfl_sync(MSA_FULL_MASK, w, j, LANES);
            if (pj >= 0 && !empty) {  // skips unused rows (which may hold anything)
                Partial<T, PER_LANE> part;
                part.load(part_o + ((i64)pj * G + hh) * D + lane * PER_LANE);
#pragma unroll
                for (int i = 0; i < PER_LANE; ++i) acc[i] += wj * part.x[i];
            }
        }
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) total += __shfl_xor_sync(MSA_FULL_MASK, total, off, LANES);
    if (!live || tile_row) return;
    const float inv = empty ? 0.f : 1.f / total;  // total NaN: NaN out
    const i64 dst = ((i64)(q_begin + row) * n_heads_q + h);
    unsigned packed[PER_LANE / 2];
#pragma unroll
    for (int i = 0; i < PER_LANE; i += 2)
        packed[i / 2] = from_float<T>(acc[i] * inv).bits | ((unsigned)from_float<T>(acc[i + 1] * inv).bits << 16);
    T* o = out + dst * D + lane * PER_LANE;
    if constexpr (PER_LANE == 8) *reinterpret_cast<uint4*>(o) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    else *reinterpret_cast<uint2*>(o) = make_uint2(packed[0], packed[1]);
    if (lane == 0) lse_out[dst] = empty ? MSA_NEG_INF : mx + __logf(total);
}
