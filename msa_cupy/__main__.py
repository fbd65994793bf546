"""`python -m msa_cupy demo | bench | check | warmup | info`."""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import os
import platform
import re
import sys
import time

import numpy as np

OP_MODULES = ("_plain", "selection", "sparse", "plan")  # modules that declare kernel variants
LOG_LINES = 40  # an NVRTC log printed by `check` is cut to this many lines (errors come first)
PATTERN_SUITES = ("paper", "sparse", "prefill_plan")  # bench suites whose prefill runs per selection pattern
DECODE_ROW_SUITES = ("paper", "sparse")  # pattern suites that add decode rows (--no-decode drops them)


def cmd_info(_args):
    import msa_cupy
    from msa_cupy import _interop, _jit

    print(f"msa_cupy {msa_cupy.__version__}  python {platform.python_version()}  numpy {np.__version__}")
    print(f"kernel sources: {_jit.CUDA_DIR} ({len(_jit.kernel_sources())} files)")
    print(f"kernel cache:   {_jit.cache_dir() or 'none (kernels are compiled in memory in each process)'}")
    try:
        import cupy

        print(f"cupy {cupy.__version__}")
    except ImportError:
        print("cupy: not installed (pip install 'msa-cupy[cuda13]' or [cuda12])")
        return 0
    try:
        _interop.require_cupy()
    except RuntimeError as exc:
        print(f"GPU: none ({exc})")
        return 0
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    cap = _jit.device_capability(dev.id)
    print(f"GPU {dev.id}: {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}, "
          f"compute capability {cap[0]}.{cap[1]} (arch {_jit.arch_for(cap)}), "
          f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.0f} GiB, "
          f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}")
    return 0


def _declared_variants():
    from msa_cupy import _jit

    for name in OP_MODULES:
        try:
            importlib.import_module(f"msa_cupy.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"msa_cupy.{name}":
                raise
    return _jit.VARIANTS


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str):
    """{mangled name: (registers, stack bytes, spill store bytes, spill load bytes)} from ptxas -v."""
    out, current, stats = {}, None, {}
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current, stats = m.group(1), {}
        elif current and (m := _SPILL.search(line)):
            stats["stack"], stats["spill_st"], stats["spill_ld"] = map(int, m.groups())
        elif current and (m := _REGS.search(line)):
            out[current] = (int(m.group(1)), stats.get("stack", 0), stats.get("spill_st", 0), stats.get("spill_ld", 0))
    return out


def check_archs() -> list[str]:
    """The archs `check` builds for: what NVRTC supports from sm_80 (the kernels use its mma,
    cp.async and bf16), plus sm_90a for the wgmma kernels."""
    try:
        from cuda.bindings import nvrtc

        err, archs = nvrtc.nvrtcGetSupportedArchs()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(err)
    except Exception:  # no cuda-python: the compile step will say so
        archs = [80, 86, 89, 90]
    names = [f"sm_{a}" for a in sorted(archs) if a >= 80]
    return sorted(names + ["sm_90a"], key=lambda a: (int(a[3:].rstrip("a")), a))


def _clip_log(text: str, lines: int = LOG_LINES) -> str:
    rows = text.splitlines()
    if len(rows) <= lines:
        return text
    return "\n".join(rows[:lines] + [f"... ({len(rows) - lines} more lines of the NVRTC log not shown)"])


