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

// Store two adjacent floats of a partial result in the input dtype T (bf16 or f16).
template <typename T> __device__ __forceinline__ void store2(T* dst, float a, float b) {
    *reinterpret_cast<unsigned*>(dst) = pack2<T>(a, b);
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

// One work item of the KV-outer prefill (reverse_index.cu): KV head g, one key block, a run of
// `count` entries of the block's query list from `start`.  Shared by sparse_prefill.cu
// (mma.sync) and sparse_prefill_sm90.cu (wgmma); `offset(row, chunk)` places 16-byte chunks
// in each kernel's shared-memory tile layout.
struct PrefillItem {
    int count, start, g, block, seq, q_start, n_q, k_start, n_k;  // block: the key block's index in its sequence
    KeyRows key_rows;

    // false for an empty item (the grid is an upper bound of the item count)
    __device__ __forceinline__ bool init(const int* __restrict__ items, const int* __restrict__ block_off, int n_seq,
                                         const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                                         int n_blocks_total, KeyRows key_rows_) {
        key_rows = key_rows_;
        count = items[3 * blockIdx.x + 2];
        if (count == 0) return false;
        const int bucket = items[3 * blockIdx.x];
        start = items[3 * blockIdx.x + 1];
        g = bucket / n_blocks_total;
        const int gblock = bucket - g * n_blocks_total;
        seq = sequence_of(block_off, n_seq, gblock);  // largest s with block_off[s] <= gblock
        block = gblock - block_off[seq];
        q_start = cu_q[seq];
        n_q = cu_q[seq + 1] - q_start;
        k_start = cu_k[seq];
        n_k = cu_k[seq + 1] - k_start;
        return true;
    }

    // True when a query of the item does not see every key of the block: causal, and the
    // block holds keys past the position of the item's first query (lists ascend, so the
    // first query sees the fewest).  Only then can p = 0 of an unseen key meet its V row in
    // the P V product (see zero_nonfinite_v).
    template <int BK>
    __device__ __forceinline__ bool partly_visible(const int* __restrict__ list_q, int causal) const {
        const int position = n_k - n_q + (list_q[start] - q_start);
        return causal && position + 1 < min((block + 1) * BK, n_k);
    }

    // The K and V block (BK rows; rows past the sequence end are zero-filled and masked).
    template <int D, int BK, int THREADS, typename T, typename Offset>
    __device__ __forceinline__ void load_kv(T* Ks, T* Vs, const T* __restrict__ k, const T* __restrict__ v,
                                            int n_heads_kv, Offset offset) const {
        constexpr int CH = D / 8;
        for (int c = threadIdx.x; c < BK * CH; c += THREADS) {
            const int row = c / CH, ch = c % CH;
            const int key = block * BK + row;
            const bool ok = key < n_k;
            const i64 off = (key_rows.row(seq, k_start, ok ? key : block * BK) * n_heads_kv + g) * D + ch * 8;
            cp_async_16(Ks + offset(row, ch), k + off, ok ? 16 : 0);
            cp_async_16(Vs + offset(row, ch), v + off, ok ? 16 : 0);
        }
    }

    // Query tile `tile`: TQ = M / G tokens x the G heads of group g (M rows, zero past the
    // item's end), and lim[t] = visible keys of the block for token t of the tile.
    template <int D, int M, int G, int BK, int THREADS, typename T, typename Offset>
    __device__ __forceinline__ void load_q_tile(T* dst, int* lim, const T* __restrict__ q,
                                                const int* __restrict__ list_q, int n_heads_q, int causal,
                                                int tile, Offset offset) const {
        constexpr int CH = D / 8, TQ = M / G;
        for (int c = threadIdx.x; c < M * CH; c += THREADS) {
            const int row = c / CH, ch = c % CH;
            const int t = tile * TQ + row / G;
            const bool ok = t < count;
            const int token = ok ? list_q[start + t] : list_q[start];
            const i64 off = ((i64)token * n_heads_q + g * G + row % G) * D + ch * 8;
            cp_async_16(dst + offset(row, ch), q + off, ok ? 16 : 0);
        }
        for (int t = threadIdx.x; t < TQ; t += THREADS) {
            const int tt = tile * TQ + t;
            int visible_in_block = 0;
            if (tt < count) {
                const int position = n_k - n_q + (list_q[start + tt] - q_start);
                const int visible = causal ? min(position + 1, n_k) : n_k;
                visible_in_block = visible - block * BK;
            }
            lim[t] = visible_in_block;
        }
    }
};

// NaN and Inf in the V block of a partly visible item (PrefillItem::partly_visible).  The
// tensor-core product O += P V multiplies each V row by the probabilities of all rows of the
// tile, and p = 0 of a key a row does not see times a NaN or Inf is NaN: such values would
// reach rows that never see them.  So they are zeroed in shared memory and their keys marked
// in `nonfinite` (one bit per key of the block); add_back_nonfinite_v adds p * v for them to
// the rows that see the key, in fp32, as dense attention would (p * Inf = Inf, NaN stays NaN).
// Every thread of the CTA calls this after the V block has landed (barrier before and after).
template <int D, int BK, int THREADS, typename T, typename Offset>
__device__ __forceinline__ void zero_nonfinite_v(T* Vs, unsigned* nonfinite, Offset offset) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < BK * CH; c += THREADS) {
        const int row = c / CH, ch = c % CH;
        uint4* chunk = reinterpret_cast<uint4*>(Vs + offset(row, ch));
        const uint4 u = *chunk;
        unsigned w[4] = {u.x, u.y, u.z, u.w};
        bool found = false;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            T x;
            x.bits = (unsigned short)(w[i / 2] >> (16 * (i % 2)));
            if (is_nonfinite(x)) {
                w[i / 2] &= ~(0xffffu << (16 * (i % 2)));
                found = true;
            }
        }
        if (found) {
            *chunk = make_uint4(w[0], w[1], w[2], w[3]);
            atomicOr(nonfinite + row / 32, 1u << (row % 32));
        }
    }
}

