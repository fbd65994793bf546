"""NaN and Inf in q, k, v (README, "NaN and Inf"): the reference against the rule.

The rule: a query's out and lse depend only on the keys it sees (visible, in its selected
blocks); a NaN or Inf in k or v of a key it does not see never reaches it.  Over the keys it
sees, non-finite values follow dense softmax attention: a NaN score (NaN in q or k) or a +inf
score makes the whole row and its lse NaN, a -inf score gives the key weight 0, and a NaN or
Inf in v at dim d makes out[..., d] non-finite and nothing else.

``planted_case`` and ``expected_nonfinite`` are shared with tests/test_nonfinite_gpu.py: the
expected set of non-finite elements is derived here from the rule alone (which keys each query
sees, the sign of q at an infinite k), not from any implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from msa_cupy import reference as R


def seen_keys(block_indices, nq: int, nk: int, block_size: int, causal: bool):
    """(Nq, Hkv, Nk) bool: query i sees key j when j's block is among its picks and j is
    visible (causal, bottom-right: j <= Nk - Nq + i)."""
    hkv = block_indices.shape[1]
    seen = np.zeros((nq, hkv, nk), bool)
    for i in range(nq):
        last = nk - nq + i if causal else nk - 1
        for g in range(hkv):
            for b in {int(x) for x in block_indices[i, g] if x >= 0}:
                lo, hi = b * block_size, min((b + 1) * block_size, nk, last + 1)
                seen[i, g, lo:max(lo, hi)] = True
    return seen


@dataclass
class Plant:
    """One non-finite value: tensor 'q', 'k' or 'v'; index (token, head, dim); value."""
    tensor: str
    token: int
    head: int
    dim: int
    value: float


@dataclass
class Case:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    block_indices: np.ndarray
    block_size: int
    causal: bool
    scale: float
    plants: list = field(default_factory=list)

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def poisoned(self):
        """(q, k, v) copies with the plants written in."""
        arrays = {"q": self.q.copy(), "k": self.k.copy(), "v": self.v.copy()}
        for p in self.plants:
            arrays[p.tensor][p.token, p.head, p.dim] = p.value
        return arrays["q"], arrays["k"], arrays["v"]


def expected_nonfinite(case: Case):
    """(out (Nq, Hq, D), lse (Nq, Hq)) bool masks of the elements the rule makes non-finite."""
    nq, hq, d = case.q.shape
    nk = case.k.shape[0]
    seen = seen_keys(case.block_indices, nq, nk, case.block_size, case.causal)
    out = np.zeros((nq, hq, d), bool)
    lse = np.zeros((nq, hq), bool)
    sees_any = seen.any(axis=-1)
    for p in case.plants:
        if p.tensor == "q":  # every score of the row is NaN (or +-inf: then at least one +inf)
            g = p.head // case.group
            if sees_any[p.token, g]:
                out[p.token, p.head] = lse[p.token, p.head] = True
            continue
        heads = range(p.head * case.group, (p.head + 1) * case.group)
        for h in heads:
            rows = seen[:, p.head, p.token]
            if p.tensor == "v":
                out[rows, h, p.dim] = True
            elif math.isnan(p.value):  # NaN score
                out[rows, h] = True
                lse[rows, h] = True
            else:  # infinite score, its sign that of q: +inf -> NaN row, -inf -> weight 0
                positive = rows & (np.sign(case.q[:, h, p.dim].astype(np.float64)) * np.sign(p.value) > 0)
                out[positive, h] = True
                lse[positive, h] = True
    return out, lse


def _picks(rng, nq, nk, hkv, top_k, block_size, causal, avoid):
    """Random picks with the local block in a random slot, never block `avoid` for even
    queries (so that the block is unselected for some queries and selected for others)."""
    nb = -(-nk // block_size)
    ids = rng.integers(0, nb, size=(nq, hkv, top_k)).astype(np.int32)
    positions = np.arange(nq) + nk - nq
    local = np.clip(positions, 0, nk - 1) // block_size if causal else rng.integers(0, nb, nq)
    slot = rng.integers(0, top_k, size=(nq, hkv))
    np.put_along_axis(ids, slot[..., None], np.broadcast_to(local[:, None, None], (nq, hkv, 1)).astype(np.int32), -1)
    even = (np.arange(nq) % 2 == 0)[:, None, None]
    ids = np.where(even & (ids == avoid) & (local[:, None, None] != avoid), -1, ids)
    ids[rng.random(ids.shape) < 0.1] = -1
    return ids.astype(np.int32)


def planted_case(rng, *, nq, nk, hkv, group, d, block_size, top_k, causal, dtype=np.float64, kinds=("v", "k", "q")):
    """A random problem with one non-finite value of each kind in `kinds`:

    v: NaN at a key in the middle of the last query's block (later than the block's first
       queries: invisible to them under causal), +inf at a key of block 1, which even
       queries never pick (an unselected block for them), and -inf at key 0 (seen by the
       queries that pick block 0; a gather that fills unused slots with key 0 leaks it);
    k: NaN at a key of block 0 (seen by the queries that pick it and are past it), and +inf
       at one dim of a key of the last block (its score is +-inf by the sign of q);
    q: NaN at one element of a middle query.
    """
    hq = hkv * group
    q = rng.standard_normal((nq, hq, d)).astype(dtype)
    k = rng.standard_normal((nk, hkv, d)).astype(dtype)
    v = rng.standard_normal((nk, hkv, d)).astype(dtype)
    nb = -(-nk // block_size)
    unselected = min(1, nb - 1)
    bi = _picks(rng, nq, nk, hkv, top_k, block_size, causal, avoid=unselected)
    last = nb - 1
    mid_last = min(last * block_size + block_size // 2, nk - 1)
    plants = []
    if "v" in kinds:
        plants += [Plant("v", mid_last, 0, 3 % d, np.nan),
                   Plant("v", unselected * block_size + block_size // 3, hkv - 1, 5 % d, np.inf),
                   Plant("v", 0, hkv - 1, 4 % d, -np.inf)]
    if "k" in kinds:
        plants += [Plant("k", min(block_size // 4, nk - 1), hkv - 1, 7 % d, np.nan),
                   Plant("k", max(nk - 3, 0), 0, 1, np.inf)]
    if "q" in kinds:
        plants += [Plant("q", nq // 2, hq - 1, 2, np.nan)]
    scale = 1 / math.sqrt(d)
    return Case(q, k, v, bi, block_size, causal, scale, plants)


def _reference(case: Case, q, k, v):
    return R.sparse_attention(q, k, v, case.block_indices, block_size=case.block_size, causal=case.causal,
                              scale=case.scale, return_lse=True)


def _brute_force(case: Case, q, k, v):
    """Dense softmax over each query's seen keys, one (query, head) at a time, in IEEE float64."""
    nq, hq, d = q.shape
    nk = k.shape[0]
    seen = seen_keys(case.block_indices, nq, nk, case.block_size, case.causal)
    out = np.zeros((nq, hq, d))
    lse = np.full((nq, hq), -np.inf)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(nq):
            for h in range(hq):
                g = h // case.group
                keys = np.flatnonzero(seen[i, g])
                s = case.scale * (k[keys, g] @ q[i, h])
                m = np.max(s, initial=-np.inf)  # NaN if any score is NaN
                if m == -np.inf:
                    continue
                p = np.exp(s - m)
                z = p.sum()
                out[i, h] = (p[:, None] * v[keys, g]).sum(axis=0) / z
                lse[i, h] = m + np.log(z)
    return out, lse


