// Producer/consumer pipelines inside a CTA (sm_90): one warpgroup loads shared-memory buffers
// while the others compute on the buffers loaded before, with no CTA-wide barrier between
// them.  Used by the producer variants of sparse_prefill_tile_sm90.cu and select_sm90.cu.
//
// Each buffer of the ring has two mbarriers: `full` (the producer's threads arrive once the
// buffer holds its chunk; the consumers wait) and `empty` (each consumer warp arrives once it
// no longer reads the buffer; the producer waits before it overwrites it).  A barrier counts its
// completed phases; a wait names the parity of the phase it waits for, so a buffer's n-th use
// waits for phase n (parity n & 1) of `full`, and its producer for the consumers' n-th release.
#pragma once
#include "wgmma.cuh"

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

// The ring of STAGES buffers between a producer warpgroup (128 threads, cp.async) and
// `consumer_warps` computing warps, item i (chunk, key tile) in buffer i % STAGES; a
// __shared__ object, set up by one thread (init) and published by a CTA barrier.
template <int STAGES>
struct MbarrierRing {
    mbarrier_t full[STAGES], empty[STAGES];

    __device__ __forceinline__ void init(unsigned consumer_warps) {
        for (int b = 0; b < STAGES; ++b) {
            mbarrier_init(&full[b], 128);              // every producer thread, its copies landed
            mbarrier_init(&empty[b], consumer_warps);  // every computing warp, done reading
        }
    }
    // consumers: item i is in its buffer
    __device__ __forceinline__ void wait_filled(int i) { mbarrier_wait(&full[i % STAGES], (i / STAGES) & 1); }
    // consumers, every lane of the warp: this warp no longer reads item i's buffer
    __device__ __forceinline__ void release(int i) {
        __syncwarp();
        if ((threadIdx.x & 31) == 0) mbarrier_arrive(&empty[i % STAGES]);
    }

    // The producer's loop over n items, every producer thread: load(i, buffer) issues its
    // cp.async copies of item i once the consumers have released the buffer's item i - STAGES;
    // hand_over(i, buffer) runs once this thread's copies of item i have landed, before item i
    // is published (fenced for wgmma's reads).  STAGES - 2 items stay in flight besides the one
    // handed over, so that the one handed over after a wait for a free buffer is never the one
    // the consumers need next.
    template <typename Load, typename HandOver>
    __device__ __forceinline__ void produce(int n, Load load, HandOver hand_over) {
        constexpr int LAG = STAGES - 2;
#pragma unroll 1
        for (int i = 0; i < n + LAG; ++i) {
            if (i < n) {
                mbarrier_wait(&empty[i % STAGES], (i / STAGES + 1) & 1);  // a fresh barrier passes parity 1
                load(i, i % STAGES);
            }
            cp_async_commit();  // a group every step, empty past the last item: wait_group counts them
            const int f = i - LAG;
            if (f < 0) continue;
            cp_async_wait<LAG>();  // this thread's copies of item f have landed
            hand_over(f, f % STAGES);
            fence_proxy_async();  // this thread's cp.async (and hand_over's) writes, read next by wgmma
            mbarrier_arrive(&full[f % STAGES]);
        }
    }
};
