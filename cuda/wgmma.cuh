// Hopper warpgroup matrix multiply (wgmma, sm_90a only): A in registers or shared memory, B in
// shared memory.
// Used by select_sm90.cu (index GEMM), sparse_prefill_sm90.cu and sparse_prefill_tile_sm90.cu
// (Q K^T and P V).
//
// A warpgroup (4 consecutive warps, first warp index divisible by 4) issues
// wgmma.mma_async m64n128k16: D (64 x 128, fp32, in registers) += A (64 x 16) * B (16 x 128),
// A in registers, B in shared memory, described by a 64-bit matrix descriptor.  B uses the
// 128-byte swizzle: rows of 64 16-bit elements (128 bytes), 8-row atoms of 1024 bytes
// (1024-byte aligned), 16-byte chunk c of row r stored at chunk c ^ (r % 8) -- the layout
// `swizzled_panel` (mma.cuh) gives.  A k16 step inside a panel advances the start address by 32 bytes.
//
// Accumulator layout (PTX ISA, "wgmma register fragment D" for m64nNk16 fp32): warp w of the
// warpgroup holds rows 16w..16w+15; lane l, register i: row 16w + l/4 + 8*((i/2)%2),
// column 8*(i/4) + 2*(l%4) + i%2 -- the mma.m16n8 C layout repeated over N/8 column tiles.
#pragma once
#include "mma.cuh"

typedef unsigned long long u64;

// Descriptor of a SWIZZLE_128B operand starting at shared byte address `addr`: start >> 4
// (bits 0-13), leading byte offset (bits 16-29), stride byte offset (bits 32-45), swizzle
// mode 1 = 128B (bits 62-63).  K-major (rows of 64 K-elements): the leading offset is unused
// and the stride is 1024 bytes between 8-row atoms.  MN-major (rows of 64 N-elements, 8-row
// atoms along K): the leading offset is the stride between 64-element panels along N, the
// stride offset 1024 bytes between 8-row atoms along K.
__device__ __forceinline__ u64 wgmma_desc_sw128(unsigned addr, unsigned leading = 16, unsigned stride = 1024) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(leading >> 4) << 16) | ((u64)(stride >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Shared memory written through the generic proxy (st.shared, cp.async) and read next by
// wgmma (async proxy): each writing thread fences before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The m64n128 accumulator as 16 n-tiles of 8 columns, [n][4]: the mma.m16n8 C layout above,
// so the mma.sync softmax and P packing (attention.cuh) take it as it is.
__device__ __forceinline__ float (&wgmma_acc(float (&d)[16][4]))[64] { return reinterpret_cast<float(&)[64]>(d); }

// Keeps the compiler from touching accumulators while a wgmma that writes them is in flight
// (no moves or reloads across this point).
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

#define MSA_WGMMA_D64                                                                              \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "   \
    "%56, %57, %58, %59, %60, %61, %62, %63}"
#define MSA_F8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                     "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// One wgmma.mma_async m64n128k16 into d[64] (fp32): OPERANDS is the PTX text of the A and B
// operands and of the immediates after the accumulate predicate, whose input operand is PRED;
// the inputs follow.
#define MSA_WGMMA_M64N128K16(TYPE, PRED, OPERANDS, ...)                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " MSA_WGMMA_D64    \
                 ", " OPERANDS ";\n}\n"                                                            \
                 : MSA_F8(d, 0), MSA_F8(d, 8), MSA_F8(d, 16), MSA_F8(d, 24), MSA_F8(d, 32),          \
                   MSA_F8(d, 40), MSA_F8(d, 48), MSA_F8(d, 56)                                       \
                 : __VA_ARGS__)
// A from registers: the four b32 registers of this warp's 16 x 16 A slice, in the
// mma.m16n8k16 A-fragment layout (ldmatrix_x4 of rows 16w.., mma.cuh); only B is read from
// shared memory, K-major (TRANS_B = 0) or MN-major (TRANS_B = 1).
#define MSA_WGMMA_RS(TYPE)                                                                        \
    MSA_WGMMA_M64N128K16(TYPE, "%69", "{%64, %65, %66, %67}, %68, p, 1, 1, %70", "r"(a[0]), "r"(a[1]), \
                         "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))
// Both operands from shared memory: A (64 x 16) K-major through its descriptor as well.
#define MSA_WGMMA_SS(TYPE)                                                                        \
    MSA_WGMMA_M64N128K16(TYPE, "%66", "%64, %65, p, 1, 1, 0, %67", "l"(desc_a), "l"(desc_b), "r"(accumulate), \
                         "n"(TRANS_B))

// D (+)= A (64 x 16) * B (16 x 128) over one k16 step, B stored as 128 rows of K (K-major,
// e.g. keys for Q K^T) or as 16 rows of N (MN-major, TRANS_B = 1, e.g. V for P V);
// accumulate = 0 overwrites D.
template <typename T, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const unsigned (&a)[4], u64 desc_b, int accumulate) {
    if constexpr (mma_type<T>::is_bf16) {
        MSA_WGMMA_RS("bf16");
    } else {
        MSA_WGMMA_RS("f16");
    }
}

// The same with A from shared memory (64 rows of K, K-major, the 128-byte swizzle): desc_a
// from wgmma_desc_sw128 at the warpgroup's first row, 32 bytes further per k16 step.
template <typename T, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], u64 desc_a, u64 desc_b, int accumulate) {
    if constexpr (mma_type<T>::is_bf16) {
        MSA_WGMMA_SS("bf16");
    } else {
        MSA_WGMMA_SS("f16");
    }
}
