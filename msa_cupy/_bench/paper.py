"""The MSA paper's table on the card at hand: Hq=64, Hkv=4, D=Di=128, Bk=128, k=16, bf16.

Prefill (one sequence of N tokens, causal) and decode (batch of one query each against N
cached tokens), end to end through ``msa_cupy.attention`` with a learned-style index (random
``index_q`` per group, one shared ``index_k`` head, as in the paper), the time of each stage,
and dense attention through torch SDPA (cuDNN and flash backends) on the same shapes.

Dense prefill past ``dense_max_tokens`` (default DENSE_MAX_TOKENS; ``--dense-max-tokens`` on
the command line) is not run, as it takes seconds to a minute a call: its time is extrapolated
from the largest measured length by the quadratic FLOP count and marked "estimated".  Measured
dense runs past DENSE_MAX_TOKENS are timed once after one warm-up run.  Decode shapes that do not
fit in free GPU memory are skipped and say so.
"""
from __future__ import annotations

import msa_cupy

from . import harness

HQ, HKV, D, DI, BLOCK, TOP_K = 64, 4, 128, 128, 128, 16
PREFILL_TOKENS = (32768, 131072, 524288, 1048576)
DECODE_CACHES = (131072, 1048576)
DECODE_BATCHES = (1, 8, 32)
DENSE_MAX_TOKENS = 131072


def _inputs(batch, nq, nk):
    bf16 = harness.BF16
    q = harness.random((batch, nq, HQ, D), bf16)
    k, v = harness.random((batch, nk, HKV, D), bf16), harness.random((batch, nk, HKV, D), bf16)
    iq, ik = harness.random((batch, nq, HKV, DI), bf16), harness.random((batch, nk, 1, DI), bf16)
    return q, k, v, iq, ik


def _time_stages(q, k, v, iq, ik, repeat):
    """Median ms of selection, sparse attention and attention end to end; and the selection."""
    opts = dict(block_size=BLOCK, top_k=TOP_K)
    select_ms = harness.time_ms(lambda: msa_cupy.select_blocks(iq, ik, **opts), [()], warmup=1, repeat=repeat)
    ids = msa_cupy.select_blocks(iq, ik, **opts)
    sparse_ms = harness.time_ms(lambda: msa_cupy.sparse_attention(q, k, v, ids, block_size=BLOCK), [()],
                                warmup=1, repeat=repeat)
    total_ms = harness.time_ms(lambda: msa_cupy.attention(q, k, v, index_q=iq, index_k=ik, **opts), [()],
                               warmup=1, repeat=repeat)
    return select_ms, sparse_ms, total_ms, ids


def prefill(report, ceilings, n, dense_ref, dense_max_tokens=DENSE_MAX_TOKENS):
    cp = harness.cupy()
    q, k, v, iq, ik = _inputs(1, n, n)
    select_ms, sparse_ms, total_ms, ids = _time_stages(q, k, v, iq, ik, repeat=3)
    pairs = n * (n + 1) / 2
    index_flops = 2 * HKV * DI * pairs
    attn_flops = 4 * (HQ // HKV) * D * harness.selected_visible_keys(ids[0], n, BLOCK)
    del q, k, v, iq, ik, ids
    cp.get_default_memory_pool().free_all_blocks()
    dense = {}
    for backend in ("cudnn", "flash"):
        if n <= dense_max_tokens:
            runs = dict(warmup=2, repeat=5) if n <= DENSE_MAX_TOKENS else dict(warmup=1, repeat=1)
            dense[backend] = harness.dense_attention_ms(1, n, n, HQ, HKV, D, causal=True, backend=backend, **runs)
            if dense[backend]:
                dense_ref[backend] = (n, dense[backend])
        elif backend in dense_ref:
            n0, ms0 = dense_ref[backend]
            dense[backend] = ms0 * (n / n0) ** 2
    estimated = n > dense_max_tokens
    matmul = ceilings["matmul_TFLOPs"]
    report(f"prefill {n // 1024}K", kind="prefill", tokens=n, msa_ms=total_ms, select_ms=select_ms,
           sparse_ms=sparse_ms, index_TFLOPs=index_flops / select_ms / 1e9,
           index_pct_matmul=100 * index_flops / select_ms / 1e9 / matmul,
           attn_TFLOPs=attn_flops / sparse_ms / 1e9, attn_pct_matmul=100 * attn_flops / sparse_ms / 1e9 / matmul,
           dense_cudnn_ms=dense.get("cudnn"), dense_flash_ms=dense.get("flash"), dense_estimated=estimated,
           speedup_vs_cudnn=dense["cudnn"] / total_ms if dense.get("cudnn") else None)


def decode(report, ceilings, batch, n):
    cp = harness.cupy()
    name = f"decode b{batch} {n // 1024}K"
    if harness.skip_if_too_big(report, name, batch * n * (2 * HKV * D + DI) * 2 * 1.3, kind="decode", batch=batch,
                               tokens=n):
        return
    q, k, v, iq, ik = _inputs(batch, 1, n)
    select_ms, sparse_ms, total_ms, ids = _time_stages(q, k, v, iq, ik, repeat=5)
    selected_blocks = float((ids >= 0).sum())
    floor_bytes = batch * n * DI * 2 + selected_blocks * BLOCK * D * 2 * 2
    floor_ms = floor_bytes / ceilings["copy_GBps"] / 1e6  # copy_GBps: all bytes moved per second
    del q, k, v, iq, ik, ids
    cp.get_default_memory_pool().free_all_blocks()
    dense = harness.dense_decode_ms(batch, n, HQ, HKV, D)
    report(name, kind="decode", batch=batch, tokens=n, msa_ms=total_ms,
           select_ms=select_ms, sparse_ms=sparse_ms, floor_ms=floor_ms, pct_of_floor=100 * floor_ms / total_ms,
           dense_cudnn_ms=dense["cudnn"], dense_flash_ms=dense["flash"],
           speedup_vs_dense=dense["best"] / total_ms if dense["best"] else None)


def run(report, ceilings, tokens=PREFILL_TOKENS, caches=DECODE_CACHES, batches=DECODE_BATCHES,
        dense_max_tokens=DENSE_MAX_TOKENS):
    """End-to-end prefill at each of tokens (with each stage and dense attention), decode per
    cache length and batch."""
    dense_ref = {}
    for n in tokens:
        prefill(report, ceilings, n, dense_ref, dense_max_tokens)
    for n in caches:
        for b in batches:
            decode(report, ceilings, b, n)
