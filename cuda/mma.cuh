// Tensor-core building blocks for sm_80+ (Ampere, Hopper): mma.sync m16n8k16 with fp32
// accumulation, ldmatrix fragment loads and cp.async global->shared copies.
//
// Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"): for lane
// l, group = l / 4, quad = l % 4.  A (16x16, row-major) lives in 4 b32 registers holding
// rows {group, group+8} x cols {2*quad, 2*quad+1, 2*quad+8, 2*quad+9}; B (16x8, "col") in 2
// registers holding cols {group} x rows {2*quad.., 2*quad+8..}; C/D (16x8 fp32) in 4 floats
// at rows {group, group+8} x cols {2*quad, 2*quad+1}.
#pragma once
#include "common.cuh"

template <typename T> struct mma_type;
template <> struct mma_type<bf16> { static constexpr bool is_bf16 = true; };
template <> struct mma_type<f16> { static constexpr bool is_bf16 = false; };

// D = A * B + D, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    if constexpr (mma_type<T>::is_bf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8*i..8*i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row_ptr)));
}

// K-major tile of ROWS rows x DI elements stored as DI/64 panels of [ROWS][64], 128-byte XOR
// swizzle inside each panel: element offset of 16-byte chunk `chunk` of row `row`.  This is
// the wgmma SWIZZLE_128B layout and is conflict-free for ldmatrix (8 rows, one chunk each).
template <int DI, int ROWS>
__device__ __forceinline__ int swizzled_panel(int row, int chunk) {
    return (chunk >> 3) * (ROWS * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

// 16-byte asynchronous copy global -> shared; src_bytes < 16 zero-fills the rest (0 for
// out-of-range rows, so tails need no separate path).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(smem_dst)), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

// Two floats -> one b32 register of two 16-bit values (low half = first), the A operand
// format when a product (e.g. softmax probabilities) feeds the next mma from registers.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<bf16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ unsigned pack2<f16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
