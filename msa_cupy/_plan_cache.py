"""The one-call ``msa_cupy.attention`` on decode shapes, through decode plans cached per shape.

A decode-shaped call -- causal, at most DECODE_MAX_QUERIES queries per sequence, contiguous K/V
(and index keys), shapes the kernels cover -- makes the launches of the earlier one-call path
(the same kernels with the same arguments and split-K counts, so the same bits) through the
prepared launches of a DecodePlan: a call costs the host a plan step plus its outputs.
CuPy arrays without cu_seqlens take a short path that checks shapes and flags only (any doubt
sends the call down the public function's checks, which raise the errors); other calls
(PyTorch, JAX, varlen) are checked by the public function and then launched the same way.
Shapes plans do not cover keep the earlier path.

Cache.  Plans are kept per thread (a call rewrites its plan's prepared argument blocks), at
most CACHED_PLANS, the least recently used dropped first.  The key is everything a plan's
launches depend on: device, dtype, heads, head and index dims, the index branch (index-key
heads, or the training-free index), block size, top_k, local and sink blocks, scale,
queries per sequence, the batch and the longest sequence each rounded up to a power of two.
A cached plan holds no GPU memory: each call takes its scratch (lengths, selection, partial
lists) from CuPy's pool on the caller's stream and lets it go when it returns, as the earlier
path did, so the pool hands that memory again only to work queued after this call's kernels.
Dropping a plan frees nothing that queued work may still read.  Outputs are fresh arrays that
the caller owns.
"""
from __future__ import annotations

import math
import os
import sys
import threading
from collections import OrderedDict

import numpy as np

from . import _interop, plan, selection, sparse

CACHED_PLANS = 16  # per thread
MAX_SCRATCH_BYTES = 1 << 30  # larger calls keep the earlier path (it cuts queries into chunks)
enabled = True  # False: every call takes the earlier path (tests and benchmarks compare the two)

_HEAD_DIMS = frozenset(sparse.SUPPORTED_HEAD_DIMS)
_GROUPS = frozenset(sparse.SUPPORTED_GROUP_SIZES)
_BLOCKS = frozenset(selection.BLOCK_SIZES)
_INDEX_DIMS = frozenset(selection.INDEX_DIMS)


def bucket(n: int) -> int:
    """n rounded up to a power of two (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def plan_key(device, dtype, hq, hkv, d, index_dim, index_k_heads, block_size, top_k, local_blocks, sink_blocks, scale,
             queries, n_seq, max_k) -> tuple:
    """The cache key of the plan serving a call: index_dim / index_k_heads None for the
    training-free index; n_seq and max_k in power-of-two buckets."""
    return (device, dtype, hq, hkv, d, index_dim, index_k_heads, block_size, top_k, local_blocks, sink_blocks, scale,
            queries, bucket(n_seq), bucket(max_k))


class PlanCache:
    """At most ``capacity`` plans by key, the least recently used dropped first."""

    def __init__(self, capacity=CACHED_PLANS):
        self.capacity = capacity
        self.plans: OrderedDict = OrderedDict()

    def get(self, key, make):
        """The plan for key: cached, or make() kept (dropping the least recently used)."""
        found = self.plans.get(key)
        if found is None:
            found = self.plans[key] = make()
            if len(self.plans) > self.capacity:
                self.plans.popitem(last=False)
        else:
            self.plans.move_to_end(key)
        return found


_local = threading.local()


def cache() -> PlanCache:
    """This thread's plans."""
    found = getattr(_local, "plans", None)
    if found is None:
        found = _local.plans = PlanCache()
    return found


def fits(*, batch, queries, hq, top_k, d, itemsize) -> bool:
    """Whether a plan for `batch` (a bucket) sequences of `queries` queries serves its calls:
    the earlier path would not cut them in chunks, and the scratch stays under MAX_SCRATCH_BYTES
    (partial outputs of every pick: the bulk)."""
    rows = batch * queries
    return (sparse._chunk_rows(rows, hq, top_k, d, itemsize) >= rows
            and rows * hq * top_k * (d * itemsize + 4) <= MAX_SCRATCH_BYTES)


def _plan_for(key):
    """The cached plan for key, or None (cached too) where the shape does not fit a plan."""
    def make():
        (device, dtype, hq, hkv, d, di, ikh, block_size, top_k, local_blocks, sink_blocks, scale, nq, batch,
         max_len) = key
        if not plan.rows_fit(max_len, batch * max_len, block_size) or not fits(
                batch=batch, queries=nq, hq=hq, top_k=top_k, d=d, itemsize=dtype.itemsize):
            return _UNFIT
        return plan.DecodePlan._for_calls(
            max_batch=batch, max_cache_len=max_len, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
            index_dim=di, index_k_heads=1 if ikh is None else ikh, block_size=block_size, top_k=top_k,
            local_blocks=local_blocks, sink_blocks=sink_blocks, queries_per_seq=nq, scale=scale)

    found = cache().get(key, make)
    return None if found is _UNFIT else found


