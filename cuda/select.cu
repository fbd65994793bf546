// Index-branch selection on tensor cores: S = index_q @ index_k^T with the masked max over
// each key block in the epilogue, then either
//   EPI_SCORES: the block scores go to memory (block_scores), or
//   EPI_TOPK  : a running top-k per (query, group) row in shared memory, so only block ids
//               (or, with split-K, top_k partial keys per split) leave the kernel (select_blocks).
//
// Rows, grid and the per-row epilogue: select_tile.cuh.
//
// Tiles.  Keys stream in KEY_TILE = 128-key tiles (one 128-block or two 64-blocks), double
// buffered with cp.async into XOR-swizzled shared memory (conflict-free ldmatrix).  Warps form a
// WM x WN grid; a warp owns 16 * MT rows (MT m16 tiles, A fragments kept in registers for the
// whole run: Di=128, MT=2 -> 64 registers) x 128/WN keys.  Four 8-key n-tiles at a time: B by
// ldmatrix, then MT m-tiles x 4 n-tiles independent mma.m16n8k16 chains over Di/16 k-steps (one
// chain stalls on mma latency: 24% -> 36% of the matmul ceiling), and each 16x8 fp32 result
// folds straight into running block maxima (no accumulator tile).  WM=8, WN=1 (BM=256) for
// prefill (select_sm90.cu replaces it on sm_90); for decode, where few rows exist and the key
// stream sets the time: WM=1, WN=4 (BM=32), or WN=8 with MT=1 (BM=16) for at most 16 rows:
// half the registers and twice the warps per SM on the key stream (with 2 warps per scheduler
// the loop stalls on instruction latency, not on memory: 52% of DRAM bandwidth measured).
// Causal: only tiles crossing the first row's position are masked.  Each row has one owner thread that writes its block score
// or offers the block to its top-k list (kept in shared memory, ThreadTopK): with WN = 1 the
// owner is a lane of the warp that computed the row (quad shuffles, one barrier per tile);
// with WN > 1 the warps' partial maxima meet in shared memory first.
#include "select_tile.cuh"

