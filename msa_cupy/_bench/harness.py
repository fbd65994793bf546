"""Timing, ceilings and records for the benchmarks: the one harness every suite runs on.

Times are CUDA-event medians after warm-up (JIT excluded), over input sets rotated so that
repeats do not find their inputs in L2.  Ceilings are measured in the same run on the same
card: device-to-device copy bandwidth (bytes read + written) and a large bf16 matrix product.
Inputs come from the test kit (``msa_cupy.testing``).  Results are written as one record per
run in the schema of ``validate_record`` (benchmarks/README.md describes it).
"""
from __future__ import annotations

import datetime
import json
import numbers
import platform
import re
import subprocess
from pathlib import Path

import numpy as np

from .. import testing
from .._interop import external_stream
from .patterns import PATTERNS

BF16 = testing.DTYPES["bfloat16"]  # the benchmarks' dtype
SCHEMA = 1  # version of the record layout checked by validate_record


def cupy():
    from .._interop import require_cupy

    return require_cupy()


def time_ms(fn, arg_sets, *, warmup=2, repeat=10):
    """Median milliseconds of fn(*args), cycling through arg_sets (rotate inputs past L2)."""
    cp = cupy()
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    cp.cuda.get_current_stream().synchronize()
    times = []
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for i in range(repeat):
        args = arg_sets[i % len(arg_sets)]
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


GRAPH_REPLAYS = 20  # replays per timed window of graph_ms


def graph_ms(run) -> float:
    """Median ms of one replay of run() captured in a CUDA graph on a CuPy stream (after one
    eager call; GRAPH_REPLAYS back to back per window, five windows, events)."""
    cp = cupy()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        run()
        stream.begin_capture()
        run()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(5):
            start.record(stream)
            for _ in range(GRAPH_REPLAYS):
                graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) / GRAPH_REPLAYS)
    return float(np.median(times))


HOST_WINDOW = 40  # steps per window of host_us


def host_us(steps, window=HOST_WINDOW) -> float:
    """Median host microseconds per step over windows of ``window`` consecutive steps (zero-
    argument callables, e.g. a decode step at a growing length each) queued back to back.  The
    stream is drained before each window, so that the launch queue never fills: a full queue
    makes the host wait for the GPU, which is not host cost."""
    import time

    cp = cupy()
    times = []
    for start in range(0, max(len(steps) - window, 0) + 1, window):
        batch = steps[start:start + window]
        cp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for step in batch:
            step()
        times.append((time.perf_counter() - t0) / len(batch) * 1e6)
    cp.cuda.get_current_stream().synchronize()
    return float(np.median(times))


