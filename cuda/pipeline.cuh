// Producer/consumer pipelines inside a CTA (sm_90): one warpgroup loads shared-memory buffers
// while the others compute on the buffers loaded before, with no CTA-wide barrier between
// them.  Used by sparse_prefill_tile_sm90.cu's producer variant.
//
// Each buffer of the ring has two mbarriers: `full` (the producer's threads arrive once the
// buffer holds its chunk; the consumers wait) and `empty` (each consumer warp arrives once it
// no longer reads the buffer; the producer waits before it overwrites it).  A barrier counts its
// completed phases; a wait names the parity of the phase it waits for, so a buffer's n-th use
// waits for phase n (parity n & 1) of `full`, and its producer for the consumers' n-th release.
#pragma once
#include "mma.cuh"

typedef unsigned long long mbarrier_t;

__device__ __forceinline__ void mbarrier_init(mbarrier_t* bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// Arrives (release: this thread's earlier shared-memory writes are seen by whoever waits).
__device__ __forceinline__ void mbarrier_arrive(mbarrier_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(smem_addr(bar)) : "memory");
}
// Waits until phase `parity` (0 or 1: the phase's number mod 2) has completed (acquire).  A
// fresh barrier is in phase 0: a wait for parity 1 returns at once (as for a phase before it).
__device__ __forceinline__ void mbarrier_wait(mbarrier_t* bar, int parity) {
    const unsigned addr = smem_addr(bar);
    unsigned done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(addr), "r"(parity) : "memory");
}

// A barrier among `THREADS` threads (whole warps) of the CTA, named `id` (1-15; 0 is
// __syncthreads'): the consumers or the producer alone.
template <int THREADS>
__device__ __forceinline__ void named_barrier_sync(int id) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "n"(THREADS) : "memory");
}

// Register reallocation between the warpgroups of a CTA (sm_90a; every thread of the
// warpgroup executes it): the producer gives registers back, the consumers take them.  The
// kernel is compiled for its thread count (launch bounds); these set the budget of the code
// that follows them.  A warpgroup's warps must meet (a barrier) between two of them.
template <int REGS> __device__ __forceinline__ void warpgroup_registers_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
template <int REGS> __device__ __forceinline__ void warpgroup_registers_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
