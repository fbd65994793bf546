// Reverse index of a block selection, and the work schedule of the KV-outer attention.
//
// Input: block_indices (rows, Hkv, K) int32 for a range of query rows [q_begin, q_begin+rows).
// A *bucket* is one (KV head g, global key block B): B = block_off[seq] + b numbers the key
// blocks of all sequences one after the other, bucket = g * n_blocks_total + B (n_blocks_total
// may be an upper bound: every kernel here and the attention kernels use the same value).
//
// Everything runs on the device, into buffers sized by the caller (no allocation, no host
// sync, no sort library), and the result does not depend on thread timing:
//
//   0. block_offsets        block_off[s] = first global key block of sequence s.
//   1. reverse_index_keys   one thread per entry (row, g, slot): drops -1 and repeated ids
//                           (and the rows that the tile-outer kernel owns: row_mode, and
//                           rows past the last query token), writes
//                           the entry's bucket (invalid entries: n_buckets, after every valid
//                           one) and counts the entries of each bucket.
//   2. a stable counting sort of the entries by bucket: RADIX_BITS per pass, least significant
//      digit first; each pass is split_histogram (per warp tile, the count of each digit),
//      a scan (digit-major: a digit's elements of tile t follow those of tiles < t)
//      and split_scatter (each warp walks its tile in order and ranks equal digits with
//      __match_any_sync).  Entries enter in entry order, i.e. ascending token, so each
//      bucket's list ascends.
//   3. reverse_index_fill   one thread per sorted position p: list_q[p] = token of the entry,
//                           slot_pos[entry] = p (the partial-result row of that pick), or -1.
//   4. the work items: each bucket's list cut into items of at most max_queries tokens, so
//      that hot blocks (local block, sinks) spread over several CTAs; largest first (the full
//      items in bucket order, then the rest by decreasing size, ties in bucket order: one
//      more counting sort over the buckets, by class), empty items past the real count.
//      Item = (bucket, list start, token count).
#include "attention.cuh"

// block_off[s] = first global key block of sequence s (exclusive scan of ceil(Nk / BK)).
// One thread, serial over the sequences: n_seq is a batch size, and this replaces a
// synchronous host-to-device copy per call.
template <int BK>
__global__ void block_offsets(const int* __restrict__ cu_k, int n_seq, int* __restrict__ block_off) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int total = 0;
    for (int s = 0; s < n_seq; ++s) {
        block_off[s] = total;
        total += (cu_k[s + 1] - cu_k[s] + BK - 1) / BK;
    }
    block_off[n_seq] = total;
}


