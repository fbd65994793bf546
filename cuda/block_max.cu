// Masked block-max pooling of materialized index scores (the plain CuPy path's selection).
//
// scores: (groups, rows, num_keys) fp32, one cuBLAS product per chunk of query rows.
// out:    row r, group g, block b at out[r * out_row_stride + g * out_group_stride + b]:
//         the max over the keys of block b visible to row r, -inf when none is visible.
// One thread per (row, group, block); the block's keys are read with consecutive threads on
// consecutive blocks, which is not coalesced but this path is the fallback, not the fast one.
#include "common.cuh"

template <bool CAUSAL>
__global__ void block_max_pool(const float* __restrict__ scores, float* __restrict__ out, int rows,
                               int groups, int num_keys, int block_size, int n_blocks,
                               i64 out_row_stride, i64 out_group_stride, i64 first_position) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (i64)rows * groups * n_blocks) return;
    const int b = (int)(t % n_blocks);
    const int g = (int)((t / n_blocks) % groups);
    const int r = (int)(t / ((i64)n_blocks * groups));
    i64 visible = num_keys;
    if (CAUSAL) visible = min((i64)num_keys, max((i64)0, first_position + r + 1));
    const i64 begin = (i64)b * block_size;
    const i64 end = min(begin + block_size, visible);
    const float* row = scores + ((i64)g * rows + r) * num_keys;
    float m = MSA_NEG_INF;
    for (i64 j = begin; j < end; ++j) m = fmaxf(m, row[j]);  // fmaxf drops NaN: NaN counts as -inf
    out[(i64)r * out_row_stride + (i64)g * out_group_stride + b] = m;
}
