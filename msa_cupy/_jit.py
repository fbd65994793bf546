"""JIT layer: load the CUDA sources in ``cuda/``, compile them with NVRTC, cache, launch.

One job: turn (source file, kernel name, template arguments) into a launchable function
on the current device.  Local ``#include "x.cuh"`` lines are inlined, so the text that is
hashed and compiled holds every header it uses: editing a header recompiles its users.
Cubins are cached on disk (see ``cache_dir``), keyed on that text, the options, the target
arch and the NVRTC version.  An entry is verified before the driver sees it and compiled
afresh on any failure; a cache directory that is not the user's own is not used.  Loaded
modules are memoized per device.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

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


def compile_options(arch: str, verbose: bool = False) -> list[str]:
    opts = [*BASE_OPTIONS, f"-arch={arch}"]
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


def compile_cubin(source: str, arch: str, names=(), *, verbose=False, frontend=None):
    """Compile cuda/<source> for arch. Returns (cubin bytes, {name expression: lowered name}, log)."""
    frontend = frontend or _nvrtc_cupy
    text = source_text(source)
    options = compile_options(arch, verbose)
    return frontend(text, source, options, list(names))


# --------------------------------------------------------------------------- cache + launch


# The disk cache holds one file per compiled variant, <source stem>-<arch>-<key>.kernel:
#     ENTRY_MAGIC, one line of JSON {key, names, size, sha256}, then the cubin.
# Everything in it is checked before a byte reaches the driver (a truncated cubin crashes the
# process inside the driver's loader); any failure is a miss, compiled afresh and rewritten.
# The checksum finds damage, not malice: what keeps another user's code out of this process is
# that the directory and its entries must be this user's own, writable by nobody else, and
# reached without following a symbolic link.

ENTRY_MAGIC = b"msa_cupy kernel cache v1\n"
ENTRY_SUFFIX = ".kernel"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_S = 300  # a temp file this old was left by a writer that died before its rename
_POSIX_CACHE = (hasattr(os, "O_NOFOLLOW") and hasattr(os, "getuid") and os.listdir in os.supports_fd
                and {os.open, os.stat, os.unlink, os.rename} <= os.supports_dir_fd)  # os.replace goes as os.rename


class _Refused(Exception):
    """A cache directory or entry that must not be used; the message says why."""


def _cache_candidates() -> list[Path]:
    """Where the cache may live, best first: $MSA_CUPY_CACHE_DIR alone when set, else
    $XDG_CACHE_HOME/msa_cupy, ~/.cache/msa_cupy, then a per-user directory in the temp dir
    (containers often run with no HOME and a uid that has no passwd entry)."""
    explicit = os.environ.get("MSA_CUPY_CACHE_DIR")
    if explicit:
        return [Path(explicit)]
    candidates = []
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        candidates.append(Path(xdg) / "msa_cupy")
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry
        home = None
    if home is not None and home.is_absolute():  # HOME="" gives "."
        candidates.append(home / ".cache" / "msa_cupy")
    if hasattr(os, "getuid"):
        candidates.append(Path(tempfile.gettempdir()) / f"msa_cupy-{os.getuid()}")
    return candidates


def _check_owned(st: os.stat_result, what: str) -> None:
    if st.st_uid != os.getuid():
        raise _Refused(f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise _Refused(f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):03o})")


def _open_dir(path: Path) -> int:
    """A descriptor of the cache directory, made 0700 if missing.  OSError: it cannot be made
    or opened; _Refused: it is not safe to load code from."""
    if not os.path.lexists(path):
        os.makedirs(path, mode=0o700, exist_ok=True)  # the mode applies to the last component
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        if os.path.islink(path):
            raise _Refused("it is a symbolic link") from None
        raise
    try:
        _check_owned(os.fstat(fd), "it")
    except _Refused:
        os.close(fd)
        raise
    return fd


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _open_cache():
    """(path, descriptor) of the cache directory in use, or None: kernels stay in memory (warned once).

    A candidate that cannot be created gives way to the next; one that exists but is not
    safe stops the search, so that the user hears of it."""
    if not _POSIX_CACHE:
        _warn_once("msa_cupy: no kernel cache on this platform (it needs O_NOFOLLOW and owner checks); "
                   "kernels are compiled in each process")
        return None
    tried = []
    for path in _cache_candidates():
        try:
            return path, _open_dir(path)
        except _Refused as exc:
            _warn_once(f"msa_cupy: not using the kernel cache {path}: {exc}; kernels are compiled in memory "
                       "in each process (use a directory of your own, mode 0700, or set MSA_CUPY_CACHE_DIR)")
            return None
        except OSError as exc:
            tried.append(f"{path}: {exc.strerror or exc}")
    _warn_once(f"msa_cupy: cannot create a kernel cache directory ({'; '.join(tried) or 'none found'}); "
               "kernels are compiled in memory in each process (set MSA_CUPY_CACHE_DIR to a directory of your own)")
    return None


def cache_dir() -> Path | None:
    """The kernel cache directory (created 0700 if missing), or None when kernels stay in memory."""
    opened = _open_cache()
    if opened is None:
        return None
    os.close(opened[1])
    return opened[0]


def _entry_bytes(key: str, cubin: bytes, lowered: dict) -> bytes:
    header = {"key": key, "names": lowered, "size": len(cubin), "sha256": hashlib.sha256(cubin).hexdigest()}
    return ENTRY_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + cubin


def _parse_entry(data: bytes, key: str, names) -> tuple[bytes, dict]:
    """(cubin, lowered names) of an entry written for key and names; _Refused says what is wrong."""
    if not data.startswith(ENTRY_MAGIC):
        raise _Refused("empty" if not data else "not a msa_cupy cache entry")
    end = data.find(b"\n", len(ENTRY_MAGIC))
    try:
        header = json.loads(data[len(ENTRY_MAGIC):end]) if end > 0 else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise _Refused("its header is unreadable")
    cubin, lowered = data[end + 1:], header.get("names")
    if header.get("key") != key:
        raise _Refused("it was written for another key")
    if not (isinstance(lowered, dict) and set(lowered) == set(names)
            and all(isinstance(v, str) and v for v in lowered.values())):
        raise _Refused("its kernel names do not match")
    if header.get("size") != len(cubin):
        raise _Refused(f"it is cut short ({len(cubin)} of {header.get('size')} bytes)")
    if header.get("sha256") != hashlib.sha256(cubin).hexdigest():
        raise _Refused("its checksum does not match")
    return cubin, lowered


def _read_entry(dir_fd: int, fname: str, key: str, names):
    """The verified (cubin, lowered names) of an entry, None when there is none; _Refused otherwise."""
    try:  # O_NONBLOCK: a FIFO planted under the entry's name must not hang the open
        fd = os.open(fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Refused("it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("it is not a regular file")
        _check_owned(st, "it")
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    return _parse_entry(data, key, names)


def _write_entry(dir_fd: int, fname: str, data: bytes) -> None:
    """Write atomically: a temp file (0600) in the same directory, renamed over the entry."""
    _remove_stale_temps(dir_fd)
    tmp = f"{fname}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, fname, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _remove_stale_temps(dir_fd: int) -> None:
    """Remove temp files that writers killed before their rename left behind (any pid)."""
    now = time.time()
    for name in os.listdir(dir_fd):
        if name.endswith(TEMP_SUFFIX):
            with contextlib.suppress(OSError):
                if now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime > STALE_TEMP_S:
                    os.unlink(name, dir_fd=dir_fd)


_lock = threading.Lock()
_modules: dict = {}  # (device id, source, name expression, arch) -> Kernel


def warm_variant(job) -> str:
    """Compile one (source, arch, name expression) into the kernel cache (``warmup``'s worker:
    a module-level function, so that spawned processes can unpickle it)."""
    source, arch, expr = job
    _cached_cubin(source, arch, [expr])
    return expr


def _cached_cubin(source, arch, names, *, rejected=None):
    """(cubin, {name expression: lowered name}, from_disk) for cuda/<source> on arch: a verified
    cache entry, else a fresh compile that is then stored.  ``rejected`` (why the cached image
    failed to load) skips the cache read and replaces the entry."""
    text = source_text(source)
    options = compile_options(arch)
    key = hashlib.sha256(json.dumps([text, options, sorted(names), _nvrtc_version(_nvrtc_cupy)]).encode()).hexdigest()
    fname = f"{Path(source).stem}-{arch}-{key[:24]}{ENTRY_SUFFIX}"
    return cached_build(fname, key, names, f"{source} for {arch}",
                        lambda: _nvrtc_cupy(text, source, options, list(names))[:2], rejected=rejected)


def cached_build(fname: str, key: str, names, what: str, build, *, rejected=None):
    """(bytes, {name: lowered name}, from_disk): the verified cache entry ``fname`` written for
    ``key`` and ``names``, else ``build()`` (announced on stderr before it starts: a cold
    compile takes seconds to minutes) and stored.  ``rejected`` skips the read and replaces
    the entry."""
    opened = _open_cache()
    path, dir_fd = opened if opened else (None, None)
    try:
        why = rejected or ("first use; cached after" if dir_fd is not None else "first use; in memory only")
        if dir_fd is not None and rejected is None:
            try:
                entry = _read_entry(dir_fd, fname, key, names)
                if entry is not None:
                    return (*entry, True)
            except (_Refused, OSError) as exc:
                why = f"cached copy rejected: {exc}"
        print(f"msa_cupy: compiling {what} ({why}) ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            data, lowered = build()
        except BaseException:
            print(" failed", file=sys.stderr, flush=True)
            raise
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if dir_fd is not None:
            try:
                _write_entry(dir_fd, fname, _entry_bytes(key, data, lowered))
            except OSError as exc:
                _warn_once(f"msa_cupy: kernel cache {path} is not writable ({exc}); "
                           "kernels will be recompiled in each process")
        return data, lowered, False
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _load_function(cubin: bytes, lowered_name: str):
    """Hand a cubin to the driver on the current device: (module, function)."""
    import cupy

    module = cupy.cuda.function.Module()
    module.load(cubin)
    return module, module.get_function(lowered_name)


def _load(source: str, arch: str, expr: str):
    """(module, function) for ``expr`` of cuda/<source> on arch.  A cached image the driver
    refuses passed its checksum, so it was written bad: it is compiled afresh once and
    replaced; a fresh image the driver refuses is an error."""
    rejected = None
    while True:
        cubin, lowered, from_disk = _cached_cubin(source, arch, [expr], rejected=rejected)
        try:
            return _load_function(cubin, lowered[expr])
        except Exception as exc:
            if not from_disk:
                raise RuntimeError(f"msa_cupy: the CUDA driver cannot load {expr} of {source} "
                                   f"compiled for {arch}: {exc}") from exc
            rejected = f"cached copy rejected by the driver: {exc}"


_FUNC_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


class Kernel:
    """A compiled kernel on one device: ``kernel(grid, block, args, shared_mem=0)``
    launches on CuPy's current stream (the caller's stream inside a public call)."""

    def __init__(self, function, name):
        self.function = function
        self.name = name
        self._smem_limit = 48 * 1024
        self._nonportable_cluster = False

    def reserve_shared(self, nbytes: int):
        """Raise the kernel's dynamic shared-memory limit to nbytes (a plan does it up front, so
        that a captured launch makes no attribute call)."""
        import cupy

        if nbytes > self._smem_limit:
            cupy.cuda.driver.funcSetAttribute(
                self.function.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes))
            self._smem_limit = int(nbytes)

    def allow_cluster(self, size: int):
        """Let the kernel (built with __cluster_dims__) run clusters of ``size`` CTAs: above 8,
        a non-portable size, allowed per function."""
        import cupy

        if size > 8 and not self._nonportable_cluster:
            cupy.cuda.driver.funcSetAttribute(self.function.ptr, _FUNC_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
            self._nonportable_cluster = True

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


def get_kernel(source: str, name: str, *, template=None, arch_specific=False) -> Kernel:
    """The kernel ``name`` (``name<template...>`` when templated) of cuda/<source> on the current device.

    Each template instantiation compiles (or loads from the cache) its own module once per device.
    """
    import cupy

    expr = name_expression(name, template)
    dev = cupy.cuda.Device()
    cap = device_capability(dev.id)
    if cap < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(f"msa_cupy kernels need compute capability >= 8.0 (Ampere), device {dev.id} has {cap}")
    arch = arch_for(cap, arch_specific)
    memo_key = (dev.id, source, expr, arch)
    with _lock:
        hit = _modules.get(memo_key)
        if hit is None:
            module, function = _load(source, arch, expr)
            hit = Kernel(function, expr)
            hit._module = module  # keep the module alive with its function
            _modules[memo_key] = hit
        return hit


# --------------------------------------------------------------------------- prepared launches
#
# A decode step is a handful of launches whose arguments barely change from step to step.
# Through Kernel.__call__ each launch converts every argument again (CuPy's argument objects,
# a tuple per launch); a prepared Launch holds the argument block that cuLaunchKernel reads,
# in host memory of its own, and a step rewrites only the addresses (and the few scalars) that
# changed, then makes one driver call.  Launch functions build prepared launches unchanged:
# they receive a Recorder in place of the kernel, and Pointer / Scalar stand-ins in place of
# the arguments that are bound at each step.


class Pointer:
    """An array argument whose device address is bound at each launch (Program.bind).
    ``shape`` and ``dtype`` are what launch functions read from their arrays while a launch is
    prepared (head counts, top_k, the element type)."""

    __slots__ = ("name", "shape", "dtype")

    def __init__(self, name: str, shape=(), dtype="uint8"):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self):
        return f"Pointer({self.name!r}, {self.shape}, {self.dtype})"


class Scalar:
    """A by-value argument (int32, int64, float32...) bound at each launch."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"Scalar({self.name!r}, {self.dtype})"


