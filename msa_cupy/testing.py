"""Test kit for msa_cupy: inputs, tolerances and checks for tests, examples and benchmarks.

Inputs are drawn on the host with NumPy and rounded to the dtype the GPU sees, so that the
float64 oracle (``msa_cupy.reference``) reads exactly the values the kernels read; ``to_device``
uploads them to CuPy.  Arrays too large for the host (benchmarks) come from ``device_randn``.
Every generator draws fresh random values, never zeros.

Checks hold the GPU to the oracle as the tests do:

* attention output: relative Frobenius error ``||out - ref|| / ||ref||`` below ``TOLERANCE``
  (bfloat16 1e-2, float16 2e-3), lse within ``LSE_TOLERANCE``, no poisoned (NaN) element left;
* selection: block ids equal to the oracle's where its top-k cut is well separated; where a
  near-tie makes the index set ambiguous, a valid selection whose every pick scores within the
  float32 rounding bound (``score_tolerance``) of the oracle's weakest pick.

Functions taking a ``rng`` accept a NumPy ``Generator`` (host arrays) and, where they say so, a
CuPy one (device arrays).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from . import _interop, reference
from .diagnostics import _host as host  # NumPy view or copy of a NumPy, CuPy or PyTorch array
from .diagnostics import planted_needles  # planted data: each KV group has a needle block to find
from ._layout import Layout, query_positions, single_layout, uniform_layout, varlen_layout

__all__ = [
    "DTYPES", "TOLERANCE", "LSE_TOLERANCE", "ID_POISON", "SCORE_POISON", "SEQUENCE_KINDS",
    "dtype", "randn", "device_randn", "to_device", "host", "cu_seqlens", "sequence_lengths",
    "random_lengths", "lengths", "layout_of", "attention_inputs", "random_block_indices",
    "plausible_block_indices", "random_scores", "planted_needles", "rel_error", "assert_attention_close",
    "score_tolerance", "assert_ascending_then_pad", "assert_selection", "assert_selection_matches",
    "run_poisoned_twice",
]

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}  # ||out - ref|| / ||ref|| against the float64 oracle
LSE_TOLERANCE = 1e-3  # max |lse - ref| (natural log)
ID_POISON = -7  # fills int32 outputs before a run: not -1, not a block id
SCORE_POISON = 3.0e38  # fills float32 score outputs: finite, larger than any score
SEQUENCE_KINDS = ("chunk", "full", "decode", "empty", "one", "q_gt_k")
BLOCK_EDGES = (0, 1, 63, 64, 65, 127, 128, 129)  # key counts at block boundaries (Bk = 64, 128)
DEVICE_CHUNK = 1 << 28  # elements drawn in float32 at a time by device_randn: bounded temporaries

_ALIASES = {"f16": "float16", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def dtype(name) -> np.dtype:
    """np.dtype of "float16"/"f16"/"bfloat16"/"bf16" (or of a dtype)."""
    if isinstance(name, str):
        return DTYPES[_ALIASES.get(name, name)]
    return np.dtype(name)


def _dtype_key(dt) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype(dt)]


# --------------------------------------------------------------------------- arrays


def randn(rng, shape, dt, scale=1.0):
    """Random normal values rounded to dt (host, or device for a CuPy generator)."""
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(dtype(dt))


def device_randn(shape, dt, scale=1.0):
    """Random normal CuPy array in dt, drawn in float32 chunks (no full-size float32 copy)."""
    import cupy

    out = cupy.empty(int(np.prod(shape)), dtype(dt))
    for i in range(0, out.size, DEVICE_CHUNK):
        n = min(DEVICE_CHUNK, out.size - i)
        out[i:i + n] = (cupy.random.standard_normal(n, dtype=cupy.float32) * scale).astype(out.dtype)
    return out.reshape(shape)


def to_device(x):
    """CuPy copy of a host array (None stays None); dicts, lists and tuples item by item."""
    if isinstance(x, dict):
        return {name: to_device(value) for name, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(value) for value in x)
    if x is None:
        return None
    import cupy

    return cupy.asarray(x)


# --------------------------------------------------------------------------- sequences


def cu_seqlens(lengths) -> np.ndarray:
    """int32 offsets (len + 1) of consecutive sequences of the given lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)


