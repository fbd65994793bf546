// Training-free index_q: the mean of each group's G query heads, one launch.
//
// q (rows, Hkv * G, D) -> index_q (rows, Hkv, D) in q's dtype.  One thread per 8 consecutive
// elements (one 16-byte load per head): the G heads of a group are read in ascending order and
// summed in fp32, then divided by G with round-to-nearest, so the result does not depend on
// the launch shape (deterministic, and equal to summing the heads one by one in fp32).
#include "common.cuh"

template <typename T>
__global__ void group_mean_kernel(const T* __restrict__ q, T* __restrict__ index_q, i64 rows, int n_groups,
                                  int group_size, int head_dim) {
    const int chunks = head_dim / 8;
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * n_groups * chunks) return;
    const int c = (int)(t % chunks);
    const i64 rg = t / chunks;  // (row, group)
    const T* src = q + rg * group_size * head_dim + c * 8;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int h = 0; h < group_size; ++h) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src + (i64)h * head_dim);
        const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc[2 * i] += to_float(T{(unsigned short)(w[i] & 0xffffu)});
            acc[2 * i + 1] += to_float(T{(unsigned short)(w[i] >> 16)});
        }
    }
    unsigned packed[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        packed[i] = from_float<T>(__fdiv_rn(acc[2 * i], (float)group_size)).bits |
                    ((unsigned)from_float<T>(__fdiv_rn(acc[2 * i + 1], (float)group_size)).bits << 16);
    *reinterpret_cast<uint4*>(index_q + rg * head_dim + c * 8) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
}
