"""MSA from CuPy, stage by stage: block scores, Top-k, fused selection, sparse attention.

    python examples/cupy_example.py
"""
import cupy as cp
import ml_dtypes

import msa_cupy

bf16 = ml_dtypes.bfloat16
N, HQ, HKV, D = 8192, 16, 2, 128
q = cp.random.standard_normal((N, HQ, D), dtype=cp.float32).astype(bf16)  # one sequence, rank 3
k = cp.random.standard_normal((N, HKV, D), dtype=cp.float32).astype(bf16)
v = cp.random.standard_normal((N, HKV, D), dtype=cp.float32).astype(bf16)
index_q = cp.random.standard_normal((N, HKV, 64), dtype=cp.float32).astype(bf16)
index_k = cp.random.standard_normal((N, 1, 64), dtype=cp.float32).astype(bf16)

scores = msa_cupy.block_scores(index_q, index_k)                  # (N, HKV, N / 128) float32
picked = msa_cupy.topk_blocks(scores, num_keys=N, top_k=16)       # from materialized scores
fused = msa_cupy.select_blocks(index_q, index_k, top_k=16)        # same selection, no score map
print("fused selection equals top-k over scores:", bool(cp.array_equal(picked, fused)))
out = msa_cupy.sparse_attention(q, k, v, fused)
print("out", out.shape, out.dtype)
