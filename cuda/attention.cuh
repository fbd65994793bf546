// Shared device helpers of the sparse-attention kernels (reverse index, KV-outer and
// tile-outer prefill, decode, combine): the visibility rule, the attention math of one key
// step on mma.sync (S = Q K^T, online softmax, O += P V; the softmax and the P operand also
// serve the wgmma kernels), the row epilogue, work items, and the handling of NaN and Inf
// in V.  The tile-outer prefill's query tiles: tile_outer.cuh.
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
        return visible_keys(n_q, n_k, list_q[start] - q_start, causal) < min((block + 1) * BK, n_k);
    }

    // Row `key` of the block in a K or V cache (contiguous or paged), head g.
    template <int D, int BK, typename T>
    __device__ __forceinline__ const T* kv_row(const T* __restrict__ base, int key, int n_heads_kv) const {
        return base + (key_rows.row(seq, k_start, block * BK + key) * n_heads_kv + g) * D;
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
            lim[t] = tt < count ? visible_keys(n_q, n_k, list_q[start + tt] - q_start, causal) - block * BK : 0;
        }
    }
};

// NaN and Inf in the V block of a partly visible item (PrefillItem::partly_visible).  The
// tensor-core product O += P V multiplies each V row by the probabilities of all rows of the
// tile, and p = 0 of a key a row does not see times a NaN or Inf is NaN: such values would
// reach rows that never see them.  So they are zeroed in shared memory and their keys marked
// in `nonfinite` (one bit per key of the block); add_back_nonfinite_v adds p * v for them to
// the rows that see the key, in fp32, as dense attention would (p * Inf = Inf, NaN stays NaN).
// Every thread of the THREADS that loaded the block calls this (tid: its index among them,
// by default its index in the CTA); a thread checks the 16-byte chunks tid, tid + THREADS,
// ... of the block, the ones it copied itself with the same loop (PrefillItem::load_kv,
// QueryTile::load_keys), so it may call this right after its own cp.async wait (before the
// barrier that publishes the block) as well as between two barriers.
template <int D, int BK, int THREADS, typename T, typename Offset>
__device__ __forceinline__ void zero_nonfinite_v(T* Vs, unsigned* nonfinite, Offset offset, int tid = threadIdx.x) {
    constexpr int CH = D / 8;
    for (int c = tid; c < BK * CH; c += THREADS) {
        const int row = c / CH, ch = c % CH;
        uint4* chunk = reinterpret_cast<uint4*>(Vs + offset(row, ch));
        const uint4 u = *chunk;
        if (!(has_nonfinite_pair<T>(u.x) | has_nonfinite_pair<T>(u.y) | has_nonfinite_pair<T>(u.z) |
              has_nonfinite_pair<T>(u.w)))
            continue;  // the common case, in a few SIMD compares
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

// x = value where `pick`, as a select the compiler keeps: an unrolled chain of them over
// register-array elements would otherwise become one indexed load, moving the whole array to
// local memory (every kernel that adds back non-finite V did so, in its hot loop).
__device__ __forceinline__ void select_if(float& x, float value, bool pick) {
    asm("{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\nselp.f32 %0, %1, %0, p;\n}" : "+f"(x) : "f"(value), "r"((int)pick));
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
        for (int n = 0; n < NS; ++n) select_if(mine, (col & 1) ? p_of(n, h, 1) : p_of(n, h, 0), n == col >> 3);
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

// Calls fn(key) for each key marked in marks[KC / 32] (zero_nonfinite_v's bits), ascending.
template <int KC, typename Fn>
__device__ __forceinline__ void for_each_marked(const unsigned* marks, Fn fn) {
#pragma unroll
    for (int w = 0; w < KC / 32; ++w)
        for (unsigned bits = marks[w]; bits; bits &= bits - 1) fn(w * 32 + __ffs(bits) - 1);
}

// ---------------------------------------------------------------------------------------------
// The attention math of one key step on mma.sync (m16n8k16, fp32 accumulators), shared by the
// KV-outer (sparse_prefill.cu) and tile-outer (sparse_prefill_tile.cu) prefill kernels.  A warp
// holds MT m16 row tiles; lane l holds rows grp = l / 4 and grp + 8 (h = 0, 1) of each, and
// columns 2 quad, 2 quad + 1 (quad = l % 4) of each n-tile of 8.  A step covers NT * 8 keys at
// rows key0 .. of swizzled [rows][D] K and V tiles in shared memory.  The softmax runs in the
// log2 domain (scores times scale * log2 e) with a running maximum m, weight sum l (this lane's
// share: summed over the lane quad at the end, row_weight) and output o per row.

// S = Q K^T for the step's keys; Q fragments qa held in registers, one K fragment load per
// pair of n-tiles feeds all MT m-tiles.
template <typename T, int D, int MT, int NT>
__device__ __forceinline__ void qk_product(float (&s)[MT][NT][4], const unsigned (&qa)[MT][D / 16][4],
                                           const T* Ks, int key0) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            unsigned b[4];
            const int key = key0 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
            ldmatrix_x4(b, Ks + swizzled<D>(key, kk * 2 + ((lane >> 3) & 1)));
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16x8x16<T>(s[mt][2 * np], qa[mt][kk], b0);
                mma_16x8x16<T>(s[mt][2 * np + 1], qa[mt][kk], b1);
            }
        }
    }
}

