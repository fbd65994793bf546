// Index-branch selection on tensor cores: S = index_q @ index_k^T with the masked max over
// each key block in the epilogue, then either
//   EPI_SCORES: the block scores go to memory (block_scores), or
//   EPI_TOPK  : a running top-k per (query, group) row in shared memory, so only block ids
//               (or, with split-K, top_k partial keys per split) leave the kernel (select_blocks).
//
// Rows.  A CTA owns BM = 32*WM rows of one sequence.  With a shared index_k (1 head) a row is
// a (query, group) pair taken in memory order (q * Hkv + g): all groups read the same keys, so
// one key tile feeds Hkv groups (decode reads the index keys once).  With per-group index_k
// (Hkv heads) a CTA holds one group (grid.y) and its rows are queries.
// Grid: x = sequence * q_tiles + row tile (heaviest causal tiles first), y = group (per-group
// index_k) or 1, z = split of the CTA's key range (split-K for decode; partial lists are merged
// by topk_merge_kernel).
//
// Tiles.  Keys stream in KEY_TILE = 128-key tiles (one 128-block or two 64-blocks), double
// buffered with cp.async into XOR-swizzled shared memory (conflict-free ldmatrix).  Warps form a
// WM x WN grid; a warp owns 32 rows (two m16 tiles, A fragments kept in registers for the whole
// run: Di=128 -> 64 registers) x 128/WN keys.  Four 8-key n-tiles at a time: B by ldmatrix,
// then 2 m-tiles x 4 n-tiles = 8 independent mma.m16n8k16 chains over Di/16 k-steps (one chain
// stalls on mma latency: 24% -> 36% of the matmul ceiling), and each 16x8 fp32 result folds
// straight into running block maxima (no accumulator tile).  WM=4, WN=1 (BM=128) for prefill;
// WM=1, WN=4 (BM=32) for decode, where few rows exist and the key stream sets the time.
// Causal: a CTA visits only key tiles up to its last row's position; only tiles crossing the
// first row's position are masked.  Each row has one owner thread that writes its block score
// or offers the block to its top-k list (kept in shared memory, ThreadTopK): with WN = 1 the
// owner is a lane of the warp that computed the row (quad shuffles, one barrier per tile);
// with WN > 1 the warps' partial maxima meet in shared memory first.
#include "common.cuh"
#include "mma.cuh"
#include "warp_topk.cuh"

constexpr int KEY_TILE = 128;
constexpr int EPI_SCORES = 0;
constexpr int EPI_TOPK = 1;

template <int DI>
__device__ __forceinline__ int swizzled(int row, int chunk) {  // element offset of 16-byte chunk
    return row * DI + ((chunk ^ (row & 7)) << 3);
}

