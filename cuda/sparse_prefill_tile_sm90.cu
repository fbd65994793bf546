// Query-tile-outer block-sparse attention on Hopper (sm_90a): sparse_prefill_tile.cu's kernel
// (same grid, inputs and outputs; its header says what they are) with both products on
// wgmma, for D = BK = 128.
//
// CTA: WGS warpgroups, each on its own 64 rows of a query tile of M = 64 * WGS rows (64 / G
// tokens x G heads a warpgroup).  The tile walks the sorted union of its tokens' picks a
// whole block at a time (chunks of 128 keys, STAGES cp.async buffers of K and V): per chunk
// a warpgroup computes S = Q K^T (m64n128, Q from registers, K K-major from shared memory),
// masks it per row (the row's token picked the block; causal visibility), takes an
// online-softmax step in registers (softmax_step: the wgmma accumulator is the mma.m16n8 C
// layout repeated over n-tiles) and O += P V (P from registers, V MN-major through the
// descriptor, as in sparse_prefill_sm90.cu); out and lse are written once per row.
//
// A warpgroup none of whose tokens sees a chunk (they did not pick its block, or are before
// it) skips it: its state would not change.  A wgmma runs on all 128 threads of a warpgroup,
// so where some of its tokens picked a block the others compute it masked (p = 0); with 16
// heads a token that is 4 tokens a warpgroup, against one a warp in the mma.sync kernel.
//
// Shared memory: 1 KB to align the swizzle atoms, STAGES x (K chunk, V chunk) of 128 x D in
// the 128-byte swizzle of wgmma (the query tile staged in the last one before the walk, its
// fragments then held in registers), then the union (TileUnion).
//
// PRODUCER = 0: every thread loads (cp.async) and computes; a CTA barrier a chunk publishes
// it and frees the buffer of the one before.  PRODUCER = 1: one more warpgroup loads the chunks
// into the STAGES buffers, zeroes their non-finite V and marks them, and the computing
// warpgroups take a chunk when its `full` barrier completes and free its buffer on `empty`
// (pipeline.cuh): no CTA barrier in the walk, the warpgroups out of lockstep, the loads' address
// math and issue off the computing warps.  The producer hands its registers to them.
#include "pipeline.cuh"
#include "tile_outer.cuh"
#include "wgmma.cuh"