constexpr int RADIX_BITS = 8;
constexpr int RADIX = 1 << RADIX_BITS;
constexpr int SPLIT_TILE = 2048;  // elements per warp tile: the warp walks them in order
constexpr int SPLIT_BATCH = 8;    // loads in flight per lane

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
fill_int(int* __restrict__ a, int n, int value) {
    const i64 i = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (i < n) a[i] = value;
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
reverse_index_keys(const int* __restrict__ block_indices, const int* __restrict__ cu_q,
                   const int* __restrict__ block_off, const unsigned char* __restrict__ row_mode, int n_seq,
                   int q_begin, int rows, int n_heads_kv, int top_k, int n_blocks_total,
                   int* __restrict__ bucket_of, int* __restrict__ counts) {
    const i64 n_entries = (i64)rows * n_heads_kv * top_k;
    const i64 e = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (e >= n_entries) return;
    const int slot = (int)(e % top_k);
    const i64 row_g = e / top_k;
    const int g = (int)(row_g % n_heads_kv);
    const int row = (int)(row_g / n_heads_kv);
    const int* picks = block_indices + (e - slot);
    // row_mode (nullable, tile_schedule.cu): this (row, g) runs tile-outer, none of its picks here;
    // rows at or past cu_q[n_seq] (a prefill plan's q rows past the step's tokens) are not the step's
    if (q_begin + row < cu_q[n_seq] && (row_mode == nullptr || !row_mode[row_g]) && first_occurrence(picks, slot)) {
        const int seq = sequence_of(cu_q, n_seq, q_begin + row);
        const int bucket = g * n_blocks_total + block_off[seq] + picks[slot];
        bucket_of[e] = bucket;
        atomicAdd(counts + bucket, 1);  // a count: its value does not depend on ordering
    } else {
        bucket_of[e] = n_heads_kv * n_blocks_total;
    }
}

// The digits of a warp tile's elements [begin, end) in order, SPLIT_BATCH x 32 at a time:
// f(element, digit) on every lane, digit RADIX past the end (the loop is warp-uniform).
// Element i is order[i], or i itself when order is null (the first pass).
template <class F>
__device__ __forceinline__ void for_each_digit(const int* __restrict__ key, const int* __restrict__ order, int begin,
                                               int end, int shift, int lane, F&& f) {
    for (int base = begin; base < end; base += 32 * SPLIT_BATCH) {
        int e[SPLIT_BATCH], d[SPLIT_BATCH];
#pragma unroll
        for (int j = 0; j < SPLIT_BATCH; ++j) {
            const int i = base + j * 32 + lane;
            e[j] = i >= end ? -1 : order == nullptr ? i : order[i];
        }
#pragma unroll
        for (int j = 0; j < SPLIT_BATCH; ++j) d[j] = e[j] < 0 ? RADIX : (key[e[j]] >> shift) & (RADIX - 1);
#pragma unroll
        for (int j = 0; j < SPLIT_BATCH; ++j) f(e[j], d[j]);
    }
}

// hist[d * n_tiles + t] = elements of warp tile t whose digit is d.
template <int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
split_histogram(const int* __restrict__ key, const int* __restrict__ order, int n, int shift,
                int* __restrict__ hist) {
    __shared__ int count[WARPS][RADIX];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n_tiles = (n + SPLIT_TILE - 1) / SPLIT_TILE;
    const int tile = blockIdx.x * WARPS + warp;
    if (tile >= n_tiles) return;
    for (int d = lane; d < RADIX; d += 32) count[warp][d] = 0;
    __syncwarp();
    const int begin = tile * SPLIT_TILE;
    for_each_digit(key, order, begin, min(n, begin + SPLIT_TILE), shift, lane, [&](int, int d) {
        if (d < RADIX) atomicAdd(&count[warp][d], 1);  // a count: its value does not depend on ordering
    });
    __syncwarp();
    for (int d = lane; d < RADIX; d += 32) hist[(i64)d * n_tiles + tile] = count[warp][d];
}

// order_out[start[d * n_tiles + t] + r] = the r-th element of tile t (in order) whose digit is d.
template <int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
split_scatter(const int* __restrict__ key, const int* __restrict__ order, int n, int shift,
              const int* __restrict__ start, int* __restrict__ order_out) {
    __shared__ int next[WARPS][RADIX];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n_tiles = (n + SPLIT_TILE - 1) / SPLIT_TILE;
    const int tile = blockIdx.x * WARPS + warp;
    if (tile >= n_tiles) return;
    for (int d = lane; d < RADIX; d += 32) next[warp][d] = start[(i64)d * n_tiles + tile];
    __syncwarp();
    const unsigned below = (1u << lane) - 1;
    const int begin = tile * SPLIT_TILE;
    for_each_digit(key, order, begin, min(n, begin + SPLIT_TILE), shift, lane, [&](int e, int d) {
        const unsigned peers = __match_any_sync(0xffffffffu, d);
        const int rank = __popc(peers & below);  // lanes below hold earlier elements
        if (d < RADIX) order_out[next[warp][d] + rank] = e;
        __syncwarp();
        if (d < RADIX && rank == 0) next[warp][d] += __popc(peers);
        __syncwarp();
    });
}

// The exclusive prefix sum of x over the CTA's threads in thread order; total: the sum of
// all (THREADS <= 1024).  Once per kernel: its shared memory is not reused.
template <int THREADS>
__device__ __forceinline__ int cta_exclusive_scan(int x, int& total) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "a warp's scan of the warp totals");
    __shared__ int warp_start[THREADS / 32 + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int incl = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == 31) warp_start[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const int w = lane < THREADS / 32 ? warp_start[lane] : 0;
        int w_incl = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, w_incl, o);
            if (lane >= o) w_incl += t;
        }
        if (lane < THREADS / 32) warp_start[lane] = w_incl - w;
        if (lane == THREADS / 32 - 1) warp_start[THREADS / 32] = w_incl;
    }
    __syncthreads();
    total = warp_start[THREADS / 32];
    return warp_start[warp] + incl - x;
}

// out[i] = a[0] + ... + a[i - 1] for i <= n (out[n]: the total); out may be a.  One CTA, a
// contiguous segment per thread: for short arrays (the tile sums of scan_tiles).
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
exclusive_scan(const int* a, int n, int* out) {
    const int seg = (n + THREADS - 1) / THREADS;
    const int begin = min(n, (int)threadIdx.x * seg), end = min(n, begin + seg);
    int sum = 0;
    for (int i = begin; i < end; ++i) sum += a[i];
    int total;
    int run = cta_exclusive_scan<THREADS>(sum, total);
    for (int i = begin; i < end; ++i) {
        const int x = a[i];
        out[i] = run;
        run += x;
    }
    if (threadIdx.x == 0) out[n] = total;
}

