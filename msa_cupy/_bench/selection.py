"""Selection kernels at the paper's index shapes: Hkv=4, Di=128, Bk=128, k=16, bf16.

- topk_blocks over materialized float32 scores: GB/s (bytes the kernel must read: the visible
  blocks of each row, plus the ids written) against the copy ceiling; also the time against
  torch.topk / cupy.argpartition on the same scores (which neither mask nor force blocks).
- fused select_blocks, causal prefill: useful TFLOP/s (2 * Hkv * Di * visible pairs) against the
  matmul ceiling, and the speedup over the plain CuPy path.
- decode selection (1 query per sequence, shared index_k): time against the floor of reading the
  index keys once at the copy ceiling's bandwidth.

Suite "selection" runs all three; suite "select_variants" times the default prefill kernel against
its variants (on sm_90 the default is the wgmma kernel, select_sm90.cu, warps=(8, 1) the
mma.sync kernel, select.cu, and producer=True select_sm90.cu with a producer warpgroup),
checking that each variant picks the default's block ids.
"""
from __future__ import annotations

import time

import numpy as np

from .. import _jit
from .._layout import uniform_layout
from . import harness

HKV, DI, BLOCK, TOP_K = 4, 128, 128, 16
PREFILL_TOKENS = (32768, 131072, 1 << 20)
DECODE_CACHES = (131072, 1 << 20)
DECODE_BATCHES = (1, 8, 32)
# SelectTuning fields of the variants timed against the default: mma.sync on sm_90, and the
# wgmma kernel with a producer warpgroup (sm_90 only)
VARIANTS = (dict(warps=(8, 1)), dict(warps="wgmma", producer=True))
HOST_CALLS = 20
OPTS = dict(top_k=TOP_K, block_size=BLOCK, local_blocks=1, sink_blocks=0)


def _cu(layout):
    cp = harness.cupy()
    return cp.asarray(layout.cu_q.astype(np.int32)), cp.asarray(layout.cu_k.astype(np.int32))


