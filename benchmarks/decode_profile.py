"""Host-side cost of one decode call (where the time goes when the GPU work is microseconds).

    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py [batch] [cached tokens]
"""
import cProfile
import pstats
import sys
import time

import cupy as cp

import msa_cupy
from msa_cupy._bench import harness
from msa_cupy._bench.paper import BLOCK, TOP_K, _inputs

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
n = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
q, k, v, iq, ik = _inputs(batch, 1, n)
opts = dict(block_size=BLOCK, top_k=TOP_K)
fns = {
    "attention": lambda: msa_cupy.attention(q, k, v, index_q=iq, index_k=ik, **opts),
    "select_blocks": lambda: msa_cupy.select_blocks(iq, ik, **opts),
}
ids = msa_cupy.select_blocks(iq, ik, **opts)
fns["sparse_attention"] = lambda: msa_cupy.sparse_attention(q, k, v, ids, block_size=BLOCK)
for name, fn in fns.items():
    for _ in range(20):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    host_us = (time.perf_counter() - t0) / 200 * 1e6
    cp.cuda.Device().synchronize()
    gpu_ms = harness.time_ms(fn, [()], warmup=3, repeat=20)
    print(f"{name}: host {host_us:.0f} us per call, end to end {gpu_ms * 1e3:.0f} us")
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    fns["attention"]()
prof.disable()
cp.cuda.Device().synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
