"""The public functions: check arguments, route NumPy to the reference and GPU arrays to the
kernels (the fast ones where they cover the shape, the plain CuPy path otherwise), and hand
results back as the caller's array type."""
from __future__ import annotations

import os

import numpy as np

from . import _interop, _plain, _plan_cache, plan, reference, selection, sparse
from ._interop import Call
from ._layout import Layout

# op -> (module of its fast kernels, that module's answer to "do you cover this shape?")
_FAST = {
    "block_scores": (selection, selection.supports_block_scores),
    "topk_blocks": (selection, selection.supports_topk),
    "select_blocks": (selection, selection.supports),
    "sparse_attention": (sparse, sparse.supports),
}


def _route(op: str, **shape):
    """The module that runs ``op`` on this shape: its fast kernels where they cover it, else the
    plain CuPy path (``_plain``, always under MSA_CUPY_PLAIN=1).  The two take the same
    arguments, except that the kernels also take device cu_seqlens."""
    kernels, supports = _FAST[op]
    if os.environ.get("MSA_CUPY_PLAIN") == "1" or not supports(**shape):
        return _plain
    return kernels


def _device_cu(call: Call, layout: Layout):
    """Device cu_seqlens for the kernels: the caller's (varlen), or for batched inputs (B
    sequences of equal length; rank 3 without cu_seqlens: one sequence of all tokens) a fresh
    array written by one launch on the caller's stream.  Made once per call (selection and
    attention share it) and kept on the call only: an array cached across calls could be
    freed while queued kernels still read it, and a growing cache changes the lengths every
    step."""
    if call.device_cu is None:
        cp = _interop.require_cupy()
        cu_q, cu_k = call.arrays.get("cu_seqlens_q"), call.arrays.get("cu_seqlens_k")
        if cu_q is not None:
            call.device_cu = cp.ascontiguousarray(cu_q), cp.ascontiguousarray(cu_k)
        else:
            q_len, k_len = (layout.uniform_q, layout.uniform_k) if layout.uniform else (layout.total_q,
                                                                                        layout.total_k)
            call.device_cu = plan.uniform_cu_seqlens(layout.n_seq, q_len, k_len)
    return call.device_cu


def _group_mean(q, n_groups):
    """Training-free index_q: the mean of each group's query heads (one launch, fp32 sums)."""
    cp = _interop.require_cupy()
    return plan.group_mean(q, cp.empty((q.shape[0], n_groups, q.shape[2]), q.dtype), n_groups)


def _numpy_result(result, dtype):
    """Reference results for NumPy callers: out in the caller's dtype, the rest float32/int32."""
    out = result if not isinstance(result, tuple) else result[0]
    rest = () if not isinstance(result, tuple) else result[1:]
    cast = [out.astype(dtype)] + [r if r.dtype == np.int32 else r.astype(np.float32) for r in rest]
    return tuple(cast) if rest else cast[0]


# --------------------------------------------------------------------------- index branch