def sequence_lengths(kind: str, integers, *, max_q: int, max_k: int):
    """(nq, nk) of one sequence of a kind of SEQUENCE_KINDS; integers(lo, hi) draws in [lo, hi].

    chunk: new queries at the end of a cache (nq <= nk); full: prefill (nq = nk); decode: 1-3
    queries; empty: no queries (and sometimes no keys); one: one query (sometimes one key);
    q_gt_k: more queries than keys (the first ones sit before key 0).
    """
    nk = integers(0, max_k)
    if kind == "chunk":
        return integers(0, min(nk, max_q)), nk
    if kind == "full":
        n = min(nk, max_q)
        return n, n
    if kind == "decode":
        return integers(1, 3), nk
    if kind == "empty":
        return 0, (0, nk)[integers(0, 1)]
    if kind == "one":
        return 1, (1, nk)[integers(0, 1)]
    if kind == "q_gt_k":
        nq = integers(0, min(40, max_q))
        return nq, integers(0, nq)
    raise ValueError(f"kind must be one of {SEQUENCE_KINDS}, got {kind!r}")


def random_lengths(rng, n_seq: int, *, max_q=160, max_k=700):
    """[(nq, nk)] of n_seq sequences of random kinds (NumPy generator)."""
    def integers(lo, hi):
        return int(rng.integers(lo, hi + 1))

    return [sequence_lengths(SEQUENCE_KINDS[integers(0, len(SEQUENCE_KINDS) - 1)], integers,
                             max_q=max_q, max_k=max_k) for _ in range(n_seq)]


def lengths(*, max_q=160, max_k=700, max_seqs=4):
    """Hypothesis strategy of [(nq, nk)]: 1..max_seqs sequences of random kinds, key counts
    often on block boundaries.  Needs hypothesis (a test dependency)."""
    from hypothesis import strategies as st

    @st.composite
    def draw_lengths(draw):
        edges = [n for n in BLOCK_EDGES if n <= max_k]

        def integers(lo, hi):
            if hi >= lo and lo == 0 and hi == max_k and draw(st.booleans()):
                return draw(st.sampled_from(edges))
            return draw(st.integers(lo, hi))

        n_seq = draw(st.integers(1, max_seqs))
        return [sequence_lengths(draw(st.sampled_from(SEQUENCE_KINDS)), integers, max_q=max_q, max_k=max_k)
                for _ in range(n_seq)]

    return draw_lengths()


def layout_of(q_shape, k_shape, cu_seqlens_q=None, cu_seqlens_k=None) -> Layout:
    """The Layout of a call: (B, Nq, ...) batched, (Nq, ...) one sequence, or varlen."""
    if cu_seqlens_q is not None:
        return varlen_layout(host(cu_seqlens_q), host(cu_seqlens_k))
    if len(q_shape) == 4:
        return uniform_layout(q_shape[0], q_shape[1], k_shape[1])
    return single_layout(q_shape[0], k_shape[0])


# --------------------------------------------------------------------------- problems


