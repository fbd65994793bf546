"""Argument checks and DLPack interop.

Every public function first turns its scalar options into plain Python values
(:func:`scalar_options`), then validates its arrays here, on shapes, dtypes and host copies of
``cu_seqlens``, before any kernel runs, so that nothing is written on error.  Arrays come
in as NumPy (routed to the reference), CuPy, PyTorch, JAX or any ``__dlpack__`` producer,
and results go back as the caller's own type, on the caller's stream.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import sys

import numpy as np

from ._layout import Layout, single_layout, uniform_layout, varlen_layout

try:  # bfloat16 for NumPy (and CuPy, which takes its dtype from ml_dtypes)
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a declared dependency
    BFLOAT16 = None

GPU_DTYPES = tuple(d for d in (np.dtype(np.float16), BFLOAT16) if d is not None)
REFERENCE_DTYPES = GPU_DTYPES + (np.dtype(np.float32), np.dtype(np.float64))
GPU_HEAD_DIMS = (64, 128)
GPU_BLOCK_SIZES = (64, 128)
# Limits on top_k, one home each.  The public GPU functions take top_k <= GPU_MAX_TOP_K; the
# kernels cover part of that and the plain CuPy path the rest (see _api._route).
GPU_MAX_TOP_K = 64
SELECT_KERNEL_MAX_TOP_K = 32     # select.cu / topk.cu keep the top-k list one entry per warp lane
SPARSE_KERNEL_MAX_SLOTS = 256    # block_indices slots per (query, group) the attention kernels take


def _dtype_name(dt) -> str:
    return "bfloat16" if BFLOAT16 is not None and dt == BFLOAT16 else str(dt)


def _allowed(dtypes) -> str:
    return ", ".join(_dtype_name(d) for d in dtypes)


# --------------------------------------------------------------------------- scalars


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """True/False (NumPy's bool_ too); None, ints and strings are refused rather than read as truth values."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_scale_value(scale) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


_COUNT_MINIMUM = {"top_k": 1, "block_size": 1, "local_blocks": 0, "sink_blocks": 0, "num_keys": 0}
_FLAGS = ("causal", "return_lse", "return_indices")


def scalar_options(**options) -> dict:
    """The scalar options of a public call as plain Python int, bool and float (``num_keys`` and
    ``scale`` may stay None), checked for type and sign.

    Every public function calls this once, before anything else, and uses only what it returns:
    a NumPy scalar (``np.int16(128)``, ``np.uint8(64)``, ``np.bool_``) that reached the launch
    code would size shared memory and launch arguments in its own narrow type."""
    out = {}
    for name, value in options.items():
        if name in _COUNT_MINIMUM:
            none_ok = name == "num_keys"
            out[name] = None if none_ok and value is None else check_int(name, value, minimum=_COUNT_MINIMUM[name])
        elif name in _FLAGS:
            out[name] = check_bool(name, value)
        elif name == "scale":
            out[name] = _check_scale_value(value)
        else:
            raise TypeError(f"unexpected option {name!r}")
    if all(name in out for name in ("top_k", "local_blocks", "sink_blocks")):  # (no set <= keys: torch.compile traces this)
        if out["local_blocks"] + out["sink_blocks"] > out["top_k"]:
            raise ValueError(
                f"local_blocks + sink_blocks ({out['local_blocks']} + {out['sink_blocks']}) must not exceed "
                f"top_k ({out['top_k']}): forced blocks use up slots of the top_k"
            )
    return out


def check_gpu_options(options: dict) -> None:
    """The GPU's limits on normalized options (block_size, top_k where present)."""
    block_size, top_k = options.get("block_size"), options.get("top_k")
    if block_size is not None and block_size not in GPU_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {GPU_BLOCK_SIZES} on the GPU, got {block_size}")
    if top_k is not None and top_k > GPU_MAX_TOP_K:
        raise ValueError(f"top_k must be <= {GPU_MAX_TOP_K} on the GPU, got {top_k}")


def check_reference_top_k(top_k: int, n_blocks: int) -> None:
    """The reference takes every top_k the GPU takes, and beyond that up to the key blocks of
    the longest sequence (that top_k already selects every visible block): a selection is
    (..., top_k) wide, so a larger top_k would only allocate -1 slots."""
    if top_k > max(GPU_MAX_TOP_K, n_blocks):
        raise ValueError(
            f"top_k must be <= max({GPU_MAX_TOP_K}, key blocks of the longest sequence = {n_blocks}), got "
            f"{top_k}: top_k = {max(n_blocks, 1)} already selects every block"
        )


def check_selection_options(top_k, block_size, local_blocks, sink_blocks, *, gpu: bool):
    """(top_k, block_size, local_blocks, sink_blocks) normalized and checked (diagnostics' form)."""
    options = scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks, sink_blocks=sink_blocks)
    if gpu:
        check_gpu_options(options)
    return options["top_k"], options["block_size"], options["local_blocks"], options["sink_blocks"]