// A long scan in three launches (histograms of millions of counts): scan_tile_sums, the
// exclusive_scan of those sums, scan_tiles.  A CTA takes a tile of THREADS * SCAN_ITEMS
// elements, SCAN_ITEMS consecutive ones a thread; integer sums, so no order dependence.
constexpr int SCAN_ITEMS = 8;

// sums[b] = the sum of tile b of a.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
scan_tile_sums(const int* __restrict__ a, int n, int* __restrict__ sums) {
    const i64 base = ((i64)blockIdx.x * THREADS + threadIdx.x) * SCAN_ITEMS;
    int x = 0;
#pragma unroll
    for (int j = 0; j < SCAN_ITEMS; ++j) x += base + j < n ? a[base + j] : 0;
    int total;
    cta_exclusive_scan<THREADS>(x, total);
    if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

// out[i] = a[0] + ... + a[i - 1] for i <= n, from tile_start (the scanned tile sums, with the
// total at [gridDim.x]); out may be a: each thread reads its elements before writing them.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
scan_tiles(const int* a, int n, const int* __restrict__ tile_start, int* out) {
    const i64 base = ((i64)blockIdx.x * THREADS + threadIdx.x) * SCAN_ITEMS;
    int v[SCAN_ITEMS], x = 0;
#pragma unroll
    for (int j = 0; j < SCAN_ITEMS; ++j) {
        v[j] = base + j < n ? a[base + j] : 0;
        x += v[j];
    }
    int total;
    int run = tile_start[blockIdx.x] + cta_exclusive_scan<THREADS>(x, total);
#pragma unroll
    for (int j = 0; j < SCAN_ITEMS; ++j) {
        if (base + j < n) out[base + j] = run;
        run += v[j];
    }
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) out[n] = tile_start[gridDim.x];
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
reverse_index_fill(const int* __restrict__ bucket_of, const int* __restrict__ perm, int n_entries, int n_buckets,
                   int entries_per_row, int q_begin, int* __restrict__ list_q, int* __restrict__ slot_pos) {
    const i64 p = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (p >= n_entries) return;
    const int e = perm[p];
    if (bucket_of[e] < n_buckets) {
        list_q[p] = q_begin + e / entries_per_row;
        slot_pos[e] = (int)p;
    } else {
        list_q[p] = -1;
        slot_pos[e] = -1;
    }
}

// Per bucket: its full items (count / max_queries) and the sort class of its last, partial
// item: max_queries - size (larger first), or max_queries when it has none (sorted last).
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
item_classes(const int* __restrict__ counts, int n_buckets, int max_queries, int* __restrict__ full_items,
             int* __restrict__ item_class) {
    const int b = blockIdx.x * THREADS + threadIdx.x;
    if (b >= n_buckets) return;
    const int count = counts[b], rest = count % max_queries;
    full_items[b] = count / max_queries;
    item_class[b] = rest ? max_queries - rest : max_queries;
}

// Thread t: bucket t's full items at full_start[t]; the t-th partial item after every full
// item, its bucket the t-th in class order (class_order: stable ascending by item_class, so the
// buckets with a partial item, class < max_queries, come first); empty items up to n_items.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
build_work_items(const int* __restrict__ counts, const int* __restrict__ list_start,
                 const int* __restrict__ full_start, const int* __restrict__ item_class,
                 const int* __restrict__ class_order, int n_buckets, int max_queries, int n_items,
                 int* __restrict__ items) {
    const int t = blockIdx.x * THREADS + threadIdx.x;
    const int n_full = full_start[n_buckets];
    if (t < n_buckets) {
        int* item = items + 3 * (i64)full_start[t];
        for (int first = 0; first + max_queries <= counts[t]; first += max_queries, item += 3) {
            item[0] = t;
            item[1] = list_start[t] + first;
            item[2] = max_queries;
        }
    }
    if (t < n_buckets && item_class[class_order[t]] < max_queries) {
        const int b = class_order[t], count = counts[b], rest = count % max_queries;
        int* item = items + 3 * ((i64)n_full + t);
        item[0] = b;
        item[1] = list_start[b] + count - rest;
        item[2] = rest;
    }
    const int p = t - n_full;  // an item slot past the full ones that no partial item takes
    if (t < n_items && p >= 0 && (p >= n_buckets || item_class[class_order[p]] == max_queries)) {
        int* item = items + 3 * (i64)t;
        item[0] = item[1] = item[2] = 0;
    }
}
