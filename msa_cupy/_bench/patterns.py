"""Selection patterns of the prefill benchmarks, and the statistics that tell them apart.

The speed of sparse attention depends on how much neighbouring queries share their picks
(a query tile attends the union of its tokens' blocks), so every prefill figure names the
index pattern that produced its selection:

* ``random``: i.i.d. normal ``index_q`` per token (and ``index_k``): neighbouring queries
  share little beyond the local block.
* ``coherent``: ``index_q`` a moving average of i.i.d. normal noise over ``window`` tokens
  (default 512), scaled back to unit variance; ``index_k`` i.i.d.  Adjacent queries pick
  nearly the same blocks, as trained indexes do.
* ``needle``: the planted index of ``diagnostics.planted_needles`` (each group looks for its
  needle block and for recent keys; ``diagnostics.planted_needle_index``).

Statistics of a selection ``block_indices`` of one sequence ``(Nq, Hkv, k)`` (-1 unused,
repeated ids count once), computed where the array lives (NumPy or CuPy), in chunks of
queries so that 1M tokens need bounded memory:

* ``adjacent_overlap``: mean over queries t < Nq - 1 and groups of
  ``|picks(t) & picks(t + 1)| / k``;
* ``tile_union``: mean over tiles of ``tile`` consecutive queries (whole tiles) and groups of
  the number of distinct blocks the tile picks;
* ``selection_stats``: both, and the mean picks per (query, group), as benchmark fields.
"""
from __future__ import annotations

import numpy as np

from .. import _interop

PATTERNS = ("random", "coherent", "needle")
DEFAULT_PATTERNS = ("random", "coherent")
COHERENT_WINDOW = 512
STAT_TILES = (4, 8)  # query tiles of the union statistics (G = 16: 64- and 128-row tiles)
CHUNK_ROWS = 1 << 16  # queries per step of the generators and statistics (bounded temporaries)


def check_patterns(patterns) -> tuple:
    """patterns as a non-empty tuple of PATTERNS names, or TypeError/ValueError naming it."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not hasattr(patterns, "__iter__"):
        raise TypeError(f"patterns must be a sequence of names, got {type(patterns).__name__}")
    patterns = tuple(patterns)
    if not patterns:
        raise ValueError("patterns must name at least one pattern")
    for p in patterns:
        if p not in PATTERNS:
            raise ValueError(f"patterns must be among {PATTERNS}, got {p!r}")
    return patterns


# --------------------------------------------------------------------------- index generators


def index_inputs(rng, pattern, nq, nk, n_kv_heads, index_dim, dtype, *, window=COHERENT_WINDOW, block_size=128):
    """(index_q (nq, Hkv, Di), index_k (nk, 1, Di)) of one sequence whose nq queries are the
    last of its nk keys, drawn for ``pattern``; device arrays for a CuPy generator."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    xp = _interop.array_module(rng)
    if pattern == "needle":
        from ..diagnostics import planted_needle_index

        seed = int(rng.integers(0, 2**31 - 1))
        iq, ik = planted_needle_index(nk, n_kv_heads=n_kv_heads, index_dim=index_dim, block_size=block_size,
                                      seed=seed, dtype=dtype)
        return xp.asarray(iq[nk - nq:]), xp.asarray(ik)
    if pattern == "coherent":
        index_q = moving_average_noise(rng, nq, (n_kv_heads, index_dim), window, dtype)
    else:
        index_q = _normal(rng, (nq, n_kv_heads, index_dim), dtype)
    return index_q, _normal(rng, (nk, 1, index_dim), dtype)


def _normal(rng, shape, dtype):
    xp = _interop.array_module(rng)
    out = xp.empty(shape, dtype)
    for a in range(0, shape[0], CHUNK_ROWS):
        b = min(shape[0], a + CHUNK_ROWS)
        out[a:b] = rng.standard_normal((b - a, *shape[1:]), dtype=np.float32).astype(dtype)
    return out


