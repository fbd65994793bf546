// Reverse index of a block selection, and the work schedule of the KV-outer attention.
//
// Input: block_indices (rows, Hkv, K) int32 for a range of query rows [q_begin, q_begin+rows).
// A *bucket* is one (KV head g, global key block B): B = block_off[seq] + b numbers the key
// blocks of all sequences one after the other, bucket = g * n_blocks_total + B.
//
//   0. block_offsets        block_off[s] = first global key block of sequence s.
//   1. reverse_index_keys   one thread per entry (row, g, slot): drops -1 and repeated ids
//                           (and the rows that the tile-outer kernel owns: row_mode),
//                           writes a unique 64-bit sort key  bucket * rows + row  (invalid
//                           entries: n_buckets * rows + entry, after every valid one) and
//                           counts the entries of each bucket.
//   (host side, CuPy)       perm = argsort(keys): since keys are unique the order is fully
//                           determined (no dependence on sort stability or thread timing);
//                           valid entries come first, grouped by bucket, ascending token.
//   2. reverse_index_fill   one thread per sorted position p: list_q[p] = token of the entry,
//                           slot_pos[entry] = p (the partial-result row of that pick), or -1.
//   3. build_work_items     one thread per bucket: cuts its list into items of at most
//                           max_queries tokens, so that hot blocks (local block, sinks) spread
//                           over several CTAs.  Item = (bucket, list start, token count).
//                           Items are then ordered largest first on the host side (CuPy sort
//                           of a unique key), empty slots of the upper-bound grid last.
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

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
reverse_index_keys(const int* __restrict__ block_indices, const int* __restrict__ cu_q,
                   const int* __restrict__ block_off, const unsigned char* __restrict__ row_mode, int n_seq,
                   int q_begin, int rows, int n_heads_kv, int top_k, int n_blocks_total,
                   i64* __restrict__ keys, int* __restrict__ counts) {
    const i64 n_entries = (i64)rows * n_heads_kv * top_k;
    const i64 e = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (e >= n_entries) return;
    const int slot = (int)(e % top_k);
    const i64 row_g = e / top_k;
    const int g = (int)(row_g % n_heads_kv);
    const int row = (int)(row_g / n_heads_kv);
    const int* picks = block_indices + (e - slot);
    const i64 n_buckets = (i64)n_heads_kv * n_blocks_total;
    // row_mode (nullable, tile_schedule.cu): this (row, g) runs tile-outer, none of its picks here
    if ((row_mode == nullptr || !row_mode[row_g]) && first_occurrence(picks, slot)) {
        const int seq = sequence_of(cu_q, n_seq, q_begin + row);
        const int bucket = g * n_blocks_total + block_off[seq] + picks[slot];
        keys[e] = (i64)bucket * rows + row;
        atomicAdd(counts + bucket, 1);  // a count: its value does not depend on ordering
    } else {
        keys[e] = n_buckets * rows + e;
    }
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
reverse_index_fill(const i64* __restrict__ keys, const i64* __restrict__ perm, i64 n_entries,
                   i64 invalid_base, int rows, int q_begin,
                   int* __restrict__ list_q, int* __restrict__ slot_pos) {
    const i64 p = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (p >= n_entries) return;
    const i64 e = perm[p];
    const i64 key = keys[e];
    if (key < invalid_base) {
        list_q[p] = q_begin + (int)(key % rows);
        slot_pos[e] = (int)p;
    } else {
        list_q[p] = -1;
        slot_pos[e] = -1;
    }
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
build_work_items(const int* __restrict__ counts, const int* __restrict__ list_start,
                 const int* __restrict__ item_start, int n_buckets, int max_queries,
                 int* __restrict__ items) {
    const int bucket = blockIdx.x * THREADS + threadIdx.x;
    if (bucket >= n_buckets) return;
    const int count = counts[bucket];
    int* item = items + 3 * (i64)item_start[bucket];
    for (int first = 0; first < count; first += max_queries, item += 3) {
        item[0] = bucket;
        item[1] = list_start[bucket] + first;
        item[2] = min(max_queries, count - first);
    }
}