def check_block_size(block_size, *, gpu: bool) -> int:
    """block_size normalized and checked (diagnostics' form)."""
    block_size = scalar_options(block_size=block_size)["block_size"]
    if gpu:
        check_gpu_options({"block_size": block_size})
    return block_size


def check_scale(scale, head_dim: int) -> float:
    """scale as a float; None is the default 1 / sqrt(head_dim)."""
    scale = _check_scale_value(scale)
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


# --------------------------------------------------------------------------- arrays


def check_array(name, arr):
    """An array-like with shape, ndim and dtype: None, lists and scalars are named, not met
    later as an AttributeError."""
    if not all(hasattr(arr, attr) for attr in ("shape", "ndim", "dtype")):
        raise TypeError(f"{name} must be an array, got {type(arr).__name__}")


def _numpy_dtype(name, arr):
    try:
        return np.dtype(arr.dtype)
    except TypeError as exc:
        raise TypeError(f"{name} has dtype {arr.dtype!r}, which is not a NumPy dtype") from exc


def _check_dtype(name, arr, *, gpu: bool):
    allowed = GPU_DTYPES if gpu else REFERENCE_DTYPES
    if _numpy_dtype(name, arr) not in allowed:
        where = "on the GPU" if gpu else "in the reference"
        raise TypeError(f"{name} must have dtype {_allowed(allowed)} {where}, got {_dtype_name(arr.dtype)}")


def _check_rank(name, arr, ranks):
    check_array(name, arr)
    if arr.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(arr.shape)}")


KERNEL_ALIGNMENT = 16  # bytes: the kernels load rows with 16-byte cp.async and vector loads


def check_contiguous(name, arr):
    """The kernels index token-major arrays with fixed strides (C order only) from 16-byte
    aligned bases: a misaligned load would fault and poison the CUDA context."""
    flags = getattr(arr, "flags", None)
    if flags is not None and not flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous (token-major, last dim innermost); got strides "
            f"{tuple(arr.strides)} for shape {tuple(arr.shape)}: make a contiguous copy first"
        )
    data = getattr(arr, "data", None)
    ptr = getattr(data, "ptr", None)
    if ptr is not None and arr.size and ptr % KERNEL_ALIGNMENT:
        raise ValueError(
            f"{name} must start at a {KERNEL_ALIGNMENT}-byte aligned address, got {ptr:#x} (a view at an "
            f"odd offset into a larger buffer?): make a copy first"
        )


def _host_cu_seqlens(name, cu):
    if not hasattr(cu, "dtype") or not hasattr(cu, "shape"):
        raise TypeError(f"{name} must be an int32 array, got {type(cu).__name__}")
    if _numpy_dtype(name, cu) != np.int32:
        raise TypeError(f"{name} must have dtype int32, got {_dtype_name(cu.dtype)}")
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with length batch + 1 >= 2, got shape {tuple(cu.shape)}")
    host = cu.get() if hasattr(cu, "get") else np.asarray(cu)
    host = host.astype(np.int64)
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    if np.any(np.diff(host) < 0):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()}")
    return host


