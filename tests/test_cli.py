"""`python -m msa_cupy`: short, clear errors for what cannot run here; no tracebacks."""
import os
import subprocess
import sys

import pytest

import msa_cupy.__main__ as cli
from msa_cupy import _bench, _jit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None, code=None, timeout=300, cwd=REPO):
    """The CLI in a fresh process with no visible GPU; ``code`` runs first (to break the host)."""
    full_env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", **(env or {}))
    full_env = {k: v for k, v in full_env.items() if v is not None}
    prog = f"{code or ''}\nimport runpy, sys\nsys.argv = ['msa_cupy', *{list(args)!r}]\n" \
           "runpy.run_module('msa_cupy', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", prog], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("cmd", ["bench", "warmup"])
def test_gpu_commands_without_a_gpu_are_one_line(cmd):
    res = run_cli(cmd)
    assert res.returncode in (1, 2)
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stdout == "" and len(lines(res.stderr)) == 1, res.stderr
    assert "GPU" in res.stderr


def test_bench_suites_come_from_the_bench_package():
    suites = cli.bench_suites()
    assert {"paper", "plain", "selection"} <= set(suites) and "harness" not in suites
    for suite in suites:  # each one a runner that `bench` can call
        assert callable(_bench.SUITES[suite])
    res = run_cli("bench", "--help")
    assert res.returncode == 0 and "{" + ",".join(suites) + "}" in res.stdout


