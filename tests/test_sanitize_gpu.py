"""compute-sanitizer memcheck, racecheck and synccheck on every kernel (msa_cupy._sanitize).

The workload runs every kernel once on small shapes and checks each result against the
reference; first in this process (recording which kernels it launches), then alone in a
fresh process (which also fills the kernel cache), then under each tool in its own process."""
from __future__ import annotations

import re

import pytest

from msa_cupy import _jit, _sanitize

pytestmark = pytest.mark.gpu


def _kernel_name(expression: str) -> str:
    return re.sub(r"<.*", "", expression)


def test_workload_checks_every_declared_kernel(monkeypatch):
    """Every (source, kernel) that a module declares is launched, and every result is right."""
    from msa_cupy.__main__ import _declared_variants

    launched = set()
    get_kernel = _jit.get_kernel

    def recording(source, name, **kw):
        launched.add((source, name))
        return get_kernel(source, name, **kw)

    monkeypatch.setattr(_jit, "get_kernel", recording)
    monkeypatch.setattr(_jit, "_LAUNCH", {})  # memoized launches would bypass get_kernel
    lines = []
    assert _sanitize.workload(log=lines.append) == 0, "\n".join(lines)
    wgmma = _jit.has_wgmma()
    declared = {(source, _kernel_name(expr)) for source, exprs in _declared_variants().items()
                for expr, arch_specific in exprs.items() if wgmma or not arch_specific}
    assert declared - launched == set(), f"kernels the workload never runs: {sorted(declared - launched)}"


@pytest.fixture(scope="module")
def warm_cache():
    """The workload alone in a fresh process: its results are right and its kernels cached,
    so the sanitized runs do not compile."""
    clean, output = _sanitize.run(None)
    assert clean, output[-8000:]


@pytest.mark.parametrize("tool", _sanitize.TOOLS)
def test_every_kernel_is_clean_under_compute_sanitizer(tool, warm_cache):
    if _sanitize.compute_sanitizer() is None:
        pytest.skip("compute-sanitizer not found on PATH, under $CUDA_HOME/bin or /usr/local/cuda/bin")
    clean, output = _sanitize.run(tool)
    assert _sanitize.reports_clean(output), output[-8000:]
    assert clean, output[-8000:]