// (minimum 1 CTA per SM: left to itself ptxas capped the decode grids at 80 registers and
// spilled; split_count sizes those grids for 2 CTAs per SM, which 128 registers still allow)
template <int DI, int BS, int WM, int WN, int MT, int EPI, typename T>
__global__ void __launch_bounds__(32 * WM * WN, 1)
select_kernel(const T* __restrict__ index_q, const T* __restrict__ index_k,
              const int* __restrict__ cu_q, const int* __restrict__ cu_k,
              float* __restrict__ scores_out, int* __restrict__ ids_out, u64* __restrict__ partial_out,
              unsigned* __restrict__ counters,
              int n_heads, int k_heads, int width, int q_tiles, int top_k, int local_blocks,
              int sink_blocks, int causal, int n_splits,
              const int* __restrict__ block_table, int max_pages, int page_size) {
    constexpr int THREADS = 32 * WM * WN;
    constexpr int WR = 16 * MT;              // rows per warp (MT m16 tiles)
    constexpr int BM = WR * WM;              // rows per CTA
    constexpr int NW = KEY_TILE / WN;        // keys per warp per tile
    constexpr int NJ = NW / 8;               // n8 tiles per warp
    constexpr int KS = DI / 16;              // k16 steps
    constexpr int BPW = NW > BS ? NW / BS : 1;   // blocks a warp's key slice touches
    constexpr int TB = KEY_TILE / BS;        // blocks per key tile
    constexpr int NG = NJ < 4 ? NJ : 4;      // n-tiles in flight together
    static_assert(DI == 64 || DI == 128, "index dim");
    static_assert(BS == 64 || BS == 128, "block size");
    static_assert(NW % 8 == 0 && KS % 2 == 0, "tile shape");
    static_assert(MT == 2 || (MT == 1 && WN > 1), "one m-tile per warp: rows reach their owners through shared memory");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* kbuf = reinterpret_cast<T*>(smem_raw);                    // [2][KEY_TILE * DI]
    float* red = reinterpret_cast<float*>(kbuf + 2 * KEY_TILE * DI);  // [WN][BPW][BM]
    u64* lists = reinterpret_cast<u64*>(red + WN * BPW * BM);    // [top_k][BM]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp / WN, warp_n = warp % WN;
    const int group = lane >> 2, quad = lane & 3;

    SelectRows<BM> rows;
    if (!rows.init(cu_q, cu_k, n_heads, k_heads, q_tiles, causal, n_splits, KeyRows{block_table, max_pages, page_size})) return;
    const int rows_here = rows.rows_here, t_begin = rows.t_begin, t_end = rows.t_end;
    auto load_keys = [&](int buf, int t) { rows.template load_keys<DI, THREADS>(kbuf + buf * KEY_TILE * DI, index_k, t); };

    // ---- Q rows -> shared -> A fragments in registers.  BM <= KEY_TILE: Q is staged in buffer 1
    // while the first key tile lands in buffer 0.  BM > KEY_TILE (WM = 8): Q needs both buffers,
    // so the first key tile is loaded after the A fragments are out.
    constexpr bool Q_IN_BUFFER_1 = BM <= KEY_TILE;
    static_assert(BM <= 2 * KEY_TILE, "Q staging must fit the two key buffers");
    if (Q_IN_BUFFER_1 && t_begin < t_end) load_keys(0, t_begin);
    rows.template load_rows<DI, THREADS>(Q_IN_BUFFER_1 ? kbuf + KEY_TILE * DI : kbuf, index_q);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned a[MT][KS][4];
    {
        const T* qs = Q_IN_BUFFER_1 ? kbuf + KEY_TILE * DI : kbuf;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                ldmatrix_x4(a[mt][kk], qs + swizzled_panel<DI, BM>(warp_m * WR + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }
    if (!Q_IN_BUFFER_1) {
        __syncthreads();  // every warp has its A fragments: the buffers are free
        if (t_begin < t_end) load_keys(0, t_begin);
        cp_async_commit();  // waited for at the top of the first iteration
    }
    // warp-uniform: m-tiles holding real rows (inactive ones only produce -inf, masked below)
    bool m_active[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m_active[mt] = warp_m * WR + mt * 16 < rows_here;
    int row_vis[MT][2];  // visible keys of this thread's accumulator rows (0 for padding rows)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp_m * WR + mt * 16 + h * 8 + group;
            row_vis[mt][h] = r < rows_here ? rows.n_visible(r) : 0;
        }

    // ---- the row owned by this thread in the epilogue.  WN == 1: a warp holds whole rows, so
    // lane (group, quad) owns row (mt, h) = (quad / 2, quad % 2) of its group and the epilogue
    // stays inside the warp (no shared-memory reduction, one barrier per key tile).
    // WN > 1: thread r owns row r after a reduction through shared memory.
    const int own = (WN == 1) ? warp_m * 32 + (quad >> 1) * 16 + (quad & 1) * 8 + group : tid;
    SelectRowOwner<BS, EPI> row_owner;
    row_owner.init(rows, own, lists, top_k);
    const bool owner = row_owner.owner;
    __syncthreads();  // A fragments read: buffer 1 is free

    auto consume = [&](int blk, float m) { row_owner.consume(blk, m, scores_out, width, local_blocks, sink_blocks); };

    for (int t = t_begin; t < t_end; ++t) {
        const int cur = (t - t_begin) & 1;
        // Tile t+1 is issued before waiting for tile t, so two tiles are in flight while a CTA
        // waits: decode rows are few and the math per tile short, so the key stream is
        // latency-bound and the bytes in flight set the bandwidth.
        __syncthreads();  // every warp is done with tile t-1's buffer
        if (t + 1 < t_end) load_keys(cur ^ 1, t + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // tile t landed for all

        const T* ks = kbuf + cur * KEY_TILE * DI;
        const int key0 = t * KEY_TILE;
        const bool need_mask = key0 + KEY_TILE > rows.n_vis_min;
        float mx[MT][2][BPW];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int lb = 0; lb < BPW; ++lb) mx[mt][h][lb] = MSA_NEG_INF;

        // NG n-tiles at a time: 2 x NG independent accumulator chains keep the tensor pipe
        // busy (one chain of Di/16 dependent mma per n-tile would stall on mma latency).
#pragma unroll
        for (int j0 = 0; j0 < NJ; j0 += NG) {
            float acc[MT][NG][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int g = 0; g < NG; ++g)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][g][e] = 0.f;
#pragma unroll
            for (int p = 0; p < KS / 2; ++p) {
                unsigned r4[NG][4];  // n-tile j0+g, k-steps 2p and 2p+1
#pragma unroll
                for (int g = 0; g < NG; ++g)
                    ldmatrix_x4(r4[g], ks + swizzled_panel<DI, KEY_TILE>(warp_n * NW + (j0 + g) * 8 + (lane & 7), p * 4 + (lane >> 3)));
#pragma unroll
                for (int s2 = 0; s2 < 2; ++s2)
#pragma unroll
                    for (int g = 0; g < NG; ++g) {
                        const unsigned bf[2] = {r4[g][2 * s2], r4[g][2 * s2 + 1]};
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt)
                            if (m_active[mt]) mma_16x8x16<T>(acc[mt][g], a[mt][2 * p + s2], bf);
                    }
            }
#pragma unroll
            for (int g = 0; g < NG; ++g) {
                const int lb = ((j0 + g) * 8) / (NW / BPW);  // constant after unrolling
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    float* c = acc[mt][g];
                    if (need_mask) {
                        const int col = key0 + warp_n * NW + (j0 + g) * 8 + 2 * quad;
                        c[0] = col < row_vis[mt][0] ? c[0] : MSA_NEG_INF;
                        c[1] = col + 1 < row_vis[mt][0] ? c[1] : MSA_NEG_INF;
                        c[2] = col < row_vis[mt][1] ? c[2] : MSA_NEG_INF;
                        c[3] = col + 1 < row_vis[mt][1] ? c[3] : MSA_NEG_INF;
                    }
                    mx[mt][0][lb] = fmaxf(mx[mt][0][lb], fmaxf(c[0], c[1]));
                    mx[mt][1][lb] = fmaxf(mx[mt][1][lb], fmaxf(c[2], c[3]));
                }
            }
        }
        quad_max(mx);
        if constexpr (WN == 1) {
            if (owner) {
#pragma unroll
                for (int lb = 0; lb < BPW; ++lb) consume(key0 / BS + lb, owned_max(mx, lb, quad));  // BPW == TB here
            }
        } else {
            if (quad == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int lb = 0; lb < BPW; ++lb)
                            red[(warp_n * BPW + lb) * BM + warp_m * WR + mt * 16 + h * 8 + group] = mx[mt][h][lb];
            }
            __syncthreads();
            if (owner) {
#pragma unroll
                for (int gb = 0; gb < TB; ++gb) {
                    float m = MSA_NEG_INF;
#pragma unroll
                    for (int wn = 0; wn < WN; ++wn)
#pragma unroll
                        for (int lb = 0; lb < BPW; ++lb)
                            if ((wn * NW) / BS + lb == gb) m = fmaxf(m, red[(wn * BPW + lb) * BM + tid]);
                    consume(key0 / BS + gb, m);
                }
            }
        }
        // the next iteration's first barrier orders these reads of red before its writes
    }

    row_owner.template finish<BM, THREADS>(rows, scores_out, ids_out, partial_out, counters, width, top_k, n_splits);
}
