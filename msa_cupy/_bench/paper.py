"""The MSA paper's table on the card at hand: Hq=64, Hkv=4, D=Di=128, Bk=128, k=16, bf16.

Prefill (one sequence of N tokens, causal) and decode (batch of one query each against N
cached tokens), end to end through ``msa_cupy.attention`` with a learned-style index
(``index_q`` per group, one shared ``index_k`` head, as in the paper), the time of each stage,
and dense attention through torch SDPA (cuDNN and flash backends) on the same shapes.

Prefill runs once per selection pattern (``patterns``, default random and coherent; see
``patterns.py``): the index is drawn for the pattern, and each row reports the selection's
adjacent-query overlap and mean union per query tile next to the times.  Dense attention is
measured once per length.

Dense prefill past ``dense_max_tokens`` (default DENSE_MAX_TOKENS; ``--dense-max-tokens`` on
the command line) is not run, as it takes seconds to a minute a call: its time is extrapolated
from the largest measured length by the quadratic FLOP count and marked "estimated".  Measured
dense runs past DENSE_MAX_TOKENS are timed once after one warm-up run.  Decode shapes that do not
fit in free GPU memory are skipped and say so.
"""
from __future__ import annotations

import msa_cupy

from . import harness, patterns as selection_patterns

HQ, HKV, D, DI, BLOCK, TOP_K = 64, 4, 128, 128, 128, 16
PREFILL_TOKENS = (32768, 131072, 524288, 1048576)
DECODE_CACHES = (131072, 1048576)
DECODE_BATCHES = (1, 8, 32)
DENSE_MAX_TOKENS = 131072


def _inputs(batch, nq, nk, pattern="random"):
    bf16 = harness.BF16
    q = harness.random((batch, nq, HQ, D), bf16)
    k, v = harness.random((batch, nk, HKV, D), bf16), harness.random((batch, nk, HKV, D), bf16)
    if pattern == "random":
        iq, ik = harness.random((batch, nq, HKV, DI), bf16), harness.random((batch, nk, 1, DI), bf16)
    else:  # one sequence (prefill)
        iq, ik = selection_patterns.index_inputs(harness.cupy().random.default_rng(nk), pattern, nq, nk, HKV, DI, bf16,
                                                 block_size=BLOCK)
        iq, ik = iq[None], ik[None]
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


def prefill(report, ceilings, n, dense_ref, dense_max_tokens=DENSE_MAX_TOKENS,
            patterns=selection_patterns.DEFAULT_PATTERNS):
    cp = harness.cupy()
    pairs = n * (n + 1) / 2
    index_flops = 2 * HKV * DI * pairs
    matmul = ceilings["matmul_TFLOPs"]
    measured = []
    for pattern in patterns:
        q, k, v, iq, ik = _inputs(1, n, n, pattern)
        select_ms, sparse_ms, total_ms, ids = _time_stages(q, k, v, iq, ik, repeat=3)
        attn_flops = 4 * (HQ // HKV) * D * harness.selected_visible_keys(ids[0], n, BLOCK)
        stats = selection_patterns.selection_stats(ids[0])
        del q, k, v, iq, ik, ids
        cp.get_default_memory_pool().free_all_blocks()
        measured.append((pattern, select_ms, sparse_ms, total_ms, attn_flops, stats))
    dense = _dense(n, dense_ref, dense_max_tokens)
    estimated = n > dense_max_tokens
    for pattern, select_ms, sparse_ms, total_ms, attn_flops, stats in measured:
        report(f"prefill {n // 1024}K {pattern}", kind="prefill", tokens=n, pattern=pattern, **stats,
               msa_ms=total_ms, select_ms=select_ms, sparse_ms=sparse_ms,
               index_TFLOPs=index_flops / select_ms / 1e9, index_pct_matmul=100 * index_flops / select_ms / 1e9 / matmul,
               attn_TFLOPs=attn_flops / sparse_ms / 1e9, attn_pct_matmul=100 * attn_flops / sparse_ms / 1e9 / matmul,
               dense_cudnn_ms=dense.get("cudnn"), dense_flash_ms=dense.get("flash"), dense_estimated=estimated,
               speedup_vs_cudnn=dense["cudnn"] / total_ms if dense.get("cudnn") else None)


def _dense(n, dense_ref, dense_max_tokens):
    """Dense causal prefill ms per SDPA backend: measured up to dense_max_tokens, past it
    extrapolated from the longest measured length (dense_ref) by the quadratic FLOP count."""
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
    return dense


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
        dense_max_tokens=DENSE_MAX_TOKENS, patterns=selection_patterns.DEFAULT_PATTERNS):
    """End-to-end prefill at each of tokens for each selection pattern (with each stage, the
    selection's overlap and tile unions, and dense attention), decode per cache length and batch."""
    patterns = selection_patterns.check_patterns(patterns)
    dense_ref = {}
    for n in tokens:
        prefill(report, ceilings, n, dense_ref, dense_max_tokens, patterns)
    for n in caches:
        for b in batches:
            decode(report, ceilings, b, n)