def test_unknown_bench_suite_is_rejected():
    res = run_cli("bench", "--suite", "plain", "nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "invalid choice: 'nope'" in res.stderr and "'paper'" in res.stderr


def test_unknown_bench_pattern_is_rejected():
    res = run_cli("bench", "--suite", "paper", "--pattern", "random", "smooth")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "invalid choice: 'smooth'" in res.stderr and "'coherent'" in res.stderr


def test_bench_variants_are_sparse_tunings():
    import argparse

    from msa_cupy import sparse

    assert cli.sparse_variant("tile_stages=3,tile_kernel=mma") == sparse.SparseTuning(tile_stages=3, tile_kernel="mma")
    assert cli.sparse_variant("schedule=tile,tile_rows=64,tile_min_useful=0.5") == sparse.SparseTuning(
        schedule="tile", tile_rows=64, tile_min_useful=0.5)
    assert cli.sparse_variant("tile_producer=true,tile_kernel=wgmma") == sparse.SparseTuning(tile_producer=True,
                                                                                         tile_kernel="wgmma")
    assert cli.sparse_variant("tile_producer=0") == sparse.SparseTuning()
    for bad in ("tile_rows=96", "rows=64", "schedule=", "tile_producer=yes", "tile_producer=true,tile_kernel=mma"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.sparse_variant(bad)
    res = run_cli("bench", "--suite", "sparse", "--variant", "tile_rows=96")
    assert res.returncode == 2 and "tile_rows" in res.stderr and "Traceback" not in res.stderr


def test_check_rejects_archs_below_sm80_in_one_line():
    res = run_cli("check", "--arch", "sm_90", "sm_75", timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    (line,) = lines(res.stderr)
    assert "sm_75" in line and "sm_80" in line and "sm_90a" in line


def test_check_archs_are_sm80_and_newer():
    archs = cli.check_archs()
    assert {"sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"} <= set(archs)
    assert all(int(a[3:].rstrip("a")) >= 80 for a in archs)


@pytest.fixture
def fake_compile(monkeypatch):
    calls = []

    def compile_cubin(source, arch, names, *, verbose=False, frontend=None):
        calls.append((source, arch, tuple(names)))
        return b"", {n: n for n in names}, ""

    monkeypatch.setattr(_jit, "compile_cubin", compile_cubin)
    return calls


def test_check_sm90a_builds_what_sm90_builds(fake_compile, capsys):
    assert cli.main(["check", "--arch", "sm_90"]) == 0
    as_sm90 = list(fake_compile)
    fake_compile.clear()
    assert cli.main(["check", "--arch", "sm_90a"]) == 0
    assert fake_compile == as_sm90
    assert any(arch == "sm_90a" for _, arch, _ in as_sm90) and any(arch == "sm_90" for _, arch, _ in as_sm90)


def test_check_fails_a_kernel_with_local_memory(monkeypatch, capsys):
    """A stack frame (a register array the compiler moved to memory) or spills fail `check`."""
    for stats, rc in (("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", 0),
                      ("128 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", 1),
                      ("0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads", 1)):
        log = (f"ptxas info    : Compiling entry function '_k' for 'sm_80'\nptxas         .     {stats}\n"
               f"ptxas info    : Used 40 registers\n")
        monkeypatch.setattr(_jit, "compile_cubin", lambda source, arch, names, **_: (b"", {"k": "_k"}, log))
        monkeypatch.setattr(cli, "_declared_variants", lambda: {"k.cu": {"k": False}})
        monkeypatch.setattr(_jit, "kernel_sources", lambda: ["k.cu"])
        assert cli.main(["check", "--arch", "sm_80"]) == rc, stats
        assert ("local memory" in capsys.readouterr().out) == bool(rc)


def test_check_cuts_long_nvrtc_logs(monkeypatch, capsys):
    log = "\n".join(f"kernel.cu({i}): error: something is wrong here" for i in range(30000))

    def failing(source, arch, names, *, verbose=False, frontend=None):
        raise _jit.CompileError(f"NVRTC failed on {source}:\n{log}")

    monkeypatch.setattr(_jit, "compile_cubin", failing)
    monkeypatch.setattr(cli, "_declared_variants", lambda: {"k.cu": {"k": False}})
    monkeypatch.setattr(_jit, "kernel_sources", lambda: ["k.cu"])
    assert cli.main(["check", "--arch", "sm_80"]) == 1
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 60
    assert "kernel.cu(0): error" in out and "more lines" in out and "FAILED" in out


NO_PASSWD = """
import pwd
def _no_entry(*args):
    raise KeyError("getpwuid(): uid not found")
pwd.getpwuid = pwd.getpwnam = _no_entry
"""


def test_info_without_home_or_passwd_entry(tmp_path):
    res = run_cli("info", code=NO_PASSWD, cwd=tmp_path,  # without a home CuPy makes ./~/.cupy
                  env=dict(HOME=None, MSA_CUPY_CACHE_DIR=None, XDG_CACHE_HOME=None, TMPDIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    cache_line = [line for line in res.stdout.splitlines() if line.startswith("kernel cache:")]
    assert cache_line == [f"kernel cache:   {tmp_path / f'msa_cupy-{os.getuid()}'}"]


def test_warmup_worker_fills_the_cache_that_loads_read(tmp_path, monkeypatch):
    """warmup's worker compiles a variant into the cache under the key a later load looks up."""
    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    assert _jit.warm_variant(("group_mean.cu", "sm_90", "group_mean_kernel<bf16>")) == "group_mean_kernel<bf16>"
    _, _, from_disk = _jit._cached_cubin("group_mean.cu", "sm_90", ["group_mean_kernel<bf16>"])
    assert from_disk


def test_warmup_worker_runs_in_spawned_processes(tmp_path, monkeypatch):
    """warmup's pool spawns fresh interpreters (python -m msa_cupy is their __main__ too): the
    worker must be importable by name from the package, not defined in __main__."""
    import concurrent.futures
    import multiprocessing

    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    assert _jit.warm_variant.__module__ == "msa_cupy._jit"
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert list(pool.map(_jit.warm_variant, [("group_mean.cu", "sm_80", "group_mean_kernel<f16>")])) == [
            "group_mean_kernel<f16>"]


def test_sanitizer_summaries_are_read_per_tool():
    from msa_cupy import _sanitize

    assert _sanitize.reports_clean("========= ERROR SUMMARY: 0 errors\n")
    assert _sanitize.reports_clean("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert not _sanitize.reports_clean("========= ERROR SUMMARY: 3 errors\n")
    assert not _sanitize.reports_clean("========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n")
    assert not _sanitize.reports_clean("no summary: the tool did not finish\n")


def test_sanitizer_stages_are_selected_by_name():
    """`check --sanitize --stage TEXT` (and `python -m msa_cupy._sanitize TEXT`) run the stages
    whose name holds TEXT; a TEXT no stage holds is refused before anything compiles."""
    from msa_cupy import _sanitize

    every = _sanitize.stages(wgmma=True)
    assert _sanitize.selected(every) == every
    producer = _sanitize.selected(every, ("producer warpgroup",))
    assert [name for name, _ in producer] == [name for name, _ in every if "producer warpgroup" in name]
    assert len(producer) == 2 and [name.split()[0] for name, _ in producer] == ["select_sm90.cu",
                                                                                 "sparse_prefill_tile_sm90.cu"]
    both = _sanitize.selected(every, ("decode.cu", "producer warpgroup"))
    assert len(both) > 1 and [s for s in every if s in both] == both  # in the workload's order
    with pytest.raises(ValueError, match="'no such stage'"):
        _sanitize.selected(every, ("decode.cu", "no such stage"))
    res = run_cli("check", "--sanitize", "--stage", "no such stage", timeout=120)
    assert res.returncode == 2 and "no sanitizer stage matches 'no such stage'" in res.stderr and res.stdout == ""
    res = run_cli("check", "--stage", "decode.cu", timeout=120)
    assert res.returncode == 2 and "needs --sanitize" in res.stderr and res.stdout == ""
