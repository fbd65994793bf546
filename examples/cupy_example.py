"""MSA from CuPy, stage by stage: block scores, Top-k, fused selection, sparse attention, and a
check of sampled rows against the float64 reference.

    python examples/cupy_example.py
"""
import numpy as np

import msa_cupy
from msa_cupy import reference, testing

N, HQ, HKV, D, DI = 8192, 16, 2, 128, 64
rng = np.random.default_rng(0)
host = testing.attention_inputs(rng, [(N, N)], n_kv_heads=HKV, group_size=HQ // HKV, head_dim=D, index_dim=DI,
                                dt="bfloat16")  # one sequence: rank-3 arrays (N, H, D), drawn on the host
q, k, v, index_q, index_k = testing.to_device([host[name] for name in ("q", "k", "v", "index_q", "index_k")])

scores = msa_cupy.block_scores(index_q, index_k)                  # (N, HKV, N / 128) float32
picked = msa_cupy.topk_blocks(scores, num_keys=N, top_k=16)       # from materialized scores
fused = msa_cupy.select_blocks(index_q, index_k, top_k=16)        # same selection, no score map
print("fused selection equals top-k over scores:", bool((picked == fused).all()))
out = msa_cupy.sparse_attention(q, k, v, fused)
print("out", out.shape, out.dtype)

# the reference recomputes a few rows over the same selection (a whole 8K context in float64 would
# take minutes on the CPU)
rows = np.array([0, 1, 4095, N - 1])  # in a prefill, query i sits at key position i
ref_out, _ = reference.sequence_sparse_attention(host["q"][rows], host["k"], host["v"], fused.get()[rows], rows)
err = testing.rel_error(out.get()[rows], ref_out)
print(f"sampled rows against the reference: relative error {err:.1e} (bf16 tolerance {testing.TOLERANCE['bfloat16']})")