def _host_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k):
    """Host int64 copies of a cu_seqlens pair (None, None when neither is given)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_seqlens_q is None:
        return None, None
    cu_q = _host_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    cu_k = _host_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(cu_q)} and {len(cu_k)}"
        )
    return cu_q, cu_k


def check_layout(name_q, q_shape, name_k, k_shape, cu_seqlens_q, cu_seqlens_k) -> Layout:
    """Sequence layout from the shapes of a query-side and a key-side array."""
    rank = len(q_shape)
    if len(k_shape) != rank:
        raise ValueError(
            f"{name_q} and {name_k} must have the same rank, got {tuple(q_shape)} and {tuple(k_shape)}"
        )
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if rank != 3:
            raise ValueError(
                f"{name_q} must be (total, heads, dim) when cu_seqlens are given, got shape {tuple(q_shape)}"
            )
        cu_q, cu_k = _host_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k)
        if cu_q[-1] != q_shape[0]:
            raise ValueError(f"cu_seqlens_q[-1] = {int(cu_q[-1])} must equal {name_q}.shape[0] = {q_shape[0]}")
        if cu_k[-1] != k_shape[0]:
            raise ValueError(f"cu_seqlens_k[-1] = {int(cu_k[-1])} must equal {name_k}.shape[0] = {k_shape[0]}")
        return varlen_layout(cu_q, cu_k)
    if rank == 4:
        if q_shape[0] != k_shape[0]:
            raise ValueError(
                f"{name_q} and {name_k} must have the same batch size, got {q_shape[0]} and {k_shape[0]}"
            )
        return uniform_layout(q_shape[0], q_shape[1], k_shape[1])
    return single_layout(q_shape[0], k_shape[0])


def check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, *, gpu: bool):
    """Checks for the main branch. Returns (layout, n_q_heads, n_kv_heads, head_dim)."""
    for name, arr in (("q", q), ("k", k), ("v", v)):
        _check_rank(name, arr, (3, 4))
        _check_dtype(name, arr, gpu=gpu)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got {_dtype_name(q.dtype)}, {_dtype_name(k.dtype)}, "
            f"{_dtype_name(v.dtype)}"
        )
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    layout = check_layout("q", q.shape, "k", k.shape, cu_seqlens_q, cu_seqlens_k)
    hq, d = q.shape[-2], q.shape[-1]
    hkv, dk = k.shape[-2], k.shape[-1]
    if d != dk:
        raise ValueError(f"q and k must have the same head dim, got {d} and {dk}")
    if d < 1:
        raise ValueError(f"q, k and v need a head dim >= 1, got shape {tuple(q.shape)}")
    if hkv < 1 or hq < 1:
        raise ValueError(f"q and k need at least one head, got {hq} and {hkv}")
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k heads ({hkv}) for grouped-query attention")
    if gpu and d not in GPU_HEAD_DIMS:
        raise ValueError(f"q, k, v head dim must be one of {GPU_HEAD_DIMS} on the GPU, got {d}")
    if gpu:
        for name, arr in (("q", q), ("k", k), ("v", v)):
            check_contiguous(name, arr)
    return layout, hq, hkv, d


def check_index(index_q, index_k, cu_seqlens_q, cu_seqlens_k, *, gpu: bool, n_kv_heads=None, layout=None):
    """Checks for the index branch. Returns (layout, n_groups, n_index_k_heads, index_dim)."""
    for name, arr in (("index_q", index_q), ("index_k", index_k)):
        _check_rank(name, arr, (3, 4))
        _check_dtype(name, arr, gpu=gpu)
        if gpu:
            check_contiguous(name, arr)
    if index_q.dtype != index_k.dtype:
        raise TypeError(
            f"index_q and index_k must share one dtype, got {_dtype_name(index_q.dtype)} and "
            f"{_dtype_name(index_k.dtype)}"
        )
    idx_layout = check_layout("index_q", index_q.shape, "index_k", index_k.shape, cu_seqlens_q, cu_seqlens_k)
    groups, di = index_q.shape[-2], index_q.shape[-1]
    hk, dik = index_k.shape[-2], index_k.shape[-1]
    if di != dik:
        raise ValueError(f"index_q and index_k must have the same index dim, got {di} and {dik}")
    if di < 1:
        raise ValueError(f"index_q and index_k need an index dim >= 1, got shape {tuple(index_q.shape)}")
    if groups < 1:
        raise ValueError(f"index_q needs at least one head, got shape {tuple(index_q.shape)}")
    if hk not in (1, groups):
        raise ValueError(f"index_k must have 1 head (shared) or {groups} (one per group), got {hk}")
    if n_kv_heads is not None and groups != n_kv_heads:
        raise ValueError(f"index_q must have one head per KV head ({n_kv_heads}), got {groups}")
    if gpu and di not in GPU_HEAD_DIMS:
        raise ValueError(f"index_q/index_k dim must be one of {GPU_HEAD_DIMS} on the GPU, got {di}")
    if layout is not None:
        same = (
            idx_layout.batch_shape == layout.batch_shape
            and np.array_equal(idx_layout.cu_q, layout.cu_q)
            and np.array_equal(idx_layout.cu_k, layout.cu_k)
        )
        if not same:
            raise ValueError(
                f"index_q/index_k token counts {tuple(index_q.shape[:-2])}/{tuple(index_k.shape[:-2])} "
                f"must match q/k"
            )
    return idx_layout, groups, hk, di


def topk_layout(scores, num_keys, cu_seqlens_q, cu_seqlens_k, *, name="scores") -> Layout:
    """Layout of a score map or selection ``(B, Nq, Hkv, n)`` / ``(total_q, Hkv, n)``: num_keys
    (batched) or cu_seqlens (varlen) say where its queries sit."""
    _check_rank(name, scores, (3, 4))
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if num_keys is not None:
            raise ValueError(f"pass either num_keys (batched {name}) or cu_seqlens_q/cu_seqlens_k, not both")
        if scores.ndim != 3:
            raise ValueError(f"{name} must be (total_q, Hkv, n_blocks) with cu_seqlens, got {tuple(scores.shape)}")
        cu_q, cu_k = _host_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k)
        if cu_q[-1] != scores.shape[0]:
            raise ValueError(f"cu_seqlens_q[-1] = {int(cu_q[-1])} must equal {name}.shape[0] = {scores.shape[0]}")
        return varlen_layout(cu_q, cu_k)
    if num_keys is None:
        raise ValueError(f"num_keys is required for batched {name}: the key count sets each query's position")
    num_keys = check_int("num_keys", num_keys, minimum=0)
    if scores.ndim == 4:
        return uniform_layout(scores.shape[0], scores.shape[1], num_keys)
    return single_layout(scores.shape[0], num_keys)


def check_scores(scores, layout: Layout, block_size: int):
    _check_rank("scores", scores, (3, 4))
    if _numpy_dtype("scores", scores) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"scores must have dtype float32 (or float64 in the reference), got {_dtype_name(scores.dtype)}")
    want_blocks = layout.n_blocks(block_size)
    if scores.shape[-1] != want_blocks:
        raise ValueError(
            f"scores must have {want_blocks} key blocks (ceil(num_keys / block_size)) in its last dim, "
            f"got {scores.shape[-1]}"
        )
    lead = tuple(scores.shape[:-2])
    want_lead = layout.query_shape
    if lead != want_lead:
        raise ValueError(f"scores must have leading shape {want_lead} (queries), got {lead}")


def check_block_indices(block_indices, layout: Layout, n_kv_heads: int, *, gpu: bool):
    _check_rank("block_indices", block_indices, (3, 4))
    if _numpy_dtype("block_indices", block_indices) != np.int32:
        raise TypeError(f"block_indices must have dtype int32, got {_dtype_name(block_indices.dtype)}")
    lead = tuple(block_indices.shape[:-2])
    want_lead = layout.query_shape
    if lead != want_lead or block_indices.shape[-2] != n_kv_heads:
        raise ValueError(
            f"block_indices must have shape {(*want_lead, n_kv_heads)} + (k,), got {tuple(block_indices.shape)}"
        )
    if block_indices.shape[-1] < 1:
        raise ValueError("block_indices must have at least one slot in its last dim")
    if gpu:
        check_contiguous("block_indices", block_indices)


def array_module(x):
    """numpy, or cupy for CuPy arrays (checks and selection rules serve both)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def check_block_ids(block_indices, layout: Layout, block_size: int, *, name="block_indices"):
    """Every entry of flat ``(total_q, Hkv, k)`` block_indices is -1 (unused) or a key block id of
    its own query's sequence.  One reduction where the array lives (on the GPU: one sync)."""
    if block_indices.size == 0:
        return
    blocks_per_row = np.repeat(-(-np.diff(layout.cu_k) // block_size), np.diff(layout.cu_q))
    check_block_range(block_indices, blocks_per_row[:, None, None], name=name,
                      most=layout.n_blocks(block_size))


def check_block_range(block_indices, n_blocks=None, *, name="block_indices", most=None):
    """The rule of check_block_ids where the layout is not known: every entry is -1 (unused) or a
    block id below ``n_blocks`` (host int or int array broadcasting against block_indices; None:
    no upper bound).  ``most``: the largest block count, for the message."""
    xp = array_module(block_indices)
    if block_indices.size == 0:
        return
    bad = block_indices < -1
    if n_blocks is not None:
        bad |= block_indices >= xp.asarray(np.asarray(n_blocks, np.int64))
    count = int(xp.count_nonzero(bad))
    if count:
        lo, hi = int(block_indices.min()), int(block_indices.max())
        most = int(np.max(n_blocks)) if most is None and n_blocks is not None else most
        raise ValueError(
            f"{name} hold {count} entries that are neither -1 (unused) nor a key block id of their "
            f"sequence (values in [{lo}, {hi}]" + ("" if most is None else f", sequences have up to {most} key blocks")
            + ")"
        )


# --------------------------------------------------------------------------- interop

_KDLCUDA, _KDLCUDAMANAGED = 2, 13
OPTIONAL_ARRAYS = frozenset({"index_q", "index_k", "cu_seqlens_q", "cu_seqlens_k"})  # None means "not given"


def framework_of(name, x) -> str:
    """'numpy', 'cupy', 'torch', 'jax' or 'dlpack' (any other CUDA __dlpack__ producer)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        return "cupy"
    if mod == "torch":
        return "torch"
    if mod in ("jax", "jaxlib"):
        return "jax"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    raise TypeError(
        f"{name}: expected a NumPy, CuPy, PyTorch or JAX array (or any __dlpack__ object), got {type(x).__name__}"
    )


def _check_on_cuda(name, a, kind):
    """A GPU-side argument must live on a CUDA device: asked of the producer before CuPy is
    needed, so that a host tensor or a producer that cannot answer is named as such."""
    if kind == "cupy":
        return
    if kind == "torch" and not a.is_cuda:
        raise TypeError(f"{name} is a CPU tensor: pass CUDA tensors, or NumPy arrays for the reference")
    ask = getattr(a, "__dlpack_device__", None)
    if ask is None:  # an older producer: cupy.from_dlpack finds out
        return
    try:
        dev_type = int(ask()[0])
    except Exception as exc:
        raise TypeError(f"{name}.__dlpack_device__() failed ({type(exc).__name__}: {exc}): pass a GPU array, "
                        f"or a NumPy array for the reference") from exc
    if dev_type not in (_KDLCUDA, _KDLCUDAMANAGED):
        raise TypeError(
            f"{name} lives on DLPack device type {dev_type}, not a CUDA GPU: pass GPU arrays, "
            f"or NumPy arrays for the reference"
        )


class Call:
    """One public call: the arrays as NumPy or CuPy, the caller's framework and stream.

    ``named_arrays`` maps argument names to the caller's arrays; those in OPTIONAL_ARRAYS may be
    None, every other one is required."""

    def __init__(self, named_arrays: dict):
        for name, a in named_arrays.items():
            if a is None and name not in OPTIONAL_ARRAYS:
                raise TypeError(f"{name} must be an array, got None")
        present = {k: v for k, v in named_arrays.items() if v is not None}
        kinds = {name: framework_of(name, a) for name, a in present.items()}
        frameworks = set(kinds.values())
        self.on_gpu = frameworks != {"numpy"}
        if self.on_gpu and "numpy" in frameworks:
            host = sorted(n for n, f in kinds.items() if f == "numpy")
            raise TypeError(
                f"{', '.join(host)} {'is a NumPy array' if len(host) == 1 else 'are NumPy arrays'} but "
                f"the other arguments are on the GPU: pass all arrays on one device"
            )
        main = [f for f in kinds.values() if f != "numpy"]
        self.framework = main[0] if main else "numpy"
        self.arrays = {}
        self._stream = None
        self.device_cu = None  # the kernels' device cu_seqlens, made once per call (_api._device_cu)
        if not self.on_gpu:
            self.arrays = dict(named_arrays)
            return
        for name, a in present.items():
            _check_on_cuda(name, a, kinds[name])
        require_cupy()
        if self.framework == "torch":
            first = next(a for name, a in present.items() if kinds[name] == "torch")
            self.device = first.device.index
            self._stream = torch_stream(first.device.index)
        devices = set()
        with self.stream():
            for name, a in named_arrays.items():
                if a is None:
                    self.arrays[name] = None
                    continue
                arr = a if kinds[name] == "cupy" else _from_dlpack(name, a)
                devices.add(arr.device.id)
                self.arrays[name] = arr
        if len(devices) > 1:
            raise ValueError(f"all arrays must be on one GPU, got devices {sorted(devices)}")
        self.device = devices.pop()

    def stream(self):
        """Context in which CuPy work runs on the caller's device and stream."""
        if not self.on_gpu:
            return contextlib.nullcontext()
        cp = require_cupy()
        stack = contextlib.ExitStack()
        stack.enter_context(cp.cuda.Device(getattr(self, "device", None)))
        if self._stream is not None:
            stack.enter_context(self._stream)
        return stack

    def wrap(self, result):
        """Hand results back as the caller's own array type (no copy)."""
        return wrap_as(self.framework, result)


def wrap_as(framework: str, result):
    """CuPy results (or tuples of them) as arrays of `framework` (framework_of's names), no copy."""
    if isinstance(result, tuple):
        return tuple(wrap_as(framework, r) for r in result)
    if framework in ("numpy", "cupy", "dlpack"):
        return result
    if framework == "torch":
        import torch

        return torch.from_dlpack(result)
    import jax.dlpack

    return jax.dlpack.from_dlpack(result)


def torch_stream_handle(stream) -> tuple[int, int]:
    """(raw cudaStream_t, device index) of a PyTorch stream: a ``torch.cuda.Stream``, or the
    device-generic ``torch.Stream`` that code compiled by torch.compile gets from
    ``torch.cuda.current_stream()`` (it has no ``cuda_stream``)."""
    device = getattr(stream, "device_index", None)
    if device is None:
        device = stream.device.index
    ptr = getattr(stream, "cuda_stream", None)
    if ptr is None:
        try:
            ptr = stream.native_handle
        except (AttributeError, RuntimeError):
            import torch

            ptr = torch.cuda.Stream(stream_id=stream.stream_id, device_index=stream.device_index,
                                    device_type=stream.device_type).cuda_stream
    return int(ptr), int(device)


class _StreamHandle:
    """The CUDA stream protocol over a raw handle (what ``cupy.cuda.Stream.from_external`` reads)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_CUPY_STREAMS: dict = {}  # (handle, device) -> CuPy stream: one lookup per call, host cost counts


def external_stream(stream):
    """A CuPy stream object for a PyTorch stream (work queued on it runs in the caller's order)."""
    key = torch_stream_handle(stream)
    hit = _CUPY_STREAMS.get(key)
    if hit is None:
        cp = require_cupy()
        ptr, device = key
        if ptr == 0:  # the legacy default stream
            hit = cp.cuda.Stream.null
        elif hasattr(cp.cuda.Stream, "from_external"):
            hit = cp.cuda.Stream.from_external(_StreamHandle(ptr))
        else:  # CuPy 13
            hit = cp.cuda.ExternalStream(ptr, device)
        if len(_CUPY_STREAMS) > 256:  # streams made and dropped by the caller: keep the table small
            _CUPY_STREAMS.clear()
        _CUPY_STREAMS[key] = hit
    return hit


def torch_stream(device_index: int):
    """The CuPy stream object for PyTorch's current stream on ``device_index``."""
    import torch

    return external_stream(torch.cuda.current_stream(device_index))


# --------------------------------------------------------------------------- torch.compile

_EAGER: dict = {}  # function -> its torch.compiler.disable'd twin


def outside_torch_compile(torch_op: str | None = None):
    """Decorator for the public entry points: when torch.compile traces a call, the call runs
    eagerly outside the trace (one graph break) instead of being traced through CuPy and
    NumPy code, which would bake trace-time values such as the stream into the graph.

    ``torch_op``: the name of the ``msa_cupy.torch`` function that takes the same arguments
    as a custom op; torch tensors are then traced as that op (no graph break, fullgraph
    and CUDA graphs work).  Outside a trace the cost is one dict lookup."""

    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            torch = sys.modules.get("torch")
            if torch is not None and torch.compiler.is_compiling():
                if torch_op is not None and args and isinstance(args[0], torch.Tensor):
                    from . import torch as msa_torch

                    return getattr(msa_torch, torch_op)(*args, **kwargs)
                eager = _EAGER.get(fn)
                if eager is None:
                    eager = _EAGER[fn] = torch.compiler.disable(fn)
                return eager(*args, **kwargs)
            return fn(*args, **kwargs)

        return call

    return decorate


def _from_dlpack(name, a):
    cp = require_cupy()
    try:
        return cp.from_dlpack(a)
    except Exception as exc:  # pragma: no cover - depends on the producer
        raise TypeError(f"{name} could not be imported through DLPack: {exc}") from exc


_CUPY_ERROR = None


def require_cupy():
    """CuPy with a usable GPU, or an error that names the missing piece."""
    global _CUPY_ERROR
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "the GPU path needs CuPy: pip install 'msa-cupy[cuda13]' (or [cuda12]); "
            "msa_cupy.reference works without it"
        ) from exc
    if _CUPY_ERROR is None:
        try:
            n = cupy.cuda.runtime.getDeviceCount()
            _CUPY_ERROR = "" if n > 0 else "no CUDA GPU is visible"
        except Exception as exc:  # CUDARuntimeError: no driver / no device
            _CUPY_ERROR = f"no usable CUDA GPU ({exc})"
    if _CUPY_ERROR:
        raise RuntimeError(f"the GPU path needs a CUDA GPU: {_CUPY_ERROR}; msa_cupy.reference works without one")
    return cupy


def gpu_available() -> bool:
    try:
        require_cupy()
        return True
    except RuntimeError:
        return False
