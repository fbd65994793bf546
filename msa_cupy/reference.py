"""NumPy oracle for MiniMax Sparse Attention, float64 inside.

Same signatures as the public API.  Every GPU kernel is judged against these functions.
Results are float64 (scores, out, lse) and int32 (block indices).  Options as in the API,
with wider bounds: any ``block_size >= 1`` (one longer than a sequence's keys is one block of
them), ``top_k`` up to max(64, key blocks of the longest sequence).  The ``sequence_*``
functions work on one sequence with explicit query positions, so that tests can check
sampled rows of a long context without computing all of it.
"""
from __future__ import annotations

import numpy as np

from . import _interop
from ._interop import topk_layout
from ._layout import Layout, query_positions


# --------------------------------------------------------------------------- one sequence


def _f64(x):
    return np.asarray(x).astype(np.float64)


_xp = _interop.array_module  # the selection rules below serve the plain GPU path too


def _visible_keys(positions, nk: int, causal: bool):
    """Number of visible keys per query: keys [0, n) are visible."""
    return np.clip(positions + 1, 0, nk) if causal else np.full(positions.shape, nk, np.int64)


def sequence_block_scores(index_q, index_k, positions, *, block_size=128, causal=True):
    """(Nq, Hkv, Di) x (Nk, 1|Hkv, Di) -> (Nq, Hkv, n_blocks) masked block maxima."""
    iq, ik = _f64(index_q), _f64(index_k)
    nq, groups, _ = iq.shape
    nk = ik.shape[0]
    block_size = min(block_size, max(nk, 1))  # a block longer than the keys is all of them: pad no further
    n_blocks = -(-nk // block_size)
    ik = np.broadcast_to(ik, (nk, groups, ik.shape[-1]))
    s = np.einsum("qgd,kgd->qgk", iq, ik)
    visible = np.arange(nk)[None, :] < _visible_keys(positions, nk, causal)[:, None]
    s = np.where(visible[:, None, :] & ~np.isnan(s), s, -np.inf)  # NaN counts as -inf
    pad = n_blocks * block_size - nk
    s = np.concatenate([s, np.full((nq, groups, pad), -np.inf)], axis=-1)
    return s.reshape(nq, groups, n_blocks, block_size).max(axis=-1)


def _forced_and_visible(positions, nk, n_blocks, block_size, local_blocks, sink_blocks, causal):
    """Boolean (Nq, n_blocks) maps: blocks a query may see, and blocks forced into its selection."""
    xp = _xp(positions)
    n_vis_keys = xp.clip(positions + 1, 0, nk) if causal else xp.full(positions.shape, nk, positions.dtype)
    n_vis_blocks = -(-n_vis_keys // block_size)
    b = xp.arange(n_blocks)[None, :]
    visible = b < n_vis_blocks[:, None]
    local = xp.clip(positions, 0, max(nk - 1, 0)) // block_size
    forced = (b <= local[:, None]) & (b > local[:, None] - local_blocks)
    forced |= b < sink_blocks
    return visible, forced & visible


def sequence_topk(scores, positions, num_keys, *, top_k=16, block_size=128, local_blocks=1,
                  sink_blocks=0, causal=True):
    """(Nq, Hkv, n_blocks) scores -> (Nq, Hkv, top_k) int32 block ids, ascending, -1 padded.

    Works on NumPy or CuPy arrays alike (the plain GPU path calls it on chunks of rows).
    """
    xp = _xp(scores)
    s = scores
    nq, groups, n_blocks = s.shape
    visible, forced = _forced_and_visible(
        positions, num_keys, n_blocks, block_size, local_blocks, sink_blocks, causal
    )
    key = xp.where(visible[:, None, :] & ~xp.isnan(s), s, -xp.inf)  # NaN counts as -inf
    # stable sort by descending score (equal scores keep ascending ids: the lower id wins ties),
    # then a stable sort that moves forced blocks first, whatever their score (+inf included)
    forced = xp.broadcast_to(forced[:, None, :], key.shape)
    order = xp.argsort(-key, axis=-1, kind="stable")
    unforced_first = (~xp.take_along_axis(forced, order, axis=-1)).astype(xp.int8)
    order = xp.take_along_axis(order, xp.argsort(unforced_first, axis=-1, kind="stable"), axis=-1)[..., :top_k]
    chosen = xp.take_along_axis(forced | (key > -xp.inf), order, axis=-1)
    ids = xp.sort(xp.where(chosen, order, n_blocks + 1), axis=-1)
    ids = xp.where(ids > n_blocks, -1, ids).astype(xp.int32)
    if ids.shape[-1] < top_k:
        ids = xp.concatenate([ids, xp.full((nq, groups, top_k - ids.shape[-1]), -1, xp.int32)], axis=-1)
    return ids


def _weighted_values(p, v, keep_h, group):
    """sum_k p[q, h, k] v[k, group[h], :] over the seen keys (keep_h) only, in IEEE arithmetic.

    The product runs on v with its non-finite values zeroed; those values are then added back
    for the seen keys alone, so that a NaN or Inf of a key a query does not see never meets
    that query's zero weight (0 * NaN = NaN), while one of a seen key propagates as dense
    attention propagates it (p * Inf = Inf, 0 * Inf = NaN, NaN anywhere = NaN)."""
    finite = np.isfinite(v)
    out = np.einsum("qhk,khd->qhd", p, np.where(finite, v, 0.0)[:, group, :])
    for key in np.flatnonzero(~finite.all(axis=(1, 2))):
        vk = v[key, group, :]  # (Hq, D)
        seen = keep_h[:, :, key, None] & ~np.isfinite(vk)[None]
        out += np.where(seen, p[:, :, key, None] * vk[None], 0.0)
    return out


def sequence_sparse_attention(q, k, v, block_indices, positions, *, block_size=128, causal=True,
                              scale=None):
    """Exact softmax over the selected, visible keys. Returns (out (Nq, Hq, D), lse (Nq, Hq)).

    Keys a query does not see are masked (their k and v never reach its result); over the keys
    it sees, NaN and Inf follow dense softmax attention (README, "NaN and Inf")."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    scale = _interop.check_scale(scale, d)
    n_blocks = -(-nk // block_size)
    bi = np.asarray(block_indices)
    chosen = np.zeros((nq, hkv, n_blocks + 1), bool)  # last column absorbs -1
    np.put_along_axis(chosen, np.where(bi < 0, n_blocks, bi).astype(np.int64), True, axis=-1)
    key_block = np.arange(nk) // block_size
    keep = chosen[:, :, key_block]  # (Nq, Hkv, Nk)
    keep &= (np.arange(nk)[None, :] < _visible_keys(positions, nk, causal)[:, None])[:, None, :]
    group = np.arange(hq) // (hq // hkv)
    keep_h = keep[:, group, :]
    with np.errstate(invalid="ignore", over="ignore"):
        # unseen keys are masked by a select: a NaN or Inf in their k or v never enters a sum
        logits = np.where(keep_h, scale * np.einsum("qhd,khd->qhk", q, k[:, group, :]), -np.inf)
        m = logits.max(axis=-1, initial=-np.inf, keepdims=True)  # NaN if a seen score is NaN
        m_safe = np.where(m == -np.inf, 0.0, m)  # +inf stays: exp(inf - inf) = NaN, as in dense softmax
        p = np.where(keep_h, np.exp(logits - m_safe), 0.0)
        denom = p.sum(axis=-1, keepdims=True)
        out = _weighted_values(p, v, keep_h, group)
        empty = denom == 0  # no seen key, or every seen score -inf
        out = np.where(empty, 0.0, out / np.where(empty, 1.0, denom))
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(empty[..., 0], -np.inf, np.log(denom[..., 0]) + m_safe[..., 0])
    return out, lse


# --------------------------------------------------------------------------- batching




def _per_sequence(layout: Layout, fn, out_tail, dtype, fill):
    """Run fn(q0, nq, k0, nk) per sequence into a (total_q, *out_tail) array."""
    result = np.full((layout.total_q, *out_tail), fill, dtype)
    for q0, nq, k0, nk in layout.sequences():
        if nq:
            result[q0:q0 + nq] = fn(q0, nq, k0, nk)
    return layout.unflatten(result)


# --------------------------------------------------------------------------- public oracle


def block_scores(index_q, index_k, *, block_size=128, causal=True, cu_seqlens_q=None, cu_seqlens_k=None):
    """float64 (..., Nq, Hkv, n_blocks): max over the visible keys of each block of index_q . index_k."""
    options = _interop.scalar_options(block_size=block_size, causal=causal)
    layout, groups, _, _ = _interop.check_index(index_q, index_k, cu_seqlens_q, cu_seqlens_k, gpu=False)
    iq, ik = layout.flatten(index_q), layout.flatten(index_k)
    n_blocks = layout.n_blocks(options["block_size"])

    def one(q0, nq, k0, nk):
        s = sequence_block_scores(iq[q0:q0 + nq], ik[k0:k0 + nk], query_positions(nq, nk), **options)
        return np.pad(s, ((0, 0), (0, 0), (0, n_blocks - s.shape[-1])), constant_values=-np.inf)

    return _per_sequence(layout, one, (groups, n_blocks), np.float64, -np.inf)


def topk_blocks(scores, *, top_k=16, block_size=128, num_keys=None, local_blocks=1, sink_blocks=0,
                causal=True, cu_seqlens_q=None, cu_seqlens_k=None):
    """int32 (..., Nq, Hkv, top_k): forced blocks + the best other visible blocks, ascending, -1 padded.

    top_k may exceed the key blocks (every visible block is selected) up to max(64, key blocks)."""
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal, num_keys=num_keys)
    layout = topk_layout(scores, options.pop("num_keys"), cu_seqlens_q, cu_seqlens_k)
    _interop.check_scores(scores, layout, options["block_size"])
    _interop.check_reference_top_k(options["top_k"], layout.n_blocks(options["block_size"]))
    flat = layout.flatten(scores)
    groups = flat.shape[-2]

    def one(q0, nq, k0, nk):
        nb = -(-nk // options["block_size"])
        return sequence_topk(flat[q0:q0 + nq, :, :nb], query_positions(nq, nk), nk, **options)

    return _per_sequence(layout, one, (groups, options["top_k"]), np.int32, -1)


def select_blocks(index_q, index_k, *, top_k=16, block_size=128, local_blocks=1, sink_blocks=0,
                  causal=True, cu_seqlens_q=None, cu_seqlens_k=None):
    """int32 (..., Nq, Hkv, top_k): block_scores followed by topk_blocks, per sequence."""
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal)
    layout, groups, _, _ = _interop.check_index(index_q, index_k, cu_seqlens_q, cu_seqlens_k, gpu=False)
    _interop.check_reference_top_k(options["top_k"], layout.n_blocks(options["block_size"]))
    iq, ik = layout.flatten(index_q), layout.flatten(index_k)

    def one(q0, nq, k0, nk):
        positions = query_positions(nq, nk)
        s = sequence_block_scores(iq[q0:q0 + nq], ik[k0:k0 + nk], positions, block_size=options["block_size"],
                                  causal=options["causal"])
        return sequence_topk(s, positions, nk, **options)

    return _per_sequence(layout, one, (groups, options["top_k"]), np.int32, -1)


def sparse_attention(q, k, v, block_indices, *, block_size=128, causal=True, scale=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    """float64 out (..., Nq, Hq, D) [and lse (..., Nq, Hq)] over the selected blocks.

    block_indices is read as a set per (query, group): order does not matter, duplicates
    count once, -1 marks an unused slot.
    """
    options = _interop.scalar_options(block_size=block_size, causal=causal, scale=scale, return_lse=return_lse)
    block_size, causal, return_lse = options["block_size"], options["causal"], options["return_lse"]
    layout, hq, hkv, d = _interop.check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, gpu=False)
    scale = _interop.check_scale(options["scale"], d)
    _interop.check_block_indices(block_indices, layout, hkv, gpu=False)
    qf, kf, vf, bif = (layout.flatten(x) for x in (q, k, v, np.asarray(block_indices)))
    _interop.check_block_ids(bif, layout, block_size)  # every sequence checked before any work
    out = np.zeros((layout.total_q, hq, d))
    lse = np.full((layout.total_q, hq), -np.inf)
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0:
            continue
        o, l = sequence_sparse_attention(qf[q0:q0 + nq], kf[k0:k0 + nk], vf[k0:k0 + nk], bif[q0:q0 + nq],
                                         query_positions(nq, nk), block_size=block_size,
                                         causal=causal, scale=scale)
        out[q0:q0 + nq], lse[q0:q0 + nq] = o, l
    out, lse = layout.unflatten(out), layout.unflatten(lse)
    return (out, lse) if return_lse else out


def dense_attention(q, k, v, *, causal=True, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    return_lse=False):
    """Ordinary (causal, bottom-right) GQA softmax attention: MSA with every block selected."""
    options = _interop.scalar_options(causal=causal, scale=scale, return_lse=return_lse)
    layout, _, hkv, _ = _interop.check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, gpu=False)
    every = np.full((layout.total_q, hkv, max(layout.max_k, 1)), -1, np.int32)
    for q0, nq, _, nk in layout.sequences():
        every[q0:q0 + nq, :, :nk] = np.arange(nk, dtype=np.int32)  # block size 1: a block per key
    return sparse_attention(q, k, v, layout.unflatten(every), block_size=1, cu_seqlens_q=cu_seqlens_q,
                            cu_seqlens_k=cu_seqlens_k, **options)


def training_free_index(q, k):
    """The default index when a model has no learned one: index_q = mean of each group's
    query heads, index_k = the group's own key head.  An approximation, not trained MSA."""
    q = np.asarray(q)
    hq, hkv = q.shape[-2], np.asarray(k).shape[-2]
    grouped = _f64(q).reshape(*q.shape[:-2], hkv, hq // hkv, q.shape[-1])
    return grouped.mean(axis=-2).astype(q.dtype), np.asarray(k)


def attention(q, k, v, *, index_q=None, index_k=None, block_size=128, top_k=16, local_blocks=1,
              sink_blocks=0, causal=True, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
              return_lse=False, return_indices=False):
    """MSA end to end: select blocks with the index branch, then sparse attention.

    Returns out, then lse if return_lse, then block_indices if return_indices.
    """
    options = _interop.scalar_options(top_k=top_k, block_size=block_size, local_blocks=local_blocks,
                                      sink_blocks=sink_blocks, causal=causal, scale=scale, return_lse=return_lse,
                                      return_indices=return_indices)
    flags = {name: options.pop(name) for name in ("scale", "return_lse", "return_indices")}
    layout, _, hkv, d = _interop.check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, gpu=False)
    scale = _interop.check_scale(flags["scale"], d)
    _interop.check_reference_top_k(options["top_k"], layout.n_blocks(options["block_size"]))
    if (index_q is None) != (index_k is None):
        raise ValueError("index_q and index_k must be given together (or neither, for the training-free default)")
    if index_q is None:
        index_q, index_k = training_free_index(q, k)
    _interop.check_index(index_q, index_k, cu_seqlens_q, cu_seqlens_k, gpu=False, n_kv_heads=hkv, layout=layout)
    indices = select_blocks(index_q, index_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **options)
    out, lse = sparse_attention(q, k, v, indices, block_size=options["block_size"], causal=options["causal"],
                                scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=True)
    result = (out,) + ((lse,) if flags["return_lse"] else ()) + ((indices,) if flags["return_indices"] else ())
    return result if len(result) > 1 else out


# --------------------------------------------------------------------------- KV caches (decode plans)


def cache_rows(seq_lens, page_size: int, block_table=None):
    """Row of every cached key, sequence after sequence, in a cache flattened to (rows, heads,
    dim): key j of sequence s is row j % page_size of page block_table[s, j // page_size]; a
    contiguous cache (batch, cache_len, ...) is one page of cache_len rows per sequence."""
    table = np.arange(len(seq_lens))[:, None] if block_table is None else np.asarray(block_table, np.int64)
    rows = [table[s, j // page_size] * page_size + j % page_size
            for s, j in enumerate(np.arange(n, dtype=np.int64) for n in np.asarray(seq_lens, np.int64))]
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def _cache_attention(q, index_q, cu_q, k_cache, v_cache, index_k_cache, seq_lens, block_table, **options):
    """:func:`attention` of packed queries q (total_q, Hq, D) (cu_q per sequence) over each
    sequence's cached keys, gathered from a contiguous or paged cache."""
    seq_lens = np.asarray(seq_lens, np.int64)
    k_cache = np.asarray(k_cache)
    rows = cache_rows(seq_lens, k_cache.shape[1], block_table)

    def gather(cache):
        cache = np.asarray(cache)
        return cache.reshape(-1, *cache.shape[2:])[rows]

    cu_k = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32)
    index = {} if index_q is None else dict(index_q=index_q, index_k=gather(index_k_cache))
    result = attention(q, gather(k_cache), gather(v_cache), causal=True, cu_seqlens_q=np.asarray(cu_q, np.int32),
                       cu_seqlens_k=cu_k, **index, **options)
    return result if isinstance(result, tuple) else (result,)


def decode_attention(q, k_cache, v_cache, seq_lens, *, block_table=None, index_q=None, index_k_cache=None,
                     block_size=128, top_k=16, local_blocks=1, sink_blocks=0, scale=None, return_lse=False,
                     return_indices=False):
    """MSA over a KV cache, as ``DecodePlan.run`` computes it: ``q`` (B, nq, Hq, D) holds the
    last nq tokens of each sequence (their keys are in the cache: ``seq_lens`` counts them);
    caches are contiguous (B', cache_len, H, D) or, with ``block_table`` (B, pages), paged
    (pages, page_size, H, D).  ``index_k_cache`` is laid out like the K cache.  Gathers each
    sequence's keys and runs :func:`attention` on the varlen batch (causal, bottom-right)."""
    q = np.asarray(q)
    batch, nq = q.shape[:2]
    flat_iq = None if index_q is None else np.asarray(index_q).reshape(batch * nq, *np.asarray(index_q).shape[2:])
    result = _cache_attention(q.reshape(batch * nq, *q.shape[2:]), flat_iq, np.arange(batch + 1) * nq, k_cache,
                              v_cache, index_k_cache, seq_lens, block_table, block_size=block_size, top_k=top_k,
                              local_blocks=local_blocks, sink_blocks=sink_blocks, scale=scale, return_lse=return_lse,
                              return_indices=return_indices)
    shaped = tuple(r.reshape(batch, nq, *r.shape[1:]) for r in result)
    return shaped if len(shaped) > 1 else shaped[0]


def prefill_attention(q, k_cache, v_cache, seq_lens, query_lens, *, block_table=None, index_q=None,
                      index_k_cache=None, block_size=128, top_k=16, local_blocks=1, sink_blocks=0, scale=None,
                      return_lse=False, return_indices=False):
    """MSA chunked prefill over a KV cache, as ``PrefillPlan.run`` computes it: ``q`` (total,
    Hq, D) packs the last ``query_lens[s]`` tokens of each sequence (their keys are in the
    cache); caches and ``block_table`` as in :func:`decode_attention`; ``index_q`` (total,
    Hkv, Di) packed like q."""
    q = np.asarray(q)
    cu_q = np.concatenate([[0], np.cumsum(np.asarray(query_lens, np.int64))])
    result = _cache_attention(q, None if index_q is None else np.asarray(index_q), cu_q, k_cache, v_cache,
                              index_k_cache, seq_lens, block_table, block_size=block_size, top_k=top_k,
                              local_blocks=local_blocks, sink_blocks=sink_blocks, scale=scale, return_lse=return_lse,
                              return_indices=return_indices)
    return result if len(result) > 1 else result[0]