template <int DI, int BS, int WM, int WN, int EPI, typename T>
__global__ void __launch_bounds__(32 * WM * WN)
select_kernel(const T* __restrict__ index_q, const T* __restrict__ index_k,
              const int* __restrict__ cu_q, const int* __restrict__ cu_k,
              float* __restrict__ scores_out, int* __restrict__ ids_out, u64* __restrict__ partial_out,
              int n_heads, int k_heads, int width, int q_tiles, int top_k, int local_blocks,
              int sink_blocks, int causal, int n_splits) {
    constexpr int THREADS = 32 * WM * WN;
    constexpr int BM = 32 * WM;              // rows per CTA
    constexpr int NW = KEY_TILE / WN;        // keys per warp per tile
    constexpr int NJ = NW / 8;               // n8 tiles per warp
    constexpr int KS = DI / 16;              // k16 steps
    constexpr int CH = DI / 8;               // 16-byte chunks per row
    constexpr int BPW = NW > BS ? NW / BS : 1;   // blocks a warp's key slice touches
    constexpr int TB = KEY_TILE / BS;        // blocks per key tile
    constexpr int NG = NJ < 4 ? NJ : 4;      // n-tiles in flight together
    static_assert(DI == 64 || DI == 128, "index dim");
    static_assert(BS == 64 || BS == 128, "block size");
    static_assert(NW % 8 == 0 && KS % 2 == 0, "tile shape");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* kbuf = reinterpret_cast<T*>(smem_raw);                    // [2][KEY_TILE * DI]
    float* red = reinterpret_cast<float*>(kbuf + 2 * KEY_TILE * DI);  // [WN][BPW][BM]
    u64* lists = reinterpret_cast<u64*>(red + WN * BPW * BM);    // [top_k][BM]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp / WN, warp_n = warp % WN;
    const int group = lane >> 2, quad = lane & 3;

    const int seq = blockIdx.x / q_tiles;
    const int tile = q_tiles - 1 - (int)(blockIdx.x % q_tiles);
    const int q_start = cu_q[seq], nq = cu_q[seq + 1] - q_start;
    const int k_start = cu_k[seq], nk = cu_k[seq + 1] - k_start;
    const bool shared_k = (k_heads == 1);
    const int rows_per_q = shared_k ? n_heads : 1;
    const int g0 = shared_k ? 0 : (int)blockIdx.y;
    const int seq_rows = nq * rows_per_q;
    const int row0 = tile * BM;
    if (row0 >= seq_rows) return;
    const int rows_here = min(BM, seq_rows - row0);

    auto n_visible = [&](int r) {  // visible keys of local row r
        const int pos = nk - nq + (row0 + r) / rows_per_q;
        return causal ? min(max(pos + 1, 0), nk) : nk;
    };
    auto global_row = [&](int r) {  // row index into (total_q * Hkv)
        const int fr = row0 + r;
        return (i64)(q_start + fr / rows_per_q) * n_heads + g0 + fr % rows_per_q;
    };
    const int n_vis_min = n_visible(0);
    const int n_tiles = (n_visible(rows_here - 1) + KEY_TILE - 1) / KEY_TILE;
    const int t_begin = (int)((i64)blockIdx.z * n_tiles / n_splits);
    const int t_end = (int)((i64)(blockIdx.z + 1) * n_tiles / n_splits);
    const int k_head = shared_k ? 0 : g0;

    auto load_keys = [&](int buf, int t) {
        T* dst = kbuf + buf * KEY_TILE * DI;
        for (int c = tid; c < KEY_TILE * CH; c += THREADS) {
            const int kr = c / CH, ch = c % CH;
            const int key = t * KEY_TILE + kr;
            const T* src = index_k;
            int bytes = 0;
            if (key < nk) {
                src = index_k + ((i64)(k_start + key) * k_heads + k_head) * DI + ch * 8;
                bytes = 16;
            }
            cp_async_16(dst + swizzled<DI>(kr, ch), src, bytes);
        }
    };

    // ---- Q rows -> shared -> A fragments in registers.  BM <= KEY_TILE: Q is staged in buffer 1
    // while the first key tile lands in buffer 0.  BM > KEY_TILE (WM = 8): Q needs both buffers,
    // so the first key tile is loaded after the A fragments are out.
    constexpr bool Q_IN_BUFFER_1 = BM <= KEY_TILE;
    static_assert(BM <= 2 * KEY_TILE, "Q staging must fit the two key buffers");
    if (Q_IN_BUFFER_1 && t_begin < t_end) load_keys(0, t_begin);
    {
        T* qs = Q_IN_BUFFER_1 ? kbuf + KEY_TILE * DI : kbuf;
        for (int c = tid; c < BM * CH; c += THREADS) {
            const int r = c / CH, ch = c % CH;
            const T* src = index_q;
            int bytes = 0;
            if (r < rows_here) {
                src = index_q + global_row(r) * DI + ch * 8;
                bytes = 16;
            }
            cp_async_16(qs + swizzled<DI>(r, ch), src, bytes);
        }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned a[2][KS][4];
    {
        const T* qs = Q_IN_BUFFER_1 ? kbuf + KEY_TILE * DI : kbuf;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int kk = 0; kk < KS; ++kk)
                ldmatrix_x4(a[mt][kk], qs + swizzled<DI>(warp_m * 32 + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }
    if (!Q_IN_BUFFER_1) {
        __syncthreads();  // every warp has its A fragments: the buffers are free
        if (t_begin < t_end) load_keys(0, t_begin);
        cp_async_commit();  // waited for at the top of the first iteration
    }
    // warp-uniform: m-tiles holding real rows (inactive ones only produce -inf, masked below)
    const bool m_active[2] = {warp_m * 32 < rows_here, warp_m * 32 + 16 < rows_here};
    int row_vis[2][2];  // visible keys of this thread's accumulator rows (0 for padding rows)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp_m * 32 + mt * 16 + h * 8 + group;
            row_vis[mt][h] = r < rows_here ? n_visible(r) : 0;
        }

    // ---- the row owned by this thread in the epilogue.  WN == 1: a warp holds whole rows, so
    // lane (group, quad) owns row (mt, h) = (quad / 2, quad % 2) of its group and the epilogue
    // stays inside the warp (no shared-memory reduction, one barrier per key tile).
    // WN > 1: thread r owns row r after a reduction through shared memory.
    const int own = (WN == 1) ? warp_m * 32 + (quad >> 1) * 16 + (quad & 1) * 8 + group : tid;
    const bool owner = own < rows_here;
    const i64 my_row = owner ? global_row(own) : 0;
    const int my_vis = owner ? n_visible(own) : 0;
    const int my_pos = nk - nq + (row0 + own) / rows_per_q;
    const int my_local = min(max(my_pos, 0), max(nk - 1, 0)) / BS;
    ThreadTopK best;
    if (EPI == EPI_TOPK && own < BM) best.init(lists + own, BM, top_k);
    __syncthreads();  // A fragments read: buffer 1 is free

    auto consume = [&](int blk, float m) {  // block score m of block blk for the owned row
        if (EPI == EPI_SCORES) {
            if (blk < width) scores_out[my_row * width + blk] = m;
        } else if (blk * BS < my_vis) {
            best.offer(msa_block_key(m, blk, msa_is_forced(blk, my_local, local_blocks, sink_blocks)));
        }
    };

    for (int t = t_begin; t < t_end; ++t) {
        const int cur = (t - t_begin) & 1;
        cp_async_wait<0>();
        __syncthreads();  // tile t landed for all; every warp is done with tile t-1's buffer
        if (t + 1 < t_end) load_keys(cur ^ 1, t + 1);  // overlaps this tile's math
        cp_async_commit();

        const T* ks = kbuf + cur * KEY_TILE * DI;
        const int key0 = t * KEY_TILE;
        const bool need_mask = key0 + KEY_TILE > n_vis_min;
        float mx[2][2][BPW];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int lb = 0; lb < BPW; ++lb) mx[mt][h][lb] = MSA_NEG_INF;

        // NG n-tiles at a time: 2 x NG independent accumulator chains keep the tensor pipe
        // busy (one chain of Di/16 dependent mma per n-tile would stall on mma latency).
#pragma unroll
        for (int j0 = 0; j0 < NJ; j0 += NG) {
            float acc[2][NG][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int g = 0; g < NG; ++g)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][g][e] = 0.f;
#pragma unroll
            for (int p = 0; p < KS / 2; ++p) {
                unsigned r4[NG][4];  // n-tile j0+g, k-steps 2p and 2p+1
#pragma unroll
                for (int g = 0; g < NG; ++g)
                    ldmatrix_x4(r4[g], ks + swizzled<DI>(warp_n * NW + (j0 + g) * 8 + (lane & 7), p * 4 + (lane >> 3)));
#pragma unroll
                for (int s2 = 0; s2 < 2; ++s2)
#pragma unroll
                    for (int g = 0; g < NG; ++g) {
                        const unsigned bf[2] = {r4[g][2 * s2], r4[g][2 * s2 + 1]};
                        if (m_active[0]) mma_16x8x16<T>(acc[0][g], a[0][2 * p + s2], bf);
                        if (m_active[1]) mma_16x8x16<T>(acc[1][g], a[1][2 * p + s2], bf);
                    }
            }
#pragma unroll
            for (int g = 0; g < NG; ++g) {
                const int lb = ((j0 + g) * 8) / (NW / BPW);  // constant after unrolling
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
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
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int lb = 0; lb < BPW; ++lb) {
                    float v = mx[mt][h][lb];
                    v = fmaxf(v, __shfl_xor_sync(MSA_FULL_MASK, v, 1));
                    v = fmaxf(v, __shfl_xor_sync(MSA_FULL_MASK, v, 2));
                    mx[mt][h][lb] = v;
                }
        if constexpr (WN == 1) {
            if (owner) {
#pragma unroll
                for (int lb = 0; lb < BPW; ++lb) {  // BPW == TB here
                    const float m = quad == 0 ? mx[0][0][lb] : quad == 1 ? mx[0][1][lb]
                                  : quad == 2 ? mx[1][0][lb] : mx[1][1][lb];
                    consume(key0 / BS + lb, m);
                }
            }
        } else {
            if (quad == 0) {
#pragma unroll
                for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int lb = 0; lb < BPW; ++lb)
                            red[(warp_n * BPW + lb) * BM + warp_m * 32 + mt * 16 + h * 8 + group] = mx[mt][h][lb];
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

    if (EPI == EPI_SCORES) {
        // blocks after the CTA's key range hold -inf (written by the last split)
        if (blockIdx.z == n_splits - 1) {
            const int fill0 = min(n_tiles * TB, width);
            const int count = width - fill0;
            for (int i = tid; i < rows_here * count; i += THREADS) {
                const int r = i / count, blk = fill0 + i % count;
                scores_out[global_row(r) * width + blk] = MSA_NEG_INF;
            }
        }
    } else if (owner) {
        if (n_splits == 1) best.write_sorted(ids_out + my_row * top_k);
        else best.write_keys(partial_out + (my_row * n_splits + blockIdx.z) * top_k);
    }
}
