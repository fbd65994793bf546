// The schedule of the prefill between its two attention kernels, per chunk of query rows
// [q_begin, q_begin + rows):
//
//   query_tile_offsets    one thread: cuts each sequence's tokens in the chunk into query
//                         tiles of tt consecutive tokens; tile_off[s] = first tile of sequence
//                         s, tile_off[n_seq] = the count (QueryTile in tile_outer.cuh).
//   classify_query_tiles  one warp per (query tile, KV head g): from the tile's rows of
//                         block_indices, u = its distinct blocks and p = its picks (distinct
//                         valid ids per token, summed).  The tile-outer kernel
//                         (sparse_prefill_tile.cu) computes count x u (token, block) pairs of
//                         which p are useful; the KV-outer path computes the p alone but
//                         writes and merges a partial result for each.  The tile goes
//                         tile-outer when p >= min_useful * count * u (the useful share of its
//                         work, against the measured cost ratio of the two paths): row_mode of
//                         each of its rows (row - q_begin, g) = 1, else 0.  reverse_index_keys
//                         leaves out the picks of rows with row_mode 1 and the combine skips
//                         them: each row has one owner, no atomics, a deterministic result.
#include "tile_outer.cuh"

__global__ void query_tile_offsets(const int* __restrict__ cu_q, int n_seq, int q_begin, int rows, int tt,
                                   int* __restrict__ tile_off) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int total = 0;
    for (int s = 0; s < n_seq; ++s) {
        tile_off[s] = total;
        const int n = min(cu_q[s + 1], q_begin + rows) - max(cu_q[s], q_begin);
        total += n > 0 ? (n + tt - 1) / tt : 0;
    }
    tile_off[n_seq] = total;
}

// Shared memory: WARPS * tt * top_k ints (each warp's copy of its tile's block ids).
template <int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
classify_query_tiles(const int* __restrict__ block_indices, const int* __restrict__ cu_q,
                     const int* __restrict__ cu_k, const int* __restrict__ tile_off, int n_seq, int q_begin,
                     int rows, int n_tiles, int tt, int top_k, int n_heads_kv, float min_useful,
                     unsigned char* __restrict__ row_mode) {
    extern __shared__ int ids_all[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int w = blockIdx.x * WARPS + warp;  // (g, tile) = w: neighbouring warps, neighbouring tiles
    const int g = w / n_tiles;
    QueryTile tile;
    if (g >= n_heads_kv || !tile.init(w - g * n_tiles, tile_off, cu_q, cu_k, n_seq, q_begin, rows, tt)) return;
    const int n = tile.count * top_k;
    int* ids = ids_all + warp * tt * top_k;
    const int* src = block_indices + ((i64)(tile.t0 - q_begin) * n_heads_kv + g) * top_k;
    for (int e = lane; e < n; e += 32) {
        const int t = e / top_k;
        ids[e] = src[(i64)t * n_heads_kv * top_k + (e - t * top_k)];
    }
    __syncwarp();
    int u = 0, picks = 0;
    for (int e = lane; e < n; e += 32) {
        const int id = ids[e];
        if (id < 0) continue;
        const int row_first = e - e % top_k;  // first entry of this entry's token
        bool first_in_tile = true, first_in_row = true;
        for (int e2 = 0; e2 < e; ++e2) {
            if (ids[e2] != id) continue;
            first_in_tile = false;
            if (e2 >= row_first) {
                first_in_row = false;
                break;
            }
        }
        u += first_in_tile;
        picks += first_in_row;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        u += __shfl_xor_sync(MSA_FULL_MASK, u, off);
        picks += __shfl_xor_sync(MSA_FULL_MASK, picks, off);
    }
    const unsigned char mode = (float)picks >= min_useful * (float)(tile.count * u);
    for (int t = lane; t < tile.count; t += 32) row_mode[(i64)(tile.t0 - q_begin + t) * n_heads_kv + g] = mode;
}
