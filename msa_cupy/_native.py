"""Host code compiled at first use: the XLA FFI handler that runs a decode step for
``msa_cupy.jax`` with no Python at run time (``msa_cupy/xla_ffi.c``).

The handler is C, built with the system C compiler against the XLA FFI header that jaxlib
ships (``jax.ffi.include_dir()``) and kept in the kernel cache like the cubins (a verified entry,
copied to a private file before it is loaded).  A step is its prepared launches
(``_jit.Program``) flattened into words (:func:`flat_program`) and registered under a key
(:func:`register`); XLA passes the key as an attribute.  Where no C compiler (or no jaxlib
header) is found, :func:`library` says why and ``msa_cupy.jax`` keeps its Python callback.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import _jit

SOURCE = Path(__file__).resolve().parent / "xla_ffi.c"
TARGET = "msa_cupy_decode_step"  # the XLA custom-call target
PROGRAM_MAGIC = 0x4D5341666669  # "MSAffi", the program's first word (xla_ffi.c)
SOURCE_WORKSPACE = -1  # a bind to the aligned workspace (the last result)
LAUNCH_WORDS = 12
MAX_CELLS = 64
COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_library = None
unavailable = None  # why the handler is not available (None: not tried yet, or it built)
_kept: list = []  # registered programs and their cells: the handler reads them for good


def compiler() -> list[str] | None:
    """The C compiler command: $CC, else the one Python was built with, else cc / gcc / clang."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            cmd = shlex.split(candidate)
            if cmd and shutil.which(cmd[0]):
                return cmd
    return None


def _build(cc: list[str], include: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="msa_cupy_ffi_") as tmp:
        out = Path(tmp) / "xla_ffi.so"
        cmd = [*cc, "-O2", "-std=c11", "-shared", "-fPIC", "-I", include, str(SOURCE), "-o", str(out), "-lpthread"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-600:]}")
        return out.read_bytes()


def _cached_library(cc: list[str], include: str) -> bytes:
    """The shared library's bytes: a verified cache entry, else compiled (and stored)."""
    header = Path(include) / "xla" / "ffi" / "api" / "c_api.h"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), header.read_bytes(), " ".join(cc).encode(),
                                     sys.platform.encode()])).hexdigest()
    names = {"handler": TARGET}
    return _jit.cached_build(f"xla_ffi-{key[:24]}{_jit.ENTRY_SUFFIX}", key, names,
                             f"the XLA decode handler with {cc[0]}", lambda: (_build(cc, include), names))[0]


def _load(data: bytes) -> ctypes.CDLL:
    """dlopen a private copy (a file only this process wrote), removed once loaded."""
    fd, name = tempfile.mkstemp(prefix="msa_cupy_ffi_", suffix=".so")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        lib = ctypes.CDLL(name)
    finally:
        os.unlink(name)
    lib.msa_cupy_register.argtypes = [ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
    lib.msa_cupy_register.restype = ctypes.c_int
    lib.msa_cupy_check_program.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.msa_cupy_check_program.restype = ctypes.c_int64
    lib.msa_cupy_run_program.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    lib.msa_cupy_run_program.restype = ctypes.c_int
    lib.msa_cupy_executions.restype = ctypes.c_longlong
    return lib


def library():
    """The loaded handler library (ctypes), or None (``unavailable`` says why); tried once."""
    global _library, unavailable
    with _lock:
        if _library is not None or unavailable is not None:
            return _library
        cc = compiler()
        if cc is None:
            unavailable = "no C compiler found (set CC)"
            return None
        try:
            import jax.ffi

            include = jax.ffi.include_dir()
        except (ImportError, AttributeError) as exc:
            unavailable = f"jaxlib ships no XLA FFI header ({exc})"
            return None
        try:
            _library = _load(_cached_library(cc, include))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            unavailable = f"the XLA decode handler did not build: {exc}"
        return _library


def driver_entry_points() -> tuple[int, int]:
    """Addresses of cuLaunchKernelEx and cuMemsetD8Async in the CUDA driver."""
    cuda = ctypes.CDLL("libcuda.so.1")
    return (ctypes.cast(cuda.cuLaunchKernelEx, ctypes.c_void_p).value,
            ctypes.cast(cuda.cuMemsetD8Async, ctypes.c_void_p).value)


def flat_program(programs, sources: dict, *, n_args: int, n_rets: int, counter_span: tuple, align: int,
                 entry_points: tuple) -> tuple[np.ndarray, list]:
    """The words of the launches of ``programs`` (``_jit.Program``, run in order), in xla_ffi.c's
    layout, and what they point to (keep it alive with them).  ``sources`` maps each slot name
    to (source, byte offset): an operand index, a result index (``n_args`` + i), or
    ``SOURCE_WORKSPACE``.  Every slot must be a pointer with a source: the handler binds
    nothing else."""
    launch_ex, memset = entry_points
    words = [PROGRAM_MAGIC, 0, n_args, n_rets, align, counter_span[0], counter_span[1], launch_ex, memset]
    keep = []
    for program in programs:
        for launch in program.launches:
            n_cells = len(launch.values)
            if n_cells > MAX_CELLS:
                raise ValueError(f"{launch.kernel.name}: {n_cells} arguments, the handler takes {MAX_CELLS}")
            cells = launch.values.copy()  # the constants as prepared; the slots are rewritten per call
            keep += [cells, launch._keep]  # (arrays whose addresses are constants: live as long as the words)
            binds = []
            for name, view, index in launch.slots:
                if view is not launch.values:
                    raise ValueError(f"{launch.kernel.name}: scalar slot {name!r} has no source in the handler")
                if name not in sources:
                    raise ValueError(f"{launch.kernel.name}: slot {name!r} has no source")
                source, offset = sources[name]
                binds += [index, source, offset]
            words += [launch.function, *launch.grid, *launch.block, launch.shared_mem,
                      int(launch._config is not None), n_cells, cells.ctypes.data, len(binds) // 3, *binds]
            words[1] += 1
    return np.array(words, np.int64), keep


def register(lib, key: int, device: int, words: np.ndarray, keep: list) -> None:
    """Check ``words`` and register them under (key, device); kept alive for good."""
    words = np.ascontiguousarray(words, np.int64)
    bad = lib.msa_cupy_check_program(words.ctypes.data, words.size)
    if bad != -1:
        raise RuntimeError(f"msa_cupy: malformed decode program (word {bad})")
    with _lock:
        _kept.append((words, keep))
        if lib.msa_cupy_register(key, device, words.ctypes.data):
            raise RuntimeError("msa_cupy: the XLA decode handler's program registry is full")
