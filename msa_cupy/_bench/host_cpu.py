"""Host-side pieces of a decode step that need no GPU, timed on the CPU.

    python -m msa_cupy._bench.host_cpu

The whole host cost per call (CuPy, DLPack, driver launches included) needs a GPU: that is
``python -m msa_cupy bench --suite decode_host``.  This script times, at the MSA paper's decode
shapes (Hq=64, Hkv=4, D=Di=128, Bk=128, k=16, bf16), what a step does on the host alone:
the earlier one-call path's checks of options and shapes (on NumPy arrays of the call's
shapes), and what a planned step does instead -- the plan-cache key and lookup, the split-K
choice, binding a step's addresses into prepared argument blocks (blocks built as for the
one-call program; a placeholder kernel handle, nothing is launched) -- and the packing of a
host-array update.  Medians of repeated timings, microseconds per call.
"""
from __future__ import annotations

import time

import numpy as np

from .. import _interop, _jit, _layout, _plan_cache, plan, selection, sparse

HQ, HKV, D, BLOCK, TOP_K = 64, 4, 128, 128, 16
BF16 = _interop.BFLOAT16


def _us(fn, number=2000, repeat=7) -> float:
    for _ in range(number // 10):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number * 1e6)
    return float(np.median(times))


def _shaped(shape):
    """A NumPy bf16 array of the shape (one element, broadcast: the checks read shapes only)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, BF16), shape=shape, strides=(0,) * len(shape))


class _Handle:
    """A kernel handle that is never launched: prepared argument blocks are built and bound only."""

    class function:  # noqa: N801 - the attribute a Kernel has
        ptr = 0

    @staticmethod
    def reserve_shared(nbytes):
        pass


def _one_call_program():
    """A program with the one-call decode's launches and arguments (cu_seqlens, split-K select
    with its merge, decode with its combine), built by the stage functions with Pointer stand-ins."""
    P, rows = _jit.Pointer, 1
    q, k, v = P("q", (rows, HQ, D), BF16), P("k", (0, HKV, D), BF16), P("v", (0, HKV, D), BF16)
    ids, cu_q, cu_k = P("ids", (rows, HKV, TOP_K), np.int32), P("cu_q"), P("cu_k")
    launches = []

    def record(launch, *args, **kwargs):
        recorder = _jit.Recorder(_Handle())
        launch(*args, kernel=recorder, **kwargs)
        launches.append(recorder.launch)

    record(plan.launch_uniform_cu_seqlens, 1, 1, _jit.Scalar("k_len", np.int32), cu_q, cu_k)
    select = _jit.Recorder(_Handle())
    cfg = selection.SelectLaunch(select, 128, 0, 1, 1, 66, 32)
    selection.launch_select(cfg, P("iq", (rows, HKV, D)), P("ik", (0, 1, D)), cu_q, cu_k, 1, causal=True,
                            width=_jit.Scalar("width", np.int32), top_k=TOP_K, local_blocks=1, sink_blocks=0,
                            ids_out=ids, partial=P("partial"), counters=P("select_count"),
                            pages=_layout.CONTIGUOUS_KEYS)
    launches.append(select.launch)
    decode = _jit.Recorder(_Handle())
    sparse.launch_decode(decode, 0, q, k, v, ids, cu_q, cu_k, 1, 0, rows, P("part_o"), P("part_lse"),
                         P("decode_count"), P("out", (rows, HQ, D), BF16), P("lse", (rows, HQ), np.float32),
                         causal=True, scale_log2=np.float32(0.1275), pages=_layout.CONTIGUOUS_KEYS)
    launches.append(decode.launch)
    return _jit.Program(launches)


def main():
    rows = []
    q, k, iq, ik = _shaped((1, 1, HQ, D)), _shaped((1, 131072, HKV, D)), _shaped((1, 1, HKV, D)), _shaped(
        (1, 131072, 1, D))
    rows.append(("earlier path: scalar options", _us(lambda: _interop.scalar_options(
        top_k=TOP_K, block_size=BLOCK, local_blocks=1, sink_blocks=0, causal=True, scale=None, return_lse=False,
        return_indices=False))))
    rows.append(("earlier path: q/k/v checks and Layout", _us(lambda: _interop.check_qkv(q, k, k, None, None,
                                                                                          gpu=False))))
    layout = _interop.check_qkv(q, k, k, None, None, gpu=False)[0]
    rows.append(("earlier path: index checks", _us(lambda: _interop.check_index(iq, ik, None, None, gpu=False,
                                                                                 n_kv_heads=HKV, layout=layout))))
    cache = _plan_cache.PlanCache()
    key = _plan_cache.plan_key(0, BF16, HQ, HKV, D, D, 1, BLOCK, TOP_K, 1, 0, None, 1, 1, 131072)
    cache.get(key, object)
    rows.append(("plans: cache key and lookup", _us(lambda: cache.get(_plan_cache.plan_key(
        0, BF16, HQ, HKV, D, D, 1, BLOCK, TOP_K, 1, 0, None, 1, 1, 131072), object))))
    rows.append(("plans: split-K choice", _us(lambda: selection.split_count(1, 1, 131072, sm_count=132))))
    program = _one_call_program()
    names = ("q", "k", "v", "iq", "ik", "out", "lse", "ids", "cu_q", "cu_k", "k_len", "width")
    values = tuple(0x7F0000000000 + 4096 * i for i in range(10)) + (131072, 1024)
    bind = program.binder(names)
    rows.append(("plans: bind a step's 12 arguments (5 launches)", _us(lambda: bind(*values))))
    rows.append(("plans: prepare the 5 launches (once per shape)", _us(_one_call_program, number=200)))
    for batch, pages, page in ((8, 1, 1 << 17), (8, 8192, 128)):
        views = (np.zeros(batch + 1, np.int32), np.zeros(batch + 1, np.int32), np.zeros((batch, pages), np.int32))
        lens = np.full(batch, 1000, np.int32)
        table = np.arange(batch * pages, dtype=np.int32).reshape(batch, pages) if pages > 1 else None
        rows.append((f"host update: pack B={batch}, {pages} pages per sequence", _us(
            lambda: plan.pack_host_update(lens, table, *views, max_cache_len=pages * page, queries_per_seq=1,
                                          paged=pages > 1, page_size=page, num_pages=batch * pages), number=500)))
    width = max(len(name) for name, _ in rows)
    print(f"{'host piece (CPU, no GPU)':<{width}}  us/call")
    for name, us in rows:
        print(f"{name:<{width}}  {us:7.2f}")


if __name__ == "__main__":
    main()
