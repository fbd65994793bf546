"""Decode through a DecodePlan at the paper's shapes (Hq=64, Hkv=4, D=Di=128, Bk=128, k=16,
bf16, a learned-style index with one shared index-key head): CUDA-graph replay and eager runs,
host time per step in a growing cache, the share of the bandwidth floor, and dense decode
(cuDNN / flash SDPA) on the same card.

Floor: the bytes a step must read, over the card's copy rate: every cached index key once per
sequence, plus the K and V rows of every selected block (counted from the plan's selection).
Host time per step: ``update`` (a new device length array each step, one launch) + ``run``
queued back to back while the cache grows by one token a step (``harness.host_us``).
"""
from __future__ import annotations

import msa_cupy

from . import harness, paper

CACHES = (4096, 32768, 131072, 1048576)
BATCHES = (1, 8, 32, 64)
MTP = (1, 4, 8)              # queries per sequence; MTP > 1 runs at MTP_BATCH and each cache length
MTP_BATCH = 8
PAGE_SIZE = 128
GROWING_STEPS = 200


def _inputs(batch, nq, n, paged):
    """q, index_q and the caches (paged: pages in a random order) + lengths and block table."""
    cp = harness.cupy()
    bf16 = harness.BF16
    q = harness.random((batch, nq, paper.HQ, paper.D), bf16)
    iq = harness.random((batch, nq, paper.HKV, paper.DI), bf16)
    pages = -(-n // PAGE_SIZE)
    rows = (batch * pages, PAGE_SIZE) if paged else (batch, n)
    k, v = harness.random((*rows, paper.HKV, paper.D), bf16), harness.random((*rows, paper.HKV, paper.D), bf16)
    ik = harness.random((*rows, 1, paper.DI), bf16)
    lens = cp.full(batch, n, cp.int32)
    table = cp.random.permutation(rows[0]).astype(cp.int32).reshape(batch, pages) if paged else None
    return q, iq, k, v, ik, lens, table


def _plan(batch, nq, n, paged):
    return msa_cupy.DecodePlan(max_batch=batch, max_cache_len=n, num_q_heads=paper.HQ, num_kv_heads=paper.HKV,
                               head_dim=paper.D, dtype="bfloat16", index_dim=paper.DI, index_k_heads=1,
                               block_size=paper.BLOCK, top_k=paper.TOP_K, queries_per_seq=nq,
                               page_size=PAGE_SIZE if paged else None,
                               num_pages=batch * -(-n // PAGE_SIZE) if paged else None)


def _growing_host_us(plan, args, kwargs, lens, table, n):
    """Host microseconds per decode step (update from a new device length array + run) while the
    cache grows a token a step, and per run alone (harness.host_us: windows drained first)."""
    cp = harness.cupy()
    first = cp.maximum(lens - GROWING_STEPS - 1, 0)
    step_lens = [first + i for i in range(GROWING_STEPS)]  # made before timing: the caller's arrays
    plan.update(step_lens[0], table)
    plan.run(*args, **kwargs)

    def step(lens_i):
        return lambda: (plan.update(lens_i, table), plan.run(*args, **kwargs))

    host_us = harness.host_us([step(x) for x in step_lens])
    run_us = harness.host_us([lambda: plan.run(*args, **kwargs)] * GROWING_STEPS)
    plan.update(lens, table)
    return host_us, run_us


def bench(report, ceilings, batch, n, nq=1, paged=True, dense=True):
    name = f"decode b{batch} {n // 1024}K" + (f" mtp{nq}" if nq > 1 else "") + (" paged" if paged else "")
    fields = dict(kind="decode", batch=batch, tokens=n, queries_per_seq=nq, paged=paged)
    cache_bytes = batch * n * (2 * paper.HKV * paper.D + paper.DI) * 2
    if harness.skip_if_too_big(report, name, cache_bytes * 1.2, **fields):
        return
    cp = harness.cupy()
    q, iq, k, v, ik, lens, table = _inputs(batch, nq, n, paged)
    plan = _plan(batch, nq, n, paged)
    plan.update(lens, table)
    args, kwargs = (q, k, v), dict(index_q=iq, index_k_cache=ik)
    eager_ms = harness.time_ms(lambda: plan.run(*args, **kwargs), [()], warmup=3, repeat=20)
    graph_ms = harness.graph_ms(lambda: plan.run(*args, **kwargs))
    host_us, run_us = _growing_host_us(plan, args, kwargs, lens, table, n)
    plan.run(*args, **kwargs)
    ids = plan.block_indices
    picked = float((ids >= 0).sum())  # every selected block is full: the queries sit at the cache's end
    floor_bytes = batch * n * paper.DI * 2 + picked * paper.BLOCK * paper.D * 2 * 2
    floor_ms = floor_bytes / ceilings["copy_GBps"] / 1e6
    workspace_bytes = plan.workspace_bytes
    del q, iq, k, v, ik, ids, plan
    cp.get_default_memory_pool().free_all_blocks()
    best = harness.dense_decode_ms(batch, n, paper.HQ, paper.HKV, paper.D)["best"] if dense and nq == 1 else None
    report(name, **fields, graph_ms=graph_ms, eager_ms=eager_ms, host_us_per_step=host_us,
           host_us_per_run=run_us, floor_ms=floor_ms, pct_of_floor_graph=100 * floor_ms / graph_ms,
           dense_best_ms=best, speedup_vs_dense_graph=best / graph_ms if best else None,
           workspace_MiB=workspace_bytes / 2**20)


def run(report, ceilings, tokens=CACHES, batches=BATCHES, mtp=MTP):
    """Decode plans on each cache length in tokens: batches (decode), then multi-token
    prediction at MTP_BATCH, paged; contiguous once per length at batch 1 and 8."""
    for n in tokens:
        for batch in batches:
            bench(report, ceilings, batch, n)
        for batch in (1, 8):
            bench(report, ceilings, batch, n, paged=False, dense=False)
        for nq in mtp:
            if nq > 1:
                bench(report, ceilings, MTP_BATCH, n, nq=nq, dense=False)
