"""The plain CuPy path: cuBLAS products and array operations, chunked so that memory stays
bounded (about CHUNK_BYTES of temporaries) at any context length.

It is right, not fast: the fallback for shapes the fast kernels do not cover and the
"plain CuPy" baseline of the benchmarks.  Inputs are flattened varlen CuPy arrays (see
_layout); outputs are fresh arrays.  Selection rules are shared with the reference
(``reference.sequence_topk`` runs on CuPy arrays too); block scores are pooled by the
``block_max_pool`` kernel of cuda/block_max.cu.
"""
from __future__ import annotations

import math

import numpy as np

from . import _jit
from ._layout import Layout
from .reference import sequence_topk

CHUNK_BYTES = 256 << 20
THREADS = 256

_jit.declare("block_max.cu", "block_max_pool", ("true",), ("false",))


def _cp():
    import cupy

    return cupy


def _rows_per_chunk(bytes_per_row: int) -> int:
    return max(1, CHUNK_BYTES // max(bytes_per_row, 1))


def _score_rows(iq, ik, first_position: int, out, *, block_size: int, causal: bool):
    """Block scores of consecutive queries of one sequence into out (rows, G, >= n_blocks).

    iq: (rows, G, Di); ik: (nk, 1|G, Di); the first row sits at key position first_position.
    """
    cp = _cp()
    rows, groups = iq.shape[0], iq.shape[1]
    nk = ik.shape[0]
    if rows == 0 or nk == 0:
        return
    pool = _jit.get_kernel("block_max.cu", "block_max_pool", template=("true" if causal else "false",))
    iq = iq.astype(cp.float32).transpose(1, 0, 2)  # (G, rows, Di)
    ik = ik.astype(cp.float32).transpose(1, 2, 0)  # (1|G, Di, nk)
    nb = -(-nk // block_size)
    step = _rows_per_chunk(groups * nk * 4)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = cp.ascontiguousarray(cp.matmul(iq[:, r0:r1], ik))  # (G, r1 - r0, nk)
        n = (r1 - r0) * groups * nb
        pool((math.ceil(n / THREADS),), (THREADS,),
             (s, out[r0:], np.int32(r1 - r0), np.int32(groups), np.int32(nk), np.int32(block_size),
              np.int32(nb), np.int64(out.strides[0] // 4), np.int64(out.strides[1] // 4),
              np.int64(first_position + r0)))


def _topk_rows(scores, first_position: int, nk: int, **options):
    """Selection of consecutive queries of one sequence from their (rows, G, n_blocks) scores."""
    cp = _cp()
    positions = cp.arange(scores.shape[0], dtype=cp.int64) + first_position
    return sequence_topk(scores, positions, nk, **options)


def block_scores(index_q, index_k, layout: Layout, *, block_size: int, causal: bool):
    """float32 (total_q, Hkv, n_blocks); -inf where a block has no visible key."""
    cp = _cp()
    out = cp.full((layout.total_q, index_q.shape[1], layout.n_blocks(block_size)), -cp.inf, cp.float32)
    for q0, nq, k0, nk in layout.sequences():
        _score_rows(index_q[q0:q0 + nq], index_k[k0:k0 + nk], nk - nq, out[q0:q0 + nq],
                    block_size=block_size, causal=causal)
    return out


def _select_chunks(layout: Layout, groups, top_k, bytes_per_row, select_rows):
    """int32 (total_q, groups, top_k): select_rows(q0, r0, r1, nq, k0, nk) for chunks of each
    sequence's queries sized to bytes_per_row(nk); sequences without keys stay -1."""
    cp = _cp()
    out = cp.full((layout.total_q, groups, top_k), -1, cp.int32)
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0 or nk == 0:
            continue
        step = _rows_per_chunk(bytes_per_row(nk))
        for r0 in range(0, nq, step):
            r1 = min(nq, r0 + step)
            out[q0 + r0:q0 + r1] = select_rows(q0, r0, r1, nq, k0, nk)
    return out


def topk_blocks(scores, layout: Layout, *, top_k, block_size, local_blocks, sink_blocks, causal):
    """int32 (total_q, Hkv, top_k) from (total_q, Hkv, n_blocks) float32 scores."""
    groups = scores.shape[1]
    options = dict(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                   sink_blocks=sink_blocks, causal=causal)

    def rows(q0, r0, r1, nq, k0, nk):
        nb = -(-nk // block_size)
        return _topk_rows(scores[q0 + r0:q0 + r1, :, :nb], nk - nq + r0, nk, **options)

    # per row: the key, the order and the sort's temporaries
    return _select_chunks(layout, groups, top_k, lambda nk: groups * -(-nk // block_size) * 24, rows)


def select_blocks(index_q, index_k, layout: Layout, *, top_k, block_size, local_blocks, sink_blocks, causal):
    """Selection through materialized scores, a chunk of queries at a time."""
    cp = _cp()
    groups = index_q.shape[1]
    options = dict(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                   sink_blocks=sink_blocks, causal=causal)

    def rows(q0, r0, r1, nq, k0, nk):
        scores = cp.full((r1 - r0, groups, -(-nk // block_size)), -cp.inf, cp.float32)
        _score_rows(index_q[q0 + r0:q0 + r1], index_k[k0:k0 + nk], nk - nq + r0, scores,
                    block_size=block_size, causal=causal)
        return _topk_rows(scores, nk - nq + r0, nk, **options)

    # per row: the dense scores of one chunk, then the top-k temporaries
    return _select_chunks(layout, groups, top_k,
                          lambda nk: groups * (nk * 4 + -(-nk // block_size) * 24), rows)


def sparse_attention(q, k, v, block_indices, layout: Layout, *, block_size, causal, scale):
    """Exact softmax over the selected, visible keys by gathering them per query.

    Returns (out (total_q, Hq, D) in q's dtype, lse (total_q, Hq) float32).  block_indices
    are read as a set per (query, group): duplicates are dropped after a sort.
    """
    cp = _cp()
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    top_k = block_indices.shape[-1]
    out = cp.zeros((total_q, hq, d), q.dtype)
    lse = cp.full((total_q, hq), -cp.inf, cp.float32)
    offsets = cp.arange(block_size, dtype=cp.int64)
    group_ids = cp.arange(hkv, dtype=cp.int64)[None, :, None]
    # per gathered key: k and v in float32 plus one masked copy in flight, logits and p
    step = _rows_per_chunk(hkv * top_k * block_size * (3 * d + 2 * g + 4) * 4)
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0 or nk == 0:
            continue  # no keys: out 0, lse -inf
        kf, vf = k[k0:k0 + nk], v[k0:k0 + nk]
        for r0 in range(0, nq, step):
            r1 = min(nq, r0 + step)
            rows = r1 - r0
            ids = cp.sort(block_indices[q0 + r0:q0 + r1].astype(cp.int64), axis=-1)
            ids[..., 1:] = cp.where(ids[..., 1:] == ids[..., :-1], -1, ids[..., 1:])
            tok = (ids[..., None] * block_size + offsets).reshape(rows, hkv, top_k * block_size)
            limit = nk if not causal else cp.clip(cp.arange(r0, r1) + (nk - nq) + 1, 0, nk)[:, None, None]
            valid = (cp.repeat(ids, block_size, axis=-1) >= 0) & (tok < limit)
            tok = cp.where(valid, tok, 0)
            # unseen slots are zero rows (a select, not a zero weight: 0 * NaN = NaN), so a NaN
            # or Inf of a key the query does not see never enters its products
            seen = valid[..., None]
            kg = cp.where(seen, kf[tok, group_ids].astype(cp.float32), cp.float32(0))  # (rows, Hkv, K*Bk, D)
            vg = cp.where(seen, vf[tok, group_ids].astype(cp.float32), cp.float32(0))
            qg = q[q0 + r0:q0 + r1].astype(cp.float32).reshape(rows, hkv, g, d)
            logits = cp.matmul(qg, kg.transpose(0, 1, 3, 2)) * scale  # (rows, Hkv, G, K*Bk)
            logits = cp.where(valid[:, :, None, :], logits, -cp.inf)
            m = logits.max(axis=-1, keepdims=True)  # NaN if a seen score is NaN
            m = cp.where(m == -cp.inf, cp.float32(0), m)  # +inf stays: exp(inf - inf) = NaN, as in dense softmax
            p = cp.exp(logits - m)
            denom = p.sum(axis=-1, keepdims=True)
            empty = denom == 0  # no seen key, or every seen score -inf: out 0, lse -inf
            o = cp.where(empty, cp.float32(0), cp.matmul(p, vg) / cp.where(empty, cp.float32(1), denom))
            out[q0 + r0:q0 + r1] = o.reshape(rows, hq, d).astype(q.dtype)
            lse[q0 + r0:q0 + r1] = cp.where(empty, -cp.inf, cp.log(denom) + m).reshape(rows, hq)
    return out, lse