def paged_cache(cache, lens, page_size, rng, extra_pages=3):
    """The contiguous cache (B, S, H, D) as permuted pages (P, page_size, H, D) + an int32
    block table (B, pages) of the pages each sequence's ``lens`` keys need, -1 past them;
    ``extra_pages`` unused pages of noise among them."""
    batch = cache.shape[0]
    need = [-(-int(n) // page_size) for n in lens]
    n_pages = sum(need) + extra_pages
    ids = rng.permutation(n_pages)
    table = np.full((batch, max(max(need, default=1), 1) + 1), -1, np.int32)  # -1 past the used pages
    pages = randn(rng, (n_pages, page_size, *cache.shape[2:]), cache.dtype)  # unused rows: noise
    used = 0
    for s, n in enumerate(need):
        for p in range(n):
            pid = ids[used]
            used += 1
            table[s, p] = pid
            rows = cache[s, p * page_size:(p + 1) * page_size]
            pages[pid, :len(rows)] = rows
    return pages, table


def bits(x):
    """x (NumPy or CuPy) viewed as unsigned ints of its item size: equal bits compare equal, NaN
    included (bitwise checks of graph replays, paged against contiguous caches)."""
    xp = _interop.array_module(x)
    x = xp.asarray(x)
    return x.view({2: xp.uint16, 4: xp.uint32, 8: xp.uint64}[x.dtype.itemsize]) if x.dtype.kind in "fV" else x


def cache_case(p, q_prefix) -> dict:
    """Host inputs of a plan test from its drawn parameters ``p`` (seed, dtype, hkv, g, d, lens,
    batch, max_batch, max_len, learned, shared, page_size): q (*q_prefix, Hq, D), index_q
    (*q_prefix, Hkv, D) for a learned index, the K/V (and index-key) caches contiguous
    (max_batch, max_len, ...) or, with a page size, as permuted pages with a block table (the
    same page ids for all three), int32 lens."""
    rng = np.random.default_rng(p["seed"])
    dt = DTYPES[p["dtype"]]
    hq, hkv, d, b = p["hkv"] * p["g"], p["hkv"], p["d"], p["batch"]
    lens = np.array(p["lens"], np.int32)
    cache = (p["max_batch"], p["max_len"])
    k, v = randn(rng, (*cache, hkv, d), dt), randn(rng, (*cache, hkv, d), dt)
    case = dict(q=randn(rng, (*q_prefix, hq, d), dt), k=k, v=v, lens=lens, table=None,
                iq=randn(rng, (*q_prefix, hkv, d), dt) if p["learned"] else None,
                ik=randn(rng, (*cache, 1 if p["shared"] else hkv, d), dt) if p["learned"] else None)
    if p["page_size"]:
        for name in ("k", "v", "ik"):
            if case[name] is not None:
                pages, table = paged_cache(case[name][:b], lens, p["page_size"], np.random.default_rng(p["seed"] + 1))
                case[name], case["table"] = pages, table
    return case


def plan_options(p, case) -> dict:
    """The plan arguments (DecodePlan and PrefillPlan alike) of a :func:`cache_case` drawn from p."""
    return dict(max_batch=p["max_batch"], max_cache_len=p["max_len"], num_q_heads=p["hkv"] * p["g"],
                num_kv_heads=p["hkv"], head_dim=p["d"], dtype=p["dtype"], index_dim=p["d"] if p["learned"] else None,
                index_k_heads=1 if p["shared"] else p["hkv"], block_size=p["block"], top_k=p["top_k"],
                page_size=p["page_size"], num_pages=case["k"].shape[0] if p["page_size"] else None)


def run_plan(plan, dev, **kw):
    """plan.run on the device arrays of a :func:`cache_case`, with lse."""
    index = dict(index_q=dev["iq"], index_k_cache=dev["ik"]) if dev["iq"] is not None else {}
    return plan.run(dev["q"], dev["k"], dev["v"], return_lse=True, **index, **kw)


def attention_inputs(rng, seqs, *, n_kv_heads, group_size, head_dim, index_dim=None, dt="bfloat16",
                     shared_index_k=True, batched=False):
    """Random q, k, v, index_q, index_k (host, rounded to dt) and cu_seqlens for sequences seqs
    = [(nq, nk), ...]: varlen (total, H, D) with cu_seqlens_q/k, or with batched=True (all seqs
    equal) (B, N, H, D) with cu_seqlens None."""
    index_dim = head_dim if index_dim is None else index_dim
    hkv, hq = n_kv_heads, n_kv_heads * group_size
    if batched:
        if len(set(seqs)) != 1:
            raise ValueError(f"batched inputs need equal sequences, got {seqs}")
        qs, ks = (len(seqs), seqs[0][0]), (len(seqs), seqs[0][1])
        cu = dict(cu_seqlens_q=None, cu_seqlens_k=None)
    else:
        cu = dict(cu_seqlens_q=cu_seqlens([nq for nq, _ in seqs]), cu_seqlens_k=cu_seqlens([nk for _, nk in seqs]))
        qs, ks = (int(cu["cu_seqlens_q"][-1]),), (int(cu["cu_seqlens_k"][-1]),)
    return dict(q=randn(rng, (*qs, hq, head_dim), dt), k=randn(rng, (*ks, hkv, head_dim), dt),
                v=randn(rng, (*ks, hkv, head_dim), dt), index_q=randn(rng, (*qs, hkv, index_dim), dt),
                index_k=randn(rng, (*ks, 1 if shared_index_k else hkv, index_dim), dt), **cu)


def random_block_indices(rng, seqs, n_kv_heads, top_k, block_size, *, mode="random", causal=True):
    """int32 (total_q, Hkv, top_k) valid block ids of each query's own sequence, stacked over
    seqs = [(nq, nk), ...].  mode "random": unordered, repeats, 20% -1; "local": the same with
    the query's local block in a random slot (as a selector would put it); "all": every block
    of the sequence in random order, -1 padded (needs top_k >= the block count)."""
    parts = []
    for nq, nk in seqs:
        nb = -(-nk // block_size)
        shape = (nq, n_kv_heads, top_k)
        if nb == 0:
            parts.append(np.full(shape, -1, np.int32))
            continue
        if mode == "all":
            if top_k < nb:
                raise ValueError(f"mode 'all' needs top_k >= {nb} blocks, got {top_k}")
            ids = np.full(shape, -1, np.int32)
            ids[..., :nb] = rng.permutation(nb)
            parts.append(ids)
            continue
        ids = rng.integers(0, nb, size=shape).astype(np.int32)
        if mode == "local" and causal:
            local = np.clip(query_positions(nq, nk), 0, nk - 1) // block_size
            slot = rng.integers(0, top_k, size=(nq, n_kv_heads))
            np.put_along_axis(ids, slot[..., None],
                              np.broadcast_to(local[:, None, None], (nq, n_kv_heads, 1)).astype(np.int32), -1)
        elif mode not in ("random", "local"):
            raise ValueError(f"mode must be 'random', 'local' or 'all', got {mode!r}")
        ids[rng.random(ids.shape) < 0.2] = -1
        parts.append(ids)
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0, n_kv_heads, top_k), np.int32)


def plausible_block_indices(rng, nq, nk, n_kv_heads, top_k, block_size, *, n_seq=1):
    """int32 (n_seq * nq, Hkv, top_k) selections shaped like a causal selector's: the local
    block last, before it top_k - 1 distinct random earlier blocks, ascending (-1 where there
    are fewer), for n_seq sequences of nq queries over nk keys.  A CuPy generator gives a
    device array (benchmarks at 1M tokens)."""
    xp = reference._xp(rng)
    local = xp.asarray(query_positions(nq, nk) // block_size)
    local = xp.tile(local, n_seq)[:, None, None]
    r = xp.sort(rng.random((n_seq * nq, n_kv_heads, top_k - 1)), axis=-1)
    span = xp.maximum(local - (top_k - 1) + 1, 1)
    earlier = (r * span).astype(xp.int64) + xp.arange(top_k - 1)  # distinct: strictly increasing
    earlier = xp.where(earlier < local, earlier, -1)
    ids = xp.concatenate([earlier, xp.broadcast_to(local, (n_seq * nq, n_kv_heads, 1))], axis=-1)
    return xp.ascontiguousarray(ids.astype(xp.int32))


def random_scores(rng, shape, *, levels=0, specials=False):
    """float32 block scores: normals; levels > 0 rounds them to a few values (many exact ties);
    specials puts NaN, -inf and +inf at random places (5% each)."""
    scores = rng.standard_normal(shape).astype(np.float32)
    if levels:
        scores = np.round(scores * levels / 3).astype(np.float32)
    if specials and scores.size:
        flat = scores.reshape(-1)
        for value in (np.nan, -np.inf, np.inf):
            flat[rng.integers(0, flat.size, size=max(1, flat.size // 20))] = value
    return scores


# --------------------------------------------------------------------------- attention checks


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| (Frobenius, float64); out must be finite (no poison left)."""
    out, ref = host(out).astype(np.float64), host(ref).astype(np.float64)
    assert np.isfinite(out).all(), "non-finite values in the output (unwritten or poisoned elements)"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def assert_attention_close(out, ref_out, dt, lse=None, ref_lse=None):
    """out within TOLERANCE[dt] of the oracle; with lse: no NaN, -inf exactly where the oracle
    has it (and out = 0 there: a query that sees no key), elsewhere within LSE_TOLERANCE."""
    err = rel_error(out, ref_out)
    assert err < TOLERANCE[_dtype_key(dt)], f"relative error {err:.2e} >= {TOLERANCE[_dtype_key(dt)]:.0e} ({dt})"
    if lse is None:
        return
    lse, ref_lse = host(lse).astype(np.float64), host(ref_lse).astype(np.float64)
    assert not np.isnan(lse).any(), "unwritten (poisoned) lse elements"
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "rows with lse = -inf differ"
    assert np.all(host(out)[np.isneginf(ref_lse)] == 0), "queries that see no key must give 0"
    finite = np.isfinite(ref_lse)
    diff = np.abs(lse[finite] - ref_lse[finite]).max(initial=0.0)
    assert diff < LSE_TOLERANCE, f"lse differs by {diff:.2e}"


# --------------------------------------------------------------------------- selection checks


def score_tolerance(index_q, index_k) -> float:
    """Bound (with slack) on the float32 accumulation error of one index_q . index_k product."""
    iq, ik = host(index_q).astype(np.float64), host(index_k).astype(np.float64)
    di = iq.shape[-1]
    amax = float(np.abs(iq).max(initial=0)) * float(np.abs(ik).max(initial=0))
    return 4.0 * di * 6e-8 * amax * np.sqrt(di) + 1e-6


def assert_ascending_then_pad(ids):
    """Each row of block ids: valid ids strictly ascending, then -1 only."""
    ids = host(ids)
    for row in ids.reshape(-1, ids.shape[-1]) if ids.size else ():
        n = int(np.sum(row >= 0))
        assert np.all(row[:n] >= 0) and np.all(row[n:] == -1), f"ids not valid-first, then -1: {row.tolist()}"
        assert np.all(np.diff(row[:n]) > 0), f"valid ids not strictly ascending: {row.tolist()}"


def assert_selection(got, scores, positions, num_keys, *, tol, top_k, block_size, local_blocks=1,
                     sink_blocks=0, causal=True, first_row=0):
    """Block ids of rows of one sequence against float64 oracle scores.

    got (rows, Hkv, top_k) ids; scores (rows, Hkv, >= n_blocks) the oracle's block scores of
    those rows; positions (rows,) their key positions; num_keys the sequence's key count.  A row
    equal to the oracle's selection passes.  Otherwise the oracle's cut must be a near-tie (its
    weakest free pick within tol of the best block it left out), and got a valid selection:
    ascending then -1, as many ids, visible blocks only, every forced block, every free pick
    scoring within tol of the oracle's weakest.  first_row numbers rows in messages.
    """
    got = host(got)
    n_blocks = -(-num_keys // block_size)
    opts = dict(top_k=top_k, block_size=block_size, local_blocks=local_blocks, sink_blocks=sink_blocks,
                causal=causal)
    s = np.asarray(scores, np.float64)[..., :n_blocks]
    want = reference.sequence_topk(s, positions, num_keys, **opts)
    assert got.shape == want.shape, f"ids shape {got.shape}, expected {want.shape}"
    if np.array_equal(got, want):
        return
    visible, forced = reference._forced_and_visible(positions, num_keys, n_blocks, block_size, local_blocks,
                                                    sink_blocks, causal)
    for i, h in zip(*np.nonzero(np.any(got != want, axis=-1))):
        row, ref_row = got[i, h], want[i, h]
        valid = row[row >= 0]
        ctx = f"query {first_row + i} group {h}: got {row.tolist()}, oracle {ref_row.tolist()}"
        assert_ascending_then_pad(row)
        assert len(valid) == np.sum(ref_row >= 0), f"{ctx}: a different number of blocks"
        assert np.all(valid < n_blocks) and np.all(visible[i, valid]), f"{ctx}: a block the query cannot see"
        assert np.all(np.isin(np.nonzero(forced[i])[0], valid)), f"{ctx}: a forced block is missing"
        key = np.where(visible[i], np.nan_to_num(s[i, h], nan=-np.inf), -np.inf)
        free = np.where(forced[i], -np.inf, key)
        picked_ref = [b for b in ref_row[ref_row >= 0] if not forced[i, b]]
        assert picked_ref, ctx
        kth = min(free[b] for b in picked_ref)
        rest = np.sort(np.delete(free, picked_ref))[::-1]
        nxt = rest[0] if rest.size else -np.inf
        assert kth - nxt <= tol, f"{ctx}: the oracle's cut is separated by {kth - nxt} > tol {tol}"
        assert all(free[b] >= kth - tol for b in valid if not forced[i, b]), f"{ctx}: a pick below the cut"


def assert_selection_matches(got, index_q, index_k, *, top_k=16, block_size=128, local_blocks=1, sink_blocks=0,
                             causal=True, cu_seqlens_q=None, cu_seqlens_k=None, tol=None):
    """Block ids of a whole call (any layout) against the oracle's selection from index_q/index_k
    (host or CuPy), by assert_selection per sequence; tol defaults to score_tolerance."""
    iq, ik = host(index_q), host(index_k)
    layout = layout_of(iq.shape, ik.shape, cu_seqlens_q, cu_seqlens_k)
    tol = score_tolerance(iq, ik) if tol is None else tol
    got, iq, ik = layout.flatten(host(got)), layout.flatten(iq), layout.flatten(ik)
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0:
            continue
        positions = query_positions(nq, nk)
        scores = reference.sequence_block_scores(iq[q0:q0 + nq], ik[k0:k0 + nk], positions, block_size=block_size,
                                                 causal=causal)
        assert_selection(got[q0:q0 + nq], scores, positions, nk, tol=tol, top_k=top_k, block_size=block_size,
                         local_blocks=local_blocks, sink_blocks=sink_blocks, causal=causal, first_row=q0)


# --------------------------------------------------------------------------- runs


def run_poisoned_twice(fn, make_out, poison):
    """fn(out) twice into fresh CuPy buffers filled with poison; fn must return out.  Asserts the
    two results are bitwise identical and returns the first on the host."""
    import cupy

    results = []
    for _ in range(2):
        out = make_out()
        out.fill(poison)
        assert fn(out) is out, "the result must be written into the given out array"
        cupy.cuda.runtime.deviceSynchronize()
        results.append(cupy.asnumpy(out))
    assert np.array_equal(results[0].view(np.uint32), results[1].view(np.uint32)), "repeated runs differ"
    return results[0]
