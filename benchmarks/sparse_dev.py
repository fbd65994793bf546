"""Development benchmark of msa_cupy.sparse at the paper's shapes (until the bench harness
takes it over): Hq=64, Hkv=4, D=128, Bk=128, k=16, bf16; block indices = local block + 15
distinct random earlier blocks per (query, group).

    PYTHONPATH=$PWD python3 benchmarks/sparse_dev.py [--prefill 32768,131072] [--decode ...] [--test]

Reports useful TFLOP/s (4 * Hq * D * selected visible keys) against a bf16 torch matmul
measured in the same run, the reverse-index / attention / combine split, decode bytes of
selected K/V over time against the measured copy bandwidth, and the speedup over dense causal
attention by torch SDPA (cuDNN backend for prefill).  CUDA events, warm-up, median of repeats.
``--test`` first runs tests/test_sparse_gpu.py through pytest.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

HQ, HKV, D, BK, TOP_K = 64, 4, 128, 128, 16


def median_ms(fn, warmup=2, repeat=7):
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    times = []
    for _ in range(repeat):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def ceilings():
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b), repeat=20)
    tflops = 2 * n**3 / ms / 1e9
    x = torch.randn(1 << 29, device="cuda", dtype=torch.float32)  # 2 GiB
    y = torch.empty_like(x)
    ms_c = median_ms(lambda: y.copy_(x), repeat=10)
    tbs = 2 * x.numel() * 4 / ms_c / 1e9
    del a, b, x, y
    torch.cuda.empty_cache()
    return tflops, tbs


def realistic_picks(nq, nk, n_seq=1):
    """Device (n_seq*nq, Hkv, k): local block + 15 distinct random earlier blocks, ascending."""
    import cupy

    pos = cupy.arange(nq, dtype=cupy.int64) + (nk - nq)
    local = pos // BK
    r = cupy.sort(cupy.random.random((n_seq * nq, HKV, TOP_K - 1)), axis=-1)
    local = cupy.tile(local, n_seq)[:, None, None]
    span = cupy.maximum(local - (TOP_K - 1) + 1, 1)
    earlier = (r * span).astype(cupy.int64) + cupy.arange(TOP_K - 1)
    earlier = cupy.where(earlier < local, earlier, -1)
    ids = cupy.concatenate([earlier, cupy.broadcast_to(local, (n_seq * nq, HKV, 1))], axis=-1)
    return cupy.ascontiguousarray(ids.astype(cupy.int32))


def visible_keys(bi, nq, nk, n_seq=1):
    """Selected visible keys summed over (query, group) (causal, bottom-right)."""
    import cupy

    pos = cupy.tile(cupy.arange(nq, dtype=cupy.int64) + (nk - nq), n_seq)[:, None, None]
    b = bi.astype(cupy.int64)
    keys = cupy.clip(pos + 1 - b * BK, 0, BK)
    return float(cupy.where(b >= 0, keys, 0).sum())


def rand(shape, dtype, slab=1 << 26):
    """Random normal device array in dtype, generated in slabs (no full-size fp32 temporary)."""
    import cupy

    out = cupy.empty(shape, dtype)
    flat = out.reshape(-1)
    for i in range(0, flat.size, slab):
        n = min(slab, flat.size - i)
        flat[i:i + n] = cupy.random.standard_normal(n, dtype=cupy.float32).astype(dtype)
    return out


def dense_ms(nq, nk, batch=1, cudnn=True):
    """torch SDPA causal (bottom-right) GQA at the same shapes."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = torch.randn(batch, HQ, nq, D, device="cuda", dtype=torch.bfloat16)
    kt = torch.randn(batch, HKV, nk, D, device="cuda", dtype=torch.bfloat16)
    vt = torch.randn(batch, HKV, nk, D, device="cuda", dtype=torch.bfloat16)
    backends = [SDPBackend.CUDNN_ATTENTION] if cudnn else [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                           SDPBackend.EFFICIENT_ATTENTION]
    if nq == nk:
        mask = dict(is_causal=True)
    else:  # decode: one query at the end sees every key
        mask = dict(is_causal=False)
    f = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel(backends):
            run = lambda: f(qt, kt, vt, enable_gqa=True, **mask)  # noqa: E731
            run()
    except Exception as exc:
        print(f"  (SDPA enable_gqa failed: {str(exc)[:120]}; repeating KV heads)")
        kt = kt.repeat_interleave(HQ // HKV, 1)
        vt = vt.repeat_interleave(HQ // HKV, 1)
        with sdpa_kernel(backends):
            run = lambda: f(qt, kt, vt, **mask)  # noqa: E731
            run()
    with sdpa_kernel(backends):
        if nq * nk > 2**36:  # 1M x 1M: one timed run (about half a minute)
            return median_ms(run, warmup=0, repeat=1)
        return median_ms(run, warmup=1, repeat=3 if nq * nk > 2**34 else 7)


args_dense_max = 1 << 20


def bench_prefill(n, ceiling, rows, configs=((4, 2, 4096, 8, 1),)):
    import cupy
    import ml_dtypes

    from msa_cupy import sparse
    from msa_cupy._layout import single_layout

    bf16 = np.dtype(ml_dtypes.bfloat16)
    q, k, v = rand((n, HQ, D), bf16), rand((n, HKV, D), bf16), rand((n, HKV, D), bf16)
    bi = realistic_picks(n, n)
    flops = 4 * (HQ // HKV) * D * visible_keys(bi, n, n)
    layout = single_layout(n, n)
    cu = cupy.array([0, n], cupy.int32)
    try:
        dms = dense_ms(n, n) if n <= args_dense_max else float("nan")
        import torch

        torch.cuda.empty_cache()
    except Exception as exc:
        print(f"  dense failed: {exc!r}"[:200])
        dms = float("nan")
    ref = None
    defaults = sparse.PARTIAL_BUDGET_BYTES, sparse.TILES_PER_ITEM
    for warps, stages, budget_mb, tiles, mt, *which in configs:
        kernel = {"w": "wgmma", "m": "mma"}.get(which[0]) if which else None
        sparse.PARTIAL_BUDGET_BYTES, sparse.TILES_PER_ITEM = budget_mb << 20, tiles
        run = lambda stats=None: sparse.sparse_attention(q, k, v, bi, layout, cu, cu, block_size=BK, causal=True,  # noqa: E731
                                                         scale=D**-0.5, stats=stats, prefill_warps=warps,
                                                         prefill_stages=stages, prefill_mt=mt, prefill_kernel=kernel)
        ms = median_ms(run, repeat=5)
        diff = 0.0
        if len(configs) > 1:  # each variant against the first one (a sanity check, not the test)
            out = run()[0].astype(cupy.float32)
            if ref is None:
                ref = out
            diff = float(cupy.linalg.norm(out - ref) / cupy.linalg.norm(ref))
            del out
        stats = sparse._Stats()
        run(stats)
        split = stats.totals()
        tf = flops / ms / 1e9
        attn_tf = flops / split.get("attention", float("nan")) / 1e9
        rows.append(("prefill", f"N={n} W{warps}S{stages}P{budget_mb}T{tiles}M{mt}{kernel or ''} d={diff:.0e}", ms, f"{tf:.0f} TFLOP/s", f"{100 * tf / ceiling:.0f}% mm",
                     f"ri {split.get('reverse_index', 0):.2f} / attn {split.get('attention', 0):.2f} "
                     f"({100 * attn_tf / ceiling:.0f}%) / comb {split.get('combine', 0):.2f} ms",
                     f"dense {dms:.1f} ms = {dms / ms:.1f}x"))
        print(rows[-1], flush=True)
    sparse.PARTIAL_BUDGET_BYTES, sparse.TILES_PER_ITEM = defaults
    del q, k, v, bi
    cupy.get_default_memory_pool().free_all_blocks()


def bench_decode(nk, batch, bandwidth, rows):
    import cupy
    import ml_dtypes

    from msa_cupy import sparse
    from msa_cupy._layout import varlen_layout

    bf16 = np.dtype(ml_dtypes.bfloat16)
    q = rand((batch, HQ, D), bf16)
    k, v = rand((batch * nk, HKV, D), bf16), rand((batch * nk, HKV, D), bf16)
    bi = realistic_picks(1, nk, n_seq=batch)
    n_blocks_read = int((bi >= 0).sum())
    nbytes = n_blocks_read * BK * D * 2 * 2 + q.nbytes * 2
    layout = varlen_layout(np.arange(batch + 1), np.arange(batch + 1) * nk)
    cu_q = cupy.arange(batch + 1, dtype=cupy.int32)
    cu_k = cupy.arange(batch + 1, dtype=cupy.int32) * nk
    run = lambda stats=None: sparse.sparse_attention(q, k, v, bi, layout, cu_q, cu_k, block_size=BK,  # noqa: E731
                                                     causal=True, scale=D**-0.5, stats=stats)
    ms = median_ms(run, warmup=3, repeat=20)
    stats = sparse._Stats()
    run(stats)
    split = stats.totals()
    bw = nbytes / ms / 1e9
    del k, v
    cupy.get_default_memory_pool().free_all_blocks()
    try:
        dms = dense_ms(1, nk, batch=batch, cudnn=False)
    except Exception as exc:
        print(f"  dense failed: {exc!r}"[:200])
        dms = float("nan")
    rows.append(("decode", f"cache={nk} B={batch}", ms, f"{bw:.2f} TB/s", f"{100 * bw / bandwidth:.0f}% copy",
                 f"sched {split.get('reverse_index', 0):.3f} / attn {split.get('attention', 0):.3f} / comb {split.get('combine', 0):.3f} ms",
                 f"dense {dms:.3f} ms = {dms / ms:.1f}x"))
    print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", default="32768,131072")
    ap.add_argument("--dense-max", type=int, default=1 << 20, help="largest N timed with dense SDPA")
    ap.add_argument("--decode", default="131072:1,131072:8,131072:32,1048576:1,1048576:8")
    ap.add_argument("--test", default="", help="pytest -k expression ('all' for every test)")
    ap.add_argument("--configs", default="4x2x4096x8x1",
                    help="prefill warps x stages x partial-buffer MiB x tiles per item x m-tiles per warp, e.g. "
                         "4x2x4096x8x1; append xw for the sm_90 wgmma kernel (which ignores warps, stages and "
                         "m-tiles), xm for mma.sync (the default picks by card)")
    args = ap.parse_args()
    global args_dense_max
    args_dense_max = args.dense_max
    if args.test:
        import pytest

        pa = [os.path.join(ROOT, "tests", "test_sparse_gpu.py"), "-q", "-x", "-p", "no:cacheprovider"]
        if args.test != "all":
            pa += ["-k", args.test]
        rc = pytest.main(pa)
        print(f"pytest exit code {rc}", flush=True)
    import cupy
    import torch

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    tflops, tbs = ceilings()
    print(f"{name}: bf16 matmul {tflops:.0f} TFLOP/s, copy {tbs:.2f} TB/s", flush=True)
    rows = []
    import cupy as cp

    for n in [int(x) for x in args.prefill.split(",") if x]:
        try:
            bench_prefill(n, tflops, rows, [tuple(int(t) if t.isdigit() else t for t in c.split('x'))
                                            for c in args.configs.split(',')])
        except Exception as exc:  # e.g. out of memory on a smaller card
            print(f"prefill N={n} failed: {exc!r}"[:300], flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    for item in [x for x in args.decode.split(",") if x]:
        nk, b = (int(t) for t in item.split(":"))
        try:
            bench_decode(nk, b, tbs, rows)
        except Exception as exc:
            print(f"decode {item} failed: {exc!r}"[:300], flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    print(f"\n== {name} (matmul {tflops:.0f} TFLOP/s, copy {tbs:.2f} TB/s), torch {torch.__version__} ==")
    for r in rows:
        print(f"{r[0]:8s} {r[1]:30s} {r[2]:9.3f} ms  {r[3]:>14s} {r[4]:>10s}  {r[5]}  {r[6]}")


if __name__ == "__main__":
    main()
