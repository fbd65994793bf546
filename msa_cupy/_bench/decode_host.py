"""Host cost of one decode call: where the time goes when the GPU work takes microseconds.

At the paper's shapes (see paper.py), for each cached length in ``tokens`` and each batch:
host microseconds per call of ``attention``, ``select_blocks`` and ``sparse_attention`` (calls
queued back to back: the host returns before the GPU finishes) against the GPU time end to end,
then the functions that take the most host time in ``attention`` (cProfile, own time per call).
"""
from __future__ import annotations

import cProfile
import pstats
import time

import msa_cupy

from . import harness, paper

CACHES = (131072,)
BATCHES = (1,)
HOST_CALLS = 200
PROFILE_TOP = 12


def _host_us(fn, calls=HOST_CALLS):
    cp = harness.cupy()
    for _ in range(20):
        fn()
    cp.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - t0) / calls * 1e6
    cp.cuda.get_current_stream().synchronize()
    return host_us


def bench(report, batch, n):
    q, k, v, iq, ik = paper._inputs(batch, 1, n)
    opts = dict(block_size=paper.BLOCK, top_k=paper.TOP_K)
    ids = msa_cupy.select_blocks(iq, ik, **opts)
    calls = {
        "attention": lambda: msa_cupy.attention(q, k, v, index_q=iq, index_k=ik, **opts),
        "select_blocks": lambda: msa_cupy.select_blocks(iq, ik, **opts),
        "sparse_attention": lambda: msa_cupy.sparse_attention(q, k, v, ids, block_size=paper.BLOCK),
    }
    for name, fn in calls.items():
        host_us = _host_us(fn)
        gpu_us = 1e3 * harness.time_ms(fn, [()], warmup=3, repeat=20)
        report(f"decode host {name} b{batch} {n // 1024}K", kind="decode host", function=name, batch=batch,
               tokens=n, host_us_per_call=host_us, end_to_end_us=gpu_us)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(HOST_CALLS):
        calls["attention"]()
    profile.disable()
    harness.cupy().cuda.get_current_stream().synchronize()
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, primitive, own s, cumulative s, callers)}
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:PROFILE_TOP]
    for (filename, line, function), (_, primitive, own, cumulative, _) in top:
        report(f"  {function} ({filename.rsplit('/', 1)[-1]}:{line})", kind="decode host profile", batch=batch,
               tokens=n, calls_per_attention=primitive / HOST_CALLS, own_us_per_attention=own / HOST_CALLS * 1e6,
               cumulative_us_per_attention=cumulative / HOST_CALLS * 1e6)


def run(report, ceilings, tokens=CACHES, batches=BATCHES):
    """Host cost per decode call against each cached length in tokens, for each batch."""
    del ceilings  # host time has no ceiling
    for n in tokens:
        for batch in batches:
            bench(report, batch, n)