_UNFIT = "no plan"  # a cached answer: this key's calls keep the earlier path


def covers(*, hq, hkv, d, index_dim, index_k_heads, block_size, top_k, causal, max_q, n_seq, total_q, max_k) -> bool:
    """Whether a checked call may run through a plan (``fits`` then decides on its size): what
    the earlier path sends to the decode kernels (fused selection, query-outer decode) and what
    a plan takes."""
    if not enabled or not causal or os.environ.get("MSA_CUPY_PLAIN") == "1":
        return False
    if not (n_seq >= 1 and total_q >= 1 and 1 <= max_q <= sparse.DECODE_MAX_QUERIES and max_k >= 1):
        return False
    # the kernels' own predicates, the ones _api._route asks
    return (hkv >= 1 and hq % hkv == 0
            and selection.supports(top_k=top_k, block_size=block_size, index_dim=d if index_dim is None else index_dim)
            and sparse.supports(head_dim=d, block_size=block_size, group_size=hq // hkv, top_k=top_k)
            and (index_dim is None or index_k_heads in (1, hkv)))


def _run(found, cp, q, k, v, index_q, index_k, *, n_seq, rows, splits, max_k, k_len, cu_q, cu_k, lead, hq, hkv, d,
         top_k, return_lse, return_indices):
    """Outputs (fresh arrays of leading shape ``lead``) and one plan step on CuPy's current stream."""
    scratch = cp.cuda.alloc(found.workspace_bytes)  # pool memory of this stream, free again at return
    empty = sparse._empty if sparse._poison_outputs else cp.empty  # the earlier path's test hook
    out = empty((*lead, hq, d), q.dtype)
    lse = empty((*lead, hq), np.float32) if return_lse else None
    ids = cp.empty((*lead, hkv, top_k), cp.int32) if return_indices else None
    found._launch_call(
        cp.cuda.get_current_stream().ptr, scratch.ptr, n_seq=n_seq, rows=rows, splits=splits, max_k=max_k, k_len=k_len,
        q=q.data.ptr, k=k.data.ptr, v=v.data.ptr, index_q=0 if index_q is None else index_q.data.ptr,
        index_k=0 if index_k is None else index_k.data.ptr, out=out.data.ptr,
        lse=0 if lse is None else lse.data.ptr, ids=0 if ids is None else ids.data.ptr, cu_q=cu_q, cu_k=cu_k)
    if not (return_lse or return_indices):
        return out
    return (out,) + ((lse,) if return_lse else ()) + ((ids,) if return_indices else ())


# --------------------------------------------------------------------------- checked calls


def attention_checked(layout, q, k, v, index_q, index_k, cu_seqlens_q, cu_seqlens_k, *, hq, hkv, d, block_size,
                      top_k, local_blocks, sink_blocks, causal, scale, return_lse, return_indices):
    """A call the public function has checked (CuPy arrays in varlen form, CuPy's current
    stream the caller's, cu_seqlens device int32 or None): its outputs through a plan, or None
    where plans do not cover it (the caller takes the earlier path)."""
    dt = q.dtype
    di = ikh = None
    if index_q is not None:
        di, ikh = index_q.shape[-1], index_k.shape[-2]
        if index_q.dtype != dt:  # a plan has one dtype
            return None
    n_seq, rows = layout.n_seq, layout.total_q
    if not covers(hq=hq, hkv=hkv, d=d, index_dim=di, index_k_heads=ikh, block_size=block_size, top_k=top_k,
                  causal=causal, max_q=layout.max_q, n_seq=n_seq, total_q=rows, max_k=layout.max_k):
        return None
    cp = _interop.require_cupy()
    found = _plan_for(plan_key(cp.cuda.runtime.getDevice(), dt, hq, hkv, d, di, ikh, block_size, top_k, local_blocks,
                               sink_blocks, scale, layout.max_q, n_seq, layout.max_k))
    if found is None:
        return None
    cfg = found._select
    cu_q = cu_k = 0
    if cu_seqlens_q is None:  # batched, or one sequence: cu_seqlens written by a launch
        k_len = layout.uniform_k if layout.uniform else layout.total_k
        tiles = n_seq * cfg.q_tiles
    else:
        cu_seqlens_q, cu_seqlens_k = cp.ascontiguousarray(cu_seqlens_q), cp.ascontiguousarray(cu_seqlens_k)
        cu_q, cu_k, k_len = cu_seqlens_q.data.ptr, cu_seqlens_k.data.ptr, None
        rows_per_q = hkv if found.index_k_heads == 1 else 1
        tiles = selection.query_tiles(np.diff(layout.cu_q), rows_per_q, cfg.tile_rows)
    splits = found._call_splits(tiles, layout.max_k)
    return _run(found, cp, q, k, v, index_q, index_k, n_seq=n_seq, rows=rows, splits=splits, max_k=layout.max_k,
                k_len=k_len, cu_q=cu_q, cu_k=cu_k, lead=layout.query_shape, hq=hq, hkv=hkv, d=d, top_k=top_k, return_lse=return_lse,
                return_indices=return_indices)


# --------------------------------------------------------------------------- the short path

_nd = _cp = None  # cupy.ndarray and cupy once CuPy found a GPU


def _ndarray():
    global _nd, _cp
    if _nd is None and "cupy" in sys.modules:  # a CuPy array means CuPy is imported
        try:
            _cp = _interop.require_cupy()
        except RuntimeError:  # no GPU: the public function says so
            return None
        _nd = _cp.ndarray
    return _nd


def _usable(x, device) -> bool:
    """C-contiguous, 16-byte aligned, on the device (what the public checks ask of a GPU array)."""
    mem = x.data
    return x._c_contiguous and not mem.ptr % _interop.KERNEL_ALIGNMENT and mem.device_id == device


def fast_attention(q, k, v, index_q, index_k, block_size, top_k, local_blocks, sink_blocks, causal, scale,
                   cu_seqlens_q, cu_seqlens_k, return_lse, return_indices):
    """``attention`` for CuPy decode shapes without cu_seqlens, checked on shapes and flags
    only: the outputs, or None where anything is unusual (the public function then checks the
    call, raising what is wrong, and may still launch it through a plan)."""
    nd = _nd if _nd is not None else _ndarray()
    if (nd is None or not enabled or type(q) is not nd or type(k) is not nd or type(v) is not nd
            or cu_seqlens_q is not None or cu_seqlens_k is not None):
        return None
    if (causal is not True or type(top_k) is not int or type(block_size) is not int or type(local_blocks) is not int
            or type(sink_blocks) is not int or type(return_lse) is not bool or type(return_indices) is not bool):
        return None
    if scale is not None and (type(scale) is not float or not math.isfinite(scale)):
        return None
    if not (1 <= top_k <= _interop.SELECT_KERNEL_MAX_TOP_K and block_size in _BLOCKS and local_blocks >= 0
            and sink_blocks >= 0 and local_blocks + sink_blocks <= top_k):
        return None
    qs, ks = q.shape, k.shape
    if len(qs) == 4:
        if len(ks) != 4 or ks[0] != qs[0]:
            return None
        n_seq, nq, hq, d = qs
        nk, hkv = ks[1], ks[2]
    elif len(qs) == 3:
        if len(ks) != 3:
            return None
        n_seq = 1
        nq, hq, d = qs
        nk, hkv = ks[0], ks[1]
    else:
        return None
    if (v.shape != ks or ks[-1] != d or d not in _HEAD_DIMS or n_seq < 1 or not 1 <= nq <= sparse.DECODE_MAX_QUERIES
            or nk < 1 or hkv < 1 or hq % hkv or hq // hkv not in _GROUPS):
        return None
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt or dt not in _interop.GPU_DTYPES:
        return None
    cp = _cp
    device = cp.cuda.runtime.getDevice()
    if not (_usable(q, device) and _usable(k, device) and _usable(v, device)):
        return None
    if index_q is not None:
        if type(index_q) is not nd or type(index_k) is not nd:
            return None
        iqs, iks = index_q.shape, index_k.shape
        if len(iqs) != len(qs) or len(iks) != len(ks):
            return None
        di, ikh = iqs[-1], iks[-2]
        if (iqs != (*qs[:-2], hkv, di) or iks[:-2] != ks[:-2] or iks[-1] != di or di not in _INDEX_DIMS
                or (ikh != 1 and ikh != hkv)):
            return None
        if (index_q.dtype != dt or index_k.dtype != dt or not _usable(index_q, device)
                or not _usable(index_k, device)):
            return None
    elif index_k is not None:
        return None
    else:
        di = ikh = None
    if os.environ.get("MSA_CUPY_PLAIN") == "1":
        return None
    found = _plan_for(plan_key(device, dt, hq, hkv, d, di, ikh, block_size, top_k, local_blocks, sink_blocks, scale,
                               nq, n_seq, nk))
    if found is None:
        return None
    rows = n_seq * nq
    splits = found._call_splits(n_seq * found._select.q_tiles, nk)
    return _run(found, cp, q, k, v, index_q, index_k, n_seq=n_seq, rows=rows, splits=splits, max_k=nk, k_len=nk,
                cu_q=0, cu_k=0, lead=qs[:-2], hq=hq, hkv=hkv, d=d, top_k=top_k, return_lse=return_lse,
                return_indices=return_indices)
