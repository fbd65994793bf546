"""Seeing the selection: what MSA keeps, what it loses, and what that saves.

Everything here runs on the host in float64 (GPU arrays are copied over with ``.get()``), on
the same layouts as the rest of the package: ``(B, N, H, D)``, one sequence ``(N, H, D)``, or
``(total, H, D)`` with ``cu_seqlens_q``/``cu_seqlens_k``.  Selections are ``block_indices``
``(..., Nq, Hkv, k)`` int32, read as sets per (query, group): -1 marks an unused slot.

The yardstick is the *oracle selection*: per query and group, the ``top_k`` key blocks that
hold the most true attention probability (softmax of the full dense attention over the
visible keys, averaged over the group's query heads).  Against it:

    block_recall             |oracle & selected| / |oracle|
    score_recall             mass(oracle & selected) / mass(oracle)
    attention_mass_captured  mass(selected), the probability the sparse softmax keeps
    compute_saved            1 - selected visible keys / visible keys (dense attention's work)

Each metric is defined per (query, group) row; it returns the mean over the rows where it is
defined (a query that sees no key has no oracle), or with ``per_query=True`` the rows
themselves, ``(..., Nq, Hkv)`` with NaN where undefined.  ``block_attention_mass`` computes
the masses once (the expensive, dense part); the metrics take them as an argument so that
sweeps over ``top_k`` reuse them, and ``recall_sweep`` runs such a sweep over top_k and block
size.  ``planted_needles`` builds a synthetic context whose groups each have a needle to find
(``planted_needle_index``: its index branch alone, for long contexts).

Choice about forced blocks: the oracle is pure attention mass; it forces nothing
(``local_blocks=0, sink_blocks=0`` by default), so a selection that spends a slot on a local
block that holds little mass shows up as lost recall.  Pass ``local_blocks=1`` to
``oracle_selection`` to compare against the best selection under MSA's own constraint.

Plots need matplotlib (an optional dependency, imported only inside the plotting
functions); they return a ``matplotlib.figure.Figure``, or draw into ``ax`` when given.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from . import _interop, reference
from ._layout import query_positions

__all__ = [
    "block_attention_mass", "oracle_selection", "selection_mask", "block_recall", "score_recall",
    "attention_mass_captured", "compute_saved", "recall_sweep", "planted_needles", "planted_needle_index",
    "plot_selection_map", "plot_group_difference", "plot_recall",
]

# dense pass: at most this many float64 logits live at once (32 MB)
_LOGITS_PER_CHUNK = 1 << 22


# --------------------------------------------------------------------------- inputs


def _host(x):
    """NumPy view of x: CuPy arrays come over with .get(), PyTorch through .cpu()."""
    if x is None or isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get") and not isinstance(x, dict):  # CuPy (and anything like it)
        return x.get()
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach().cpu()
        return x.float().numpy() if str(x.dtype) == "torch.bfloat16" else x.numpy()
    return np.asarray(x)


def _indices_layout(block_indices, num_keys, cu_seqlens_q, cu_seqlens_k):
    """Layout of a selection, as topk_blocks reads a score map: num_keys or cu_seqlens."""
    return _interop.topk_layout(block_indices, num_keys, _host(cu_seqlens_q), _host(cu_seqlens_k), name="block_indices")


def _check_indices(name, block_indices):
    block_indices = _host(block_indices)
    if not hasattr(block_indices, "dtype") or not np.issubdtype(block_indices.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of block ids (-1 = unused), got "
                        f"{getattr(block_indices, 'dtype', type(block_indices).__name__)}")
    if block_indices.ndim not in (3, 4):
        raise ValueError(f"{name} must be (..., Nq, Hkv, k) with 3 or 4 dimensions, got shape "
                         f"{tuple(block_indices.shape)}")
    if block_indices.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one slot in its last dim")
    _interop.check_block_range(block_indices, name=name)  # the upper bound needs a layout: compute_saved
    return block_indices


def selection_mask(block_indices, n_blocks: int):
    """Boolean (..., n_blocks) from (..., k) block ids: True where a block is selected.

    Duplicates count once; -1 entries are unused slots.
    """
    block_indices = _host(block_indices)
    if not hasattr(block_indices, "dtype") or not np.issubdtype(block_indices.dtype, np.integer):
        raise TypeError("block_indices must be an integer array of block ids (-1 = unused)")
    if block_indices.ndim < 1:
        raise ValueError("block_indices must have at least one dimension (the k slots)")
    n_blocks = _interop.check_int("n_blocks", n_blocks, minimum=0)
    _interop.check_block_range(block_indices, n_blocks)
    mask = np.zeros((*block_indices.shape[:-1], n_blocks + 1), bool)  # last column absorbs -1
    np.put_along_axis(mask, np.where(block_indices < 0, n_blocks, block_indices).astype(np.int64), True, axis=-1)
    return mask[..., :n_blocks]


def _reduce(values, per_query: bool):
    """Mean over the (query, group) rows where the metric is defined (NaN elsewhere)."""
    if per_query:
        return values
    defined = ~np.isnan(values)
    return float(values[defined].mean()) if defined.any() else math.nan


# --------------------------------------------------------------------------- true attention mass


def _sequence_block_mass(q, k, positions, block_size, causal, scale):
    """(Nq, Hq, D) x (Nk, Hkv, D) -> (Nq, Hkv, n_blocks): softmax mass per block, mean over the group."""
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    heads_per_group = hq // hkv
    block_size = min(block_size, max(nk, 1))  # a block longer than the keys is all of them: pad no further
    n_blocks = -(-nk // block_size)
    pad = n_blocks * block_size - nk
    n_visible = reference._visible_keys(positions, nk, causal)
    mass = np.zeros((nq, hkv, n_blocks))
    chunk = max(1, _LOGITS_PER_CHUNK // max(1, nk * heads_per_group))
    for g in range(hkv):
        keys_t = k[:, g, :].T  # (D, Nk)
        for r0 in range(0, nq, chunk):
            r1 = min(nq, r0 + chunk)
            rows = q[r0:r1, g * heads_per_group:(g + 1) * heads_per_group, :]  # (rows, G, D)
            logits = scale * (rows @ keys_t)  # (rows, G, Nk)
            visible = np.arange(nk)[None, None, :] < n_visible[r0:r1, None, None]
            logits = np.where(visible, logits, -np.inf)
            top = logits.max(axis=-1, keepdims=True, initial=-np.inf)
            p = np.where(visible, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
            total = p.sum(axis=-1, keepdims=True)
            p /= np.where(total > 0, total, 1.0)
            p = np.pad(p, ((0, 0), (0, 0), (0, pad)))
            mass[r0:r1, g] = p.reshape(r1 - r0, heads_per_group, n_blocks, block_size).sum(-1).mean(1)
    return mass


def block_attention_mass(q, k, *, block_size=128, causal=True, scale=None, cu_seqlens_q=None,
                         cu_seqlens_k=None):
    """float64 (..., Nq, Hkv, n_blocks): true attention probability per key block.

    For query i and group g: the softmax of ``scale * q[i, h] . k[j, g]`` over the keys
    visible to i (dense attention, no selection), summed over the keys of each block, then
    averaged over the group's query heads h.  Rows sum to 1 (0 for a query that sees no key);
    blocks a query cannot see hold 0.  Costs one dense attention pass, done in row chunks.
    """
    q, k = _host(q), _host(k)
    block_size = _interop.check_block_size(block_size, gpu=False)
    layout, hq, hkv, d = _interop.check_qkv(q, k, k, _host(cu_seqlens_q), _host(cu_seqlens_k), gpu=False)
    scale = _interop.check_scale(scale, d)
    qf, kf = layout.flatten(q).astype(np.float64), layout.flatten(k).astype(np.float64)
    n_blocks = layout.n_blocks(block_size)
    mass = np.zeros((layout.total_q, hkv, n_blocks))
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0 or nk == 0:
            continue
        m = _sequence_block_mass(qf[q0:q0 + nq], kf[k0:k0 + nk], query_positions(nq, nk), block_size,
                                 causal, scale)
        mass[q0:q0 + nq, :, :m.shape[-1]] = m
    return layout.unflatten(mass)


def oracle_selection(q, k, *, top_k=16, block_size=128, causal=True, scale=None, local_blocks=0,
                     sink_blocks=0, cu_seqlens_q=None, cu_seqlens_k=None, block_mass=None):
    """int32 (..., Nq, Hkv, top_k): per query and group, the top_k blocks with the most true mass.

    Same rules as ``reference.topk_blocks`` applied to ``block_attention_mass`` instead of index
    scores: ascending ids, -1 padding, only visible blocks, ties to the lower block id, every
    visible block when a query sees top_k blocks or fewer.  Nothing is forced by default (see the
    module docstring); ``local_blocks``/``sink_blocks`` force blocks as MSA does.
    ``block_mass``: the result of ``block_attention_mass`` with the same arguments, to skip the
    dense pass when sweeping top_k.
    """
    q, k = _host(q), _host(k)
    cu_q, cu_k = _host(cu_seqlens_q), _host(cu_seqlens_k)
    top_k, block_size, local_blocks, sink_blocks = _interop.check_selection_options(
        top_k, block_size, local_blocks, sink_blocks, gpu=False)
    layout, _, hkv, _ = _interop.check_qkv(q, k, k, cu_q, cu_k, gpu=False)
    if block_mass is None:
        block_mass = block_attention_mass(q, k, block_size=block_size, causal=causal, scale=scale,
                                          cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    block_mass = np.asarray(_host(block_mass), np.float64)
    want = (*layout.query_shape, hkv,
            layout.n_blocks(block_size))
    if block_mass.shape != want:
        raise ValueError(f"block_mass must have shape {want} (block_attention_mass of q, k with "
                         f"block_size={block_size}), got {block_mass.shape}")
    num_keys = None if cu_q is not None else layout.max_k
    return reference.topk_blocks(block_mass, top_k=top_k, block_size=block_size, num_keys=num_keys,
                                 local_blocks=local_blocks, sink_blocks=sink_blocks, causal=causal,
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


# --------------------------------------------------------------------------- metrics


def _masks(block_indices, oracle_indices, block_mass=None):
    block_indices = _check_indices("block_indices", block_indices)
    oracle_indices = _check_indices("oracle_indices", oracle_indices)
    if block_indices.shape[:-1] != oracle_indices.shape[:-1]:
        raise ValueError(f"block_indices and oracle_indices must agree on (..., Nq, Hkv), got "
                         f"{tuple(block_indices.shape)} and {tuple(oracle_indices.shape)}")
    if block_mass is not None:
        n_blocks = block_mass.shape[-1]
    else:
        n_blocks = int(max(block_indices.max(initial=-1), oracle_indices.max(initial=-1))) + 1
    return selection_mask(block_indices, n_blocks), selection_mask(oracle_indices, n_blocks)


def _check_mass(block_mass, block_indices):
    block_mass = np.asarray(_host(block_mass), np.float64)
    block_indices = _host(block_indices)
    if block_mass.shape[:-1] != block_indices.shape[:-1]:
        raise ValueError(f"block_mass {tuple(block_mass.shape)} and block_indices {tuple(block_indices.shape)} "
                         f"must agree on (..., Nq, Hkv)")
    return block_mass


def block_recall(block_indices, oracle_indices, *, per_query=False):
    """|oracle & selected| / |oracle| per (query, group); the mean over rows unless per_query.

    Rows whose oracle is empty (the query sees no key) are NaN and left out of the mean.
    """
    selected, oracle = _masks(block_indices, oracle_indices)
    n_oracle = oracle.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_oracle > 0, (selected & oracle).sum(-1) / n_oracle, np.nan)
    return _reduce(recall, per_query)


def score_recall(block_indices, oracle_indices, block_mass, *, per_query=False):
    """Attention mass of the selected oracle blocks over the mass of all oracle blocks.

    Weighs block recall by how much each oracle block matters: missing a block that holds
    little mass costs little.  NaN (left out of the mean) where the oracle holds no mass.
    """
    block_mass = _check_mass(block_mass, block_indices)
    selected, oracle = _masks(block_indices, oracle_indices, block_mass)
    oracle_mass = np.where(oracle, block_mass, 0.0).sum(-1)
    kept = np.where(oracle & selected, block_mass, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(oracle_mass > 0, kept / oracle_mass, np.nan)
    return _reduce(recall, per_query)


def attention_mass_captured(block_indices, block_mass, *, per_query=False):
    """Probability mass of dense attention that falls in the selected blocks (mean over heads).

    1 for a selection of every visible block; what the sparse softmax renormalises away is
    ``1 - captured``.  NaN (left out of the mean) for queries that see no key.
    """
    block_mass = _check_mass(block_mass, block_indices)
    selected = selection_mask(block_indices, block_mass.shape[-1])
    captured = np.where(selected, block_mass, 0.0).sum(-1)
    total = block_mass.sum(-1)
    return _reduce(np.where(total > 0, np.minimum(captured, 1.0), np.nan), per_query)


def compute_saved(block_indices, *, block_size=128, num_keys=None, causal=True, cu_seqlens_q=None,
                  cu_seqlens_k=None, per_query=False):
    """1 - (selected visible keys) / (visible keys): the share of dense attention's work skipped.

    Layout as ``topk_blocks`` reads it: ``num_keys`` for a batch or one sequence, or
    ``cu_seqlens_q``/``cu_seqlens_k`` for varlen.  The total (unless per_query) is the ratio of
    sums over all (query, group) rows, so long rows weigh more; ``1 / (1 - saved)`` is the
    reduction in attention FLOPs.  Per row it is NaN where a query sees no key.
    """
    block_indices = _check_indices("block_indices", block_indices)
    block_size = _interop.check_block_size(block_size, gpu=False)
    layout = _indices_layout(block_indices, num_keys, cu_seqlens_q, cu_seqlens_k)
    flat = layout.flatten(block_indices)
    _interop.check_block_ids(flat, layout, block_size)
    groups = flat.shape[-2]
    selected_keys = np.zeros((layout.total_q, groups))
    visible_keys = np.zeros((layout.total_q, groups))
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0:
            continue
        n_blocks = -(-nk // block_size)
        rows = flat[q0:q0 + nq]
        n_visible = reference._visible_keys(query_positions(nq, nk), nk, causal)  # (nq,)
        block_start = np.arange(n_blocks) * block_size
        # visible keys of each block per query: clip(n_visible - start, 0, block_size)
        per_block = np.clip(n_visible[:, None] - block_start[None, :], 0, block_size)  # (nq, n_blocks)
        mask = selection_mask(rows, n_blocks)  # (nq, G, n_blocks)
        selected_keys[q0:q0 + nq] = (mask * per_block[:, None, :]).sum(-1)
        visible_keys[q0:q0 + nq] = n_visible[:, None]
    if per_query:
        with np.errstate(invalid="ignore", divide="ignore"):
            saved = np.where(visible_keys > 0, 1.0 - selected_keys / visible_keys, np.nan)
        return layout.unflatten(saved)
    total = visible_keys.sum()
    return float(1.0 - selected_keys.sum() / total) if total > 0 else math.nan


def recall_sweep(q, k, index_q, index_k, *, top_k=(4, 8, 16), block_size=(64, 128), causal=True,
                 scale=None, local_blocks=1, sink_blocks=0, cu_seqlens_q=None, cu_seqlens_k=None):
    """Selection quality over a grid of top_k x block_size, for recall-vs-k / vs-block-size plots.

    Selects with the index branch (``reference.block_scores`` + ``topk_blocks``) and measures it
    against the oracle at the same top_k and block size.  Returns a list of dicts with keys
    ``top_k, block_size, block_recall, score_recall, mass_captured, oracle_mass, compute_saved``
    (``oracle_mass``: the mass the oracle itself captures, the ceiling for ``mass_captured``).
    Pairs where the forced blocks exceed top_k are skipped.
    """
    q, k, index_q, index_k = (_host(x) for x in (q, k, index_q, index_k))
    cu_q, cu_k = _host(cu_seqlens_q), _host(cu_seqlens_k)
    top_ks = (top_k,) if np.isscalar(top_k) else tuple(top_k)
    block_sizes = (block_size,) if np.isscalar(block_size) else tuple(block_size)
    layout, _, _, _ = _interop.check_qkv(q, k, k, cu_q, cu_k, gpu=False)
    num_keys = None if cu_q is not None else layout.max_k
    records = []
    for bs in block_sizes:
        mass = block_attention_mass(q, k, block_size=bs, causal=causal, scale=scale, cu_seqlens_q=cu_q,
                                    cu_seqlens_k=cu_k)
        scores = reference.block_scores(index_q, index_k, block_size=bs, causal=causal, cu_seqlens_q=cu_q,
                                        cu_seqlens_k=cu_k)
        for kk in top_ks:
            if local_blocks + sink_blocks > kk:
                continue
            selected = reference.topk_blocks(scores, top_k=kk, block_size=bs, num_keys=num_keys,
                                             local_blocks=local_blocks, sink_blocks=sink_blocks, causal=causal,
                                             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
            oracle = oracle_selection(q, k, top_k=kk, block_size=bs, causal=causal, scale=scale,
                                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_mass=mass)
            records.append(dict(
                top_k=int(kk), block_size=int(bs),
                block_recall=block_recall(selected, oracle),
                score_recall=score_recall(selected, oracle, mass),
                mass_captured=attention_mass_captured(selected, mass),
                oracle_mass=attention_mass_captured(oracle, mass),
                compute_saved=compute_saved(selected, block_size=bs, num_keys=num_keys, causal=causal,
                                            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
            ))
    return records


# --------------------------------------------------------------------------- synthetic inputs


def planted_needles(n_tokens=2048, *, n_kv_heads=4, heads_per_group=2, head_dim=64, block_size=64,
                    needle_blocks=None, needle_tokens=4, needle_strength=5.0, local_strength=3.0, query_noise=0.25,
                    local_length=64.0, seed=0, dtype=np.float16):
    """A synthetic context where each group must find its own needle block.

    Keys and queries are noise plus a slowly drifting "position" component (so true attention
    favours recent keys, as real attention does).  Group g gets a random unit direction u_g,
    planted with ``needle_strength * sqrt(head_dim)`` into ``needle_tokens`` keys of block
    ``needle_blocks[g]`` of its KV head; its query heads point along u_g.  So each group's
    dense attention puts a large share of its mass on its needle block, a different block per
    group.  Returns a dict: ``q, k, v`` (one sequence, ``(N, H, D)``), ``needle_blocks``,
    ``needle_positions`` (per group, the planted key positions), ``directions`` (Hkv, D) and
    ``learned_index`` = (index_q (N, Hkv, Di), index_k (N, 1, Di)): a planted "learned" index
    branch with one shared key head, whose coordinates say which needle a key holds plus the
    same drifting position signal, as a trained index would learn to.
    """
    rng = np.random.default_rng(seed)
    needle_blocks = _needle_blocks(needle_blocks, n_tokens, n_kv_heads, head_dim, block_size)
    d = head_dim
    hq = n_kv_heads * heads_per_group
    directions, walk = _drift_walk(rng, n_tokens, d, n_kv_heads, local_length)
    k = rng.standard_normal((n_tokens, n_kv_heads, d)) + math.sqrt(d) * walk[:, None, :]
    q = rng.standard_normal((n_tokens, hq, d)) * query_noise + local_strength * walk[:, None, :]
    v = rng.standard_normal((n_tokens, n_kv_heads, d))
    needle_positions = _needle_positions(rng, needle_blocks, block_size, n_tokens, needle_tokens)
    for g, pos in enumerate(needle_positions):
        k[pos, g, :] += needle_strength * math.sqrt(d) * directions[g]
        q[:, g * heads_per_group:(g + 1) * heads_per_group, :] += directions[g]
    return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), needle_blocks=needle_blocks,
                needle_positions=needle_positions, directions=directions,
                learned_index=_planted_index(rng, walk, needle_positions, n_kv_heads, dtype), block_size=block_size)


def planted_needle_index(n_tokens=2048, *, n_kv_heads=4, index_dim=128, block_size=128, needle_blocks=None,
                         needle_tokens=4, local_length=64.0, seed=0, dtype=np.float16):
    """The index branch of ``planted_needles`` alone, for long contexts (no q, k, v): index_q
    (N, Hkv, index_dim) and index_k (N, 1, index_dim).  Each group's index queries look for
    their needle block and for recent keys (the drifting position signal), so neighbouring
    queries pick nearly the same blocks: a selection pattern for benchmarks."""
    rng = np.random.default_rng(seed)
    needle_blocks = _needle_blocks(needle_blocks, n_tokens, n_kv_heads, index_dim, block_size)
    _, walk = _drift_walk(rng, n_tokens, index_dim, n_kv_heads, local_length)
    needle_positions = _needle_positions(rng, needle_blocks, block_size, n_tokens, needle_tokens)
    return _planted_index(rng, walk, needle_positions, n_kv_heads, dtype)


def _needle_blocks(needle_blocks, n_tokens, n_kv_heads, head_dim, block_size):
    n_blocks = -(-n_tokens // block_size)
    if needle_blocks is None:
        # spread over the first half of the context, away from block 0 and from each other
        needle_blocks = np.linspace(1, max(1, n_blocks // 2), n_kv_heads).round().astype(int)
    needle_blocks = np.asarray(needle_blocks, int)
    if head_dim <= n_kv_heads:
        raise ValueError(f"head_dim ({head_dim}) must exceed n_kv_heads ({n_kv_heads}): the planted index keeps "
                         f"one coordinate per needle and the rest for position")
    if needle_blocks.shape != (n_kv_heads,) or needle_blocks.min() < 0 or needle_blocks.max() >= n_blocks:
        raise ValueError(f"needle_blocks must hold {n_kv_heads} block ids in [0, {n_blocks}), got {needle_blocks}")
    return needle_blocks


def _drift_walk(rng, n_tokens, d, n_kv_heads, local_length):
    """Random unit needle directions (Hkv, d) and the drifting position component (N, d): a
    stationary AR(1) walk on the unit sphere whose correlation between tokens i and j is about
    exp(-|i - j| / local_length) (nearby keys look alike), orthogonal to the directions."""
    directions = rng.standard_normal((n_kv_heads, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rho = math.exp(-1.0 / local_length)
    walk = rng.standard_normal((n_tokens, d))
    walk[1:] *= math.sqrt(1 - rho * rho)
    # walk[t] = rho * walk[t - 1] + step: by doubling, walk[t] = sum_i rho^i step[t - i] over
    # ever longer spans, until rho^span no longer shows in float64
    span, decay = 1, rho
    while span < n_tokens and decay > 1e-20:
        walk[span:] += decay * walk[:-span]
        span, decay = 2 * span, decay * decay
    # position and content live in separate subspaces: no query drifts toward a needle by chance
    basis, _ = np.linalg.qr(directions.T)  # (D, Hkv) orthonormal span of the needle directions
    walk -= (walk @ basis) @ basis.T
    walk /= np.linalg.norm(walk, axis=1, keepdims=True)
    return directions, walk


def _needle_positions(rng, needle_blocks, block_size, n_tokens, needle_tokens):
    positions = []
    for b in needle_blocks:
        start = b * block_size
        span = min(block_size, n_tokens - start)
        pos = start + rng.choice(span, size=min(needle_tokens, span), replace=False)
        pos.sort()
        positions.append(pos)
    return positions


def _planted_index(rng, walk, needle_positions, n_kv_heads, dtype):
    """Planted learned-style index (index_q, index_k): coordinate g marks "holds needle g",
    the rest carry the position walk (built in float32: long contexts)."""
    n_tokens, di = walk.shape
    index_k = np.zeros((n_tokens, 1, di), np.float32)
    index_q = np.zeros((n_tokens, n_kv_heads, di), np.float32)
    index_k[:, 0, n_kv_heads:] = walk[:, n_kv_heads:]
    index_q[:, :, n_kv_heads:] = walk[:, None, n_kv_heads:]
    for g, pos in enumerate(needle_positions):
        index_k[pos, 0, g] = 4.0
        index_q[:, g, g] = 1.0
    index_k += 0.05 * rng.standard_normal(index_k.shape, dtype=np.float32)
    return index_q.astype(dtype), index_k.astype(dtype)


# --------------------------------------------------------------------------- plots


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "msa_cupy.diagnostics plots need matplotlib: pip install matplotlib "
            "(the metrics work without it)"
        ) from exc


def _axes(ax, figsize):
    """The caller's axes, or a new Figure (not registered with pyplot: no global state)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _one_sequence(name, block_indices, sequence):
    """(Nq, Hkv, k) of one sequence from (Nq, Hkv, k) or (B, Nq, Hkv, k)."""
    block_indices = _check_indices(name, block_indices)
    if block_indices.ndim == 4:
        if not 0 <= sequence < block_indices.shape[0]:
            raise ValueError(f"sequence must be in [0, {block_indices.shape[0]}), got {sequence}")
        return block_indices[sequence]
    return block_indices


