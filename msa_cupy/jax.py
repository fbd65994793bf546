"""MSA inside ``jax.jit``: the public functions as staged JAX operations.

    import msa_cupy.jax as msa_jax

    out = jax.jit(lambda q, k, v: msa_jax.attention(q, k, v, top_k=16))(q, k, v)
    out = msa_jax.decode(q, k_cache, v_cache, seq_lens, block_table)   # in lax.scan / while_loop bodies

On a GPU each call is an XLA custom call on XLA's stream: the kernels read XLA's input
buffers and write its output buffers in place (no copies, no host sync).  ``decode``
allocates nothing: the decode plan (kernels, grids) is built once per static configuration
when the function is traced, its workspace is one more output that XLA allocates, and a step
is ``DecodePlan.update`` + ``run`` into XLA's buffers in a Python callback
(``jax.experimental.buffer_callback``), declared command-buffer compatible.  With
``MSA_CUPY_JAX_NATIVE=1`` (or ``NATIVE = True`` before the call is traced) a step is instead
the plan's prepared launches (``DecodePlan.step_programs``) run by msa_cupy's native XLA FFI
handler (``xla_ffi.c``, built at first use by ``_native``): no Python at run time.  It is
opt-in until it has run on a GPU (its CPU tests call it through XLA's CPU runtime).
``attention`` (prefill, any shape) is such a callback: it allocates its scratch through CuPy
and copies its results into XLA's buffers; it is not command-buffer compatible, and needs GPU
memory that XLA has not taken (``XLA_PYTHON_CLIENT_PREALLOCATE=false`` or a lower
``XLA_PYTHON_CLIENT_MEM_FRACTION``).

On the CPU the same functions run the float64 reference (``msa_cupy.reference``) through
``jax.pure_callback``, so that jitted code, scans and loops can be tested without a GPU.  Where
JAX also has a CUDA backend, ``lax.platform_dependent`` picks the path when XLA compiles.

Options (``top_k``, ``block_size``, ...) are static: each new value traces and compiles anew.
There is no gradient (``jax.grad``/``jax.jvp`` raise a NotImplementedError naming the function)
and no ``jax.vmap`` (the arrays already carry a batch axis: fold a mapped axis into it).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
import warnings
from typing import NamedTuple

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax import lax
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("msa_cupy.jax needs JAX: pip install jax (CPU) or 'jax[cuda13]' (GPU)") from exc

from . import _api, _interop, _native, reference
from . import plan as _plan

__all__ = ["attention", "decode"]

# decode steps through the native XLA handler (read when a call is traced); opt-in until it has run on a GPU
NATIVE = os.environ.get("MSA_CUPY_JAX_NATIVE", "0") == "1"
_ARRAY_CACHE_SIZE = 256  # CuPy views of XLA buffers kept by address (a loop reuses the same ones)


class _Op(NamedTuple):
    """The static part of one call: what JAX caches compiled code on."""
    name: str          # "attention" or "decode"
    arrays: tuple      # names of the arrays passed, in order
    options: tuple     # (option, value) pairs of the public call
    plan: tuple = ()   # decode: DecodePlan keyword arguments, as (name, value) pairs
    native: bool = False  # decode on the GPU: the native XLA handler (else the Python callback)


# --------------------------------------------------------------------------- public functions


def attention(q, k, v, *, index_q=None, index_k=None, block_size=128, top_k=16, local_blocks=1, sink_blocks=0,
              causal=True, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False,
              return_indices=False):
    """:func:`msa_cupy.attention` as a JAX operation (usable inside ``jax.jit``): same arrays
    and options, ``jax.Array`` results.  Prefill or any shape; ``cu_seqlens_q``/``cu_seqlens_k``
    may be traced arrays.  Allocates scratch through CuPy on the GPU (not command-buffer
    compatible: for decode steps use :func:`decode`)."""
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal, scale=scale, return_lse=return_lse,
                                      return_indices=return_indices)
    arrays = _present(q=q, k=k, v=v, index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k)
    _check_attention(arrays, options, gpu=bool(_cuda_devices()))
    result = _staged(_Op("attention", tuple(arrays), tuple(options.items())), *arrays.values())
    return result if len(result) > 1 else result[0]


def decode(q, k_cache, v_cache, seq_lens, block_table=None, *, index_q=None, index_k_cache=None, block_size=128,
           top_k=16, local_blocks=1, sink_blocks=0, scale=None, return_lse=False):
    """One decode (or multi-token prediction) step over a KV cache, as :class:`msa_cupy.DecodePlan`
    computes it, as a JAX operation: allocation-free, command-buffer compatible, for
    ``lax.scan``/``lax.while_loop`` bodies.

    ``q`` (batch, queries_per_seq, Hq, D); ``k_cache``/``v_cache`` contiguous (max_batch,
    cache_len, Hkv, D), or paged (num_pages, page_size, Hkv, D) with ``block_table`` int32
    (batch, pages); ``seq_lens`` int32 (batch,) counts each sequence's keys, the new tokens'
    included (their keys are already in the cache).  ``index_q`` (batch, queries_per_seq, Hkv,
    Di) with ``index_k_cache`` laid out like the K cache (1 or Hkv heads) is the learned index;
    without them the training-free index is used.  The plan's maxima come from the shapes: a
    contiguous cache holds ``cache_len`` keys a sequence, a paged one ``pages * page_size``.
    On the GPU, lengths and page ids out of range are clamped (no read outside the cache).

    Returns ``out`` (batch, queries_per_seq, Hq, D), and ``lse`` (batch, queries_per_seq, Hq)
    float32 with ``return_lse``."""
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, scale=scale, return_lse=return_lse)
    arrays = _present(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, block_table=block_table,
                      index_q=index_q, index_k_cache=index_k_cache)
    gpu = bool(_cuda_devices())
    plan_args = _check_decode(arrays, options, gpu=gpu)
    result = _staged(_Op("decode", tuple(arrays), tuple(options.items()), tuple(plan_args.items()), NATIVE and gpu),
                     *arrays.values())
    return result if len(result) > 1 else result[0]


# --------------------------------------------------------------------------- staging


def _present(**arrays) -> dict:
    return {name: a for name, a in arrays.items() if a is not None}


@functools.partial(jax.jit, static_argnums=0)
def _staged(op: _Op, *arrays):
    """One jitted operation per static configuration (eager calls compile once, then dispatch)."""
    return _guarded(op)(*arrays)


@functools.lru_cache(maxsize=None)
def _guarded(op: _Op):
    """The operation with errors, naming the public function, where JAX would differentiate or
    batch it: its kernels have neither a gradient nor a batching rule."""
    public = f"msa_cupy.jax.{op.name}"

    batched = jax.custom_batching.custom_vmap(functools.partial(_lowered, op))

    @batched.def_vmap
    def _no_vmap(axis_size, in_batched, *args):
        raise NotImplementedError(f"{public} does not support jax.vmap: its arrays already carry a batch axis; fold "
                                  f"the mapped axis into it (or call it once per mapped item)")

    @jax.custom_jvp
    def staged(*args):
        return batched(*args)

    @staged.defjvp
    def _no_gradient(primals, tangents):
        raise NotImplementedError(f"{public} has no gradient (jax.grad, jax.jvp): MSA's kernels are forward "
                                  f"only; stop_gradient its inputs to differentiate around it")

    return staged


def _lowered(op: _Op, *arrays):
    """The reference on the CPU; where JAX has a CUDA backend, the kernels when compiled for it."""
    host = functools.partial(_host_call, op)
    if not _cuda_devices():
        return host(*arrays)
    return lax.platform_dependent(*arrays, cpu=host, cuda=functools.partial(_gpu_call, op))


@functools.lru_cache(maxsize=None)
def _cuda_devices() -> tuple:
    """JAX's CUDA devices (empty without a CUDA backend)."""
    for backend in ("cuda", "gpu"):
        try:
            devices = jax.devices(backend)
        except RuntimeError:
            continue
        return tuple(devices)
    return ()


