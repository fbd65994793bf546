"""The JIT layer: header inlining, cache keys that see headers, unwritable caches."""
import warnings

import pytest

from msa_cupy import _jit


@pytest.fixture
def cuda_dir(tmp_path, monkeypatch):
    (tmp_path / "a.cuh").write_text("#pragma once\n#define A_VALUE 1\n")
    (tmp_path / "b.cuh").write_text('#pragma once\n#include "a.cuh"\n#define B_VALUE 2\n')
    (tmp_path / "k.cu").write_text(
        '#include "a.cuh"\n#include "b.cuh"\n'
        "template <int N> __global__ void fill(int* out) { out[threadIdx.x] = N + A_VALUE + B_VALUE; }\n")
    monkeypatch.setattr(_jit, "CUDA_DIR", tmp_path)
    return tmp_path


def test_headers_are_inlined_once(cuda_dir):
    text = _jit.source_text("k.cu")
    assert text.count("#define A_VALUE") == 1 and "#define B_VALUE" in text
    assert '#include "' not in text


def test_missing_source_is_named(cuda_dir):
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        _jit.source_text("nope.cu")


def test_every_declared_source_exists():
    import msa_cupy.__main__ as cli

    for source in cli._declared_variants():
        assert (_jit.CUDA_DIR / source).is_file(), source


def test_cuda_python_compiles_for_sm80_and_sm90(cuda_dir):
    pytest.importorskip("cuda.bindings")
    for arch in ("sm_80", "sm_90", "sm_90a"):
        cubin, lowered, log = _jit.compile_cubin("k.cu", arch, ["fill<3>"], verbose=True,
                                                 frontend=_jit._nvrtc_cuda_python)
        assert len(cubin) > 0 and lowered["fill<3>"].startswith("_Z")
        assert "registers" in log


def test_compile_errors_carry_the_log(cuda_dir):
    pytest.importorskip("cuda.bindings")
    (cuda_dir / "bad.cu").write_text("__global__ void k() { undeclared_thing(); }\n")
    with pytest.raises(_jit.CompileError, match="undeclared_thing"):
        _jit.compile_cubin("bad.cu", "sm_80", [], frontend=_jit._nvrtc_cuda_python)


def test_cache_key_sees_header_edits_and_survives_unwritable_dir(cuda_dir, tmp_path, monkeypatch):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    monkeypatch.setattr(_jit, "_warned", set())
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(cache))
    cubin1, names1, from_disk = _jit._cached_cubin("k.cu", "sm_80", ["fill<1>"])
    assert not from_disk and len(list(cache.glob("*.kernel"))) == 1
    cubin1b, names1b, from_disk = _jit._cached_cubin("k.cu", "sm_80", ["fill<1>"])
    assert from_disk and cubin1b == cubin1 and names1b == names1
    (cuda_dir / "a.cuh").write_text("#pragma once\n#define A_VALUE 5\n")
    _, _, from_disk = _jit._cached_cubin("k.cu", "sm_80", ["fill<1>"])
    assert not from_disk and len(list(cache.glob("*.kernel"))) == 2, "editing a header must change the cache key"
    # a cache path that cannot be created: compile anyway, warn once
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(blocker / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cubin3, names3, _ = _jit._cached_cubin("k.cu", "sm_80", ["fill<2>"])
        _jit._cached_cubin("k.cu", "sm_80", ["fill<3>"])
    assert len(cubin3) > 0 and "fill<2>" in names3
    assert [str(w.message) for w in caught if "cannot create a kernel cache" in str(w.message)] != []
    assert len(caught) == 1


def test_arch_choice():
    assert _jit.arch_for((9, 0)) == "sm_90"
    assert _jit.arch_for((9, 0), arch_specific=True) == "sm_90a"
    assert _jit.arch_for((8, 6), arch_specific=True) == "sm_86"
