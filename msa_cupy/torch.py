"""MSA as PyTorch custom ops: usable under ``torch.compile`` (``fullgraph=True``,
``mode="reduce-overhead"``) and in ``torch.cuda.graph`` captures.

    import msa_cupy.torch as msa_torch

    out = msa_torch.attention(q, k, v)                      # torch.ops.msa_cupy.attention
    msa_torch.attention_out(q, k, v, out)                   # torch.ops.msa_cupy.attention_out

    plan = msa_torch.DecodePlan(max_batch=8, max_cache_len=1 << 20, num_q_heads=64, num_kv_heads=4,
                                head_dim=128, dtype=torch.bfloat16, page_size=128, num_pages=65536)
    plan.update(seq_lens, block_table)                      # torch.ops.msa_cupy.decode_update
    out = plan.run(q, k_cache, v_cache)                     # torch.ops.msa_cupy.decode_run

Each op has a fake implementation (shapes and dtypes only), so tracing never touches the
GPU.  Inside the ops, work is queued on PyTorch's current stream, and whatever CuPy allocates
comes from PyTorch's caching allocator on that stream: under graph capture it lands in the
graph's private pool, so later allocations are never overwritten by replays.

Decode plans.  A :class:`DecodePlan` holds a :class:`msa_cupy.DecodePlan` whose workspace is
a uint8 tensor from PyTorch's allocator, and an int handle that names it in a module-level
table.  The ops take the workspace tensor as an argument they mutate, so that torch orders
``decode_update`` before the ``decode_run`` that reads the step (and never drops an update
as dead code); the workspace is marked as a static address so CUDA-graph trees replay on it
without copies.  This module imports torch; ``import msa_cupy`` does not.
"""
import contextlib
import itertools
import weakref
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from . import _api, _interop
from .plan import DecodePlan as _Plan

Tensor = torch.Tensor

# --------------------------------------------------------------------------- CuPy on torch's allocator


class _TorchBlock:
    """One block of PyTorch's caching allocator, handed back when CuPy drops the memory."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    # CuPy may drop memory while dynamo traces a frame (garbage collection runs anywhere):
    # dynamo must run this eagerly, not compile it (it failed to, with "invalid device pointer")
    @torch.compiler.disable
    def __del__(self):
        try:
            torch.cuda.caching_allocator_delete(self.ptr)
        except Exception:  # interpreter shutdown: torch may be gone already
            pass


def _torch_alloc(size: int):
    """A CuPy allocator drawing from PyTorch's caching allocator on CuPy's current device and
    stream (inside the ops: PyTorch's current stream, capture pools included)."""
    import cupy

    device = cupy.cuda.runtime.getDevice()
    ptr = torch.cuda.caching_allocator_alloc(max(size, 1), device, cupy.cuda.get_current_stream().ptr)
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), device), 0)


def torch_allocator():
    """Context in which CuPy allocations come from PyTorch's caching allocator (this thread)."""
    try:
        import cupy
    except ImportError:  # the call inside names what is missing
        return contextlib.nullcontext()
    return cupy.cuda.using_allocator(_torch_alloc)


# --------------------------------------------------------------------------- trace-time checks

_NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.bfloat16: _interop.BFLOAT16,
                 torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
                 torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64)}


def _shape_of(t):
    """What the argument checks of msa_cupy._interop read of an array, from a (fake) tensor."""
    if t is None:
        return None
    dtype = _NUMPY_DTYPES.get(t.dtype, str(t.dtype).replace("torch.", ""))
    return SimpleNamespace(shape=tuple(t.shape), ndim=t.dim(), dtype=dtype, strides=tuple(t.stride()),
                           flags=SimpleNamespace(c_contiguous=t.is_contiguous()))


def _static(*tensors) -> bool:
    return all(isinstance(d, int) for t in tensors if t is not None for d in t.shape)


def _check_attention(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k):
    """The shape, dtype and layout checks of msa_cupy.attention, at trace time.  Skipped under
    symbolic shapes (they would specialize them); the call checks everything again when it runs.
    What needs the values of cu_seqlens is checked only then."""
    if not _static(q, k, v, index_q, index_k):
        return
    if (index_q is None) != (index_k is None):
        raise ValueError("index_q and index_k must be given together (or neither, for the training-free default)")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is not None and (cu.dtype != torch.int32 or cu.dim() != 1):
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {cu.dtype} of shape {tuple(cu.shape)}")
    layout, _, hkv, _ = _interop.check_qkv(_shape_of(q), _shape_of(k), _shape_of(v), None, None, gpu=True)
    if index_q is not None:
        _interop.check_index(_shape_of(index_q), _shape_of(index_k), None, None, gpu=True, n_kv_heads=hkv,
                             layout=layout)


def _check_tensors(**arrays):
    for name, a in arrays.items():
        if a is not None and not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__} (msa_cupy.attention takes "
                            f"other array types)")


def _options(top_k, block_size, local_blocks, sink_blocks, causal, scale):
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal, scale=scale)
    _interop.check_gpu_options(options)
    return options