def moving_average_noise(rng, n, shape, window, dtype):
    """(n, *shape) in dtype: row t is the sum of i.i.d. normal rows max(0, t - window + 1) .. t
    divided by the square root of their count (unit variance everywhere); float64 sums."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    xp = _interop.array_module(rng)
    out = xp.empty((n, *shape), dtype)
    tail = xp.zeros((0, *shape), np.float32)  # the window - 1 noise rows before the chunk
    for a in range(0, n, CHUNK_ROWS):
        b = min(n, a + CHUNK_ROWS)
        z = xp.concatenate([tail, rng.standard_normal((b - a, *shape), dtype=np.float32)])
        csum = xp.concatenate([xp.zeros((1, *shape)), xp.cumsum(z, axis=0, dtype=np.float64)])
        rows = xp.arange(len(tail), len(z))  # this chunk's rows of z: tokens a .. b - 1
        count = xp.minimum(xp.arange(a, b) + 1, window)
        sums = csum[rows + 1] - csum[rows + 1 - count]
        scaled = sums / xp.sqrt(count.astype(np.float64)).reshape(-1, *[1] * len(shape))
        out[a:b] = scaled.astype(np.float32).astype(dtype)  # through float32: the casts CuPy has for bf16
        tail = z[max(0, len(z) - (window - 1)):] if window > 1 else z[:0]
    return out


# --------------------------------------------------------------------------- statistics


def _distinct_sorted(ids, xp):
    """Rows sorted ascending, repeated ids replaced by -1 (each valid id once per row)."""
    s = xp.sort(ids, axis=-1)
    if s.shape[-1] > 1:
        rest = s[..., 1:]
        rest[rest == s[..., :-1]] = -1
    return s


def _count_distinct_sorted(s, xp):
    """Distinct values >= 0 per row of ascending rows."""
    first = (s[..., :1] >= 0).sum(axis=-1)
    return first + ((s[..., 1:] != s[..., :-1]) & (s[..., 1:] >= 0)).sum(axis=-1)


def _check(block_indices):
    if block_indices.ndim != 3:
        raise ValueError(f"block_indices must be (Nq, Hkv, k) of one sequence, got shape {block_indices.shape}")


def adjacent_overlap(block_indices) -> float:
    """Mean over queries t < Nq - 1 and groups of |picks(t) & picks(t + 1)| / k (0 for Nq < 2)."""
    _check(block_indices)
    xp = _interop.array_module(block_indices)
    nq, hkv, top_k = block_indices.shape
    if nq < 2:
        return 0.0
    common = 0
    for a in range(0, nq - 1, CHUNK_ROWS):
        b = min(nq - 1, a + CHUNK_ROWS)
        s = _distinct_sorted(block_indices[a:b + 1], xp)
        both = xp.sort(xp.concatenate([s[:-1], s[1:]], axis=-1), axis=-1)
        common += int(((both[..., 1:] == both[..., :-1]) & (both[..., 1:] >= 0)).sum())
    return common / ((nq - 1) * hkv * top_k)


def tile_union(block_indices, tile: int) -> float:
    """Mean over whole tiles of ``tile`` consecutive queries (one tile of all Nq when Nq < tile)
    and groups of the number of distinct blocks the tile picks."""
    _check(block_indices)
    xp = _interop.array_module(block_indices)
    nq, hkv, top_k = block_indices.shape
    if nq == 0:
        return 0.0
    tile = min(tile, nq)
    n_tiles = nq // tile
    total = 0
    step = max(tile, CHUNK_ROWS // tile * tile)
    for a in range(0, n_tiles * tile, step):
        b = min(n_tiles * tile, a + step)
        t = block_indices[a:b].reshape(-1, tile, hkv, top_k).transpose(0, 2, 1, 3).reshape(-1, hkv, tile * top_k)
        total += int(_count_distinct_sorted(xp.sort(t, axis=-1), xp).sum())
    return total / (n_tiles * hkv)


def mean_picks(block_indices) -> float:
    """Mean distinct valid picks per (query, group)."""
    _check(block_indices)
    xp = _interop.array_module(block_indices)
    nq, hkv, _ = block_indices.shape
    if nq == 0:
        return 0.0
    total = 0
    for a in range(0, nq, CHUNK_ROWS):
        total += int(_count_distinct_sorted(xp.sort(block_indices[a:a + CHUNK_ROWS], axis=-1), xp).sum())
    return total / (nq * hkv)


def selection_stats(block_indices, tiles=STAT_TILES) -> dict:
    """Benchmark fields of a selection: ``overlap`` (adjacent_overlap), ``picks`` (mean_picks)
    and ``union_t{T}`` (tile_union) for each T of tiles."""
    fields = dict(overlap=adjacent_overlap(block_indices), picks=mean_picks(block_indices))
    for t in tiles:
        fields[f"union_t{t}"] = tile_union(block_indices, t)
    return fields
