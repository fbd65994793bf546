"""Decode from JAX against the plan it wraps, at the paper's shapes (see paper.py: a learned-style
index with one shared index-key head, contiguous cache): milliseconds per step of

- ``plan eager``: ``DecodePlan.update`` + ``run`` queued step after step (CuPy);
- ``plan graph``: ``update`` + one CUDA-graph replay of ``run`` per step;
- ``jax scan``: ``msa_cupy.jax.decode`` in a jitted ``lax.scan`` over the steps, XLA command
  buffers off; each step is the native XLA handler (C: binds XLA's buffers, launches the
  plan's kernels; no Python);
- ``jax scan, unroll 8``: the same scan with eight steps per loop iteration (XLA reads a while
  loop's predicate on the host each iteration: a host-device sync that the unrolled loop pays
  once per eight steps);
- ``jax scan, command buffers``: the same with XLA command buffers on for custom calls
  (``--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE,CONDITIONAL``), where XLA may
  record the loop into CUDA graphs;
- ``jax scan, Python callback``: the scan with each step through the Python callback
  (``buffer_callback``), as where no C compiler builds the handler.

Every step reads a new length (the cache grows by one key a step).  Wall clock over STEPS steps
queued back to back, one sync at the end, median of REPEATS runs: the cost a decode loop pays
per step, host time included.  XLA flags hold for a whole process, so each JAX mode runs in a
child process (``child_main``) that prints one JSON line; the rows
say how many times the step ran on the host per step (the Python callback or the native
handler; 1 without command buffers, below 1 where XLA replays recorded steps).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import harness, paper

CACHES = (32768,)
BATCHES = (1,)
STEPS = 256
REPEATS = 5
_NO_BUFFERS = "--xla_gpu_enable_command_buffer="
_BUFFERS = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
MODES = {  # name: (XLA flags, lax.scan unroll, native handler)
    "jax scan": (_NO_BUFFERS, 1, True),
    "jax scan, unroll 8": (_NO_BUFFERS, 8, True),
    "jax scan, command buffers": (_BUFFERS, 1, True),
    "jax scan, Python callback": (_NO_BUFFERS, 1, False),
}
CHILD_TIMEOUT_S = 300


def _median_ms_per_step(fn):
    fn()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / STEPS * 1e3)
    return float(np.median(times))


def _plan_ms(batch, n):
    """(eager, graph replay) ms per step of the DecodePlan alone, in this process."""
    import msa_cupy

    cp = harness.cupy()
    q, k, v, iq, ik = paper._inputs(batch, 1, n)
    lens = cp.asarray((n - STEPS + np.arange(STEPS)[:, None] + np.zeros(batch, np.int64)).astype(np.int32))
    plan = msa_cupy.DecodePlan(max_batch=batch, max_cache_len=n, num_q_heads=paper.HQ, num_kv_heads=paper.HKV,
                               head_dim=paper.D, dtype="bfloat16", index_dim=paper.DI, index_k_heads=1,
                               block_size=paper.BLOCK, top_k=paper.TOP_K)
    out = cp.empty_like(q)
    cp.cuda.Device().synchronize()  # inputs drawn on the default stream, the steps run on another
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        def eager():
            for t in range(STEPS):
                plan.update(lens[t])
                plan.run(q, k, v, index_q=iq, index_k_cache=ik, out=out)
            stream.synchronize()

        eager_ms = _median_ms_per_step(eager)
        stream.begin_capture()
        plan.run(q, k, v, index_q=iq, index_k_cache=ik, out=out)
        graph = stream.end_capture()

        def replay():
            for t in range(STEPS):
                plan.update(lens[t])
                graph.launch(stream)
            stream.synchronize()

        graph_ms = _median_ms_per_step(replay)
    return eager_ms, graph_ms


def _jax_child(batch, n, unroll=1, native=True):
    """In a child process (XLA flags set by the parent): ms per step of the jitted scan
    (``unroll`` steps per loop iteration), and how many times a step ran on the host per step."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp

    import msa_cupy.jax as msa_jax

    msa_jax.NATIVE = native
    calls = [0]
    callback = msa_jax._decode_callback

    def counted(*args, **kwargs):
        calls[0] += 1
        return callback(*args, **kwargs)

    msa_jax._decode_callback = counted
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 6))
    bf16 = jnp.bfloat16
    k = jax.random.normal(next(keys), (batch, n, paper.HKV, paper.D), bf16)
    v = jax.random.normal(next(keys), (batch, n, paper.HKV, paper.D), bf16)
    ik = jax.random.normal(next(keys), (batch, n, 1, paper.DI), bf16)
    qs = jax.random.normal(next(keys), (STEPS, batch, 1, paper.HQ, paper.D), bf16)
    iqs = jax.random.normal(next(keys), (STEPS, batch, 1, paper.HKV, paper.DI), bf16)
    lens = jnp.full((batch,), n - STEPS, jnp.int32)

    def steps(lens, k, v, ik, qs, iqs):  # the caches are arguments: closed over, XLA would embed them
        def step(lens, x):
            q, iq = x
            out = msa_jax.decode(q, k, v, lens, index_q=iq, index_k_cache=ik, block_size=paper.BLOCK,
                                 top_k=paper.TOP_K)
            return lens + 1, out

        return jax.lax.scan(step, lens, (qs, iqs), unroll=unroll)[1]

    loop = jax.jit(steps)
    args = (lens, k, v, ik, qs, iqs)
    def runs():  # Python callbacks, or the native handler's executions
        lib = msa_jax._native._library
        return calls[0] + (lib.msa_cupy_executions() if lib is not None and native else 0)

    loop(*args).block_until_ready()  # compile, record
    first = runs()
    ms = _median_ms_per_step(lambda: loop(*args).block_until_ready())
    return dict(ms_per_step=ms, host_runs_per_step=(runs() - first) / (STEPS * (REPEATS + 1)),
                native=msa_jax._native._library is not None and native, jax=jax.__version__)