# --------------------------------------------------------------------------- attention


def _run_attention(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, top_k, block_size, local_blocks,
                   sink_blocks, causal, scale):
    with torch_allocator():
        result = _api.attention(q, k, v, index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, top_k=top_k, block_size=block_size,
                                local_blocks=local_blocks, sink_blocks=sink_blocks, causal=causal, scale=scale,
                                return_lse=True, return_indices=True)
    return tuple(r.contiguous() for r in result)  # the strides the fake implementation promises


@torch.library.custom_op("msa_cupy::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, index_q: Optional[Tensor], index_k: Optional[Tensor],
               cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], top_k: int, block_size: int,
               local_blocks: int, sink_blocks: int, causal: bool,
               scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    return _run_attention(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, top_k, block_size, local_blocks,
                          sink_blocks, causal, scale)


@_attention.register_fake
def _attention_fake(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, top_k, block_size, local_blocks,
                    sink_blocks, causal, scale):
    _check_attention(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k)
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty((*q.shape[:-2], k.shape[-2], top_k), dtype=torch.int32))


@torch.library.custom_op("msa_cupy::attention_out", mutates_args=("out", "lse"))
def _attention_out(q: Tensor, k: Tensor, v: Tensor, index_q: Optional[Tensor], index_k: Optional[Tensor],
                   cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], out: Tensor,
                   lse: Optional[Tensor], top_k: int, block_size: int, local_blocks: int, sink_blocks: int,
                   causal: bool, scale: Optional[float]) -> None:
    _check_out(q, out, lse)
    result, result_lse, _ = _run_attention(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, top_k, block_size,
                                           local_blocks, sink_blocks, causal, scale)
    out.copy_(result)  # on the current stream, after the kernels; no write into out on error
    if lse is not None:
        lse.copy_(result_lse)


@_attention_out.register_fake
def _attention_out_fake(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, out, lse, top_k, block_size,
                        local_blocks, sink_blocks, causal, scale):
    _check_attention(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k)
    _check_out(q, out, lse)


def _check_out(q, out, lse):
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if lse is not None and (lse.shape != q.shape[:-1] or lse.dtype != torch.float32 or lse.device != q.device):
        raise ValueError(f"lse must be a float32 tensor of shape {tuple(q.shape[:-1])} on {q.device}, got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")