def cmd_check(args):
    """Compile every declared kernel variant (default sm_80 and sm_90) with cuda-python's NVRTC (no GPU
    needed), a program per source and arch, --jobs at once (threads: NVRTC releases the GIL); a
    variant that uses local memory (stack frame or spills) fails."""
    from msa_cupy import _jit

    accepted = check_archs()
    bad = [a for a in args.arch if a not in accepted]
    if bad:
        print(f"msa_cupy check: unsupported --arch {', '.join(bad)}: the kernels need sm_80 or newer; "
              f"accepted: {', '.join(accepted)}", file=sys.stderr)
        return 2
    if args.stage:
        from msa_cupy import _sanitize

        try:
            if not args.sanitize:
                raise ValueError("--stage selects sanitizer stages: it needs --sanitize")
            _sanitize.selected(_sanitize.stages(wgmma=True), args.stage)
        except ValueError as exc:
            print(f"msa_cupy check: {exc}", file=sys.stderr)
            return 2
    variants = _declared_variants()
    missing = sorted(set(_jit.kernel_sources()) - set(variants))
    failures = 0
    if missing:
        print(f"FAIL: sources with no declared kernel variant: {', '.join(missing)}")
        failures += 1
    jobs = []  # (source, arch, names): one NVRTC program each
    for source in sorted(variants):
        for cap in args.arch:
            cap = cap.removesuffix("a")  # sm_90a: as sm_90, which builds sm_90a where a kernel needs it
            names = [n for n, specific in variants[source].items() if cap == "sm_90" or not specific]
            if not names:  # an sm_90a-only source (wgmma) has nothing to build for other archs
                continue
            wgmma = cap == "sm_90" and any(variants[source][n] for n in names)
            jobs.append((source, cap + ("a" if wgmma else ""), names))

    def compile_job(job):  # NVRTC releases the GIL: threads compile in parallel
        source, arch, names = job
        t0 = time.perf_counter()
        try:
            _, lowered, log = _jit.compile_cubin(source, arch, names, verbose=True, frontend=_jit._nvrtc_cuda_python)
        except _jit.CompileError as exc:
            return exc, None, time.perf_counter() - t0
        return lowered, log, time.perf_counter() - t0

    print(f"{'kernel':<64} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st/ld':>11}")
    workers = max(1, min(args.jobs or os.cpu_count() or 1, len(jobs)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for (source, arch, names), (lowered, log, seconds) in zip(jobs, pool.map(compile_job, jobs)):
            if isinstance(lowered, _jit.CompileError):
                print(f"FAIL {source} [{arch}]:\n{_clip_log(str(lowered))}")
                failures += 1
                continue
            stats = parse_ptxas(log)
            for expr in names:
                regs, stack, st, ld = stats.get(lowered[expr], (-1, 0, 0, 0))
                # local memory in a kernel is traffic in its loop (a spill, or a register array
                # moved to the stack): a failure, not a note
                flag = "  <- FAIL: local memory" if stack or st or ld else ""
                failures += bool(flag)
                print(f"{source + ':' + expr:<64} {arch:<7} {regs:>4} {stack:>5} {st:>5}/{ld:<5}{flag}")
            print(f"  ({source} {arch}: {seconds:.1f} s)")
    print("check:", "FAILED" if failures else "all kernels compiled")
    if args.sanitize:
        from msa_cupy import _sanitize

        failures += _sanitize.sanitize(match=tuple(args.stage))
    return 1 if failures else 0


def cmd_warmup(args):
    """Compile every declared kernel variant for this GPU into the kernel cache, in parallel
    processes, so that first calls load instead of compiling."""
    import multiprocessing

    from msa_cupy import _interop, _jit

    try:
        _interop.require_cupy()
    except RuntimeError as exc:
        print(f"msa_cupy warmup: {exc}", file=sys.stderr)
        return 1
    if _jit.cache_dir() is None:
        print("msa_cupy warmup: no usable kernel cache directory: nothing would be kept", file=sys.stderr)
        return 1
    cap = _jit.device_capability()
    jobs = [(source, _jit.arch_for(cap, specific), expr) for source, names in sorted(_declared_variants().items())
            for expr, specific in names.items() if not specific or cap == (9, 0)]
    t0 = time.perf_counter()
    workers = max(1, min(args.jobs or os.cpu_count() or 1, len(jobs)))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = sum(1 for _ in pool.map(_jit.warm_variant, jobs))
    print(f"warmup: {done} kernel variants for {_jit.arch_for(cap)} in {_jit.cache_dir()} "
          f"({time.perf_counter() - t0:.0f} s, {workers} processes)")
    return 0


def cmd_demo(args):
    import msa_cupy
    from msa_cupy import _interop, reference

    if not _interop.gpu_available():
        print("No CUDA GPU here: running the NumPy reference (float64) on a small case instead.")
        rng = np.random.default_rng(0)
        n, hq, hkv, d = 1024, 8, 2, 64
        q = rng.standard_normal((1, n, hq, d)).astype(np.float32)
        k, v = (rng.standard_normal((1, n, hkv, d)).astype(np.float32) for _ in range(2))
        t0 = time.perf_counter()
        out, ids = msa_cupy.attention(q, k, v, block_size=64, top_k=4, return_indices=True)
        dt = time.perf_counter() - t0
        dense = reference.dense_attention(q, k, v)
        _summary(ids[0], n, 64)
        print(f"reference MSA, {n} tokens, Hq={hq} Hkv={hkv} D={d}, block 64, top_k 4: {dt * 1e3:.0f} ms on the CPU")
        rel = np.linalg.norm(out - dense) / np.linalg.norm(dense)
        print(f"relative difference from dense attention: {rel:.3f} (sparse keeps 4 of {n // 64} blocks)")
        return 0
    return _gpu_demo(args)


def _summary(ids, n_keys, block_size):
    n_blocks = -(-n_keys // block_size)
    valid = ids >= 0
    counts = np.bincount(ids[valid].ravel(), minlength=n_blocks)
    print(f"selection: {ids.shape[0]} queries x {ids.shape[1]} groups x top_k {ids.shape[2]} over {n_blocks} blocks;"
          f" {valid.mean() * 100:.0f}% of slots used; most picked blocks: "
          + ", ".join(f"#{b} ({c})" for b, c in sorted(enumerate(counts), key=lambda t: -t[1])[:5]))


def _gpu_demo(args):
    import cupy as cp

    import msa_cupy
    from msa_cupy._bench import harness

    n, hq, hkv, d = args.tokens, 64, 4, 128
    print(f"MSA on the GPU ({harness.card()['name']}): {n} tokens, Hq={hq} Hkv={hkv} D={d}, bf16, block 128, top_k 16")
    q = harness.random((1, n, hq, d), harness.BF16)
    k, v = harness.random((1, n, hkv, d), harness.BF16), harness.random((1, n, hkv, d), harness.BF16)
    run = lambda: msa_cupy.attention(q, k, v, return_indices=True)  # noqa: E731
    t0 = time.perf_counter()
    out, ids = run()
    cp.cuda.get_current_stream().synchronize()
    print(f"first call (includes kernel compile or cache load): {time.perf_counter() - t0:.1f} s")
    ms = harness.time_ms(run, [()], warmup=1, repeat=3)
    _summary(cp.asnumpy(ids[0]), n, 128)
    dense = harness.dense_attention_ms(1, n, n, hq, hkv, d)
    line = f"msa_cupy.attention: {ms:.2f} ms"
    if dense:
        line += f"; dense causal attention (cuDNN via torch SDPA): {dense:.2f} ms; speedup {dense / ms:.1f}x"
    print(line)
    return 0


def bench_suites() -> list[str]:
    """The suites of `bench`, as msa_cupy._bench declares them."""
    from msa_cupy import _bench

    return list(_bench.SUITES)


def bench_patterns() -> list[str]:
    from msa_cupy._bench import patterns

    return list(patterns.PATTERNS)


def sparse_variant(text: str):
    """A SparseTuning from "field=value,field=value" (values read as the field's type)."""
    import dataclasses

    from msa_cupy import sparse

    types = {f.name: type(f.default) for f in dataclasses.fields(sparse.SparseTuning)}
    fields = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in types or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}")
        kind = types[name]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"{item!r}: {name} takes true or false")
            fields[name] = value.lower() in ("true", "1")
        else:
            fields[name] = None if value == "None" else kind(value) if kind in (int, float) else value
    try:
        return sparse.SparseTuning(**fields)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def bench_schedules() -> list[str]:
    from msa_cupy import sparse

    return list(sparse.SCHEDULES)


def cmd_bench(args):
    from msa_cupy import _interop
    from msa_cupy._bench import SUITES, harness

    try:
        _interop.require_cupy()
    except RuntimeError as exc:
        print(f"msa_cupy bench: {exc}", file=sys.stderr)
        return 1
    report = harness.Report()
    card = harness.card()
    report.meta["card"] = card
    print(f"card: {card}")
    ceil = harness.ceilings()
    report.meta["ceilings"] = ceil
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s ({ceil['matmul_via']})")
    for suite in args.suite:
        kwargs = {"tokens": tuple(args.tokens)} if args.tokens else {}
        if args.dense_max_tokens and suite == "paper":
            kwargs["dense_max_tokens"] = args.dense_max_tokens
        if args.pattern and suite in PATTERN_SUITES:
            kwargs["patterns"] = tuple(args.pattern)
        if args.schedule and suite == "sparse":
            kwargs["schedules"] = tuple(args.schedule)
        if args.variant and suite == "sparse":
            kwargs["variants"] = tuple(args.variant)
        if args.no_decode and suite in DECODE_ROW_SUITES:
            kwargs["caches"] = ()
        SUITES[suite](report, ceil, **kwargs)
    out = args.out or os.path.join("benchmarks", f"{'-'.join(args.suite)}-{card['name'].replace(' ', '_')}.json")
    report.write(out)
    print(f"wrote {out}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown())
        print(f"wrote {args.markdown}")
    if args.plot and harness.plot_speedup(report.rows, args.plot):
        print(f"wrote {args.plot}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m msa_cupy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, GPU, arch, cache dir")
    demo = sub.add_parser("demo", help="MSA on a long context (GPU) or the reference on a small case (CPU)")
    demo.add_argument("--tokens", type=int, default=32768)
    check = sub.add_parser("check", help="compile every kernel with NVRTC (no GPU needed); registers, spills")
    check.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    check.add_argument("--jobs", type=int, help="compiles at once (default: one per CPU)")
    check.add_argument("--sanitize", action="store_true",
                       help="then run every kernel on small shapes under compute-sanitizer memcheck, racecheck, "
                            "synccheck (GPU)")
    check.add_argument("--stage", action="append", default=[], metavar="TEXT",
                       help="with --sanitize: only the stages whose name holds TEXT (repeatable)")
    warmup = sub.add_parser("warmup", help="compile every kernel variant for this GPU into the cache (parallel)")
    warmup.add_argument("--jobs", type=int, help="compile processes (default: one per CPU)")
    bench = sub.add_parser("bench", help="timings against ceilings measured on this card")
    bench.add_argument("--suite", nargs="+", default=["plain"], choices=bench_suites())
    bench.add_argument("--tokens", nargs="+", type=int)
    bench.add_argument("--dense-max-tokens", type=int,
                       help="paper suite: run dense prefill up to this length (default 131072; longer is estimated)")
    bench.add_argument("--pattern", nargs="+", choices=bench_patterns(),
                       help="paper, sparse and prefill_plan suites: selection patterns of the prefill index (default: random coherent)")
    bench.add_argument("--schedule", nargs="+", choices=bench_schedules(),
                       help="sparse suite: time the prefill under each of these schedules (default: the default one)")
    bench.add_argument("--no-decode", action="store_true", help="paper and sparse suites: prefill rows only")
    bench.add_argument("--variant", action="append", type=sparse_variant, metavar="FIELD=VALUE[,...]",
                       help="sparse suite: also time this SparseTuning, e.g. schedule=tile,tile_rows=64 (repeatable)")
    bench.add_argument("--out", help="JSON file (default benchmarks/<suite>-<card>.json)")
    bench.add_argument("--markdown", help="also write the table as Markdown (e.g. docs/perf.md)")
    bench.add_argument("--plot", help="also plot prefill speedup against context length (PNG)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo, "check": cmd_check, "warmup": cmd_warmup, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
