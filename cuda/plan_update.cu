// The per-step update of a cache plan (msa_cupy/plan.py): the step's sequence lengths and
// block table, read from device arrays and written into buffers the plan owns, so that a
// captured CUDA graph (which holds the plan's addresses) sees every new step.  No host sync.
//
//   cu_q[s]  = s * queries_per_seq (decode, MTP: the new queries of a sequence are its last
//            tokens), or with q_lens (chunked prefill) the sum of q_lens[< s], at most max_rows
//   cu_k[s]  = sum of min(seq_lens[< s], max_cache_len): the kernels read lengths from cu_k
//   table[s][p] = block_table[s * table_cols + p] for the pages that hold keys, checked
//            against [0, num_pages) (and p < table_cols); contiguous caches (block_table =
//            nullptr) are one page per sequence: page s.
// Out-of-range lengths and page ids are clamped, so that no kernel reads outside the cache,
// and counted in *errors (the plan reports them on request: reading them needs a sync).
//
// Grid: CTA 0 scans the lengths (n_seq is a batch size: THREADS-wide chunks, one block
// scan each); every CTA copies a grid-stride share of the table.
#include "common.cuh"

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
plan_update_kernel(const int* __restrict__ seq_lens, const int* __restrict__ q_lens, const int* __restrict__ block_table,
                   int table_cols, int n_seq, int queries_per_seq, int max_rows, int max_cache_len, int page_size,
                   int max_pages, int num_pages, int* __restrict__ cu_q, int* __restrict__ cu_k,
                   int* __restrict__ table, int* __restrict__ errors) {
    __shared__ int scan_k[THREADS], scan_q[THREADS];
    if (blockIdx.x == 0) {
        int carry_k = 0, carry_q = 0;  // sums of earlier chunks (carry_q saturates past max_rows)
        for (int base = 0; base < n_seq; base += THREADS) {
            const int s = base + threadIdx.x;
            int len = 0, nq = 0;
            if (s < n_seq) {
                len = seq_lens[s];
                if (len < 0 || len > max_cache_len) {
                    atomicAdd(errors, 1);
                    len = min(max(len, 0), max_cache_len);
                }
                nq = q_lens == nullptr ? queries_per_seq : q_lens[s];
                if (nq < 0 || nq > max_rows) {
                    atomicAdd(errors, 1);
                    nq = min(max(nq, 0), max_rows);
                }
            }
            scan_k[threadIdx.x] = len;
            scan_q[threadIdx.x] = nq;
            __syncthreads();
            for (int off = 1; off < THREADS; off <<= 1) {  // inclusive Hillis-Steele scans
                const int add_k = threadIdx.x >= off ? scan_k[threadIdx.x - off] : 0;
                const int add_q = threadIdx.x >= off ? scan_q[threadIdx.x - off] : 0;
                __syncthreads();
                scan_k[threadIdx.x] += add_k;
                scan_q[threadIdx.x] += add_q;
                __syncthreads();
            }
            if (s < n_seq) {
                cu_k[s + 1] = carry_k + scan_k[threadIdx.x];
                const long long end = (long long)carry_q + scan_q[threadIdx.x];
                if (end > max_rows && end - nq <= max_rows) atomicAdd(errors, 1);  // the sequence that passes it
                cu_q[s + 1] = (int)min(end, (long long)max_rows);
            }
            carry_k += scan_k[THREADS - 1];
            carry_q = (int)min((long long)carry_q + scan_q[THREADS - 1], (long long)max_rows + 1);
            __syncthreads();
        }
        if (threadIdx.x == 0) cu_q[0] = cu_k[0] = 0;
    }
    const i64 n = (i64)n_seq * max_pages;
    for (i64 i = (i64)blockIdx.x * THREADS + threadIdx.x; i < n; i += (i64)gridDim.x * THREADS) {
        const int s = (int)(i / max_pages), p = (int)(i % max_pages);
        if (block_table == nullptr) {
            table[i] = p == 0 ? s : 0;
            continue;
        }
        const int len = min(max(seq_lens[s], 0), max_cache_len);
        int page = 0;
        if (p * page_size < len) {  // pages past the sequence's keys are never read
            page = p < table_cols ? block_table[(i64)s * table_cols + p] : -1;
            if (page < 0 || page >= num_pages) {
                atomicAdd(errors, 1);
                page = 0;
            }
        }
        table[i] = page;
    }
}

// cu_seqlens of n_seq sequences of q_len queries and k_len keys each (batched calls), written
// on the caller's stream: no host-to-device copy and no cache of device arrays.
__global__ void uniform_cu_seqlens(int n_seq, int q_len, int k_len, int* __restrict__ cu_q, int* __restrict__ cu_k) {
    for (int s = blockIdx.x * blockDim.x + threadIdx.x; s <= n_seq; s += gridDim.x * blockDim.x) {
        cu_q[s] = s * q_len;
        cu_k[s] = s * k_len;
    }
}

// A chunked-prefill step's cu_q bounded by the rows of the q array it runs on (cu_q_run[s] =
// min(cu_q[s], rows)), so that a step whose lengths were set on the device never reads past
// q; a bound that cuts rows is counted in *errors.  One CTA.
__global__ void bound_query_rows(const int* __restrict__ cu_q, int n_seq, int rows, int* __restrict__ cu_q_run,
                                 int* __restrict__ errors) {
    for (int s = threadIdx.x; s <= n_seq; s += blockDim.x) {
        const int end = cu_q[s];
        if (s == n_seq && end > rows) atomicAdd(errors, 1);
        cu_q_run[s] = min(end, rows);
    }
}