CASES = [dict(nq=150, nk=150, hkv=2, group=2, d=8, block_size=16, top_k=3, causal=True),
         dict(nq=9, nk=200, hkv=2, group=4, d=8, block_size=32, top_k=4, causal=True),   # decode-like
         dict(nq=120, nk=130, hkv=1, group=3, d=16, block_size=16, top_k=3, causal=False)]


@pytest.mark.parametrize("shape", CASES, ids=["prefill", "decode", "noncausal"])
@pytest.mark.parametrize("kinds", [("v",), ("k",), ("q",), ("v", "k", "q")], ids=["v", "k", "q", "all"])
def test_reference_nonfinite_follows_the_rule(shape, kinds, rng):
    case = planted_case(rng, kinds=kinds, **shape)
    q, k, v = case.poisoned()
    out, lse = _reference(case, q, k, v)
    exp_out, exp_lse = expected_nonfinite(case)
    assert exp_out.any(), "the planted values reach no query: the case tests nothing"
    np.testing.assert_array_equal(~np.isfinite(out), exp_out)
    np.testing.assert_array_equal(~np.isfinite(lse) & ~np.isneginf(lse), exp_lse)
    # invisible poison leaves the other elements as they were without it
    clean_out, clean_lse = _reference(case, case.q, case.k, case.v)
    untouched_rows = ~exp_out.any(axis=-1) & ~_sees_a_planted_key(case)
    np.testing.assert_allclose(out[untouched_rows], clean_out[untouched_rows], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse[untouched_rows], clean_lse[untouched_rows], rtol=1e-12, atol=1e-12)
    # and the finite elements agree with dense softmax over the seen keys, written out per row
    bf_out, bf_lse = _brute_force(case, q, k, v)
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(bf_out))
    fin = np.isfinite(out)
    np.testing.assert_allclose(out[fin], bf_out[fin], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(bf_lse))
    fin = np.isfinite(lse)
    np.testing.assert_allclose(lse[fin], bf_lse[fin], rtol=1e-9, atol=1e-9)