def _result_shapes(op: _Op, arrays) -> list:
    shape = dict(zip(op.arrays, (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)))
    options = dict(op.options)
    q = shape["q"]
    out = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if options["return_lse"]:
        out.append(jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    if options.get("return_indices"):
        hkv = shape["k"].shape[-2]
        out.append(jax.ShapeDtypeStruct(q.shape[:-2] + (hkv, options["top_k"]), jnp.int32))
    return out


# --------------------------------------------------------------------------- CPU: the float64 reference


def _host_call(op: _Op, *arrays):
    shapes = _result_shapes(op, arrays)
    return tuple(jax.pure_callback(functools.partial(_reference, op, shapes), tuple(shapes), *arrays))


def _reference(op: _Op, shapes, *arrays):
    named = {name: np.asarray(a) for name, a in zip(op.arrays, arrays)}
    options = dict(op.options)
    if op.name == "attention":
        result = reference.attention(**named, **options)
    else:
        named["block_table"] = named.get("block_table")
        result = reference.decode_attention(named.pop("q"), named.pop("k_cache"), named.pop("v_cache"),
                                            named.pop("seq_lens"), **named, **options)
    result = result if isinstance(result, tuple) else (result,)
    return tuple(np.asarray(r).astype(s.dtype) for r, s in zip(result, shapes))


# --------------------------------------------------------------------------- GPU: XLA buffers, XLA's stream


def _gpu_call(op: _Op, *arrays):
    try:
        from jax.experimental.buffer_callback import buffer_callback
    except ImportError as exc:  # pragma: no cover - older JAX
        raise RuntimeError("msa_cupy.jax on the GPU needs jax.experimental.buffer_callback (JAX 0.6.2 or later)") \
            from exc
    _interop.require_cupy()  # at trace time: a missing CuPy or GPU is named before XLA compiles
    shapes = _result_shapes(op, arrays)
    if op.name == "attention":
        run = buffer_callback(functools.partial(_attention_callback, op), tuple(shapes))
        return tuple(run(*arrays))
    plans = _decode_plans(op.plan)
    # the workspace is one more output, sized for any of the GPUs, with room to start it on a boundary
    workspace = max(p.workspace_bytes for p, _ in plans.values()) + _plan._ALIGN
    shapes.append(jax.ShapeDtypeStruct((workspace,), jnp.uint8))
    shape = dict(zip(op.arrays, (a.shape for a in arrays)))
    key = (_native_program(op, len(shapes), shape["q"][0], shape["block_table"][1] if "block_table" in shape else 0)
           if op.native else None)
    if key is not None:
        run = jax.ffi.ffi_call(_native.TARGET, tuple(shapes))
        return tuple(run(*arrays, program=np.int64(key)))[:-1]
    run = buffer_callback(functools.partial(_decode_callback, op, plans), tuple(shapes),
                          command_buffer_compatible=True)
    return tuple(run(*arrays))[:-1]


# the step's slots (DecodePlan.step_programs) and the decode operand each is bound to
_STEP_OPERANDS = {"q": "q", "k": "k_cache", "v": "v_cache", "seq_lens": "seq_lens", "table_in": "block_table",
                  "iq": "index_q", "ik": "index_k_cache"}


@functools.lru_cache(maxsize=None)
def _native_program(op: _Op, n_results: int, batch: int, pages: int):
    """The registry key of the step's program (``batch`` sequences, block tables of ``pages``
    columns) in the native XLA handler, registered for each GPU's plan now (at trace time);
    None where the handler is unavailable or refuses the step: then the Python callback runs
    it (warned, with the reason)."""
    lib = _native.library()
    why = _native.unavailable
    if lib is not None:
        try:
            return _register_native_step(lib, op, n_results, batch, pages)
        except (OSError, AttributeError, ValueError, RuntimeError) as exc:  # e.g. a driver without cuLaunchKernelEx
            why = f"the native handler refused the step: {exc}"
    warnings.warn(f"msa_cupy.jax.decode runs each step through a Python callback ({why}): tens of microseconds "
                  "of host time a step more", RuntimeWarning, stacklevel=4)
    return None


def _register_native_step(lib, op: _Op, n_results: int, batch: int, pages: int) -> int:
    _register_native_target(lib)
    key = int.from_bytes(hashlib.sha256(repr((op, batch, pages)).encode()).digest()[:8], "little") >> 1
    n_args = len(op.arrays)
    cp = _interop.require_cupy()
    entry_points = _native.driver_entry_points()
    for device, (plan, _) in _decode_plans(op.plan).items():
        sources = {name: (_native.SOURCE_WORKSPACE, offset) for name, offset in plan._offsets.items()}
        sources.update({slot: (op.arrays.index(name), 0) for slot, name in _STEP_OPERANDS.items()
                        if name in op.arrays})
        sources["out"] = (n_args, 0)
        if dict(op.options)["return_lse"]:
            sources["lse"] = (n_args + 1, 0)
        with cp.cuda.Device(device):
            programs = plan.step_programs(batch, pages)
            words, keep = _native.flat_program(programs, sources, n_args=n_args, n_rets=n_results,
                                               counter_span=plan._counter_span, align=_plan._ALIGN,
                                               entry_points=entry_points)
        _native.register(lib, key, device, words, keep)
    return key


@functools.lru_cache(maxsize=None)
def _register_native_target(lib) -> None:
    try:
        from jaxlib.xla_client import CustomCallTargetTraits
        traits = dict(traits=CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE)
    except ImportError:  # pragma: no cover - a jaxlib without traits: XLA reads them from the handler
        traits = {}
    jax.ffi.register_ffi_target(_native.TARGET, jax.ffi.pycapsule(lib.msa_cupy_decode_step), platform="CUDA",
                                api_version=1, **traits)


@functools.lru_cache(maxsize=None)
def _decode_plans(plan_args: tuple) -> dict:
    """{CUDA ordinal: (DecodePlan, lock)} for each of JAX's GPUs, built when the call is traced
    (kernels compiled and loaded then, never inside a captured command buffer).  The plans own
    no memory (their workspace comes from XLA), so keeping them forever frees nothing that
    queued work may read."""
    cp = _interop.require_cupy()
    plans = {}
    for device in _cuda_devices():
        ordinal = getattr(device, "local_hardware_id", None)
        ordinal = int(device.id if ordinal is None else ordinal)
        with cp.cuda.Device(ordinal):
            plans[ordinal] = (_plan.DecodePlan(**dict(plan_args)), threading.Lock())
    if not plans:
        raise RuntimeError("msa_cupy.jax.decode: JAX has no CUDA device to build a decode plan for")
    return plans


def _decode_callback(op: _Op, plans, ctx, outs, *buffers):
    """One step, on XLA's stream: launches only (no allocation, no host sync)."""
    cp = _interop.require_cupy()
    device = _ordinal(buffers[0])
    if device not in plans:
        raise RuntimeError(f"msa_cupy.jax.decode: no decode plan for GPU {device} (plans for {sorted(plans)})")
    plan, lock = plans[device]
    with lock, cp.cuda.Device(device), _xla_stream(ctx.stream, device):
        a = {name: _as_cupy(b, device) for name, b in zip(op.arrays, buffers)}
        out = [_as_cupy(b, device) for b in outs]
        raw = out[-1]
        start = -raw.data.ptr % _plan._ALIGN
        plan.use_workspace(raw[start:start + plan.workspace_bytes])
        plan.update(a["seq_lens"], a.get("block_table"))
        plan.run(a["q"], a["k_cache"], a["v_cache"], index_q=a.get("index_q"), index_k_cache=a.get("index_k_cache"),
                 out=out[0], lse=out[1] if len(out) > 2 else None)


def _attention_callback(op: _Op, ctx, outs, *buffers):
    """msa_cupy.attention on XLA's stream; its results (CuPy scratch) copied into XLA's buffers."""
    cp = _interop.require_cupy()
    device = _ordinal(buffers[0])
    with cp.cuda.Device(device), _xla_stream(ctx.stream, device):
        a = {name: _as_cupy(b, device) for name, b in zip(op.arrays, buffers)}
        result = _api.attention(**a, **dict(op.options))
        result = result if isinstance(result, tuple) else (result,)
        for buffer, r in zip(outs, result):
            r = cp.ascontiguousarray(r)
            _as_cupy(buffer, device).data.copy_from_device_async(r.data, r.nbytes)


def _ordinal(buffer) -> int:
    return int(buffer.__dlpack_device__()[1])


_ARRAYS: dict = {}
_STREAMS: dict = {}


def _as_cupy(buffer, device):
    """A CuPy view of an XLA buffer (no copy), cached by address: XLA hands a loop body the same
    buffers every step, and the view costs more host time than the step's launches."""
    shape, dtype = tuple(buffer.shape), np.dtype(buffer.dtype)
    ptr = _pointer(buffer)
    key = (ptr, shape, dtype, device)
    arr = _ARRAYS.get(key)
    if arr is None:
        cp = _interop.require_cupy()
        if len(_ARRAYS) >= _ARRAY_CACHE_SIZE:
            _ARRAYS.clear()
        memory = cp.cuda.UnownedMemory(ptr, math.prod(shape) * dtype.itemsize, None, device)
        arr = _ARRAYS[key] = cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(memory, 0))
    return arr