@_interop.outside_torch_compile()
def block_scores(index_q, index_k, *, block_size=128, causal=True, cu_seqlens_q=None, cu_seqlens_k=None):
    """Block scores: for each query, group and key block, the max over the block's visible keys
    of ``dot(index_q, index_k)``.  float32 ``(..., Nq, Hkv, ceil(Nk / block_size))``, -inf for
    blocks with no visible key.  Materializes the score map: for selection use select_blocks."""
    options = _interop.scalar_options(block_size=block_size, causal=causal)
    call = Call(dict(index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
    if not call.on_gpu:
        return reference.block_scores(index_q, index_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                      **options).astype(np.float32)
    a = call.arrays
    with call.stream():  # host reads of cu_seqlens ordered after the caller's work
        _interop.check_gpu_options(options)
        layout, _, _, di = _interop.check_index(a["index_q"], a["index_k"], a["cu_seqlens_q"], a["cu_seqlens_k"], gpu=True)
        iq, ik = layout.flatten(a["index_q"]), layout.flatten(a["index_k"])
        kernels = _route("block_scores", block_size=options["block_size"], index_dim=di)
        if kernels is _plain:
            scores = _plain.block_scores(iq, ik, layout, **options)
        else:
            scores = kernels.block_scores(iq, ik, layout, *_device_cu(call, layout), **options)
        return call.wrap(layout.unflatten(scores))


@_interop.outside_torch_compile()
def topk_blocks(scores, *, top_k=16, block_size=128, num_keys=None, local_blocks=1, sink_blocks=0,
                causal=True, cu_seqlens_q=None, cu_seqlens_k=None):
    """Exp-free Top-k over materialized block scores: int32 ``(..., Nq, Hkv, top_k)``, the forced
    local/sink blocks plus the best other visible blocks, ascending, -1 padded.  Batched scores
    ``(B, Nq, Hkv, n_blocks)`` need ``num_keys`` (it sets each query's position); varlen scores
    ``(total_q, Hkv, n_blocks)`` take ``cu_seqlens_q``/``cu_seqlens_k`` instead."""
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal, num_keys=num_keys)
    num_keys = options.pop("num_keys")
    call = Call(dict(scores=scores, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
    if not call.on_gpu:
        return reference.topk_blocks(scores, num_keys=num_keys, cu_seqlens_q=cu_seqlens_q,
                                     cu_seqlens_k=cu_seqlens_k, **options)
    a = call.arrays
    with call.stream():  # host reads of cu_seqlens ordered after the caller's work
        _interop.check_gpu_options(options)
        layout = _interop.topk_layout(a["scores"], num_keys, a["cu_seqlens_q"], a["cu_seqlens_k"])
        _interop.check_scores(a["scores"], layout, options["block_size"])
        if np.dtype(a["scores"].dtype) != np.float32:
            raise TypeError("scores must have dtype float32 on the GPU")
        _interop.check_contiguous("scores", a["scores"])
        flat = layout.flatten(a["scores"])
        kernels = _route("topk_blocks", top_k=options["top_k"])
        if kernels is _plain:
            ids = _plain.topk_blocks(flat, layout, **options)
        else:
            ids = kernels.topk_blocks(flat, layout, *_device_cu(call, layout), **options)
        return call.wrap(layout.unflatten(ids))


@_interop.outside_torch_compile()
def select_blocks(index_q, index_k, *, top_k=16, block_size=128, local_blocks=1, sink_blocks=0, causal=True,
                  cu_seqlens_q=None, cu_seqlens_k=None):
    """Fused selection: block scores feeding a running Top-k, so that only int32
    ``(..., Nq, Hkv, top_k)`` block ids leave the GPU (the score map is never materialized)."""
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal)
    call = Call(dict(index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
    if not call.on_gpu:
        return reference.select_blocks(index_q, index_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                       **options)
    a = call.arrays
    with call.stream():  # host reads of cu_seqlens ordered after the caller's work
        _interop.check_gpu_options(options)
        layout, _, _, di = _interop.check_index(a["index_q"], a["index_k"], a["cu_seqlens_q"], a["cu_seqlens_k"], gpu=True)
        ids = _select(call, layout.flatten(a["index_q"]), layout.flatten(a["index_k"]), layout, di, options)
        return call.wrap(layout.unflatten(ids))


def _select(call, iq, ik, layout, di, options):
    kernels = _route("select_blocks", top_k=options["top_k"], block_size=options["block_size"], index_dim=di)
    if kernels is _plain:
        return _plain.select_blocks(iq, ik, layout, **options)
    return kernels.select_blocks(iq, ik, layout, *_device_cu(call, layout), **options)


# --------------------------------------------------------------------------- main branch


def _sparse(call, q, k, v, block_indices, layout, hq, hkv, d, block_size, causal, scale):
    kernels = _route("sparse_attention", head_dim=d, block_size=block_size, group_size=hq // hkv,
                     top_k=block_indices.shape[-1])
    if kernels is _plain:
        return _plain.sparse_attention(q, k, v, block_indices, layout, block_size=block_size, causal=causal,
                                       scale=scale)
    return kernels.sparse_attention(q, k, v, block_indices, layout, *_device_cu(call, layout), block_size=block_size,
                                    causal=causal, scale=scale, return_lse=True)


@_interop.outside_torch_compile()
def sparse_attention(q, k, v, block_indices, *, block_size=128, causal=True, scale=None, cu_seqlens_q=None,
                     cu_seqlens_k=None, return_lse=False):
    """Exact softmax attention of each query head over the keys of its group's selected blocks.

    ``block_indices`` ``(..., Nq, Hkv, k)`` int32 is read as a set per (query, group): order does
    not matter, duplicates count once, -1 marks an unused slot.  Returns ``out`` (q's dtype) and,
    with ``return_lse``, ``lse`` float32 ``(..., Nq, Hq)`` (natural log; -inf where no key is seen).
    """
    options = _interop.scalar_options(block_size=block_size, causal=causal, scale=scale, return_lse=return_lse)
    call = Call(dict(q=q, k=k, v=v, block_indices=block_indices, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k))
    if not call.on_gpu:
        result = reference.sparse_attention(q, k, v, block_indices, cu_seqlens_q=cu_seqlens_q,
                                            cu_seqlens_k=cu_seqlens_k, **options)
        return _numpy_result(result, q.dtype)
    a = call.arrays
    with call.stream():  # host reads of cu_seqlens ordered after the caller's work
        _interop.check_gpu_options(options)
        layout, hq, hkv, d = _interop.check_qkv(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], gpu=True)
        scale = _interop.check_scale(options["scale"], d)
        _interop.check_block_indices(a["block_indices"], layout, hkv, gpu=True)
        bi = layout.flatten(a["block_indices"])
        _interop.check_block_ids(bi, layout, options["block_size"])
        out, lse = _sparse(call, layout.flatten(a["q"]), layout.flatten(a["k"]), layout.flatten(a["v"]), bi,
                           layout, hq, hkv, d, options["block_size"], options["causal"], scale)
        result = (layout.unflatten(out), layout.unflatten(lse)) if options["return_lse"] else layout.unflatten(out)
        return call.wrap(result)


@_interop.outside_torch_compile(torch_op="attention")
def attention(q, k, v, *, index_q=None, index_k=None, block_size=128, top_k=16, local_blocks=1, sink_blocks=0,
              causal=True, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False,
              return_indices=False):
    """MiniMax Sparse Attention end to end: the index branch picks ``top_k`` key blocks per
    (query, group), then exact softmax attention over them.

    Without ``index_q``/``index_k`` the training-free default is used (index_q = mean of each
    group's query heads, index_k = the group's key head): an approximation, not trained MSA.
    Returns ``out``, then ``lse`` if ``return_lse``, then ``block_indices`` if ``return_indices``:
    fresh arrays.  Decode shapes (causal, at most 16 queries per sequence) run through decode
    plans cached per shape (``_plan_cache``): the same kernels, a fraction of the host cost.
    """
    fast = _plan_cache.fast_attention(q, k, v, index_q, index_k, block_size, top_k, local_blocks, sink_blocks, causal,
                                      scale, cu_seqlens_q, cu_seqlens_k, return_lse, return_indices)
    if fast is not None:
        return fast
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal, scale=scale, return_lse=return_lse,
                                      return_indices=return_indices)
    call = Call(dict(q=q, k=k, v=v, index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k))
    if not call.on_gpu:
        result = reference.attention(q, k, v, index_q=index_q, index_k=index_k, cu_seqlens_q=cu_seqlens_q,
                                     cu_seqlens_k=cu_seqlens_k, **options)
        return _numpy_result(result, q.dtype)
    flags = {name: options.pop(name) for name in ("scale", "return_lse", "return_indices")}
    a = call.arrays
    with call.stream():  # host reads of cu_seqlens ordered after the caller's work
        _interop.check_gpu_options(options)
        layout, hq, hkv, d = _interop.check_qkv(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], gpu=True)
        scale = _interop.check_scale(flags["scale"], d)
        if (index_q is None) != (index_k is None):
            raise ValueError("index_q and index_k must be given together (or neither, for the training-free default)")
        qf, kf, vf = layout.flatten(a["q"]), layout.flatten(a["k"]), layout.flatten(a["v"])
        iq = ik = None
        if index_q is not None:
            _, _, _, di = _interop.check_index(a["index_q"], a["index_k"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                               gpu=True, n_kv_heads=hkv, layout=layout)
            iq, ik = layout.flatten(a["index_q"]), layout.flatten(a["index_k"])
        planned = _plan_cache.attention_checked(layout, qf, kf, vf, iq, ik, a["cu_seqlens_q"], a["cu_seqlens_k"],
                                                hq=hq, hkv=hkv, d=d, scale=scale, return_lse=flags["return_lse"],
                                                return_indices=flags["return_indices"], **options)
        if planned is not None:
            return call.wrap(planned)
        if iq is None:
            iq, ik, di = _group_mean(qf, hkv), kf, d
        ids = _select(call, iq, ik, layout, di, options)
        out, lse = _sparse(call, qf, kf, vf, ids, layout, hq, hkv, d, options["block_size"], options["causal"], scale)
        result = (layout.unflatten(out),)
        result += (layout.unflatten(lse),) if flags["return_lse"] else ()
        result += (layout.unflatten(ids),) if flags["return_indices"] else ()
        return call.wrap(result if len(result) > 1 else result[0])
