// Exp-free top-k over materialized float32 block scores, and the merge of partial lists.
//
// topk_kernel: scores (total_q, Hkv, W) float32 -> block_indices (total_q, Hkv, top_k) int32.
//   One warp per row (query, group); WARPS rows per CTA.  The warp finds the row's sequence
//   by binary search of cu_q, then streams only the row's visible blocks [0, n_visible_blocks)
//   (causal rows skip the masked tail: half the bytes of a causal prefill) in chunks of
//   32 x VEC x UNROLL scores (VEC-wide loads, UNROLL in flight per lane).  The list is 32 keys
//   sorted across the lanes (warp_topk.cuh).  Per chunk: (1) each lane's best score joins the
//   list in one bitonic sort-merge (or a few inserts): the threshold jumps to at least the
//   k-th best lane maximum at once; (2) the other scores pass a float pre-filter against the
//   threshold's score (a compare and a vote per score: the only per-element work) and the rare
//   survivors are inserted one by one (ballot + shfl_up).  No sort of the row, no exponentials.  Forced
//   (local, sink) blocks enter first with the top key and are hidden from the scan.
//   Output: ascending ids, -1 padding.
#include "common.cuh"
#include "warp_topk.cuh"

constexpr int TOPK_UNROLL = 4;     // independent loads per lane before the first use (8 measured slower)

template <int VEC, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
topk_kernel(const float* __restrict__ scores, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
            int* __restrict__ out, i64 n_rows, int n_seq, int n_heads, int width, int top_k,
            int block_size, int local_blocks, int sink_blocks, int causal) {
    constexpr int PER_LANE = VEC * TOPK_UNROLL;   // scores a lane holds per chunk
    constexpr int CHUNK = 32 * PER_LANE;
    const i64 row = (i64)blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= n_rows) return;
    const int lane = threadIdx.x & 31;
    const int q = (int)(row / n_heads);

    // sequence s with cu_q[s] <= q < cu_q[s + 1] (empty sequences skipped by the search)
    int lo = 0, hi = n_seq;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (cu_q[mid] <= q) lo = mid; else hi = mid;
    }
    const int nq = cu_q[lo + 1] - cu_q[lo];
    const int nk = cu_k[lo + 1] - cu_k[lo];
    const int pos = query_position(nq, nk, q - cu_q[lo]);
    const int n_visible = causal ? min(max(pos + 1, 0), nk) : nk;
    const int n_vis_blocks = (n_visible + block_size - 1) / block_size;
    const int local = min(max(pos, 0), max(nk - 1, 0)) / block_size;
    const int forced_lo = local - local_blocks + 1;  // forced local range [forced_lo, local]

    WarpTopK best;
    best.init(top_k, lane);
    // forced blocks first (at most top_k <= 32 of them: one per lane and set)
    {
        const int sink = lane, near = local - lane;
        const bool sink_ok = lane < sink_blocks && sink < n_vis_blocks;
        const bool near_ok = lane < local_blocks && near >= sink_blocks && near >= 0 && near < n_vis_blocks;
        best.offer(sink_ok ? msa_block_key(0.f, sink, true) : 0ull);
        best.offer(near_ok ? msa_block_key(0.f, near, true) : 0ull);
    }
    const float* row_scores = scores + row * (i64)width;

    for (int base = 0; base < n_vis_blocks; base += CHUNK) {
        float v[PER_LANE];
#pragma unroll
        for (int u = 0; u < TOPK_UNROLL; ++u) {
            const int e = base + (u * 32 + lane) * VEC;
            if (VEC == 4 && e + VEC <= n_vis_blocks) {
                const float4 f = *reinterpret_cast<const float4*>(row_scores + e);
                v[u * VEC] = f.x; v[(u * VEC + 1) % PER_LANE] = f.y;
                v[(u * VEC + 2) % PER_LANE] = f.z; v[(u * VEC + 3) % PER_LANE] = f.w;
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[u * VEC + i] = (e + i < n_vis_blocks) ? row_scores[e + i] : MSA_NEG_INF;
            }
        }
        auto block_of = [&](int j) { return base + ((j / VEC) * 32 + lane) * VEC + j % VEC; };
        // forced blocks are already in the list: hide them (only chunks that hold one)
        if (base < sink_blocks || (local_blocks > 0 && base <= local && base + CHUNK > forced_lo)) {
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j)
                if (msa_is_forced(block_of(j), local, local_blocks, sink_blocks)) v[j] = MSA_NEG_INF;
        }
        // 1. each lane's best score (strict '>' over ascending ids: the lower id wins ties;
        //    NaN never compares greater) joins the list in one merge
        float lane_max = MSA_NEG_INF;
        int lane_arg = 0;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j)
            if (v[j] > lane_max) { lane_max = v[j]; lane_arg = j; }
        const u64 lane_key = msa_block_key(lane_max, block_of(lane_arg), false);
        const unsigned want = __ballot_sync(MSA_FULL_MASK, lane_key > best.thresh);
        if (__popc(want) > WarpTopK::MERGE_MIN) best.merge(lane_key);
        else if (want) best.offer(lane_key);
        // 2. the rest: only scores at or above the threshold's score can still enter
        float floor_score = best.thresh_score();
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const bool maybe = v[j] >= floor_score && v[j] > MSA_NEG_INF && j != lane_arg;
            if (__any_sync(MSA_FULL_MASK, maybe)) {
                best.offer(maybe ? msa_block_key(v[j], block_of(j), false) : 0ull);
                floor_score = best.thresh_score();
            }
        }
    }
    best.write_sorted(out + row * top_k);
}
