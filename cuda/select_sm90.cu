// Index-branch selection for prefill on Hopper (sm_90a): select.cu's kernel with the index
// GEMM on wgmma instead of mma.sync.  Same rows, grid, epilogues and results
// (select_tile.cuh); only the inner product and the pipeline differ.
//
// CTA: two warpgroups, 256 rows (a warpgroup owns 128 rows = two m64 tiles).  The query rows
// pass through shared memory into registers once (wgmma A operand from registers); keys
// stream in 128-key tiles through a STAGES-deep cp.async ring, loaded STAGES - 1 tiles ahead.
// Per tile a warpgroup issues the two m64n128 products as two commit groups: it folds the
// first into block maxima while the second still runs on the tensor cores, and the two
// warpgroups' epilogues overlap each other's products.
// (Issuing the next tile's first product before this tile's second fold, so that one product
// is always in flight, made ptxas serialize every wgmma: C7514, two accumulators in flight
// across the loop.)
// Shared memory: rows (256 x Di) + STAGES key tiles (128 x Di) + top-k lists (top_k x 256 x 8 B):
// 224 KB at Di = 128 with 4 stages and top_k 16, or 3 stages and top_k 32.
//
// PRODUCER = 1: a third warpgroup loads the key tiles into the ring (full / empty mbarriers,
// pipeline.cuh) and the two computing warpgroups run out of step, with no CTA barrier per
// tile: one's fold overlaps the other's products.  The producer hands its registers to them
// for the key stream and all three take the launch's share back for the epilogue (finish),
// which every thread of the CTA runs: a CTA barrier orders the computing warpgroups' return
// before the producer's.
#include "pipeline.cuh"
#include "select_tile.cuh"
#include "wgmma.cuh"

constexpr int SM90_ROWS = 256;