def _run_child(batch, n, flags, unroll, native):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", CHILD, "--batch", str(batch), "--tokens", str(n), "--unroll",
                           str(unroll), "--native", str(int(native))], env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return dict(error=(done.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return json.loads(lines[-1])


def run(report, ceilings, tokens=CACHES, batches=BATCHES):
    """Decode steps through msa_cupy.jax (jitted scan, with and without XLA command buffers)
    against the DecodePlan eager and in graph replay, for each cache length and batch."""
    del ceilings  # per-step cost against the plan itself, no ceiling
    batches = tuple(int(b) for b in batches)
    if not batches or min(batches) < 1:
        raise ValueError(f"batches must be ints >= 1, got {batches}")
    for n in tokens:
        if n <= STEPS:
            raise ValueError(f"tokens must be > {STEPS} (the loop grows the cache by {STEPS} keys), got {n}")
    harness.cupy()
    for n in tokens:
        for batch in batches:
            fields = dict(kind="jax decode", batch=batch, tokens=n, steps=STEPS)
            name = f"jax decode b{batch} {n // 1024}K"
            eager_ms, graph_ms = _plan_ms(batch, n)
            report(f"{name} plan eager", **fields, mode="plan eager", ms_per_step=eager_ms)
            report(f"{name} plan graph", **fields, mode="plan graph", ms_per_step=graph_ms)
            for mode, (flags, unroll, native) in MODES.items():
                got = _run_child(batch, n, flags, unroll, native)
                if "error" in got:
                    report(f"{name} {mode}", **fields, mode=mode, skipped=got["error"])
                    continue
                ms = got["ms_per_step"]
                report(f"{name} {mode}", **fields, mode=mode, ms_per_step=ms, native=got["native"],
                       host_runs_per_step=got["host_runs_per_step"], vs_plan_eager=ms / eager_ms,
                       vs_plan_graph=ms / graph_ms, jax=got["jax"])


def child_main(argv):
    """The child process: one JAX mode (XLA flags from the parent), one JSON line."""
    parser = argparse.ArgumentParser(description="one JAX mode of the jax_decode suite")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--unroll", type=int, default=1)
    parser.add_argument("--native", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(_jax_child(args.batch, args.tokens, args.unroll, bool(args.native))), flush=True)


CHILD = "import sys; from msa_cupy._bench.jax_decode import child_main; child_main(sys.argv[1:])"