def int32(x):
    """np.int32(x) for a launch argument; a Scalar stays (it is bound at each launch)."""
    return x if isinstance(x, Scalar) else np.int32(x)


_CELL = 8  # bytes per argument in a prepared argument block: every kernel argument here fits


class Launch:
    """A kernel launch prepared once: grid, block, dynamic shared memory, and the argument block
    that cuLaunchKernel reads (one 8-byte cell per argument, a value in the low bytes of its
    cell, and the array of cell addresses the driver takes).  Constant arguments are written
    here; each Pointer or Scalar argument is a slot, ``slots`` lists them as (name, typed view
    of the cells, index), and is written by ``Program.bind``.  Calling it is one driver call on
    the given stream; a grid with a zero extent launches nothing (as Kernel.__call__)."""

    def __init__(self, kernel, grid, block, args, shared_mem=0):
        if sys.byteorder != "little":  # pragma: no cover - CUDA hosts are little-endian
            raise RuntimeError("prepared launches assume a little-endian host")
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        self.empty = min(grid) == 0
        self.kernel = kernel
        self.function = kernel.function.ptr
        self.grid, self.block, self.shared_mem = grid, block, int(shared_mem)
        if not self.empty:
            kernel.reserve_shared(self.shared_mem)
        n = len(args)
        self.values = np.zeros(max(n, 1), np.uint64)  # the cells
        self.addresses = self.values.ctypes.data + _CELL * np.arange(max(n, 1), dtype=np.uint64)
        self.slots = []
        self._keep = []  # arrays whose addresses are written in: alive as long as the launch
        self._views = {}
        for i, a in enumerate(args):
            self._pack(i, a)
        self._args = int(self.addresses.ctypes.data)

    def _view(self, dtype):
        if dtype not in self._views:
            self._views[dtype] = self.values.view(dtype)
        return self._views[dtype]

    def _pack(self, i, a):
        if isinstance(a, Pointer):
            self.slots.append((a.name, self.values, i))
        elif isinstance(a, Scalar):
            if a.dtype.itemsize not in (1, 2, 4, 8):
                raise TypeError(f"argument {i}: scalar slot {a.name!r} of {a.dtype} does not fit a cell")
            self.slots.append((a.name, self._view(a.dtype), i * (_CELL // a.dtype.itemsize)))
        elif a is None:
            self.values[i] = 0  # a null pointer
        elif isinstance(a, np.generic):
            raw = np.frombuffer(a.tobytes(), np.uint8)
            if raw.size not in (1, 2, 4, 8):
                raise TypeError(f"argument {i}: {a.dtype} does not fit a cell")
            self.values[i:i + 1].view(np.uint8)[:raw.size] = raw
        elif hasattr(getattr(a, "data", None), "ptr"):  # a CuPy array: its address
            self.values[i] = a.data.ptr
            self._keep.append(a)
        else:
            raise TypeError(f"argument {i}: a prepared launch takes arrays, NumPy scalars, None, Pointer or Scalar, "
                            f"got {type(a).__name__} (a Python int or float has no fixed width)")

    def overlapping_previous(self, device: int) -> "Launch":
        """Launch programmatically after the previous kernel of the stream (PDL): this launch
        may start while that one finishes, and its kernel waits for it before it reads what
        it wrote (``wait_for_previous_launch`` in common.cuh).  Only where the device (sm_90
        and later) and the driver (12.3 and later, graph capture included) take it, and
        ``PROGRAMMATIC_LAUNCH`` is on; elsewhere an ordinary launch."""
        if PROGRAMMATIC_LAUNCH and not self.empty and _programmatic_launch_ready(device):
            config = _LaunchConfig()
            config.grid[:] = self.grid
            config.block[:] = self.block
            config.shared = self.shared_mem
            config.attrs = ctypes.pointer(_SERIALIZATION)
            config.n_attrs = 1
            self._config = config
            self._config_address = ctypes.addressof(config)
        return self

    _config = None  # the cuLaunchKernelEx configuration of a programmatic launch

    def __call__(self, stream: int):
        if self._config is not None:
            self._config.stream = stream
            status = _launch_ex(self._config_address, self.function, self._args, None)
            if status:
                from cupy.cuda import driver

                raise driver.CUDADriverError(status)
        elif not self.empty:
            g, b = self.grid, self.block
            (_driver_launch or _load_driver_launch())(self.function, g[0], g[1], g[2], b[0], b[1], b[2],
                                                      self.shared_mem, stream, self._args, 0)


_driver_launch = None  # cupy's binding of cuLaunchKernel, loaded on first use


def _load_driver_launch():
    global _driver_launch
    from cupy.cuda import driver

    _driver_launch = driver.launchKernel
    return _driver_launch


# Programmatic dependent launch: cuLaunchKernelEx through ctypes (CuPy binds only cuLaunchKernel),
# with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION.  The structures as cuda.h lays
# them out: CUlaunchAttribute is an int id padded to 8 bytes and a 64-byte value union.
PROGRAMMATIC_LAUNCH = os.environ.get("MSA_CUPY_PROGRAMMATIC_LAUNCH", "1") != "0"
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


_SERIALIZATION = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION)
_SERIALIZATION.value[0] = 1  # programmaticStreamSerializationAllowed
_launch_ex = None
_programmatic_devices: dict = {}


def _programmatic_launch_ready(device: int) -> bool:
    """Whether launches on device may be programmatic (compute capability 9.0+, driver 12.3+,
    libcuda's cuLaunchKernelEx found); asked once per device."""
    global _launch_ex
    ready = _programmatic_devices.get(device)
    if ready is None:
        import cupy

        ready = False
        if device_capability(device) >= (9, 0) and cupy.cuda.runtime.driverGetVersion() >= 12030:
            try:
                fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                fn.restype = ctypes.c_int
                _launch_ex, ready = fn, True
        _programmatic_devices[device] = ready
    return ready


class Recorder:
    """Stands in for a Kernel in a launch function: the call prepares a Launch (``launch``)
    instead of running the kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launch = None

    def __call__(self, grid, block, args, shared_mem=0):
        self.launch = Launch(self.kernel, grid, block, args, shared_mem)

    def reserve_shared(self, nbytes: int):
        self.kernel.reserve_shared(nbytes)


class Program:
    """Prepared launches run in order on one stream; the slots of all of them are bound by name
    (an address, or a scalar's value).  ``tag`` is free for the owner (e.g. the workspace the
    slots were last bound to)."""

    def __init__(self, launches):
        self.launches = tuple(launch for launch in launches if not launch.empty)
        slots: dict = {}
        for launch in launches:
            for name, view, index in launch.slots:
                slots.setdefault(name, []).append((view, index))
        self.slots = {name: tuple(cells) for name, cells in slots.items()}
        self.tag = None
        self._binders: dict = {}

    def bind(self, name: str, value: int):
        """Write value into every slot called name (no slot of that name: nothing)."""
        for view, index in self.slots.get(name, ()):
            view[index] = value

    def binder(self, names: tuple):
        """A function of len(names) values that binds each to its name, in one call (a step
        binds the same names every time: the lookups are made once)."""
        found = self._binders.get(names)
        if found is None:
            cells = tuple((view, index, i) for i, name in enumerate(names) for view, index in self.slots.get(name, ()))

            def found(*values):
                for view, index, i in cells:
                    view[index] = values[i]

            self._binders[names] = found
        return found

    def __call__(self, stream: int):
        for launch in self.launches:
            launch(stream)


_THREAD = threading.local()


def launch_ready(device: int) -> None:
    """Driver launches need the device's context current in this thread: CuPy makes it so
    before its own launches (a runtime call); prepared launches do it once per thread and
    device, with the device current."""
    ready = getattr(_THREAD, "devices", None)
    if ready is None:
        ready = _THREAD.devices = set()
    if device not in ready:
        import cupy

        cupy.cuda.runtime.memGetInfo()
        ready.add(device)
