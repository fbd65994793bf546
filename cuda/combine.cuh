// The log-sum-exp combine of the per-pick partial results of one (query token, query head),
// by a half-warp (LANES = 16 lanes): the combine kernel (combine.cu, KV-outer prefill) runs it
// for every pair from global memory, the decode kernel (decode.cu) in the CTA that finishes a
// (token, group) last, from partials it staged in shared memory.  With lse_s and normalised
// o_s of the picks:
//     lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s
// weigh(): lane s reads slot s's lse (16 slots per pass), the half-warp reduces the maximum
// and the weight sum with shuffles.  add(): the partial rows of a range of slots are
// accumulated in slot order (deterministic; the same sums whatever ranges a caller cuts the
// slots into).  Each lane owns D / 16 consecutive dims: a 256-byte bf16 row is one 16-byte load
// per lane.  No pick, or only empty ones: out = 0, lse = -inf.
#pragma once
#include "attention.cuh"

constexpr int COMBINE_LANES = 16;

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

// Every lane of the warp calls each step (dead half-warps too: they join the shuffles).
// lse_of(s): the lse of slot s's partial (s < top_k), -inf when the slot has none (unused or
// repeated slot, or a pair nobody writes).  row_of(s): the partial row block p of slot s
// (its row for head hh at o + (p * G + hh) * D), -1 when none.
template <typename T, int D, int G>
struct PairCombine {
    static constexpr int LANES = COMBINE_LANES;
    static constexpr int PER_LANE = D / LANES;
    static_assert(PER_LANE == 4 || PER_LANE == 8, "D must be 64 or 128");
    float mx, total, acc[PER_LANE];

    // mx = -inf: no partial has weight (no seen key, or every seen score -inf): out 0, lse -inf.
    // Otherwise every used partial enters, weight 0 included: such a partial holds 0, or the
    // NaN that a seen key's non-finite v gives at weight 0, as in dense attention.
    __device__ __forceinline__ bool empty() const { return mx == MSA_NEG_INF; }
    __device__ __forceinline__ float weight(float lse_s) const {
        return !empty() && lse_s != MSA_NEG_INF ? __expf(lse_s - mx) : 0.f;
    }

    template <typename LseOf>
    __device__ __forceinline__ void weigh(LseOf lse_of, int top_k) {
        const int lane = threadIdx.x & (LANES - 1);
        mx = MSA_NEG_INF;  // NaN if a partial's lse is NaN (a NaN or +inf score)
        for (int s = lane; s < top_k; s += LANES) mx = fmax_nan(mx, lse_of(s));
#pragma unroll
        for (int off = LANES / 2; off > 0; off >>= 1) mx = fmax_nan(mx, __shfl_xor_sync(MSA_FULL_MASK, mx, off, LANES));
        total = 0.f;
        for (int s = lane; s < top_k; s += LANES) total += weight(lse_of(s));
#pragma unroll
        for (int off = LANES / 2; off > 0; off >>= 1) total += __shfl_xor_sync(MSA_FULL_MASK, total, off, LANES);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) acc[i] = 0.f;
    }

    // slots [s_begin, s_end), after weigh(); unused rows (which may hold anything) are neither
    // loaded nor added
    template <typename RowOf, typename LseOf>
    __device__ __forceinline__ void add(const T* o, RowOf row_of, LseOf lse_of, int hh, int s_begin, int s_end) {
        add_blocks([&](int p) { return o + (i64)p * G * D; }, row_of, lse_of, hh, s_begin, s_end);
    }
    // add() with partial row block p at block_at(p), wherever it is (the decode cluster: in the
    // shared memory of the cluster's CTA p)
    template <typename BlockAt, typename RowOf, typename LseOf>
    __device__ __forceinline__ void add_blocks(BlockAt block_at, RowOf row_of, LseOf lse_of, int hh, int s_begin,
                                               int s_end) {
        const int lane = threadIdx.x & (LANES - 1);
        for (int s0 = s_begin; s0 < s_end; s0 += LANES) {  // uniform trip count across the warp
            const int s = s0 + lane;
            const int p = s < s_end ? row_of(s) : -1;
            const float w = p >= 0 ? weight(lse_of(s)) : 0.f;
            const int n = min(LANES, s_end - s0);
#pragma unroll 4
            for (int j = 0; j < n; ++j) {
                const int pj = __shfl_sync(MSA_FULL_MASK, p, j, LANES);
                const float wj = __shfl_sync(MSA_FULL_MASK, w, j, LANES);
                if (pj >= 0 && !empty()) {
                    Partial<T, PER_LANE> part;
                    part.load(block_at(pj) + hh * D + lane * PER_LANE);
#pragma unroll
                    for (int i = 0; i < PER_LANE; ++i) acc[i] += wj * part.x[i];
                }
            }
        }
    }

    __device__ __forceinline__ void store(T* o_dst, float* lse_dst) const {
        const int lane = threadIdx.x & (LANES - 1);
        const float inv = empty() ? 0.f : 1.f / total;  // total NaN: NaN out
        unsigned packed[PER_LANE / 2];
#pragma unroll
        for (int i = 0; i < PER_LANE; i += 2)
            packed[i / 2] = from_float<T>(acc[i] * inv).bits | ((unsigned)from_float<T>(acc[i + 1] * inv).bits << 16);
        T* dst = o_dst + lane * PER_LANE;
        if constexpr (PER_LANE == 8) *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        else *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
        if (lane == 0) *lse_dst = empty() ? MSA_NEG_INF : mx + __logf(total);
    }
};