def rotations(nbytes_per_set: int, limit=4) -> int:
    """How many input sets it takes to exceed twice the L2 (at least 1, at most limit)."""
    cp = cupy()
    l2 = cp.cuda.Device().attributes.get("L2CacheSize", 50 << 20)
    return int(min(limit, max(1, -(-2 * l2 // max(nbytes_per_set, 1)))))


random = testing.device_randn  # random normal device arrays (never zeros), drawn in bounded chunks


def selected_visible_keys(block_indices, num_keys: int, block_size: int) -> float:
    """Sum over (query, group) of the selected keys each query may see (causal, one sequence of
    num_keys queries and keys, block_indices (Nq, Hkv, k)): the useful work of sparse attention."""
    cp = cupy()
    nq = block_indices.shape[0]
    pos = cp.arange(nq, dtype=cp.int64)[:, None, None] + (num_keys - nq)
    ids = block_indices.astype(cp.int64)
    keys = cp.clip(pos + 1 - ids * block_size, 0, block_size)
    return float(cp.where(ids >= 0, keys, 0).sum())


def card() -> dict:
    cp = cupy()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    return {"name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "sm_count": props["multiProcessorCount"], "capability": dev.compute_capability,
            "memory_GiB": round(props["totalGlobalMem"] / 2**30, 1)}


def ceilings() -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) on this card, now."""
    cp = cupy()
    n = 1 << 30
    src, dst = cp.empty(n, cp.uint8), cp.empty(n, cp.uint8)
    src[:] = 7

    def copy():
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, n, cp.cuda.runtime.memcpyDeviceToDevice,
                                    cp.cuda.get_current_stream().ptr)

    copy_ms = time_ms(copy, [()], warmup=3, repeat=20)
    del src, dst
    m = 8192
    try:
        import torch

        a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        with external_stream(torch.cuda.current_stream()):
            mm_ms = time_ms(lambda: torch.matmul(a, b), [()], warmup=3, repeat=10)
        how = "torch bf16"
    except ImportError:
        a, b = random((m, m), cp.float16), random((m, m), cp.float16)
        mm_ms = time_ms(lambda: cp.matmul(a, b), [()], warmup=3, repeat=10)
        how = "cupy fp16"
    return {"copy_GBps": 2 * n / copy_ms / 1e6, "matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9, "matmul_via": how}


def dense_attention_ms(batch, nq, nk, hq, hkv, d, *, causal=True, backend="cudnn", warmup=2, repeat=5):
    """Dense GQA attention through torch SDPA (cuDNN or flash backend), or None if unavailable."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if nq != nk and causal:
        return None  # SDPA's causal mask is top-left aligned; we only compare square prefill
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    q = torch.randn(batch, hq, nq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, hkv, nk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, hkv, nk, d, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([which]):
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q, k, v, is_causal=causal, enable_gqa=hkv != hq)
            with external_stream(torch.cuda.current_stream()):
                return time_ms(fn, [()], warmup=warmup, repeat=repeat)
    except RuntimeError:
        return None
    finally:  # torch's cache would otherwise keep tens of GiB from the runs that follow
        del q, k, v
        torch.cuda.empty_cache()


def dense_decode_ms(batch, nk, hq, hkv, d) -> dict:
    """Dense decode (one query per sequence at the end of its cache: non-causal attention over
    every key) through SDPA: {"cudnn": ms, "flash": ms, "best": the faster or None}."""
    dense = {b: dense_attention_ms(batch, 1, nk, hq, hkv, d, causal=False, backend=b) for b in ("cudnn", "flash")}
    dense["best"] = min((t for t in dense.values() if t), default=None)
    return dense


def skip_if_too_big(report, name, need_bytes, **fields) -> bool:
    """Report a skipped row (and return True) when need_bytes exceed the GPU's free memory."""
    if need_bytes <= cupy().cuda.runtime.memGetInfo()[0]:
        return False
    report(name, **fields, skipped=f"needs ~{need_bytes / 2**30:.0f} GiB, more than is free")
    return True


def git_commit() -> str:
    """The source commit: MSA_CUPY_COMMIT where the tree has no git metadata, else git's HEAD."""
    import os

    if os.environ.get("MSA_CUPY_COMMIT"):
        return os.environ["MSA_CUPY_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2], timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_CARD_FIELDS = {"name": str, "sm_count": numbers.Integral, "capability": str, "memory_GiB": numbers.Real}
_CEILING_FIELDS = {"copy_GBps": numbers.Real, "matmul_TFLOPs": numbers.Real, "matmul_via": str}
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


def validate_record(record) -> dict:
    """Check a benchmark record against the schema; return it, or raise ValueError naming the field.

    A record is one run: {"schema": 1, "suites": [names], "date": ISO 8601 with time zone,
    "commit": git hash (7-40 hex digits), "host": str (optional), "card": {name, sm_count,
    capability, memory_GiB}, "ceilings": {copy_GBps, matmul_TFLOPs, matmul_via}, "results":
    [rows]}; each row has a "name" and fields that are numbers, strings, booleans or null.
    Selection statistics, where a row has them: "pattern" one of patterns.PATTERNS, "overlap"
    in [0, 1], "picks" and "union_t<T>" >= 0.
    """
    def need(cond, what):
        if not cond:
            raise ValueError(f"benchmark record: {what}")

    need(isinstance(record, dict), f"must be a JSON object, got {type(record).__name__}")
    need(record.get("schema") == SCHEMA, f"schema must be {SCHEMA}, got {record.get('schema')!r}")
    suites = record.get("suites")
    need(isinstance(suites, list) and suites and all(isinstance(x, str) for x in suites),
         f"suites must be a non-empty list of suite names, got {suites!r}")
    try:
        date = datetime.datetime.fromisoformat(record.get("date", ""))
    except (TypeError, ValueError):
        date = None
    need(date is not None and date.tzinfo is not None, f"date must be ISO 8601 with a time zone, got {record.get('date')!r}")
    commit = record.get("commit")
    need(isinstance(commit, str) and _COMMIT.match(commit), f"commit must be a git hash, got {commit!r}")
    need(isinstance(record.get("host", ""), str), "host must be a string")
    for key, fields in (("card", _CARD_FIELDS), ("ceilings", _CEILING_FIELDS)):
        part = record.get(key)
        need(isinstance(part, dict), f"{key} must be an object, got {part!r}")
        for field, kind in fields.items():
            need(isinstance(part.get(field), kind) and not isinstance(part.get(field), bool),
                 f"{key}.{field} must be {kind.__name__}, got {part.get(field)!r}")
    results = record.get("results")
    need(isinstance(results, list), "results must be a list of rows")
    for i, row in enumerate(results):
        need(isinstance(row, dict) and isinstance(row.get("name"), str), f"results[{i}] must have a name")
        for field, value in row.items():
            need(value is None or isinstance(value, (str, bool, numbers.Real)),
                 f"results[{i}].{field} must be a number, string, boolean or null, got {value!r}")
        if "pattern" in row:
            need(row["pattern"] in PATTERNS, f"results[{i}].pattern must be one of {PATTERNS}, got {row['pattern']!r}")
        for field, value in row.items():
            if field in ("overlap", "picks") or field.startswith("union_t"):
                bound = 1.0 if field == "overlap" else float("inf")
                need(isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= bound,
                     f"results[{i}].{field} must be a number in [0, {bound:g}], got {value!r}")
    return record


class Report:
    """Collects result rows; prints a table and writes the run's record (card, date, commit)."""

    def __init__(self):
        self.rows = []
        self.meta = {"schema": SCHEMA, "suites": [],
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "commit": git_commit(), "host": platform.node()}

    def __call__(self, name, **fields):
        row = {"name": name, **fields}
        self.rows.append(row)
        print(" ".join([f"{name:<34}"] + [f"{k}={_fmt(v)}" for k, v in fields.items()]), flush=True)

    def record(self) -> dict:
        return {**self.meta, "results": self.rows}

    def write(self, path):
        """Write the record; one that does not validate is still written (a long run is not
        thrown away), with a warning saying what to fix before it belongs in benchmarks/."""
        record = self.record()
        try:
            validate_record(record)
        except ValueError as exc:
            print(f"warning: {exc} (set MSA_CUPY_COMMIT where the tree has no git metadata)", flush=True)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1))

    def markdown(self, title="msa_cupy performance") -> str:
        """A table per kind of row, headed by the card, date, commit and ceilings."""
        m = self.meta
        lines = [f"# {title}", ""]
        card = m.get("card", {})
        ceil = m.get("ceilings", {})
        lines += [f"- card: {card.get('name', '?')} ({card.get('sm_count', '?')} SMs, {card.get('memory_GiB', '?')} GiB)",
                  f"- date: {m['date']}, commit: {m['commit']}",
                  f"- ceilings measured in the same run: copy {ceil.get('copy_GBps', 0):.0f} GB/s (read + write), "
                  f"matmul {ceil.get('matmul_TFLOPs', 0):.0f} TFLOP/s ({ceil.get('matmul_via', '?')})", ""]
        kinds = []
        for row in self.rows:
            if row.get("kind", "") not in kinds:
                kinds.append(row.get("kind", ""))
        for kind in kinds:
            rows = [r for r in self.rows if r.get("kind", "") == kind]
            cols = [c for c in dict.fromkeys(c for r in rows for c in r) if c != "kind"]
            lines += [f"## {kind or 'results'}", "", "| " + " | ".join(cols) + " |",
                      "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
        return "\n".join(lines)


def plot_speedup(rows, path):
    """Speedup over dense against context length (prefill rows), as a PNG; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = [(r["tokens"], r["speedup_vs_cudnn"], r.get("dense_estimated"), r.get("pattern")) for r in rows
           if r.get("kind") == "prefill" and r.get("speedup_vs_cudnn")]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for pattern in dict.fromkeys(p[3] for p in pts):  # one line per selection pattern
        line = [p for p in pts if p[3] == pattern]
        label = "msa_cupy prefill vs cuDNN dense" + (f" ({pattern} selection)" if pattern else "")
        ax.plot([p[0] for p in line], [p[1] for p in line], "o-", label=label)
    for n, s, est, _ in pts:
        ax.annotate(f"{s:.1f}x" + (" (est.)" if est else ""), (n, s), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("speedup over dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
