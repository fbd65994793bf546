"""Host cost of a decode step: where the time goes when the GPU work takes microseconds.

At the paper's shapes (see paper.py), for each cached length in ``tokens`` and each batch,
host microseconds per call (calls queued back to back in windows, ``harness.host_us``) beside
the GPU time of one call end to end:

* ``DecodePlan`` eager, the cache growing a token a step: ``update`` from a new device length
  array each step + ``run``; ``run`` alone; ``update`` from host lengths (pinned staging) +
  ``run``.  Paged (128-token pages) and contiguous caches, learned index (one shared head).
* the one-call ``msa_cupy.attention``: batch 1 in a growing cache (slices of one cache), and
  the batch at the fixed length; through cached decode plans and through the earlier path
  (``_plan_cache.enabled = False``); learned index, and the training-free index.

Then the functions that take the most host time in a one-call decode through plans (cProfile,
own time per call).
"""
from __future__ import annotations

import cProfile
import pstats

import numpy as np

import msa_cupy

from .. import _plan_cache
from . import decode, harness, paper

CACHES = (131072,)
BATCHES = (1, 8)
STEPS = 200  # per measurement: 5 windows of harness.HOST_WINDOW
PROFILE_TOP = 10


class _EarlierPath:
    def __enter__(self):
        self.was, _plan_cache.enabled = _plan_cache.enabled, False

    def __exit__(self, *exc):
        _plan_cache.enabled = self.was


def _plan(report, batch, n, paged):
    """DecodePlan: host us of update + run (cache growing), run alone, host-array update + run."""
    cp = harness.cupy()
    q, iq, k, v, ik, lens, table = decode._inputs(batch, 1, n, paged)
    plan = decode._plan(batch, 1, n, paged)
    args, kwargs = (q, k, v), dict(index_q=iq, index_k_cache=ik)
    first = max(n - STEPS, 1)
    device_lens = [cp.full(batch, first + i, cp.int32) for i in range(STEPS)]  # a new array each step
    host_lens = [np.full(batch, first + i, np.int32) for i in range(STEPS)]
    host_table = None if table is None else cp.asnumpy(table)
    plan.update(device_lens[0], table)
    plan.run(*args, **kwargs)

    def step(lens_i, table_i):
        return lambda: (plan.update(lens_i, table_i), plan.run(*args, **kwargs))

    update_run = harness.host_us([step(x, table) for x in device_lens])
    run_alone = harness.host_us([lambda: plan.run(*args, **kwargs)] * STEPS)
    host_update_run = harness.host_us([step(x, host_table) for x in host_lens])
    plan.update(lens, table)
    gpu_us = 1e3 * harness.time_ms(lambda: plan.run(*args, **kwargs), [()], warmup=3, repeat=20)
    report(f"plan b{batch} {n // 1024}K" + (" paged" if paged else " contiguous"), kind="decode host",
           function="DecodePlan", batch=batch, tokens=n, paged=paged, host_us_update_run=update_run,
           host_us_run=run_alone, host_us_host_update_run=host_update_run, gpu_us=gpu_us)


def _one_call(report, batch, n):
    """msa_cupy.attention: host us per call through plans and the earlier path."""
    q, k, v, iq, ik = paper._inputs(batch, 1, n)
    opts = dict(block_size=paper.BLOCK, top_k=paper.TOP_K)
    if batch == 1:  # a growing cache: the call at each step sees one more key (contiguous slices)
        first = max(n - STEPS, 1)
        views = [(k[:, :m], v[:, :m], ik[:, :m]) for m in range(first, first + STEPS)]
        where = "growing"
    else:
        views = [(k, v, ik)] * STEPS
        where = "fixed"
    learned = [lambda kv=kv: msa_cupy.attention(q, kv[0], kv[1], index_q=iq, index_k=kv[2], **opts) for kv in views]
    free = [lambda kv=kv: msa_cupy.attention(q, kv[0], kv[1], **opts) for kv in views]
    for index, steps in (("learned", learned), ("training-free", free)):
        planned_us = harness.host_us(steps)
        planned_gpu = 1e3 * harness.time_ms(steps[-1], [()], warmup=3, repeat=20)
        with _EarlierPath():
            earlier_us = harness.host_us(steps)
            earlier_gpu = 1e3 * harness.time_ms(steps[-1], [()], warmup=3, repeat=20)
        report(f"attention b{batch} {n // 1024}K {where} {index}", kind="decode host", function="attention",
               batch=batch, tokens=n, index=index, cache=where, host_us_plans=planned_us,
               host_us_earlier=earlier_us, gpu_us_plans=planned_gpu, gpu_us_earlier=earlier_gpu)
    return learned


def _profile(report, steps, batch, n):
    profile = cProfile.Profile()
    harness.cupy().cuda.get_current_stream().synchronize()
    profile.enable()
    for step in steps[:harness.HOST_WINDOW]:
        step()
    profile.disable()
    harness.cupy().cuda.get_current_stream().synchronize()
    calls = harness.HOST_WINDOW
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, primitive, own s, cumulative s, callers)}
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:PROFILE_TOP]
    for (filename, line, function), (_, primitive, own, cumulative, _) in top:
        report(f"  {function} ({filename.rsplit('/', 1)[-1]}:{line})", kind="decode host profile", batch=batch,
               tokens=n, calls_per_attention=primitive / calls, own_us_per_attention=own / calls * 1e6,
               cumulative_us_per_attention=cumulative / calls * 1e6)


def bench(report, batch, n):
    for paged in (True, False):
        _plan(report, batch, n, paged)
    steps = _one_call(report, batch, n)
    if batch == 1:
        _profile(report, steps, batch, n)


def run(report, ceilings, tokens=CACHES, batches=BATCHES):
    """Host cost per decode step (plans and one-call attention) at each cached length in
    tokens, for each batch."""
    del ceilings  # host time has no ceiling
    for n in tokens:
        for batch in batches:
            bench(report, batch, n)
