"""The plain CuPy path (cuBLAS + array ops) at the paper shapes: the baseline the fast
kernels are measured against."""
from __future__ import annotations

from .. import _plain
from .._layout import uniform_layout
from . import harness

HQ, HKV, D, BLOCK, TOP_K = 64, 4, 128, 128, 16


def run(report, ceilings, tokens=(32768,)):
    """Selection and sparse attention on the plain path, one causal sequence of each of tokens."""
    cp = harness.cupy()
    for n in tokens:
        layout = uniform_layout(1, n, n)
        q = harness.random((n, HQ, D), harness.BF16)
        k, v = harness.random((n, HKV, D), q.dtype), harness.random((n, HKV, D), q.dtype)
        iq = q.reshape(n, HKV, HQ // HKV, D).astype(cp.float32).mean(axis=2).astype(q.dtype)
        opts = dict(top_k=TOP_K, block_size=BLOCK, local_blocks=1, sink_blocks=0, causal=True)
        select_ms = harness.time_ms(lambda: _plain.select_blocks(iq, k, layout, **opts), [()], warmup=1, repeat=3)
        ids = _plain.select_blocks(iq, k, layout, **opts)
        sparse_ms = harness.time_ms(
            lambda: _plain.sparse_attention(q, k, v, ids, layout, block_size=BLOCK, causal=True, scale=D**-0.5),
            [()], warmup=1, repeat=3)
        pairs = n * (n + 1) / 2  # visible (query, key) pairs, causal
        index_flops = 2 * HKV * D * pairs
        attn_flops = 4 * (HQ // HKV) * D * harness.selected_visible_keys(ids, n, BLOCK)
        dense = harness.dense_attention_ms(1, n, n, HQ, HKV, D)
        total = select_ms + sparse_ms
        report(f"plain attention {n // 1024}K", tokens=n, select_ms=select_ms, sparse_ms=sparse_ms,
               total_ms=total, index_TFLOPs=index_flops / select_ms / 1e9,
               index_pct=100 * index_flops / select_ms / 1e9 / ceilings["matmul_TFLOPs"],
               attn_TFLOPs=attn_flops / sparse_ms / 1e9, dense_cudnn_ms=dense,
               speedup_vs_dense=(dense / total) if dense else None)
