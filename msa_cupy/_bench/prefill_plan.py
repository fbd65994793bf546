"""Chunked prefill through a PrefillPlan at the paper's shapes (Hq=64, Hkv=4, D=Di=128,
Bk=128, k=16, bf16, a learned-style index with one shared index-key head): the last ``chunk``
tokens of one sequence of n keys, the keys in a paged cache (pages in a random order), under
each selection pattern.  Rows: the plan's ``run`` eager and replayed from a CUDA graph (the
default schedule; graph replay under each schedule too), and the
one-call ``msa_cupy.attention`` on the same inputs with contiguous keys (KV-outer attention,
reverse index and combine, host work per call); the selection's statistics and the useful
TFLOP/s of the replay (selection GEMM over the visible keys + attention over the picked
visible keys) against the matmul ceiling.
"""
from __future__ import annotations

import msa_cupy

from . import harness, paper, patterns as selection_patterns

CACHES = (32768, 131072)
SCHEDULES = ("auto", "kv", "tile")  # msa_cupy.sparse.SCHEDULES: each timed in graph replay
CHUNK = 4096
PAGE_SIZE = 128


def bench(report, ceilings, n, pattern, chunk=CHUNK):
    chunk = min(chunk, n)
    name = f"prefill plan {n // 1024}K chunk {chunk} {pattern}"
    fields = dict(kind="prefill_plan", tokens=n, chunk=chunk, pattern=pattern, paged=True)
    if harness.skip_if_too_big(report, name, n * (2 * paper.HKV * paper.D + paper.DI) * 2 * 2.5, **fields):
        return
    cp = harness.cupy()
    bf16 = harness.BF16
    pages = -(-n // PAGE_SIZE)
    q = harness.random((chunk, paper.HQ, paper.D), bf16)
    iq, ik = selection_patterns.index_inputs(cp.random.default_rng(n), pattern, chunk, n, paper.HKV, paper.DI, bf16,
                                             block_size=paper.BLOCK)
    k, v = (harness.random((pages * PAGE_SIZE, paper.HKV, paper.D), bf16) for _ in range(2))
    ik = cp.concatenate([ik, cp.zeros((pages * PAGE_SIZE - n, 1, paper.DI), ik.dtype)])
    table = cp.random.permutation(pages).astype(cp.int32)[None]
    # page p of the cache holds keys table[0, p] * PAGE_SIZE...: the paged copies of k, v, ik
    order = (table[0][:, None] * PAGE_SIZE + cp.arange(PAGE_SIZE)).ravel()
    paged = {}
    for label, x in (("k", k), ("v", v), ("ik", ik)):
        cache = cp.empty_like(x)
        cache[order] = x
        paged[label] = cache.reshape(pages, PAGE_SIZE, *x.shape[1:])
    schedule_ms = {}
    for schedule in sorted(SCHEDULES, key=lambda s: s == msa_cupy.plan.PREFILL_PLAN_SCHEDULE):  # the default last
        plan = msa_cupy.PrefillPlan(max_batch=1, max_cache_len=n, max_query_tokens=chunk, num_q_heads=paper.HQ,
                                    num_kv_heads=paper.HKV, head_dim=paper.D, dtype="bfloat16", index_dim=paper.DI,
                                    index_k_heads=1, block_size=paper.BLOCK, top_k=paper.TOP_K, page_size=PAGE_SIZE,
                                    num_pages=pages, schedule=schedule)
        plan.update(cp.asarray([n], cp.int32), cp.asarray([chunk], cp.int32), table)

        def run():
            return plan.run(q, paged["k"], paged["v"], index_q=iq, index_k_cache=paged["ik"])

        schedule_ms[f"graph_ms_{schedule}"] = graph_ms = harness.graph_ms(run)
        if schedule != msa_cupy.plan.PREFILL_PLAN_SCHEDULE:
            del plan, run
            cp.get_default_memory_pool().free_all_blocks()
    eager_ms = harness.time_ms(run, [()], warmup=2, repeat=10)
    run()
    ids = plan.block_indices.copy()
    opts = dict(block_size=paper.BLOCK, top_k=paper.TOP_K)
    one = (q[None], k[None, :n], v[None, :n])
    one_call_ms = harness.time_ms(lambda: msa_cupy.attention(*one, index_q=iq[None], index_k=ik[None, :n], **opts),
                                  [()], warmup=1, repeat=5)
    same = msa_cupy.attention(*one, index_q=iq[None], index_k=ik[None, :n], **opts)[0]
    out = run()
    agree = float(cp.abs(out.astype(cp.float32) - same.astype(cp.float32)).max())
    stats = selection_patterns.selection_stats(ids)
    visible = chunk * n - chunk * (chunk - 1) / 2  # (query, key) pairs a causal chunk sees
    flops = (2 * paper.HKV * paper.DI * visible
             + 4 * paper.HQ // paper.HKV * paper.D * harness.selected_visible_keys(ids, n, paper.BLOCK))
    del q, iq, ik, k, v, paged, plan, ids, out, same, one
    cp.get_default_memory_pool().free_all_blocks()
    report(name, **fields, **stats, eager_ms=eager_ms, graph_ms=graph_ms, **schedule_ms, one_call_ms=one_call_ms,
           speedup_vs_one_call=one_call_ms / graph_ms, TFLOPs=flops / graph_ms / 1e9,
           pct_of_matmul=100 * flops / graph_ms / 1e9 / ceilings["matmul_TFLOPs"], max_abs_vs_one_call=agree)


def run(report, ceilings, tokens=CACHES, patterns=selection_patterns.DEFAULT_PATTERNS, chunk=CHUNK):
    """Chunked prefill plans: one chunk at the end of each cache length in tokens, per pattern."""
    patterns = selection_patterns.check_patterns(patterns)
    for n in tokens:
        for pattern in patterns:
            bench(report, ceilings, n, pattern, chunk=chunk)
