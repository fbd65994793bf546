"""Regenerate docs/selection_map.png (the README picture): python docs/selection_map.py

One group's selection on the planted-needle context of notebooks/what_msa_selects.ipynb,
drawn by msa_cupy.diagnostics against the oracle (the blocks holding the most true attention).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from msa_cupy import diagnostics as dg  # noqa: E402
from msa_cupy import reference as ref  # noqa: E402

N, BLOCK, TOP_K, GROUP = 2048, 64, 8, 1

data = dg.planted_needles(N, n_kv_heads=4, heads_per_group=2, head_dim=64, block_size=BLOCK, seed=0)
index_q, index_k = ref.training_free_index(data["q"], data["k"])
selected = ref.select_blocks(index_q, index_k, top_k=TOP_K, block_size=BLOCK)
oracle = dg.oracle_selection(data["q"], data["k"], top_k=TOP_K, block_size=BLOCK)
fig = dg.plot_selection_map(
    selected, group=GROUP, oracle_indices=oracle, num_keys=N, block_size=BLOCK,
    title=f"MSA selection of group {GROUP}, top_k={TOP_K}\n(its needle sits in key block {data['needle_blocks'][GROUP]})",
)
fig.savefig(os.path.join(HERE, "selection_map.png"), dpi=100)