template <typename T, int D, int G, int BK, int WGS, int STAGES, int PRODUCER>
__global__ void __launch_bounds__(128 * (WGS + PRODUCER), 1)
sparse_prefill_tile_sm90_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const int* __restrict__ block_indices, const int* __restrict__ cu_q,
                                const int* __restrict__ cu_k, const int* __restrict__ tile_off, int n_seq,
                                int q_begin, int rows, int n_tiles, const unsigned char* __restrict__ row_mode,
                                int top_k, T* __restrict__ out, float* __restrict__ lse_out, int n_heads_q,
                                int n_heads_kv, int causal, float scale_log2, const int* __restrict__ block_table,
                                int max_pages, int page_size) {
    static_assert(D == 128 && BK == 128, "wgmma tiles: m64n128 over D = BK = 128");
    static_assert(PRODUCER == 0 || PRODUCER == 1, "no producer, or one warpgroup");
    constexpr int CONSUMERS = 128 * WGS;               // threads that compute
    constexpr int THREADS = CONSUMERS + 128 * PRODUCER;
    constexpr int LOADERS = PRODUCER ? 128 : THREADS;  // threads that load the K/V chunks
    // registers a thread after the reallocation, with two computing warpgroups (with one, the
    // launch bounds of 256 threads already give each thread the most): the CTA starts with the
    // launch bounds' 168 a thread (ptxas gives a kernel that reallocates all of them), and the
    // producer's 128 threads hand 128 each to the 256 computing ones
    constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;
    static_assert(128 * PRODUCER_REGS + 2 * 128 * CONSUMER_REGS == 384 * 168, "the register file, moved");
    constexpr int M = 64 * WGS;        // rows of the tile
    constexpr int TT = M / G;          // tokens of the tile
    constexpr int TW = 64 / G;         // tokens of a warpgroup
    constexpr int KC = BK;             // keys per chunk: a block
    constexpr int KS = D / 16, JS = KC / 16, NT = KC / 8, DN = D / 8;
    constexpr int STAGE = 2 * KC * D;  // elements of one buffer: K chunk, V chunk
    static_assert(64 % G == 0 && TT <= 64, "whole tokens a warpgroup, at most 64 a tile (a mask bit each)");
    static_assert(M * D <= STAGE, "the query tile is staged in one K/V buffer");
    static_assert(STAGES >= 2, "at least one chunk in flight while one is computed");

    const int g = blockIdx.x / n_tiles;
    QueryTile tile;
    if (!tile.init(blockIdx.x - g * n_tiles, tile_off, cu_q, cu_k, n_seq, q_begin, rows, TT) ||
        !tile.runs_tile_outer(row_mode, q_begin, g, n_heads_kv))
        return;
    const int count = tile.count;
    const KeyRows key_rows{block_table, max_pages, page_size};

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    T* bufs = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));  // [STAGES][K | V]
    // the query tile: in a region of its own with a producer (read by wgmma every chunk), else
    // staged in the last buffer (read once into registers)
    T* Qs = bufs + (PRODUCER ? STAGES : STAGES - 1) * STAGE;
    TileUnion u(reinterpret_cast<unsigned char*>(bufs + STAGES * STAGE + PRODUCER * M * D), TT * top_k);
    // keys whose V row held NaN or Inf.  Without a producer, chunk c's in slot c % (STAGES + 1): a
    // slot is cleared one barrier before the chunk that next uses it marks it.  With one, buffer
    // b's in slot b: the producer clears it once the consumers have freed the buffer.
    __shared__ unsigned nonfinite_v[STAGES + 1][KC / 32];
    __shared__ MbarrierRing<STAGES> ring;  // with a producer
    __shared__ int n_union;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
    if (tid < (STAGES + 1) * (KC / 32)) nonfinite_v[tid / (KC / 32)][tid % (KC / 32)] = 0;
    if (PRODUCER && tid == 0) ring.init(4 * WGS);  // published by the barriers of the union's build

    // the query tile (rows past the tile's tokens zero), by the computing threads
    if (!PRODUCER || tid < CONSUMERS)
        tile.template load_queries<D, M, G, CONSUMERS>(Qs, q, g, n_heads_q,
                                                       [](int row, int ch) { return swizzled_panel<D, M>(row, ch); });
    cp_async_commit();
    const int n_chunks = u.template build<THREADS>(tile, block_indices, q_begin, g, n_heads_kv, top_k, TT, n_union);
    const TileRows tr = TileRows::template make<G>(tile, causal);
    // this warpgroup's tokens (of the tile's), and the keys the last of them sees: with the
    // chunk's mask, whether any of its rows sees the chunk (the same value in every thread)
    const unsigned long long wg_tokens = (TW == 64 ? ~0ull : ((1ull << TW) - 1) << (wg * TW)) & tr.all_tokens;

    auto load_chunk = [&](int c, int buf, int loader) {
        T* Ks = bufs + buf * STAGE;
        const int key0 = u.block[c] * BK;
        tile.template load_keys<D, KC, LOADERS>(Ks, Ks + KC * D, k, v, key_rows, key0, key0, tr.key_end, g,
                                                n_heads_kv, [](int row, int ch) { return swizzled_panel<D, KC>(row, ch); },
                                                loader);
    };
    // a row of the tile that does not see a loaded key of chunk c: its p = 0 must not meet that
    // key's V (the keys read: up to what the tile's last token sees, the rest zero)
    auto partly = [&](int c) {
        const int key0 = u.block[c] * BK;
        return tr.partly(u.mask[c], key0, min(key0 + KC, tr.key_end) - key0);
    };
    // the computing warps are done with chunk c (with a producer: it may load another into its buffer)
    auto release = [&](int c) {
        if constexpr (PRODUCER) ring.release(c);
    };
    if constexpr (PRODUCER) {
        if (wg == WGS) {  // the producer: the chunks into the ring, their non-finite V cleaned
            if constexpr (WGS > 1) warpgroup_registers_dec<PRODUCER_REGS>();
            const int loader = tid - CONSUMERS;
            ring.produce(
                n_chunks,
                [&](int c, int buf) {
                    if (partly(c)) {
                        if (loader < KC / 32) nonfinite_v[buf][loader] = 0;
                        named_barrier_sync<LOADERS>(2);  // cleared before any producer thread marks a key
                    }
                    load_chunk(c, buf, loader);
                },
                [&](int c, int buf) {
                    if (partly(c))  // what this thread copied
                        zero_nonfinite_v<D, KC, LOADERS>(bufs + buf * STAGE + KC * D, nonfinite_v[buf],
                                                         [](int row, int ch) { return swizzled_panel<D, KC>(row, ch); },
                                                         loader);
                });
            return;
        }
        if constexpr (WGS > 1) warpgroup_registers_inc<CONSUMER_REGS>();
    } else {
#pragma unroll
        for (int st = 0; st < STAGES - 1; ++st) {  // the first STAGES - 1 chunks (buffers 0 .. STAGES - 2)
            if (st < n_chunks) load_chunk(st, st, tid);
            cp_async_commit();
        }
    }

    unsigned qa[KS][4];  // without a producer, the query tile's fragments (the A operand of Q K^T)
    if constexpr (PRODUCER) {
        cp_async_wait<0>();  // the query tile has landed
        fence_proxy_async();  // read by wgmma
        named_barrier_sync<CONSUMERS>(1);
    } else {
        cp_async_wait<STAGES - 1>();  // the query tile has landed (the chunks may still be in flight)
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KS; ++kk)
            ldmatrix_x4(qa[kk], Qs + swizzled_panel<D, M>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }
    float m[2] = {MSA_NEG_INF, MSA_NEG_INF}, l[2] = {0.f, 0.f};
    float o[DN][4];  // O: rows as S, columns d = 8 n + 2 quad + e
