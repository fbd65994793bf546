"""Sparse attention alone (msa_cupy.sparse: reverse index, attention, combine) at the paper's
shapes: Hq=64, Hkv=4, D=128, Di=128, Bk=128, k=16, bf16, causal.  Prefill block indices come
from the fused selection over an index drawn for each selection pattern (``patterns``,
default random and coherent; ``patterns.py``), each row with the selection's adjacent-query
overlap and mean union per query tile; decode block indices are shaped like a selector's
(the local block + 15 distinct random earlier blocks per (query, group)).

Prefill: useful TFLOP/s (4 * Hq / Hkv * D * selected visible keys, summed over (query, group))
against the matmul ceiling, the reverse index / attention / combine split, and dense causal
attention (torch SDPA, cuDNN) on the same shapes up to ``dense_max_tokens``.  Decode (one query
per sequence): bytes of the selected K/V blocks over the time against the copy ceiling, and
dense decode (best of cuDNN and flash).  ``variants``: ``sparse.SparseTuning`` choices of the
prefill kernels (e.g. ``SparseTuning(prefill_kernel="mma")``), each timed and compared with the
default's output.  ``schedules`` (e.g. ("kv", "tile", "auto")): time the prefill under each
``SparseTuning(schedule=...)`` instead of the default (the first is the reference output of the
variants); each row names its ``schedule``.
"""
from __future__ import annotations

from .. import testing
from . import harness, patterns as selection_patterns
from .paper import BLOCK, D, DI, HKV, HQ, TOP_K  # the paper's shapes, one home

PREFILL_TOKENS = (32768, 131072)
DECODE_CACHES = (131072, 1 << 20)
DECODE_BATCHES = (1, 8, 32)
DENSE_MAX_TOKENS = 131072


def _attention(q, k, v, block_indices, n_seq, nq, nk, tuning=None):
    """A call of the kernels' launch function (no public-API id check) for n_seq equal
    sequences; returns fn(stats=None) -> (out, lse)."""
    from .. import sparse
    from .._layout import uniform_layout

    cp = harness.cupy()
    layout = uniform_layout(n_seq, nq, nk)
    cu_q, cu_k = (cp.asarray(x.astype("int32")) for x in (layout.cu_q, layout.cu_k))
    tuning = sparse.DEFAULT_TUNING if tuning is None else tuning
    return lambda stats=None: sparse.sparse_attention(q, k, v, block_indices, layout, cu_q, cu_k, block_size=BLOCK,
                                                      causal=True, scale=D**-0.5, tuning=tuning, stats=stats)


def _stages(run):
    """Milliseconds of each phase of one run (CUDA events between the phases)."""
    from .. import sparse

    stats = sparse.PhaseTimes()
    run(stats)
    return stats.totals()


def _selection(n, pattern):
    """int32 (n, Hkv, k) block ids of the fused selection over an index of the pattern."""
    import msa_cupy

    cp = harness.cupy()
    iq, ik = selection_patterns.index_inputs(cp.random.default_rng(n), pattern, n, n, HKV, DI, harness.BF16,
                                             block_size=BLOCK)
    ids = msa_cupy.select_blocks(iq, ik, block_size=BLOCK, top_k=TOP_K)
    del iq, ik
    return ids


def prefill(report, ceilings, n, dense_max_tokens=DENSE_MAX_TOKENS, variants=(),
            patterns=selection_patterns.DEFAULT_PATTERNS, schedules=None):
    from .. import sparse

    cp = harness.cupy()
    tunings = (None,) if not schedules else tuple(sparse.SparseTuning(schedule=s) for s in schedules)
    tunings += tuple(variants)
    q = harness.random((n, HQ, D), harness.BF16)
    k, v = harness.random((n, HKV, D), harness.BF16), harness.random((n, HKV, D), harness.BF16)
    for pattern in patterns:
        _prefill_pattern(report, ceilings, n, q, k, v, pattern, tunings)
    del q, k, v
    cp.get_default_memory_pool().free_all_blocks()
    if n <= dense_max_tokens:
        dense = harness.dense_attention_ms(1, n, n, HQ, HKV, D, causal=True, backend="cudnn")
        report(f"dense prefill {n // 1024}K", kind="dense prefill", tokens=n, dense_cudnn_ms=dense)


