// The log-sum-exp combine of the per-pick partial results of one (query token, query head),
// by a half-warp (LANES = 16 lanes): the combine kernel (combine.cu, KV-outer prefill) runs it
// for every pair, the decode kernel (decode.cu) in the CTA that finishes a (token, group) last.
// With lse_s and normalised o_s of the picks:
//     lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s
// Lane s reads slot s's partial row and lse (16 slots per pass, independent loads), the
// half-warp reduces max and weight sum with shuffles, then the partial rows are accumulated
// in slot order (deterministic).  Each lane owns D / 16 consecutive dims: a 256-byte bf16 row
// is one 16-byte load per lane.  Partials are read through L2 (load_cg): the decode kernel
// reads what other CTAs of its launch wrote.  No pick, or only empty ones: out = 0, lse = -inf.
#pragma once
#include "attention.cuh"

constexpr int COMBINE_LANES = 16;
constexpr int COMBINE_IN_FLIGHT = 8;  // partial rows a lane loads before it sums them (16: the decode kernel spills)

// N consecutive 16-bit partial values of one lane (one 16-byte or 8-byte load), kept packed
// until they are summed: a lane holds the rows of 16 slots in flight at once.
template <typename T, int N> struct Partial {
    static_assert(N == 8 || N == 4, "8 or 4 values a lane");
    unsigned w[N / 2];
    __device__ __forceinline__ void load(const T* src) {
        if constexpr (N == 8) {
            const uint4 u = load_cg(reinterpret_cast<const uint4*>(src));
            w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
        } else {
            const uint2 u = load_cg(reinterpret_cast<const uint2*>(src));
            w[0] = u.x; w[1] = u.y;
        }
    }
    __device__ __forceinline__ float at(int i) const {  // i: a constant after unrolling
        T h;
        h.bits = (i % 2 == 0) ? (w[i / 2] & 0xffff) : (w[i / 2] >> 16);
        return to_float(h);
    }
};

// Every lane of the warp calls it (dead half-warps too: they join the shuffles).  partial_row(s):
// the partial row of slot s (< top_k), -1 for none (unused or repeated slot, or a pair this
// half-warp does not write: then every slot is -1).  hh: the head within its group (partial
// rows hold G heads); o_dst/lse_dst: where the pair's result goes, written when `write`.
template <typename T, int D, int G, typename RowOf>
__device__ __forceinline__ void combine_pair(const T* part_o, const float* part_lse, RowOf partial_row, int top_k,
                                             int hh, bool write, T* o_dst, float* lse_dst) {
    constexpr int LANES = COMBINE_LANES;
    constexpr int PER_LANE = D / LANES;
    static_assert(PER_LANE == 4 || PER_LANE == 8, "D must be 64 or 128");
    const int lane = threadIdx.x & (LANES - 1);

    float mx = MSA_NEG_INF;  // NaN if a partial's lse is NaN (a NaN or +inf score)
    for (int s0 = 0; s0 < top_k; s0 += LANES) {
        const int p = s0 + lane < top_k ? partial_row(s0 + lane) : -1;
        if (p >= 0) mx = fmax_nan(mx, load_cg(part_lse + (i64)p * G + hh));
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
        const int p = s0 + lane < top_k ? partial_row(s0 + lane) : -1;
        const float w = p >= 0 && !empty ? __expf(load_cg(part_lse + (i64)p * G + hh) - mx) : 0.f;
        total += w;
        const int n = min(LANES, top_k - s0);
        // COMBINE_IN_FLIGHT slots' partial rows in flight at once, then summed in slot order;
        // unused rows (which may hold anything) are neither loaded nor added
#pragma unroll
        for (int j0 = 0; j0 < LANES; j0 += COMBINE_IN_FLIGHT) {
            Partial<T, PER_LANE> part[COMBINE_IN_FLIGHT];
#pragma unroll
            for (int j = j0; j < j0 + COMBINE_IN_FLIGHT; ++j) {
                const int pj = __shfl_sync(MSA_FULL_MASK, p, j, LANES);
                if (j < n && pj >= 0 && !empty) part[j - j0].load(part_o + ((i64)pj * G + hh) * D + lane * PER_LANE);
            }
#pragma unroll
            for (int j = j0; j < j0 + COMBINE_IN_FLIGHT; ++j) {
                const int pj = __shfl_sync(MSA_FULL_MASK, p, j, LANES);
                const float wj = __shfl_sync(MSA_FULL_MASK, w, j, LANES);
                if (j < n && pj >= 0 && !empty) {
#pragma unroll
                    for (int i = 0; i < PER_LANE; ++i) acc[i] += wj * part[j - j0].at(i);
                }
            }
        }
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) total += __shfl_xor_sync(MSA_FULL_MASK, total, off, LANES);
    if (!write) return;
    const float inv = empty ? 0.f : 1.f / total;  // total NaN: NaN out
    unsigned packed[PER_LANE / 2];
#pragma unroll
    for (int i = 0; i < PER_LANE; i += 2)
        packed[i / 2] = from_float<T>(acc[i] * inv).bits | ((unsigned)from_float<T>(acc[i + 1] * inv).bits << 16);
    T* o = o_dst + lane * PER_LANE;
    if constexpr (PER_LANE == 8) *reinterpret_cast<uint4*>(o) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    else *reinterpret_cast<uint2*>(o) = make_uint2(packed[0], packed[1]);
    if (lane == 0) *lse_dst = empty ? MSA_NEG_INF : mx + __logf(total);
}