def attention(q, k, v, *, index_q=None, index_k=None, block_size=128, top_k=16, local_blocks=1, sink_blocks=0,
              causal=True, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False, return_indices=False):
    """:func:`msa_cupy.attention` for torch tensors as the custom op ``msa_cupy::attention``
    (same arguments, same results).  ``msa_cupy.attention`` itself takes this route when
    torch.compile traces it."""
    _check_tensors(q=q, k=k, v=v, index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    o = _options(top_k, block_size, local_blocks, sink_blocks, causal, scale)
    flags = _interop.scalar_options(return_lse=return_lse, return_indices=return_indices)
    out, lse, ids = _attention(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, o["top_k"], o["block_size"],
                               o["local_blocks"], o["sink_blocks"], o["causal"], o["scale"])
    result = (out,) + ((lse,) if flags["return_lse"] else ()) + ((ids,) if flags["return_indices"] else ())
    return result if len(result) > 1 else out


def attention_out(q, k, v, out, *, lse=None, index_q=None, index_k=None, block_size=128, top_k=16, local_blocks=1,
                  sink_blocks=0, causal=True, scale=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """:func:`attention` into the caller's ``out`` (and ``lse``), the custom op
    ``msa_cupy::attention_out``.  The result is computed into fresh memory and copied (one
    device copy), so ``out`` is untouched when an argument is refused."""
    _check_tensors(q=q, k=k, v=v, out=out, lse=lse, index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    o = _options(top_k, block_size, local_blocks, sink_blocks, causal, scale)
    _attention_out(q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, out, lse, o["top_k"], o["block_size"],
                   o["local_blocks"], o["sink_blocks"], o["causal"], o["scale"])
    return out


# --------------------------------------------------------------------------- decode plans

_PLANS: "weakref.WeakValueDictionary[int, DecodePlan]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def _plan(handle: int) -> "DecodePlan":
    plan = _PLANS.get(handle)
    if plan is None:
        raise ValueError(f"handle {handle} names no live msa_cupy.torch.DecodePlan")
    return plan


@torch.library.custom_op("msa_cupy::decode_update", mutates_args=("workspace",))
def _decode_update(seq_lens: Tensor, block_table: Optional[Tensor], workspace: Tensor, handle: int) -> None:
    plan = _plan(handle)._bind(workspace)
    if seq_lens.device.type == "cpu":  # host lengths: checked entry by entry and copied (not capturable)
        table = None if block_table is None else block_table.cpu().numpy()
        with _interop.torch_stream(workspace.device.index):
            plan.update(seq_lens.numpy(), table)
    else:
        plan.update(seq_lens, block_table)


@_decode_update.register_fake
def _decode_update_fake(seq_lens, block_table, workspace, handle):
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be a 1-D int32 tensor, got {seq_lens.dtype} of shape {tuple(seq_lens.shape)}")


@torch.library.custom_op("msa_cupy::decode_run", mutates_args=("workspace",))
def _decode_run(q: Tensor, k_cache: Tensor, v_cache: Tensor, index_q: Optional[Tensor],
                index_k_cache: Optional[Tensor], workspace: Tensor, handle: int) -> tuple[Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    _plan(handle)._bind(workspace).run(q, k_cache, v_cache, index_q=index_q, index_k_cache=index_k_cache, out=out,
                                       lse=lse)
    return out, lse


@_decode_run.register_fake
def _decode_run_fake(q, k_cache, v_cache, index_q, index_k_cache, workspace, handle):
    _check_decode_q(q)
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("msa_cupy::decode_run_out", mutates_args=("workspace", "out", "lse"))
def _decode_run_out(q: Tensor, k_cache: Tensor, v_cache: Tensor, index_q: Optional[Tensor],
                    index_k_cache: Optional[Tensor], workspace: Tensor, out: Tensor, lse: Optional[Tensor],
                    handle: int) -> None:
    _plan(handle)._bind(workspace).run(q, k_cache, v_cache, index_q=index_q, index_k_cache=index_k_cache, out=out,
                                       lse=lse)


@_decode_run_out.register_fake
def _decode_run_out_fake(q, k_cache, v_cache, index_q, index_k_cache, workspace, out, lse, handle):
    _check_decode_q(q)
    _check_out(q, out, lse)


def _check_decode_q(q):
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, queries_per_seq, num_q_heads, head_dim), got shape {tuple(q.shape)}")


class DecodePlan:
    """:class:`msa_cupy.DecodePlan` for PyTorch: the same arguments (``dtype`` may be a torch
    dtype), a workspace tensor from PyTorch's allocator on ``device`` (default: the current
    CUDA device), and ``update`` / ``run`` as custom ops that torch.compile traces with
    ``fullgraph=True`` and CUDA graphs capture (``mode="reduce-overhead"``, ``torch.cuda.graph``).

    A step: ``update(seq_lens, block_table)`` then ``run(q, k_cache, v_cache)``.  With CUDA
    tensors ``update`` is one launch that reads the lengths on the device, so a captured
    graph may hold both and serve every step; with CPU tensors it checks every entry and
    copies them through a pinned buffer (eager only)."""

    def __init__(self, *, device=None, **options):
        import cupy

        device = torch.device("cuda" if device is None else device)
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        with cupy.cuda.Device(self.device.index):
            self.plan = _Plan(**options)
        self.workspace = torch.empty(self.plan.workspace_bytes, dtype=torch.uint8, device=self.device)
        self.plan.use_workspace(self.workspace)
        self._bound = self.workspace.data_ptr()
        torch._dynamo.mark_static_address(self.workspace)
        self.handle = next(_HANDLES)
        _PLANS[self.handle] = self

    def _bind(self, workspace) -> _Plan:
        """The plan on the workspace tensor an op was given: the plan's own, or a copy of it
        where torch's functionalization handed the op a clone."""
        ptr = workspace.data_ptr()
        if ptr != self._bound:
            self.plan.use_workspace(workspace, carry_over=True)
            self._bound = ptr
        return self.plan

    @property
    def workspace_bytes(self) -> int:
        return self.plan.workspace_bytes

    def update(self, seq_lens, block_table=None):
        """Set the step's sequences (``msa_cupy.DecodePlan.update``): int32 ``seq_lens`` (batch,)
        and, for a paged plan, ``block_table`` (batch, pages)."""
        torch.ops.msa_cupy.decode_update(seq_lens, block_table, self.workspace, self.handle)
        return self

    def run(self, q, k_cache, v_cache, *, index_q=None, index_k_cache=None, out=None, lse=None, return_lse=False):
        """The step's attention (``msa_cupy.DecodePlan.run``): fresh ``out`` (and ``lse`` with
        ``return_lse``), or written into the caller's ``out`` / ``lse``."""
        if out is None:
            if lse is not None:
                raise ValueError("lse= is given without out=: pass both, or neither")
            result, result_lse = torch.ops.msa_cupy.decode_run(q, k_cache, v_cache, index_q, index_k_cache,
                                                               self.workspace, self.handle)
            return (result, result_lse) if return_lse else result
        if return_lse and lse is None:
            raise ValueError("return_lse with out= needs lse= as well")
        torch.ops.msa_cupy.decode_run_out(q, k_cache, v_cache, index_q, index_k_cache, self.workspace, out, lse,
                                          self.handle)
        return (out, lse) if return_lse else out

    @property
    def block_indices(self):
        """The last run's selection (batch, queries_per_seq, Hkv, top_k) int32, a workspace view."""
        return torch.from_dlpack(self._bind(self.workspace).block_indices)

    def clamped_entries(self) -> int:
        """Lengths and page ids clamped by device-side updates so far (a sync)."""
        return self._bind(self.workspace).clamped_entries()