def _prefill_pattern(report, ceilings, n, q, k, v, pattern, tunings):
    from .. import sparse

    cp = harness.cupy()
    ids = _selection(n, pattern)
    stats = selection_patterns.selection_stats(ids)
    flops = 4 * (HQ // HKV) * D * harness.selected_visible_keys(ids, n, BLOCK)
    matmul = ceilings["matmul_TFLOPs"]
    default = None
    for tuning in tunings:
        run = _attention(q, k, v, ids, 1, n, n, tuning)
        ms = harness.time_ms(run, [()], warmup=2, repeat=5)
        split = _stages(run)
        schedule = (tuning or sparse.DEFAULT_TUNING).schedule
        fields = dict(kind="sparse prefill", tokens=n, pattern=pattern, schedule=schedule, **stats, ms=ms,
                      TFLOPs=flops / ms / 1e9,
                      pct_matmul=100 * flops / ms / 1e9 / matmul, reverse_index_ms=split.get("reverse_index"),
                      attention_ms=split.get("attention"), combine_ms=split.get("combine"),
                      attention_pct_matmul=100 * flops / split["attention"] / 1e9 / matmul
                      if split.get("attention") else None)
        out = run()[0].astype(cp.float32)
        if default is None:
            default = out
        else:  # a variant against the default: a sanity check, the tests are the judge
            fields["rel_diff_vs_default"] = float(cp.linalg.norm(out - default) / cp.linalg.norm(default))
        del out
        changes = {} if tuning is None else tuning.changes()
        changes.setdefault("schedule", schedule)
        name = f"sparse prefill {n // 1024}K {pattern}" + "".join(f" {key}={value}" for key, value in changes.items())
        report(name, **fields)
    del ids, default
    cp.get_default_memory_pool().free_all_blocks()


def decode(report, ceilings, batch, nk):
    cp = harness.cupy()
    name = f"sparse decode b{batch} {nk // 1024}K"
    if harness.skip_if_too_big(report, name, batch * nk * 2 * HKV * D * 2 * 1.3, kind="sparse decode", batch=batch,
                               tokens=nk):
        return
    q = harness.random((batch, HQ, D), harness.BF16)
    k, v = harness.random((batch * nk, HKV, D), harness.BF16), harness.random((batch * nk, HKV, D), harness.BF16)
    ids = testing.plausible_block_indices(cp.random.default_rng(nk + batch), 1, nk, HKV, TOP_K, BLOCK, n_seq=batch)
    nbytes = float((ids >= 0).sum()) * BLOCK * D * 2 * 2 + 2 * q.nbytes  # selected K and V blocks, q in, out
    run = _attention(q, k, v, ids, batch, 1, nk)
    ms = harness.time_ms(run, [()], warmup=3, repeat=20)
    split = _stages(run)
    del q, k, v, ids
    cp.get_default_memory_pool().free_all_blocks()
    dense = harness.dense_decode_ms(batch, nk, HQ, HKV, D)
    report(name, kind="sparse decode", batch=batch, tokens=nk, ms=ms,
           GBps=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / ceilings["copy_GBps"],
           reverse_index_ms=split.get("reverse_index"), attention_ms=split.get("attention"),
           combine_ms=split.get("combine"), dense_cudnn_ms=dense["cudnn"], dense_flash_ms=dense["flash"],
           speedup_vs_dense=dense["best"] / ms if dense["best"] else None)


def run(report, ceilings, tokens=PREFILL_TOKENS, caches=DECODE_CACHES, batches=DECODE_BATCHES,
        dense_max_tokens=DENSE_MAX_TOKENS, variants=(), patterns=selection_patterns.DEFAULT_PATTERNS, schedules=None):
    """Sparse attention prefill at each of tokens for each selection pattern (and each
    variant, or each of schedules), decode per cache and batch."""
    from .. import sparse

    patterns = selection_patterns.check_patterns(patterns)
    if schedules is not None:
        schedules = (schedules,) if isinstance(schedules, str) else tuple(schedules)
        bad = [s for s in schedules if s not in sparse.SCHEDULES]
        if bad or not schedules:
            raise ValueError(f"schedules must name some of {sparse.SCHEDULES}, got {schedules!r}")
    for n in tokens:
        prefill(report, ceilings, n, dense_max_tokens, variants, patterns, schedules)
    for nk in caches:
        for batch in batches:
            decode(report, ceilings, batch, nk)