def _sees_a_planted_key(case: Case):
    """(Nq, Hq) True where the row sees a key (or is a query) holding a planted value."""
    nq, hq, _ = case.q.shape
    seen = seen_keys(case.block_indices, nq, case.k.shape[0], case.block_size, case.causal)
    hit = np.zeros((nq, hq), bool)
    for p in case.plants:
        if p.tensor == "q":
            hit[p.token, p.head] = True
        else:
            for h in range(p.head * case.group, (p.head + 1) * case.group):
                hit[:, h] |= seen[:, p.head, p.token]
    return hit


def test_invisible_nan_in_v_of_own_block_reaches_no_query():
    """The reported case: a NaN in v of the last key under causal prefill.  Only the last
    query sees that key; before the fix every query whose block held it returned NaN."""
    rng = np.random.default_rng(0)
    nq = nk = 64
    q = rng.standard_normal((nq, 4, 8))
    k, v = (rng.standard_normal((nk, 2, 8)) for _ in range(2))
    v[-1, 0, 0] = np.nan  # group 0: query heads 0 and 1
    out, lse = R.dense_attention(q, k, v, causal=True, return_lse=True)
    bad = ~np.isfinite(out)
    assert bad[-1, :2, 0].all() and bad.sum() == 2, f"{bad.sum()} non-finite elements, expected 2"
    assert np.isfinite(lse).all()


def test_nan_k_of_a_seen_key_is_nan_out_and_lse():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((20, 1, 8)) for _ in range(3))
    k[5, 0, 2] = np.nan
    out, lse = R.dense_attention(q, k, v, causal=True, return_lse=True)
    assert np.isfinite(out[:5]).all() and np.isfinite(lse[:5]).all()
    assert np.isnan(out[5:]).all() and np.isnan(lse[5:]).all()


def test_every_seen_score_minus_inf_is_an_empty_row():
    """A query whose every seen score is -inf (infinite k against q) counts as seeing no key:
    out 0, lse -inf, whatever its keys' v hold."""
    q = np.ones((4, 1, 4))
    k = np.ones((4, 1, 4))
    v = np.ones((4, 1, 4))
    k[0, 0, 0] = -np.inf
    v[0, 0, 1] = np.nan
    out, lse = R.dense_attention(q, k, v, causal=True, return_lse=True)
    assert np.all(out[0] == 0) and lse[0, 0] == -np.inf
    # later queries see key 0 with weight 0, and 0 * NaN = NaN, as in dense attention
    assert np.isnan(out[1:, 0, 1]).all() and np.isfinite(np.delete(out[1:], 1, axis=-1)).all()
    assert np.isfinite(lse[1:]).all()


def test_inf_in_v_of_a_seen_key_is_inf():
    q, k = np.ones((3, 1, 2)), np.ones((3, 1, 2))
    v = np.zeros((3, 1, 2))
    v[1, 0, 0] = np.inf
    out, lse = R.dense_attention(q, k, v, causal=True, return_lse=True)
    assert out[0, 0, 0] == 0 and np.isposinf(out[1:, 0, 0]).all() and np.all(out[:, 0, 1] == 0)
    assert np.isfinite(lse).all()
