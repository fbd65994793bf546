// Shared device helpers of the sparse-attention kernels (reverse index, KV-outer prefill,
// decode, combine).
#pragma once
#include "common.cuh"
#include "mma.cuh"

#define MSA_LN2 0.69314718055994530942f

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile of 16-bit values.
// Chunks are XOR-swizzled by (row & 7) so that the 8 row addresses of one ldmatrix
// (same logical chunk, 8 consecutive rows, row pitch a multiple of 128 B) hit 8 distinct
// bank groups: conflict-free loads without padding.  Needs D >= 64 (8 chunks per row).
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
    static_assert(D % 64 == 0, "swizzle needs at least 8 chunks of 16 B per row");
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// Store two adjacent floats of a partial result as PT (float, bf16 or f16).
template <typename PT> __device__ __forceinline__ void store2(PT* dst, float a, float b);
template <> __device__ __forceinline__ void store2<float>(float* dst, float a, float b) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}
template <> __device__ __forceinline__ void store2<bf16>(bf16* dst, float a, float b) {
    *reinterpret_cast<unsigned*>(dst) = pack2<bf16>(a, b);
}
template <> __device__ __forceinline__ void store2<f16>(f16* dst, float a, float b) {
    *reinterpret_cast<unsigned*>(dst) = pack2<f16>(a, b);
}

// Sequence of a query token: the largest s < n_seq with cu_q[s] <= token (empty sequences
// share their offset with the next one, so "largest" skips them).
__device__ __forceinline__ int sequence_of(const int* __restrict__ cu_q, int n_seq, int token) {
    int lo = 0, hi = n_seq - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (cu_q[mid] <= token) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// True when slot `slot` of a (query, group) row holds a block id that is not -1 and not a
// repeat of an earlier slot: block_indices are a set, duplicates count once.
__device__ __forceinline__ bool first_occurrence(const int* __restrict__ row, int slot) {
    const int id = row[slot];
    if (id < 0) return false;
    for (int s = 0; s < slot; ++s)
        if (row[s] == id) return false;
    return true;
}