def _visible_blocks(nq, nk, causal):
    pos = np.arange(nq, dtype=np.int64) + (nk - nq)
    vis = np.clip(pos + 1, 0, nk) if causal else np.full(nq, nk)
    return int(np.sum(-(-vis // BLOCK)))


def bench_topk(report, ceil, nq, nk, causal=True, baselines=True):
    from .. import selection

    cp = harness.cupy()
    layout = uniform_layout(1, nq, nk)
    width = layout.n_blocks(BLOCK)
    scores = harness.random((nq, HKV, width), cp.float32)
    cu_q, cu_k = _cu(layout)
    opts = dict(OPTS, causal=causal)
    fn = lambda: selection.topk_blocks(scores, layout, cu_q, cu_k, **opts)  # noqa: E731
    ms = harness.time_ms(fn, [()], warmup=2, repeat=10)
    read = _visible_blocks(nq, nk, causal) * HKV * 4
    written = nq * HKV * TOP_K * 4
    gbps = (read + written) / ms / 1e6
    full_gbps = (scores.nbytes + written) / ms / 1e6
    fields = dict(tokens=nk, queries=nq, causal=causal, blocks=width, ms=ms, GBps=gbps,
                  pct_copy=100 * gbps / ceil["copy_GBps"], matrix_GBps_equiv=full_gbps)
    if baselines:
        try:
            import torch

            from .._interop import external_stream

            t = torch.from_dlpack(scores).view(nq * HKV, width)
            with external_stream(torch.cuda.current_stream()):
                fields["torch_topk_ms"] = harness.time_ms(lambda: torch.topk(t, TOP_K, dim=-1), [()], warmup=1, repeat=5)
        except Exception as exc:  # noqa: BLE001
            fields["torch_topk_ms"] = f"n/a ({type(exc).__name__})"
        try:
            flat = scores.reshape(nq * HKV, width)
            fields["cupy_argpartition_ms"] = harness.time_ms(
                lambda: cp.argpartition(flat, width - TOP_K, axis=-1), [()], warmup=1, repeat=3)
        except Exception as exc:  # noqa: BLE001
            fields["cupy_argpartition_ms"] = f"n/a ({type(exc).__name__})"
        try:
            from .. import _plain

            fields["plain_ms"] = harness.time_ms(
                lambda: _plain.topk_blocks(scores, layout, causal=causal, **OPTS), [()], warmup=1, repeat=3)
        except Exception as exc:  # noqa: BLE001
            fields["plain_ms"] = f"n/a ({type(exc).__name__})"
    report(f"topk_blocks {nk // 1024}K x {nq} q", **fields)
    del scores


def bench_prefill(report, ceil, n, plain=True, variants=()):
    from .. import selection

    cp = harness.cupy()
    layout = uniform_layout(1, n, n)
    iq = harness.random((n, HKV, DI), harness.BF16)
    ik = harness.random((n, 1, DI), harness.BF16)
    cu_q, cu_k = _cu(layout)
    opts = dict(OPTS, causal=True)
    fn = lambda: selection.select_blocks(iq, ik, layout, cu_q, cu_k, **opts)  # noqa: E731
    repeat = 10 if n <= 131072 else 3
    ms = harness.time_ms(fn, [()], warmup=1, repeat=repeat)
    flops = 2 * HKV * DI * n * (n + 1) / 2
    tf = flops / ms / 1e9
    fields = dict(tokens=n, ms=ms, TFLOPs=tf, pct_matmul=100 * tf / ceil["matmul_TFLOPs"])
    if plain and n <= 131072:
        try:
            from .. import _plain

            pms = harness.time_ms(lambda: _plain.select_blocks(iq, ik, layout, **opts), [()], warmup=1, repeat=2)
            fields.update(plain_ms=pms, speedup_vs_plain=pms / ms)
        except Exception as exc:  # noqa: BLE001
            fields["plain_ms"] = f"n/a ({type(exc).__name__}: {exc})"[:80]
    report(f"select_blocks prefill {n // 1024}K", **fields)
    ref = fn()
    for fields in variants:  # tuning: other kernels, checked against the default first
        if fields.get("warps") == selection.WGMMA and not _jit.has_wgmma():
            continue
        tuning = selection.SelectTuning(**fields)
        vfn = lambda: selection.select_blocks(iq, ik, layout, cu_q, cu_k, tuning=tuning, **opts)  # noqa: E731
        same = bool(cp.array_equal(vfn(), ref))
        vms = harness.time_ms(vfn, [()], warmup=1, repeat=repeat)
        name = " ".join(f"{key}={value}" for key, value in fields.items())
        report(f"  variant {name}", tokens=n, ms=vms, TFLOPs=flops / vms / 1e9,
               pct_matmul=100 * flops / vms / 1e9 / ceil["matmul_TFLOPs"], same_ids=same)


def bench_decode(report, ceil, batch, nk, plain=True):
    from .. import selection

    cp = harness.cupy()
    layout = uniform_layout(batch, 1, nk)
    key_bytes = batch * nk * DI * 2
    sets = []
    for _ in range(harness.rotations(key_bytes)):
        iq = harness.random((batch, HKV, DI), harness.BF16)
        ik = harness.random((batch * nk, 1, DI), harness.BF16)
        sets.append((iq, ik))
    cu_q, cu_k = _cu(layout)
    opts = dict(OPTS, causal=True)
    fn = lambda iq, ik: selection.select_blocks(iq, ik, layout, cu_q, cu_k, **opts)  # noqa: E731
    ms = harness.time_ms(fn, sets, warmup=2, repeat=10)
    t0 = time.perf_counter()
    for _ in range(HOST_CALLS):  # launch cost alone: the host returns before the GPU finishes
        fn(*sets[0])
    host_us = (time.perf_counter() - t0) / HOST_CALLS * 1e6
    cp.cuda.get_current_stream().synchronize()
    floor_ms = key_bytes / (ceil["copy_GBps"] * 1e6)
    fields = dict(batch=batch, keys=nk, ms=ms, floor_ms=floor_ms, pct_of_floor=100 * floor_ms / ms,
                  GBps=key_bytes / ms / 1e6, host_us_per_call=host_us)
    if plain:
        try:
            from .. import _plain

            pms = harness.time_ms(lambda iq, ik: _plain.select_blocks(iq, ik, layout, **opts), sets[:1], warmup=1, repeat=3)
            fields.update(plain_ms=pms, speedup_vs_plain=pms / ms)
        except Exception as exc:  # noqa: BLE001
            fields["plain_ms"] = f"n/a ({type(exc).__name__})"
    report(f"select_blocks decode b{batch} {nk // 1024}K", **fields)
    del sets


def run(report, ceilings, tokens=PREFILL_TOKENS, caches=DECODE_CACHES, batches=DECODE_BATCHES):
    """Top-k over scores at 128K (causal and not) and 4K queries x 1M keys, fused prefill
    selection at each of tokens, decode selection for each cache length and batch."""
    bench_topk(report, ceilings, 131072, 131072, causal=True)
    bench_topk(report, ceilings, 131072, 131072, causal=False)
    bench_topk(report, ceilings, 4096, 1 << 20, causal=True)
    for n in tokens:
        bench_prefill(report, ceilings, n, plain=n <= 32768, variants=VARIANTS if n == 131072 else ())
    for nk in caches:
        for batch in batches:
            bench_decode(report, ceilings, batch, nk, plain=batch == 1)


def run_variants(report, ceilings, tokens=PREFILL_TOKENS, variants=VARIANTS):
    """Fused prefill selection at each of tokens: the default kernel, then each variant."""
    for n in tokens:
        bench_prefill(report, ceilings, n, plain=False, variants=variants)
