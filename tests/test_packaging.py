"""The README's commands, .ci/run, and a non-editable install that must find its kernels."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    commands = readme_commands()
    assert len(commands) >= 2
    demo, test = commands[0], commands[1]
    assert "python -m msa_cupy demo" in demo and "pip install" in demo
    assert "pytest" in test and "pip install" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci, ".ci/run must run the README's test command"


def test_wheel_carries_the_cuda_sources_and_the_handler_source(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheel_dir), str(ROOT)], check=True, timeout=600)
    wheel = next(wheel_dir.glob("msa_cupy-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    code = ("import msa_cupy, msa_cupy._jit as j; print(j.CUDA_DIR); print(' '.join(j.kernel_sources()));"
            "print(len(j.source_text(j.kernel_sources()[0])));"
            "import msa_cupy.testing as t, msa_cupy._bench as b; print(t.__file__); print(' '.join(sorted(b.SUITES)));"
            "import msa_cupy._native as n; print(n.SOURCE.is_file())")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert Path(out[0]).is_relative_to(site), "the installed package must use its own copy of cuda/"
    assert out[1].split() == sorted(p.name for p in (ROOT / "cuda").glob("*.cu"))
    assert int(out[2]) > 0
    assert Path(out[3]).is_relative_to(site), "the test kit (msa_cupy.testing) ships in the wheel"
    assert out[4].split() == sorted(__import__("msa_cupy._bench", fromlist=["SUITES"]).SUITES)
    assert out[5] == "True", "the XLA decode handler's C source ships in the wheel"
    headers = sorted(p.name for p in (ROOT / "cuda").glob("*.cuh"))
    assert sorted(p.name for p in Path(out[0]).glob("*.cuh")) == headers


@pytest.mark.parametrize("cmd", [["info"], ["check"]])
def test_cli_runs(cmd):
    res = subprocess.run([sys.executable, "-m", "msa_cupy", *cmd], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    if cmd == ["check"]:
        assert "all kernels compiled" in res.stdout
        assert "sm_80" in res.stdout and "sm_90" in res.stdout
        assert "select_sm90_kernel" in res.stdout and "sm_90a" in res.stdout  # the wgmma kernels


def test_demo_runs_without_or_with_a_gpu():
    res = subprocess.run([sys.executable, "-m", "msa_cupy", "demo", "--tokens", "4096"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "selection:" in res.stdout
