// Log-sum-exp combine of the per-pick partial results of the KV-outer sparse prefill
// (combine.cuh: the math of one pair).
//
// One half-warp per (query token, query head h): group g = h / G, head in group hh = h % G.
// slot_pos[(row, g, slot)] is the partial row (list position) of each distinct pick, -1 for
// unused or repeated slots.  This kernel is bound by reading the partials (K rows of G*D
// values per query and group).  Rows that the tile-outer kernel owns (row_mode, nullable: per
// (row, g), tile_schedule.cu) are left alone: that kernel writes their out and lse.  So are
// rows at or past cu_q[n_seq].  (Decode combines in its own kernel: decode.cu.)
#include "combine.cuh"

// (6 CTAs of 8 warps per SM, at most 40 registers: many pairs in flight, the kernel is bound by
// the bytes of the partials)
template <typename T, int D, int G, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 6)
sparse_combine_kernel(const T* __restrict__ part_o, const float* __restrict__ part_lse,
                      const int* __restrict__ slot_pos, const unsigned char* __restrict__ row_mode,
                      const int* __restrict__ cu_q, int n_seq, int q_begin, int rows, int n_heads_q, int top_k,
                      T* __restrict__ out, float* __restrict__ lse_out) {
    const i64 pair = ((i64)blockIdx.x * WARPS * 32 + threadIdx.x) / COMBINE_LANES;
    // dead half-warps still join the shuffles; rows past the last query token (a prefill plan's
    // q rows past the step's tokens) are not the step's: left alone
    const bool live = pair < (i64)min(rows, cu_q[n_seq] - q_begin) * n_heads_q;
    const int row = live ? (int)(pair / n_heads_q) : 0, h = live ? (int)(pair % n_heads_q) : 0;
    const int n_heads_kv = n_heads_q / G, g = h / G, hh = h % G;
    const i64 row_g = ((i64)row * n_heads_kv + g) * top_k;  // first entry of this (query, group)
    const bool tile_row = live && row_mode != nullptr && row_mode[(i64)row * n_heads_kv + g];  // written by the tile kernel
    const bool write = live && !tile_row;
    auto row_of = [&](int s) { return write ? slot_pos[row_g + s] : -1; };
    auto lse_of = [&](int s) {
        const int p = row_of(s);
        return p >= 0 ? part_lse[(i64)p * G + hh] : MSA_NEG_INF;
    };
    PairCombine<T, D, G> pc;
    pc.weigh(lse_of, top_k);
    pc.add(part_o, row_of, lse_of, hh, 0, top_k);
    const i64 dst = (i64)(q_begin + row) * n_heads_q + h;
    if (write) pc.store(out + dst * D, lse_out + dst);
}