def _group_map(block_indices, group, n_blocks):
    groups = block_indices.shape[-2]
    if not 0 <= group < groups:
        raise ValueError(f"group must be in [0, {groups}), got {group}")
    return selection_mask(block_indices[:, group, :], n_blocks)


def _n_blocks(n_blocks, *arrays):
    if n_blocks is not None:
        return int(n_blocks)
    return int(max(a.max(initial=-1) for a in arrays if a is not None)) + 1


def _invisible(nq, n_blocks, num_keys, block_size, causal):
    """(Nq, n_blocks) True where no key of the block is visible to the query."""
    if num_keys is None or not causal:
        return None
    n_visible = reference._visible_keys(query_positions(nq, num_keys), num_keys, causal)
    return np.arange(n_blocks)[None, :] * block_size >= n_visible[:, None]


def _block_axes(ax, nq):
    ax.set_xlabel("key block")
    ax.set_ylabel("query token")
    ax.set_ylim(nq - 0.5, -0.5)


def plot_selection_map(block_indices, *, group=0, sequence=0, oracle_indices=None, n_blocks=None,
                       num_keys=None, block_size=128, causal=True, title=None, legend=True, ax=None):
    """Queries x key blocks map of one group's selection (one sequence), as an image.

    ``block_indices``: (Nq, Hkv, k) or (B, Nq, Hkv, k) (``sequence`` picks the batch entry;
    for varlen, slice the rows of one sequence first).  With ``oracle_indices`` the map has
    three colours: selected and in the oracle, selected only, missed (oracle only).  With
    ``num_keys`` (and block_size) blocks the query cannot see are greyed.  Returns the Figure.
    """
    _require_matplotlib()
    rows = _one_sequence("block_indices", block_indices, sequence)
    oracle_rows = None if oracle_indices is None else _one_sequence("oracle_indices", oracle_indices, sequence)
    if num_keys is not None and n_blocks is None:
        n_blocks = -(-int(num_keys) // block_size)
    n_blocks = _n_blocks(n_blocks, rows, oracle_rows)
    selected = _group_map(rows, group, n_blocks)
    nq = selected.shape[0]
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, ax = _axes(ax, (5.0, 4.0))
    if oracle_rows is None:
        codes = selected.astype(int)  # 0 not selected, 1 selected
        colors, labels = ["white", "#1f4e9c"], ["not selected", "selected"]
    else:
        oracle = _group_map(oracle_rows, group, n_blocks)
        codes = np.select([selected & oracle, selected, oracle], [1, 2, 3], 0)
        colors = ["white", "#1f4e9c", "#f2a541", "#d62728"]
        labels = ["not selected", "selected, in oracle", "selected, not in oracle", "missed oracle block"]
    invisible = _invisible(nq, n_blocks, num_keys, block_size, causal)
    if invisible is not None:
        codes = np.where(invisible & (codes == 0), len(colors), codes)
        colors, labels = colors + ["#e6e6e6"], labels + ["not visible (causal)"]
    ax.imshow(codes, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(colors) - 0.5, aspect="auto",
              interpolation="nearest", extent=(-0.5, n_blocks - 0.5, nq - 0.5, -0.5))
    _block_axes(ax, nq)
    ax.set_title(title if title is not None else f"group {group}: selected key blocks")
    if legend:
        ax.legend(handles=[Patch(facecolor=c, edgecolor="0.5", label=l) for c, l in zip(colors, labels)],
                  loc="upper right", fontsize="x-small", framealpha=0.9)
    return fig


def plot_group_difference(block_indices, *, group_a=0, group_b=1, sequence=0, n_blocks=None, title=None,
                          ax=None):
    """Where two groups' selections differ: +1 only group_a picks the block, -1 only group_b.

    Same inputs as ``plot_selection_map``.  Blocks both groups pick (the forced local block,
    usually) vanish, so what is left is what makes the selection group-specific.
    """
    _require_matplotlib()
    rows = _one_sequence("block_indices", block_indices, sequence)
    n_blocks = _n_blocks(n_blocks, rows)
    diff = _group_map(rows, group_a, n_blocks).astype(int) - _group_map(rows, group_b, n_blocks).astype(int)
    nq = diff.shape[0]
    fig, ax = _axes(ax, (5.0, 4.0))
    image = ax.imshow(diff, cmap="coolwarm_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest",
                      extent=(-0.5, n_blocks - 0.5, nq - 0.5, -0.5))
    bar = fig.colorbar(image, ax=ax, ticks=[-1, 0, 1])
    bar.ax.set_yticklabels([f"only g{group_b}", "same", f"only g{group_a}"])
    _block_axes(ax, nq)
    ax.set_title(title if title is not None else f"group {group_a} minus group {group_b}")
    return fig


_METRIC_LABELS = {
    "block_recall": "block recall",
    "score_recall": "score recall",
    "mass_captured": "attention mass captured",
    "oracle_mass": "oracle mass (ceiling)",
    "compute_saved": "compute saved",
}


def plot_recall(records, *, x="top_k", metrics=("block_recall", "score_recall", "mass_captured"), title=None,
                ax=None):
    """Recall against top_k (``x="top_k"``, one line per block size) or against block size
    (``x="block_size"``, one line per top_k), from the records of ``recall_sweep``."""
    _require_matplotlib()
    if x not in ("top_k", "block_size"):
        raise ValueError(f'x must be "top_k" or "block_size", got {x!r}')
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in _METRIC_LABELS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {sorted(_METRIC_LABELS)}")
    records = list(records)
    if not records:
        raise ValueError("records is empty: run recall_sweep first")
    series = "block_size" if x == "top_k" else "top_k"
    fig, ax = _axes(ax, (5.5, 3.6))
    styles = ["-o", "--s", ":^", "-.d", "-x"]
    colors = [f"C{i}" for i in range(10)]
    for value, color in zip(sorted({r[series] for r in records}), itertools.cycle(colors)):
        rows = sorted((r for r in records if r[series] == value), key=lambda r: r[x])
        xs = [r[x] for r in rows]
        for metric, style in zip(metrics, itertools.cycle(styles)):
            label = f"{_METRIC_LABELS[metric]}, {series.replace('_', ' ')} {value}"
            ax.plot(xs, [r[metric] for r in rows], style, color=color, label=label, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r[x] for r in records}))
    ax.set_xticklabels([str(v) for v in sorted({r[x] for r in records})])
    ax.set_xlabel("top_k (blocks per query)" if x == "top_k" else "block size (keys)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title(title if title is not None else f"selection quality against {x.replace('_', ' ')}")
    return fig