def _pointer(buffer) -> int:
    try:
        return int(buffer.__cuda_array_interface__["data"][0])
    except Exception:  # pragma: no cover - a JAX whose buffers do not describe bfloat16 this way
        return int(_interop.require_cupy().from_dlpack(buffer).data.ptr)


def _xla_stream(ptr: int, device: int):
    """CuPy's view of XLA's stream (one object per stream, made once).  ExternalStream with its
    device given makes no CUDA call, which matters when XLA is recording a command buffer on
    that stream; CuPy 14 deprecates it for Stream.from_external, the fallback."""
    stream = _STREAMS.get((ptr, device))
    if stream is None:
        cp = _interop.require_cupy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            external = getattr(cp.cuda, "ExternalStream", None)
            stream = external(ptr, device) if external else cp.cuda.Stream.from_external(_interop._StreamHandle(ptr))
        _STREAMS[(ptr, device)] = stream
    return stream


# --------------------------------------------------------------------------- trace-time checks


def _check_attention(arrays: dict, options: dict, *, gpu: bool):
    for name, a in arrays.items():
        _interop.check_array(name, a)
    s = {name: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype) for name, a in arrays.items()}
    if gpu:
        _interop.check_gpu_options(options)
    cu_q, cu_k = s.get("cu_seqlens_q"), s.get("cu_seqlens_k")
    if (cu_q is None) != (cu_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_q is not None:
        for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            if np.dtype(cu.dtype) != np.int32:
                raise TypeError(f"{name} must have dtype int32, got {cu.dtype}")
            if cu.ndim != 1 or cu.shape[0] < 2:
                raise ValueError(f"{name} must be 1-D with length batch + 1 >= 2, got shape {cu.shape}")
        if cu_q.shape != cu_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_q.shape[0]} and "
                             f"{cu_k.shape[0]}")
        for name in ("q", "k", "v", "index_q", "index_k"):
            if name in s and s[name].ndim != 3:
                raise ValueError(f"{name} must be (total, heads, dim) when cu_seqlens are given, got shape "
                                 f"{s[name].shape}")
    # the token counts, heads and dims (lengths inside cu_seqlens are checked when the call runs)
    layout, _, hkv, _ = _interop.check_qkv(s["q"], s["k"], s["v"], None, None, gpu=gpu)
    if ("index_q" in s) != ("index_k" in s):
        raise ValueError("index_q and index_k must be given together (or neither, for the training-free default)")
    if "index_q" in s:
        _interop.check_index(s["index_q"], s["index_k"], None, None, gpu=gpu, n_kv_heads=hkv, layout=layout)


