"""JIT layer: load the CUDA sources in ``cuda/``, compile them with NVRTC, cache, launch.

One job: turn (source file, kernel name, template arguments) into a launchable function
on the current device.  Local ``#include "x.cuh"`` lines are inlined, so the text that is
hashed and compiled holds every header it uses: editing a header recompiles its users.
Cubins are cached on disk under ``$MSA_CUPY_CACHE_DIR`` (default ``~/.cache/msa_cupy``),
keyed on that text, the options, the target arch and the NVRTC version; an unwritable
cache directory only costs recompiles.  Loaded modules are memoized per device.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# installed wheel: msa_cupy/cuda/; source tree: <repo>/cuda/
CUDA_DIR = next((p for p in (_PACKAGE / "cuda", _PACKAGE.parent / "cuda") if p.is_dir()), _PACKAGE / "cuda")

BASE_OPTIONS = ("-std=c++17", "--use_fast_math", "-default-device")
MIN_COMPUTE_CAPABILITY = (8, 0)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def kernel_sources() -> list[str]:
    """Every compilable translation unit (``*.cu``) in cuda/."""
    return sorted(p.name for p in CUDA_DIR.glob("*.cu"))


def source_text(name: str) -> str:
    """The source with local headers inlined (each once, like #pragma once)."""
    seen: set[str] = set()

    def expand(fname: str) -> str:
        path = CUDA_DIR / fname
        if not path.is_file():
            raise FileNotFoundError(f"msa_cupy CUDA source {fname!r} not found in {CUDA_DIR}")
        if fname in seen:
            return ""
        seen.add(fname)
        text = path.read_text()
        return _INCLUDE.sub(lambda m: f"// ---- {m.group(1)}\n{expand(m.group(1))}", text)

    return expand(name)


def arch_for(capability: tuple[int, int], arch_specific: bool = False) -> str:
    major, minor = capability
    suffix = "a" if arch_specific and (major, minor) == (9, 0) else ""
    return f"sm_{major}{minor}{suffix}"


def compile_options(arch: str, defines: dict | None = None, verbose: bool = False) -> list[str]:
    opts = [*BASE_OPTIONS, f"-arch={arch}"]
    opts += [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    if verbose:
        opts.append("-Xptxas=-v")
    return opts


class CompileError(RuntimeError):
    pass


# Every kernel variant the package launches, declared by the module that launches it, so that
# `python -m msa_cupy check` compiles exactly what runs: {source: {name expression: arch_specific}}.
VARIANTS: dict[str, dict[str, bool]] = {}


def name_expression(name: str, template=None) -> str:
    return f"{name}<{', '.join(str(t) for t in template)}>" if template else name


_TEMPLATE_DTYPES = {"float16": "f16", "bfloat16": "bf16"}  # as the .cu files spell their element types


def dtype_template(dtype) -> str:
    """The template argument of the kernels for an element dtype: 'f16' or 'bf16'."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in _TEMPLATE_DTYPES:
        raise TypeError(f"the kernels take float16 or bfloat16, got {name}")
    return _TEMPLATE_DTYPES[name]


def declare(source: str, name: str, *templates, arch_specific: bool = False) -> None:
    """Declare the template instantiations of a kernel that a module may launch."""
    for template in templates or (None,):
        VARIANTS.setdefault(source, {})[name_expression(name, template)] = arch_specific


# --------------------------------------------------------------------------- NVRTC front ends


def _nvrtc_cupy(text, fname, options, names):
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(text, fname, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise CompileError(f"NVRTC failed on {fname} ({' '.join(options)}):\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        return nvrtc.getCUBIN(prog), lowered, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _nvrtc_cuda_python(text, fname, options, names):
    """cuda-python's NVRTC: compiles with no GPU and no CuPy (used by `check`)."""
    from cuda.bindings import nvrtc

    def ok(res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC error {err}")
        return rest[0] if len(rest) == 1 else rest

    prog = ok(nvrtc.nvrtcCreateProgram(text.encode(), fname.encode(), 0, [], []))
    try:
        for n in names:
            ok(nvrtc.nvrtcAddNameExpression(prog, n.encode()))
        bopts = [o.encode() for o in options]
        res = nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts)
        size = ok(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        ok(nvrtc.nvrtcGetProgramLog(prog, log))
        log = log.decode(errors="replace").rstrip("\x00 ")
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC failed on {fname} ({' '.join(options)}):\n{log}")
        lowered = {n: ok(nvrtc.nvrtcGetLoweredName(prog, n.encode())).decode() for n in names}
        size = ok(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        ok(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin, lowered, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvrtc_version(frontend) -> str:
    try:
        if frontend is _nvrtc_cupy:
            from cupy_backends.cuda.libs import nvrtc

            return "%d.%d" % nvrtc.getVersion()
        from cuda.bindings import nvrtc

        _, major, minor = nvrtc.nvrtcVersion()
        return f"{major}.{minor}"
    except Exception:  # pragma: no cover
        return "unknown"


def compile_cubin(source: str, arch: str, names=(), defines=None, *, verbose=False, frontend=None):
    """Compile cuda/<source> for arch. Returns (cubin bytes, {name expression: lowered name}, log)."""
    frontend = frontend or _nvrtc_cupy
    text = source_text(source)
    options = compile_options(arch, defines, verbose)
    return frontend(text, source, options, list(names))


# --------------------------------------------------------------------------- cache + launch


def cache_dir() -> Path:
    return Path(os.environ.get("MSA_CUPY_CACHE_DIR") or Path.home() / ".cache" / "msa_cupy")


_lock = threading.Lock()
_modules: dict = {}  # (device id, key) -> (cupy Module, lowered names)
_warned_cache = False


def _cached_cubin(source, arch, names, defines):
    global _warned_cache
    text = source_text(source)
    options = compile_options(arch, defines)
    key_src = json.dumps([text, options, sorted(names), _nvrtc_version(_nvrtc_cupy)])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    stem = f"{Path(source).stem}-{arch}-{key}"
    cubin_path, names_path = cache_dir() / f"{stem}.cubin", cache_dir() / f"{stem}.json"
    try:
        return key, cubin_path.read_bytes(), json.loads(names_path.read_text())
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    cubin, lowered, _ = _nvrtc_cupy(text, source, options, list(names))
    print(f"msa_cupy: compiled {source} for {arch} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        for path, data in ((cubin_path, cubin), (names_path, json.dumps(lowered).encode())):
            fd, tmp = tempfile.mkstemp(dir=cache_dir())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    except OSError as exc:
        if not _warned_cache:
            warnings.warn(f"msa_cupy: kernel cache {cache_dir()} is not writable ({exc}); "
                          "kernels will be recompiled in each process", RuntimeWarning, stacklevel=3)
            _warned_cache = True
    return key, cubin, lowered


class Kernel:
    """A compiled kernel on one device: ``kernel(grid, block, args, shared_mem=0)``
    launches on CuPy's current stream (the caller's stream inside a public call)."""

    def __init__(self, function, name):
        self.function = function
        self.name = name
        self._smem_limit = 48 * 1024

    def reserve_shared(self, nbytes: int):
        """Raise the kernel's dynamic shared-memory limit to nbytes (a plan does it up front, so
        that a captured launch makes no attribute call)."""
        import cupy

        if nbytes > self._smem_limit:
            cupy.cuda.driver.funcSetAttribute(
                self.function.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes))
            self._smem_limit = int(nbytes)

    def __call__(self, grid, block, args, shared_mem=0):
        import cupy

        self.reserve_shared(shared_mem)
        grid = tuple(int(g) for g in grid)
        if min(grid) == 0:
            return
        self.function(grid, tuple(int(b) for b in block), tuple(args), shared_mem=int(shared_mem),
                      stream=cupy.cuda.get_current_stream())

    @property
    def num_regs(self) -> int:
        import cupy

        return cupy.cuda.driver.funcGetAttribute(
            cupy.cuda.driver.CU_FUNC_ATTRIBUTE_NUM_REGS, self.function.ptr)


def device_capability(device_id=None) -> tuple[int, int]:
    import cupy

    dev = cupy.cuda.Device(device_id)
    cc = dev.compute_capability
    return int(cc[:-1]), int(cc[-1])


_WGMMA: dict = {}
_LAUNCH: dict = {}  # (device, source, name, template) -> Kernel: the launch path's lookup


def kernel(source: str, name: str, template=None, *, arch_specific=False) -> "Kernel":
    """get_kernel memoized by its arguments on the current device: one dict lookup per launch
    (decode calls count host microseconds; get_kernel formats names and takes a lock)."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), source, name, template)
    hit = _LAUNCH.get(key)
    if hit is None:
        hit = _LAUNCH[key] = get_kernel(source, name, template=template, arch_specific=arch_specific)
    return hit


def has_wgmma(device_id=None) -> bool:
    """True on sm_90 (Hopper), where the wgmma kernels (built for sm_90a) run."""
    import cupy

    dev = cupy.cuda.runtime.getDevice() if device_id is None else device_id
    if dev not in _WGMMA:
        _WGMMA[dev] = device_capability(dev) == (9, 0)
    return _WGMMA[dev]


def get_kernel(source: str, name: str, *, template=None, defines=None, arch_specific=False) -> Kernel:
    """The kernel ``name`` (``name<template...>`` when templated) of cuda/<source> on the current device.

    All template instantiations asked of one source compile together only once each; a
    new instantiation compiles its own module.
    """
    import cupy

    expr = name_expression(name, template)
    dev = cupy.cuda.Device()
    cap = device_capability(dev.id)
    if cap < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(f"msa_cupy kernels need compute capability >= 8.0 (Ampere), device {dev.id} has {cap}")
    arch = arch_for(cap, arch_specific)
    memo_key = (dev.id, source, expr, arch, tuple(sorted((defines or {}).items())))
    with _lock:
        hit = _modules.get(memo_key)
        if hit is None:
            _, cubin, lowered = _cached_cubin(source, arch, [expr], defines)
            module = cupy.cuda.function.Module()
            module.load(cubin)
            hit = Kernel(module.get_function(lowered[expr]), expr)
            hit._module = module  # keep the module alive with its function
            _modules[memo_key] = hit
        return hit