template <int DI, int BS, int STAGES, int EPI, typename T, int PRODUCER>
__global__ void __launch_bounds__(256 + 128 * PRODUCER, 1)
select_sm90_kernel(const T* __restrict__ index_q, const T* __restrict__ index_k,
                   const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                   float* __restrict__ scores_out, int* __restrict__ ids_out, u64* __restrict__ partial_out,
                   unsigned* __restrict__ counters,
                   int n_heads, int k_heads, int width, int q_tiles, int top_k, int local_blocks,
                   int sink_blocks, int causal, int n_splits,
              const int* __restrict__ block_table, int max_pages, int page_size) {
    static_assert(PRODUCER == 0 || PRODUCER == 1, "no producer, or one warpgroup");
    constexpr int CONSUMERS = 256;                      // threads that compute
    constexpr int THREADS = CONSUMERS + 128 * PRODUCER;
    // registers a thread: the launch bounds' 168 (384 threads), then 40 (producer) and 232
    // (computing) for the key stream
    constexpr int LAUNCH_REGS = 168, PRODUCER_REGS = 40, CONSUMER_REGS = 232;
    static_assert(128 * PRODUCER_REGS + CONSUMERS * CONSUMER_REGS == THREADS * LAUNCH_REGS || !PRODUCER,
                  "the register file, moved");
    constexpr int BM = SM90_ROWS;
    constexpr int KS = DI / 16;              // k16 steps
    constexpr int TB = KEY_TILE / BS;        // blocks per key tile
    static_assert(DI == 64 || DI == 128, "index dim");
    static_assert(BS == 64 || BS == 128, "block size");

    // 1024-byte aligned base: the swizzle atoms of every tile start on a 1024-byte boundary
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    T* qs = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));  // [BM x DI]
    T* kbuf = qs + BM * DI;                                                   // [STAGES][KEY_TILE x DI]
    u64* lists = reinterpret_cast<u64*>(kbuf + STAGES * KEY_TILE * DI);  // [top_k][BM]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp inside it
    const int group = lane >> 2, quad = lane & 3;

    SelectRows<BM> rows;
    if (!rows.init(cu_q, cu_k, n_heads, k_heads, q_tiles, causal, n_splits, KeyRows{block_table, max_pages, page_size})) return;
    const int rows_here = rows.rows_here, t_begin = rows.t_begin, t_end = rows.t_end;
    auto stage_of = [&](int t) { return kbuf + ((t - t_begin) % STAGES) * KEY_TILE * DI; };
    __shared__ MbarrierRing<STAGES> ring;  // with a producer

    if (!PRODUCER || tid < CONSUMERS) rows.template load_rows<DI, CONSUMERS>(qs, index_q);
    cp_async_commit();
    if constexpr (PRODUCER) {
        if (tid == 0) ring.init(CONSUMERS / 32);
        __syncthreads();  // the barriers initialized
    } else {
#pragma unroll
        for (int d = 0; d < STAGES - 1; ++d) {
            if (t_begin + d < t_end) rows.template load_keys<DI, THREADS>(stage_of(t_begin + d), index_k, t_begin + d);
            cp_async_commit();
        }
    }

    int row_vis[2][2];  // visible keys of this thread's accumulator rows (0 for padding rows)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = wg * 128 + mt * 64 + wq * 16 + h * 8 + group;
            row_vis[mt][h] = r < rows_here ? rows.n_visible(r) : 0;
        }
    // lane (group, quad) owns row (mt, h) = (quad / 2, quad % 2) of its group: the epilogue
    // stays inside the warp (quad shuffles, no shared-memory reduction)
    const int own = wg * 128 + (quad >> 1) * 64 + wq * 16 + (quad & 1) * 8 + group;
    SelectRowOwner<BS, EPI> row_owner;
    row_owner.init(rows, own, lists, top_k);

    // The key stream of the computing warpgroups: every tile's products, block maxima and offers.
    auto stream_keys = [&]() {
        // A fragments (this warp's 16 rows of each m64 tile) stay in registers for the whole run:
        // only the keys are read from shared memory by wgmma (3% faster than A from shared memory)
        unsigned a_frag[2][KS][4];
        if constexpr (PRODUCER) {
            cp_async_wait<0>();  // the rows
            named_barrier_sync<CONSUMERS>(1);
        } else {
            cp_async_wait<STAGES - 1>();  // the rows' group
            __syncthreads();
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                ldmatrix_x4(a_frag[mt][kk], qs + swizzled_panel<DI, BM>(wg * 128 + mt * 64 + wq * 16 + (lane & 15), kk * 2 + (lane >> 4)));
        for (int t = t_begin; t < t_end; ++t) {
            if constexpr (PRODUCER) {
                ring.wait_filled(t - t_begin);  // tile t landed
            } else {
                cp_async_wait<STAGES - 2>();
                fence_proxy_async();
                __syncthreads();  // tile t landed for all; every warpgroup is done with tile t-1's stage
                if (t + STAGES - 1 < t_end)
                    rows.template load_keys<DI, THREADS>(stage_of(t + STAGES - 1), index_k, t + STAGES - 1);
                cp_async_commit();
            }

            const unsigned k_base = smem_addr(stage_of(t));
            float acc[2][64];
            wgmma_fence();
            // no branch around the products, even for padding rows (zero-filled, never owned): a
            // wgmma under a condition the compiler cannot prove warpgroup-uniform is serialized
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int kk = 0; kk < KS; ++kk) {  // panel kk / 4, 32 bytes per k16 step inside it
                    const unsigned b = k_base + (kk >> 2) * (KEY_TILE * 128) + (kk & 3) * 32;
                    wgmma_m64n128k16<T>(acc[mt], a_frag[mt][kk], wgmma_desc_sw128(b), kk > 0);
                }
                wgmma_commit();
            }
            wgmma_fence_operands(acc[0]);
            wgmma_fence_operands(acc[1]);

            const int key0 = t * KEY_TILE;
            float mx[2][2][TB];
            // block maxima of the thread's two rows per m-tile: 4 independent max chains per (row,
            // block); the masked version only on tiles that cross the first row's position
            auto fold = [&](const float (&acc)[64], int mt, bool masked) {
                float part[2][TB][4];
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int lb = 0; lb < TB; ++lb)
#pragma unroll
                        for (int c = 0; c < 4; ++c) part[h][lb][c] = MSA_NEG_INF;
#pragma unroll
                for (int i = 0; i < 64; ++i) {
                    const int h = (i >> 1) & 1, lb = (8 * (i >> 2)) / BS, c = (i >> 2) & 3;
                    const bool keep = !masked || key0 + 8 * (i >> 2) + 2 * quad + (i & 1) < row_vis[mt][h];
                    part[h][lb][c] = fmaxf(part[h][lb][c], keep ? acc[i] : MSA_NEG_INF);
                }
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int lb = 0; lb < TB; ++lb)
                        mx[mt][h][lb] = fmaxf(fmaxf(part[h][lb][0], part[h][lb][1]), fmaxf(part[h][lb][2], part[h][lb][3]));
            };
            const bool need_mask = key0 + KEY_TILE > rows.n_vis_min;
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                if (mt == 0) {
                    wgmma_wait<1>();  // fold m-tile 0 while m-tile 1 multiplies
                } else {
                    wgmma_wait<0>();
                    if constexpr (PRODUCER) ring.release(t - t_begin);  // both products have read the tile
                }
                wgmma_fence_operands(acc[mt]);
                if (need_mask) fold(acc[mt], mt, true);
                else fold(acc[mt], mt, false);
            }
            quad_max(mx);
            if (row_owner.owner) {
#pragma unroll
                for (int lb = 0; lb < TB; ++lb)
                    row_owner.consume(key0 / BS + lb, owned_max(mx, lb, quad), scores_out, width, local_blocks, sink_blocks);
            }
        }
    };
    if constexpr (PRODUCER) {
        if (wg == 2) {  // the producer: the CTA's key tiles into the ring (STAGES - 2 in flight, as deep
                        // as the ring without a producer)
            warpgroup_registers_dec<PRODUCER_REGS>();
            ring.produce(
                t_end - t_begin,
                [&](int i, int) {
                    rows.template load_keys<DI, 128>(stage_of(t_begin + i), index_k, t_begin + i, tid - CONSUMERS);
                },
                [](int, int) {});
            // Not before the computing warpgroups have given theirs back: a producer with few tiles
            // (or none) would otherwise take back the registers they have not yet claimed, and they
            // would wait for them forever.  The barrier also makes the warps of each warpgroup meet
            // between two setmaxnreg (PTX).
            named_barrier_sync<THREADS>(2);
            warpgroup_registers_inc<LAUNCH_REGS>();  // for the epilogue
        } else {
            warpgroup_registers_inc<CONSUMER_REGS>();
            stream_keys();  // its warps meet at its named barrier 1 before the next setmaxnreg
            warpgroup_registers_dec<LAUNCH_REGS>();  // back to the launch's share, for the producer
            named_barrier_sync<THREADS>(2);
        }
    } else {
        stream_keys();
    }
    row_owner.template finish<BM, THREADS>(rows, scores_out, ids_out, partial_out, counters, width, top_k, n_splits);
}
