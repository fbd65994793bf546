// Exp-free top-k building blocks shared by topk.cu and select.cu.
//
// A candidate block is one 64-bit *key* whose unsigned order is the selection order:
//     high 32 bits: the block score mapped to an order-preserving uint32; 0xffffffff for a
//                   forced block (above every score, +inf included: forced blocks always win)
//     low 32 bits : 0xffffffff - block id (equal scores: the lower block id has the larger key)
// Key 0 means "no candidate" (empty slot, NaN or -inf score, invisible block): it never wins,
// so -inf is never picked and NaN counts as -inf.  Keys are unique per row (the id is in
// them), so every comparison is strict and the result is deterministic whatever the order
// candidates arrive in.
//
// Two list flavours:
//   WarpTopK      one row per warp, the best 32 keys sorted descending across the lanes
//                 (lane 0 best); insert = ballot + shfl_up; a batch of 32 = bitonic
//                 sort-merge; threshold = lane top_k-1.
//   thread lists  one row per thread in shared memory (select.cu): unsorted top_k slots plus
//                 the current minimum; a new key replaces the minimum.
#pragma once
#include "common.cuh"

typedef unsigned long long u64;

constexpr unsigned MSA_FORCED_SCORE_BITS = 0xffffffffu;  // above msa_ordered_bits(+inf) = 0xff800000

// float -> uint32 with the same order (for non-NaN inputs); -0.0 ranks as +0.0 (a tie)
__device__ __forceinline__ unsigned msa_ordered_bits(float s) {
    unsigned u = __float_as_uint(s);
    u = (u == 0x80000000u) ? 0u : u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Selection key of block b with score s; 0 (never selected) for NaN / -inf unless forced.
__device__ __forceinline__ u64 msa_block_key(float s, int b, bool forced) {
    const unsigned u = __float_as_uint(s);
    const bool dead = ((u & 0x7fffffffu) > 0x7f800000u) || (u == 0xff800000u);  // NaN or -inf
    const unsigned hi = forced ? MSA_FORCED_SCORE_BITS : msa_ordered_bits(s);
    const u64 key = ((u64)hi << 32) | (u64)(0xffffffffu - (unsigned)b);
    return (dead && !forced) ? 0ull : key;
}

__device__ __forceinline__ int msa_key_block(u64 key) { return (int)(0xffffffffu - (unsigned)key); }

// Is block b forced for a query whose local block is `local`?  (visibility checked by the caller)
__device__ __forceinline__ bool msa_is_forced(int b, int local, int local_blocks, int sink_blocks) {
    return ((unsigned)(b - (local - local_blocks + 1)) < (unsigned)local_blocks) || (b < sink_blocks);
}

// Bitonic sort of one value per lane across the warp (lane 0 first), 15 shuffle steps.
template <bool DESCENDING, typename T>
__device__ __forceinline__ T warp_bitonic_sort(T v, int lane) {
#pragma unroll
    for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            const T other = __shfl_xor_sync(MSA_FULL_MASK, v, stride);
            const bool take_max = (((lane & stride) == 0) == ((lane & size) == 0)) == DESCENDING;
            v = take_max ? (v > other ? v : other) : (v < other ? v : other);
        }
    }
    return v;
}

// Top-k of one row held by one warp: lane i holds the i-th best key (descending).
struct WarpTopK {
    static constexpr int MERGE_MIN = 3;  // more candidates than this in one round: a sort-merge, not inserts
    u64 entry;    // this lane's list entry
    u64 thresh;   // key of entry top_k-1: a candidate must beat it
    int top_k;
    int lane;

    __device__ __forceinline__ void init(int k, int lane_id) {
        entry = 0ull;
        thresh = 0ull;
        top_k = k;
        lane = lane_id;
    }

    // Insert key c (c > thresh, warp-uniform).
    __device__ __forceinline__ void insert(u64 c) {
        const int pos = __popc(__ballot_sync(MSA_FULL_MASK, entry > c));
        const u64 prev = __shfl_up_sync(MSA_FULL_MASK, entry, 1);
        if (lane > pos) entry = prev;
        else if (lane == pos) entry = c;
        thresh = __shfl_sync(MSA_FULL_MASK, entry, top_k - 1);
    }

    // Every lane offers its own candidate c (0 = none).
    __device__ __forceinline__ void offer(u64 c) {
        unsigned want = __ballot_sync(MSA_FULL_MASK, c > thresh);
        while (want) {
            const int src = __ffs(want) - 1;
            want &= want - 1;
            const u64 cand = __shfl_sync(MSA_FULL_MASK, c, src);
            if (cand > thresh) insert(cand);
        }
    }