// For key `key` of the block, marked by zero_nonfinite_v, whose V row is v_row (global
// memory, the original values): o += p * v at its non-finite dims, for the two rows of this
// lane in the mma accumulator layout (rows grp and grp + 8: h = 0, 1) that see the key
// (key < lim[h]).  The key is S column `col` of the lane quad's n-tiles (NS of 8 columns):
// p_of(n, h, e) gives this lane's probability at column 8n + 2 quad + e, read with
// compile-time n, e (unrolled, no local memory) and passed from the lane that holds the
// column; add(n, h, e, x) adds x to o at dim 8n + 2 quad + e.  Warp-uniform: call from all lanes.
template <int D, int NS, typename T, typename POf, typename Add>
__device__ __forceinline__ void add_back_nonfinite_v(const T* __restrict__ v_row, int key, int col,
                                                     const int (&lim)[2], POf p_of, Add add) {
    const int lane = threadIdx.x & 31, quad = lane & 3;
    const int owner = (lane & ~3) | ((col & 7) >> 1);
    float p[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float mine = 0.f;
#pragma unroll
        for (int n = 0; n < NS; ++n)
            if (n == col >> 3) mine = (col & 1) ? p_of(n, h, 1) : p_of(n, h, 0);
        p[h] = __shfl_sync(MSA_FULL_MASK, mine, owner);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const unsigned pair = *reinterpret_cast<const unsigned*>(v_row + n * 8 + 2 * quad);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            T x;
            x.bits = (unsigned short)(pair >> (16 * e));
            if (!is_nonfinite(x)) continue;  // already in the tensor-core product
#pragma unroll
            for (int h = 0; h < 2; ++h)
                if (key < lim[h]) add(n, h, e, p[h] * to_float(x));
        }
    }
}