def _check_decode(arrays: dict, options: dict, *, gpu: bool) -> dict:
    """Shapes and dtypes of a decode step, each error naming its argument; returns the
    DecodePlan keyword arguments the shapes imply."""
    for name, a in arrays.items():
        _interop.check_array(name, a)
    s = {name: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype) for name, a in arrays.items()}
    if gpu:
        _interop.check_gpu_options(options)
    q, kc, vc, lens, table = s["q"], s["k_cache"], s["v_cache"], s["seq_lens"], s.get("block_table")
    for name in ("q", "k_cache", "v_cache"):
        if s[name].ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {s[name].shape}")
    dtype = np.dtype(q.dtype)
    if dtype not in _interop.GPU_DTYPES:
        raise TypeError(f"q must have dtype float16 or bfloat16, got {q.dtype}")
    for name in ("k_cache", "v_cache"):
        if np.dtype(s[name].dtype) != dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {s[name].dtype}")
    if kc.shape != vc.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {kc.shape} and {vc.shape}")
    batch, nq, hq, d = q.shape
    rows, row_len, hkv, dk = kc.shape
    if dk != d:
        raise ValueError(f"k_cache must have q's head dim {d}, got shape {kc.shape}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k_cache heads ({hkv}) for grouped-query attention")
    if np.dtype(lens.dtype) != np.int32 or lens.shape != (batch,):
        raise ValueError(f"seq_lens must be int32 of shape ({batch},), got {lens.dtype} of shape {lens.shape}")
    if table is None:
        if batch > rows:
            raise ValueError(f"q holds {batch} sequences but the contiguous k_cache only {rows}")
        max_cache_len, paging = row_len, dict(page_size=None, num_pages=None)
    else:
        if np.dtype(table.dtype) != np.int32 or table.ndim != 2 or table.shape[0] != batch:
            raise ValueError(f"block_table must be int32 of shape ({batch}, pages), got {table.dtype} of shape "
                             f"{table.shape}")
        max_cache_len, paging = max(1, table.shape[1]) * row_len, dict(page_size=row_len, num_pages=rows)
    index = dict(index_dim=None, index_k_heads=1)
    if ("index_q" in s) != ("index_k_cache" in s):
        raise ValueError("index_q and index_k_cache must be given together (or neither, for the training-free index)")
    if "index_q" in s:
        iq, ik = s["index_q"], s["index_k_cache"]
        di = iq.shape[-1] if iq.ndim == 4 else None
        if iq.shape != (batch, nq, hkv, di):
            raise ValueError(f"index_q must have shape ({batch}, {nq}, {hkv}, index_dim), got {iq.shape}")
        if ik.ndim != 4 or ik.shape[:2] != kc.shape[:2] or ik.shape[2] not in (1, hkv) or ik.shape[3] != di:
            raise ValueError(f"index_k_cache must have shape ({rows}, {row_len}, 1 or {hkv}, {di}), got {ik.shape}")
        for name in ("index_q", "index_k_cache"):
            if np.dtype(s[name].dtype) != dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {s[name].dtype}")
        index = dict(index_dim=di, index_k_heads=ik.shape[2])
    return dict(max_batch=batch if table is not None else rows, max_cache_len=max_cache_len, num_q_heads=hq,
                num_kv_heads=hkv, head_dim=d, dtype=_interop._dtype_name(dtype), queries_per_seq=nq,
                block_size=options["block_size"], top_k=options["top_k"], local_blocks=options["local_blocks"],
                sink_blocks=options["sink_blocks"], scale=options["scale"], **index, **paging)