// One online-softmax step of one m16 tile: column c of the step (0-based) is seen by row h
// when c < lim[h].  Seen scores are scaled to log2 units, unseen ones replaced by -inf (a
// select: a NaN or Inf of an unseen key never enters); the running maximum propagates NaN; l
// and o are rescaled to the new maximum; s becomes the step's weights.
template <int NT, int DN>
__device__ __forceinline__ void softmax_step(float (&s)[NT][4], const int (&lim)[2], float scale_log2,
                                             float (&m)[2], float (&l)[2], float (&o)[DN][4]) {
    const int quad = threadIdx.x & 3;
    float mx[2] = {MSA_NEG_INF, MSA_NEG_INF};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + 2 * quad + (e & 1);
            s[n][e] = col < lim[e >> 1] ? s[n][e] * scale_log2 : MSA_NEG_INF;
            mx[e >> 1] = fmax_nan(mx[e >> 1], s[n][e]);
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) mx[h] = fmax_nan(mx[h], __shfl_xor_sync(MSA_FULL_MASK, mx[h], off));
        const float new_m = fmax_nan(m[h], mx[h]);
        const float base = new_m == MSA_NEG_INF ? 0.f : new_m;
        const float alpha = exp2f(m[h] - base);
        m[h] = new_m;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            s[n][2 * h] = exp2f(s[n][2 * h] - base);
            s[n][2 * h + 1] = exp2f(s[n][2 * h + 1] - base);
            sum += s[n][2 * h] + s[n][2 * h + 1];
        }
        l[h] = l[h] * alpha + sum;
#pragma unroll
        for (int n = 0; n < DN; ++n) {
            o[n][2 * h] *= alpha;
            o[n][2 * h + 1] *= alpha;
        }
    }
}

// The weights of keys 16 j .. 16 j + 15 (S n-tiles 2j, 2j + 1) as the A operand of P V: the
// accumulator layout of S is the A layout, two values to a register.
template <typename T, int NT>
__device__ __forceinline__ void pack_p(unsigned (&pa)[4], const float (&p)[NT][4], int j) {
    pa[0] = pack2<T>(p[2 * j][0], p[2 * j][1]);
    pa[1] = pack2<T>(p[2 * j][2], p[2 * j][3]);
    pa[2] = pack2<T>(p[2 * j + 1][0], p[2 * j + 1][1]);
    pa[3] = pack2<T>(p[2 * j + 1][2], p[2 * j + 1][3]);
}

// Element (n-tile n, row h, column e) of weights packed by pack_p, as a float.
template <typename T, int JS>
__device__ __forceinline__ float packed_p(const unsigned (&pa)[JS][4], int n, int h, int e) {
    T x;
    x.bits = (unsigned short)(pa[n >> 1][2 * (n & 1) + h] >> (16 * e));
    return to_float(x);
}

// O += P V for the step's keys, P from the S registers (the accumulator layout is the A
// layout), one V fragment load (transposed) per pair of n-tiles of O feeds all MT m-tiles.
template <typename T, int D, int MT, int NT>
__device__ __forceinline__ void pv_product(float (&o)[MT][D / 8][4], const float (&p)[MT][NT][4], const T* Vs,
                                           int key0) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < NT / 2; ++j) {
        unsigned pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) pack_p<T>(pa[mt], p[mt], j);
        const int key = key0 + j * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            unsigned b[4];
            ldmatrix_x4_trans(b, Vs + swizzled<D>(key, dp * 2 + (lane >> 4)));
            const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16x8x16<T>(o[mt][2 * dp], pa[mt], b0);
                mma_16x8x16<T>(o[mt][2 * dp + 1], pa[mt], b1);
            }
        }
    }
}

// A row's weight sum from the lane quad's shares (all lanes call it: shuffles).
__device__ __forceinline__ float row_weight(float l) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) l += __shfl_xor_sync(MSA_FULL_MASK, l, off);
    return l;
}

// The natural-log lse of a row from its softmax state: max m (log2 units, scores scaled by
// log2 e) and weight sum lt; -inf for no weight (lt = 0), NaN for a NaN lt.
__device__ __forceinline__ float row_lse(float m, float lt) {
    return lt == 0.f ? MSA_NEG_INF : (m + __log2f(lt)) * MSA_LN2;
}

// Row h of this lane's m-tile: o / lt (its dims 8n + 2 quad, + 1) to the row at dst and the
// natural-log lse to *lse_dst (lane quad 0), from the softmax state (m, lt = row_weight(l)).
// lt = 0 (no weight: no seen key, or every seen score -inf): lse -inf, and o scaled by 0 for
// a partial (which keeps the NaN that a seen key's non-finite v gives at weight 0, for the
// combine), or exactly 0 for a final output (final = true).  NaN lt (a NaN or +inf score):
// NaN o and lse.
template <typename T, int DN>
__device__ __forceinline__ void store_row(T* dst, float* lse_dst, const float (&o)[DN][4], int h, float m, float lt,
                                          bool final) {
    const int quad = threadIdx.x & 3;
    const bool empty = lt == 0.f;
    const float inv = empty ? 0.f : 1.f / lt;
    dst += 2 * quad;
#pragma unroll
    for (int n = 0; n < DN; ++n) {
        const float a = final && empty ? 0.f : o[n][2 * h] * inv, b = final && empty ? 0.f : o[n][2 * h + 1] * inv;
        store2<T>(dst + n * 8, a, b);
    }
    if (quad == 0) *lse_dst = row_lse(m, lt);
}