    // Every lane offers a candidate (0 = none) at once: bitonic-sort the 32 candidates
    // descending, keep the best 32 of (list, candidates), re-sort.  ~20 shuffle steps, cheaper
    // than one insert per candidate when more than a few lanes have one.
    __device__ __forceinline__ void merge(u64 c) {
        c = warp_bitonic_sort<true>(c, lane);
        const u64 mirrored = __shfl_sync(MSA_FULL_MASK, c, 31 - lane);
        entry = entry > mirrored ? entry : mirrored;  // top 32 of the union, a bitonic sequence
#pragma unroll
        for (int stride = 16; stride > 0; stride >>= 1) {
            const u64 other = __shfl_xor_sync(MSA_FULL_MASK, entry, stride);
            const bool low = (lane & stride) == 0;
            entry = low ? (entry > other ? entry : other) : (entry < other ? entry : other);
        }
        thresh = __shfl_sync(MSA_FULL_MASK, entry, top_k - 1);
    }

    // Every lane offers N candidates (0 = none): the lane maxima first (they raise the threshold
    // fastest), then the rest; a round that many lanes beat is one sort-merge (early rounds: the
    // list is still empty), else a few inserts.
    template <int N>
    __device__ __forceinline__ void offer_batch(const u64 (&c)[N]) {
        u64 top = 0ull;
        int arg = 0;
#pragma unroll
        for (int j = 0; j < N; ++j)
            if (c[j] > top) { top = c[j]; arg = j; }
#pragma unroll
        for (int j = -1; j < N; ++j) {
            const u64 x = j < 0 ? top : (j != arg ? c[j] : 0ull);
            const unsigned want = __ballot_sync(MSA_FULL_MASK, x > thresh);
            if (__popc(want) > MERGE_MIN) merge(x);
            else if (want) offer(x);
        }
    }

    // Score of the threshold key (-inf while the list has fewer than top_k entries): a cheap
    // float pre-filter, candidates that pass it are checked on the full key.  A forced
    // threshold maps to NaN, which no score passes: nothing can displace a forced block.
    __device__ __forceinline__ float thresh_score() const {
        if (thresh == 0ull) return MSA_NEG_INF;
        const unsigned hi = (unsigned)(thresh >> 32);
        return __uint_as_float((hi & 0x80000000u) ? (hi & 0x7fffffffu) : ~hi);
    }

    // Write the chosen block ids ascending, then -1 padding: out[0..top_k).
    __device__ __forceinline__ void write_sorted(int* out) const {
        constexpr int NONE = 0x7fffffff;
        const int v = warp_bitonic_sort<false>((lane < top_k && entry != 0ull) ? msa_key_block(entry) : NONE, lane);
        if (lane < top_k) out[lane] = (v == NONE) ? -1 : v;
    }
};

// ---- one row per thread, list in shared memory: slot i of this row at list[i * stride]
struct ThreadTopK {
    u64* list;     // &lists[row]; slot i at list[i * stride]
    int stride;
    int top_k;
    int min_slot;
    u64 thresh;    // smallest key in the list (0 while a slot is empty)

    __device__ __forceinline__ void init(u64* base, int s, int k) {
        list = base;
        stride = s;
        top_k = k;
        min_slot = 0;
        thresh = 0ull;
        for (int i = 0; i < k; ++i) list[i * stride] = 0ull;
    }

    __device__ __forceinline__ void offer(u64 c) {
        if (c <= thresh) return;
        list[min_slot * stride] = c;
        u64 lo = ~0ull;
        int slot = 0;
        for (int i = 0; i < top_k; ++i) {
            const u64 v = list[i * stride];
            if (v < lo) { lo = v; slot = i; }
        }
        thresh = lo;
        min_slot = slot;
    }

    // Ascending block ids then -1 padding into out[0..top_k).
    __device__ __forceinline__ void write_sorted(int* out) const {
        int n_valid = 0;
        for (int i = 0; i < top_k; ++i) {
            const u64 ki = list[i * stride];
            if (ki == 0ull) continue;
            ++n_valid;
            const int bi = msa_key_block(ki);
            int rank = 0;
            for (int j = 0; j < top_k; ++j) {
                const u64 kj = list[j * stride];
                rank += (kj != 0ull && msa_key_block(kj) < bi);
            }
            out[rank] = bi;
        }
        for (int i = n_valid; i < top_k; ++i) out[i] = -1;
    }

    // The list's keys, its best key first (merge_splits reads only that one of most lists).
    __device__ __forceinline__ void write_keys(u64* out) const {
        u64 hi = 0ull;
        int best = 0;
        for (int i = 0; i < top_k; ++i) {
            const u64 v = list[i * stride];
            if (v > hi) { hi = v; best = i; }
        }
        for (int i = 0; i < top_k; ++i) out[i] = list[(i == 0 ? best : i == best ? 0 : i) * stride];
    }
};