#pragma unroll
    for (int n = 0; n < DN; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

#pragma unroll 1
    for (int c = 0; c < n_chunks; ++c) {
        const int buf = c % STAGES, marks = PRODUCER ? buf : c % (STAGES + 1);
        const int key0 = u.block[c] * BK;
        const unsigned long long mask = u.mask[c];
        const bool part = partly(c);
        T* Ks = bufs + buf * STAGE;
        T* Vs = Ks + KC * D;
        if constexpr (PRODUCER) {
            ring.wait_filled(c);  // chunk c has landed, its V cleaned
        } else {
            cp_async_wait<STAGES - 2>();  // chunk c has landed, for this thread
            if (part)  // what this thread copied
                zero_nonfinite_v<D, KC, THREADS>(Vs, nonfinite_v[marks],
                                                 [](int row, int ch) { return swizzled_panel<D, KC>(row, ch); });
            fence_proxy_async();  // this thread's cp.async and zeroing writes, read next by wgmma
            __syncthreads();  // chunk c for every thread; and every warpgroup is done with chunk c - 1 (and the query tile)
            if (c + STAGES - 1 < n_chunks) load_chunk(c + STAGES - 1, (c + STAGES - 1) % STAGES, tid);
            cp_async_commit();
            if (tid < KC / 32) nonfinite_v[(c + STAGES) % (STAGES + 1)][tid] = 0;  // chunk c - 1's slot, next used by c + STAGES
        }
        // the warpgroup's last token that picked the block sees the most of it (causal)
        const unsigned long long mine = mask & wg_tokens;
        if (mine == 0 || tile.visible(63 - __clzll(mine), causal) <= key0) {  // warpgroup-uniform skip
            release(c);
            continue;
        }
        int lim[2];  // keys of the chunk each of this lane's rows sees
        tr.limits(lim, mask, key0);

        float s[NT][4];  // S = Q K^T: rows 16 warp + grp (+ 8), keys 8 n + 2 quad + e
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {  // K-major Q and K: panel kk / 4, 32 bytes per k16 step
            const u64 desc_k = wgmma_desc_sw128(smem_addr(Ks) + (kk >> 2) * (KC * 128) + (kk & 3) * 32);
            if constexpr (PRODUCER)  // this warpgroup's 64 rows of the query tile
                wgmma_m64n128k16_ss<T>(
                    wgmma_acc(s), wgmma_desc_sw128(smem_addr(Qs) + (kk >> 2) * (M * 128) + wg * 64 * 128 + (kk & 3) * 32),
                    desc_k, kk > 0);
            else
                wgmma_m64n128k16<T>(wgmma_acc(s), qa[kk], desc_k, kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(wgmma_acc(s));
        softmax_step<NT, DN>(s, lim, scale_log2, m, l, o);
        unsigned pa[JS][4];  // P as the A operand of P V
#pragma unroll
        for (int j = 0; j < JS; ++j) pack_p<T>(pa[j], s, j);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < JS; ++j)  // MN-major V: 16 keys = two 1024-byte atoms per step, panels 16 KB apart
            wgmma_m64n128k16<T, 1>(wgmma_acc(o), pa[j], wgmma_desc_sw128(smem_addr(Vs) + j * 2048, KC * 128, 1024), 1);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(wgmma_acc(o));
        if (part)  // the NaN and Inf of V zeroed above, for the rows that see them
            for_each_marked<KC>(nonfinite_v[marks], [&](int col) {
                const T* v_row = v + (key_rows.row(tile.seq, tile.k_start, key0 + col) * n_heads_kv + g) * D;
                add_back_nonfinite_v<D, NT>(
                    v_row, col, col, lim, [&](int n, int h, int e) { return packed_p<T>(pa, n, h, e); },
                    [&](int n, int h, int e, float x) { o[n][2 * h + e] += x; });
            });
        release(c);
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float lt = row_weight(l[h]);
        if (tr.tok[h] >= count) continue;
        const i64 row = (i64)(tile.t0 + tr.tok[h]) * n_heads_q + g * G + (warp * 16 + (lane >> 2) + 8 * h) % G;
        store_row<T, DN>(out + row * D, lse_out + row, o, h, m[h], lt, true);
    }
}
