// Storage types and conversions shared by every msa_cupy kernel.
//
// No CUDA toolkit headers: the sources compile with bare NVRTC (no include path), so
// fp16/bf16 are 16-bit payloads converted with PTX.  Arrays are token-major; offsets that
// multiply tokens x heads x dim use int64 (1M tokens x 64 heads x 128 passes 2^31).
#pragma once

typedef long long i64;

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_float(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// NaN or +-inf: the exponent bits all set.
template <typename T> constexpr unsigned short NONFINITE_EXPONENT = 0;
template <> constexpr unsigned short NONFINITE_EXPONENT<bf16> = 0x7f80;
template <> constexpr unsigned short NONFINITE_EXPONENT<f16> = 0x7c00;
template <typename T> __device__ __forceinline__ bool is_nonfinite(T x) {
    return (x.bits & NONFINITE_EXPONENT<T>) == NONFINITE_EXPONENT<T>;
}
// True when either 16-bit value of a packed pair is NaN or +-inf (one SIMD compare).
template <typename T> __device__ __forceinline__ bool has_nonfinite_pair(unsigned w) {
    constexpr unsigned e2 = NONFINITE_EXPONENT<T> * 0x10001u;
    return __vcmpeq2(w & e2, e2) != 0;
}

// Maximum that propagates NaN (max.NaN, sm_80+), where fmaxf drops it: a softmax maximum
// over a NaN score is NaN, and so is every weight taken against it.
__device__ __forceinline__ float fmax_nan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

#define MSA_NEG_INF (-__int_as_float(0x7f800000))
#define MSA_FULL_MASK 0xffffffffu  // every lane of a warp (shuffles, votes)

// Row of key token `key` (0-based in its sequence) of sequence `seq` in a token-major
// K / V / index-key array ([rows][heads][dim]).  Contiguous (varlen) arrays hold a sequence
// from row cu_k[seq] = k_start on; paged caches hold it in pages of page_size rows, page
// block_table[seq * max_pages + key / page_size] (page ids arbitrary: permuted, shared).
struct KeyRows {
    const int* __restrict__ block_table;  // nullptr: contiguous
    int max_pages, page_size;
    __device__ __forceinline__ i64 row(int seq, int k_start, int key) const {
        if (block_table == nullptr) return (i64)k_start + key;
        return (i64)block_table[(i64)seq * max_pages + key / page_size] * page_size + key % page_size;
    }
};

// The one position rule of every kernel (selection and attention): query i (0-based in its
// sequence of n_q queries and n_k keys) sits at key position n_k - n_q + i (bottom-right
// alignment; negative: before key 0) and, when causal, sees keys 0 .. position; otherwise
// every key.  visible_keys <= 0: none.
__device__ __forceinline__ int query_position(int n_q, int n_k, int i) { return n_k - n_q + i; }
__device__ __forceinline__ int visible_keys(int n_q, int n_k, int i, int causal) {
    return causal ? min(query_position(n_q, n_k, i) + 1, n_k) : n_k;
}

// Loads that bypass L1 (ld.global.cg): data other CTAs of the same launch wrote (L1 is not
// coherent across SMs; these addresses may sit in no other cache but L2).
__device__ __forceinline__ unsigned long long load_cg(const unsigned long long* p) {
    unsigned long long x;
    asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(x) : "l"(p));
    return x;
}
__device__ __forceinline__ float load_cg(const float* p) {
    float x;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(x) : "l"(p));
    return x;
}

// Programmatic dependent launch (sm_90 and later; no-ops before): a kernel launched with the
// programmatic-serialization attribute may start while the kernel before it in the stream
// finishes, once every CTA of that kernel has let it (or exited).  It must wait before it reads
// anything that kernel writes; what earlier launches wrote it may read at once.
__device__ __forceinline__ void let_next_launch_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Thread-block clusters (sm_90): the CTAs of a cluster read each other's shared memory.
// cluster_sync: every thread of every CTA of the cluster arrives (its shared-memory writes
// released) and waits for all (acquiring theirs).  cluster_map: the address of the same
// shared-memory object in the cluster's CTA `rank` (a generic address, read with plain loads).
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
template <typename P>
__device__ __forceinline__ P* cluster_map(P* p, unsigned rank) {
    unsigned long long out;
    asm("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(p), "r"(rank));
    return reinterpret_cast<P*>(out);
}
#endif

// "The last CTA finishes the job": each of `count` CTAs calls this once, with all its threads,
// after its writes; it returns true in the CTA that arrives last, which then sees every other
// CTA's writes (read them with load_cg) and does the reduction that would otherwise take
// another launch.  That CTA sets the counter back to 0, so the next launch (a graph replay
// included) starts from zero without a memset; the counters start zeroed with the workspace.
// Whoever arrives last, the reduction reads the same data in a fixed order: deterministic.
__device__ __forceinline__ bool last_to_arrive(unsigned* counter, unsigned count) {
    __threadfence();  // this thread's writes are visible before its CTA arrives
    __syncthreads();
    unsigned prev = 0;
    if (threadIdx.x == 0) prev = atomicAdd(counter, 1u);
    const bool last = __syncthreads_or(threadIdx.x == 0 && prev == count - 1) != 0;
    if (last) {
        __threadfence();
        if (threadIdx.x == 0) *counter = 0u;
    }
    return last;
}
