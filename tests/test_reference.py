"""Property tests of the NumPy oracle ``msa_cupy.reference``.

The oracle is checked against a brute-force formulation written here from the definition of
MSA alone (README, "What MSA computes"): plain Python loops over sequences, queries, groups,
blocks and keys; block scores as the max over the visible keys of each block; selection as
forced blocks + best other visible blocks (ties to the lower id, NaN as -inf, -inf never
picked); sparse attention as a dense softmax masked to the keys of the selected, visible
blocks.  Then its invariants (top_k >= the block count is dense attention, a constant added to
a row of scores changes nothing, forced blocks are always selected, permuting the batch
permutes the outputs, varlen equals per-sequence calls), and one test per class of bad input
(error type + the argument named in the message, raised before any per-sequence work starts).

Index-branch inputs are small integers: every dot product is then exact in float64 whatever
the summation order, so ties are frequent and exact, and selections can be compared bit for
bit.  Attention values use random normals and are compared to 1e-9.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_cupy import reference as R
from msa_cupy import testing
from msa_cupy.testing import assert_ascending_then_pad

DTYPES = (np.dtype(np.float32), *testing.DTYPES.values())
NEG_INF = float("-inf")
TOL = dict(rtol=1e-9, atol=1e-9)

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# =========================================================================== brute force


def bf_position(i: int, nq: int, nk: int) -> int:
    """Bottom-right alignment: query i sits at key position Nk - Nq + i."""
    return nk - nq + i


def bf_key_visible(j: int, pos: int, causal: bool) -> bool:
    return (j <= pos) if causal else True


def bf_n_blocks(nk: int, bs: int) -> int:
    return (nk + bs - 1) // bs


def bf_dot(a, b) -> float:
    total = 0.0
    for x, y in zip(a, b):
        total += float(x) * float(y)
    return total


def bf_block_scores_seq(iq, ik, bs, causal):
    """iq (Nq, Hkv, Di), ik (Nk, 1|Hkv, Di), float64 -> (Nq, Hkv, n_blocks)."""
    nq, groups = iq.shape[0], iq.shape[1]
    nk = ik.shape[0]
    nb = bf_n_blocks(nk, bs)
    out = np.full((nq, groups, nb), NEG_INF)
    for i in range(nq):
        pos = bf_position(i, nq, nk)
        for g in range(groups):
            kh = 0 if ik.shape[1] == 1 else g
            for b in range(nb):
                best = NEG_INF
                for j in range(b * bs, min((b + 1) * bs, nk)):
                    if bf_key_visible(j, pos, causal):
                        best = max(best, bf_dot(iq[i, g], ik[j, kh]))
                out[i, g, b] = best
    return out


def bf_select_row(row, pos, nk, bs, top_k, local_blocks, sink_blocks, causal):
    """One (query, group): list of top_k ids, ascending valid ids then -1."""
    nb = bf_n_blocks(nk, bs)
    visible = [b for b in range(nb) if any(bf_key_visible(j, pos, causal)
                                           for j in range(b * bs, min((b + 1) * bs, nk)))]
    p = pos if causal else min(max(pos, 0), nk - 1)
    local = p // bs if p >= 0 else None
    forced = set()
    for b in visible:
        in_window = local is not None and local - local_blocks < b <= local
        if in_window or b < sink_blocks:
            forced.add(b)
    candidates = []
    for b in visible:
        if b in forced:
            continue
        s = float(row[b])
        if math.isnan(s):
            s = NEG_INF
        if s == NEG_INF:
            continue
        candidates.append((-s, b))  # larger score first, then the lower id
    candidates.sort()
    picks = [b for _, b in candidates[: top_k - len(forced)]]
    chosen = sorted(forced | set(picks))
    assert len(chosen) <= top_k
    return chosen + [-1] * (top_k - len(chosen))


def bf_topk_seq(scores, nq, nk, bs, top_k, local_blocks, sink_blocks, causal):
    """scores (Nq, Hkv, >= n_blocks) -> int32 (Nq, Hkv, top_k)."""
    groups = scores.shape[1]
    out = np.full((nq, groups, top_k), -1, np.int32)
    for i in range(nq):
        pos = bf_position(i, nq, nk)
        for g in range(groups):
            out[i, g] = bf_select_row(scores[i, g], pos, nk, bs, top_k, local_blocks, sink_blocks,
                                      causal)
    return out


def bf_attention_seq(q, k, v, selected, bs, causal, scale):
    """Dense softmax masked to keys of selected blocks that are visible.

    q (Nq, Hq, D), k/v (Nk, Hkv, D) float64; selected (Nq, Hkv, slots) ids (-1 = unused).
    Returns out (Nq, Hq, D), lse (Nq, Hq).
    """
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    per_group = hq // hkv
    out = np.zeros((nq, hq, d))
    lse = np.full((nq, hq), NEG_INF)
    for i in range(nq):
        pos = bf_position(i, nq, nk)
        for h in range(hq):
            g = h // per_group
            blocks = {int(x) for x in selected[i, g] if x >= 0}
            logits = [NEG_INF] * nk
            for j in range(nk):
                if j // bs in blocks and bf_key_visible(j, pos, causal):
                    logits[j] = scale * bf_dot(q[i, h], k[j, g])
            m = max(logits, default=NEG_INF)
            if m == NEG_INF:
                continue  # sees no key: out 0, lse -inf
            weights = [math.exp(x - m) if x != NEG_INF else 0.0 for x in logits]
            z = sum(weights)
            acc = np.zeros(d)
            for j in range(nk):
                if weights[j]:
                    acc += weights[j] * v[j, g]
            out[i, h] = acc / z
            lse[i, h] = m + math.log(z)
    return out, lse


def bf_training_free_index(q, hkv, dtype):
    """index_q[i, g] = mean of group g's query heads (in the inputs' dtype)."""
    nq, hq, d = q.shape
    per_group = hq // hkv
    iq = np.zeros((nq, hkv, d))
    for i in range(nq):
        for g in range(hkv):
            for t in range(per_group):
                iq[i, g] += q[i, g * per_group + t]
            iq[i, g] /= per_group
    return iq.astype(dtype).astype(np.float64)


# =========================================================================== layouts


@dataclass
class Case:
    """A batch of sequences: 'batched' (B, N, H, D), 'single' (N, H, D), 'varlen' (total, H, D)."""

    kind: str
    seqs: list  # [(nq, nk)]

    def kw(self):
        if self.kind != "varlen":
            return {}
        return dict(cu_seqlens_q=testing.cu_seqlens([s[0] for s in self.seqs]),
                    cu_seqlens_k=testing.cu_seqlens([s[1] for s in self.seqs]))

    def nb_max(self, bs):
        return max((bf_n_blocks(nk, bs) for _, nk in self.seqs), default=0)

    def join(self, parts):
        """Per-sequence arrays (leading token axis) -> the caller's layout."""
        if self.kind == "batched":
            return np.stack(parts)
        if self.kind == "single":
            return parts[0]
        return np.concatenate(parts, axis=0)

    def join_padded(self, parts, width, fill):
        """Like join, after padding each part's last axis to width with fill."""
        padded = []
        for p in parts:
            extra = np.full((*p.shape[:-1], width - p.shape[-1]), fill, p.dtype)
            padded.append(np.concatenate([p, extra], axis=-1))
        return self.join(padded)

    def split(self, arr, side):
        """The caller's layout -> per-sequence arrays; side 0 = queries, 1 = keys."""
        if self.kind == "batched":
            return [arr[b] for b in range(arr.shape[0])]
        if self.kind == "single":
            return [arr]
        parts, start = [], 0
        for s in self.seqs:
            parts.append(arr[start:start + s[side]])
            start += s[side]
        return parts

    def make(self, rng, side, heads, dim, dtype, integer):
        """Random per-sequence arrays cast to dtype; returns (caller array, float64 parts)."""
        parts = []
        for s in self.seqs:
            shape = (s[side], heads, dim)
            x = rng.integers(-2, 3, shape).astype(np.float64) if integer else rng.standard_normal(shape)
            parts.append(x.astype(dtype))
        arr = self.join(parts)
        return arr, [p.astype(np.float64) for p in self.split(arr, side)]

    def make_qkv(self, rng, hkv, g, dim, dtype, integer_qk=False):
        """q (Hq = hkv * g heads), k and v, each as (caller array, float64 parts)."""
        return (self.make(rng, 0, hkv * g, dim, dtype, integer=integer_qk),
                self.make(rng, 1, hkv, dim, dtype, integer=integer_qk),
                self.make(rng, 1, hkv, dim, dtype, integer=False))


@st.composite
def cases(draw, kinds=("batched", "single", "varlen"), max_q=7, min_seqs=1):
    """A layout and a block size.  Empty sequences (Nq = 0 or Nk = 0) come now and then, Nq > Nk
    (queries before key 0) often, and several blocks per sequence most of the time."""
    kind = draw(st.sampled_from(kinds))
    bs = draw(st.sampled_from([1, 3, 4, 8, 16, 128]))
    max_k = 300 if bs == 128 else 12 * bs

    def seq():
        empty = draw(st.integers(0, 7)) == 0
        nq = draw(st.integers(0 if empty else 1, max_q))
        nk = draw(st.integers(0 if empty else 1, max_k))
        return nq, nk

    if kind == "batched":
        seqs = [seq()] * draw(st.integers(min_seqs, 3))
    elif kind == "single":
        seqs = [seq()]
    else:
        seqs = [seq() for _ in range(draw(st.integers(min_seqs, 4)))]
    return Case(kind, seqs), bs


@st.composite
def selection_options(draw):
    top_k = draw(st.integers(1, 8))
    local = draw(st.integers(0, min(3, top_k)))
    sink = draw(st.integers(0, min(2, top_k - local)))
    return top_k, local, sink


heads_st = st.tuples(st.integers(1, 2), st.sampled_from([1, 2, 4, 8, 16]))  # (Hkv, G)
seeds = st.integers(0, 2**32 - 1)


def bf_scores_all(case, iq_parts, ik_parts, bs, causal):
    return [bf_block_scores_seq(a, b, bs, causal) for a, b in zip(iq_parts, ik_parts)]


def bf_topk_all(case, score_parts, bs, top_k, local, sink, causal):
    return [bf_topk_seq(s, nq, nk, bs, top_k, local, sink, causal)
            for s, (nq, nk) in zip(score_parts, case.seqs)]


def bf_attention_all(case, q_parts, k_parts, v_parts, sel_parts, bs, causal, scale):
    outs, lses = [], []
    for q, k, v, sel in zip(q_parts, k_parts, v_parts, sel_parts):
        o, l = bf_attention_seq(q, k, v, sel, bs, causal, scale)
        outs.append(o)
        lses.append(l)
    return case.join(outs), case.join(lses)


# =========================================================================== 1. brute force


@SETTINGS
@given(cases(), heads_st, st.integers(1, 3), st.sampled_from(DTYPES), st.booleans(), st.booleans(),
       selection_options(), seeds)
def test_index_branch_matches_brute_force(case_bs, heads, di, dtype, causal, shared, opts, seed):
    case, bs = case_bs
    hkv, _ = heads
    top_k, local, sink = opts
    rng = np.random.default_rng(seed)
    iq, iq_p = case.make(rng, 0, hkv, di, dtype, integer=True)
    ik, ik_p = case.make(rng, 1, 1 if shared else hkv, di, dtype, integer=True)
    nb = case.nb_max(bs)

    exp_scores = bf_scores_all(case, iq_p, ik_p, bs, causal)
    got = R.block_scores(iq, ik, block_size=bs, causal=causal, **case.kw())
    np.testing.assert_array_equal(got, case.join_padded(exp_scores, nb, NEG_INF))

    exp_ids = case.join(bf_topk_all(case, exp_scores, bs, top_k, local, sink, causal))
    opts_kw = dict(top_k=top_k, block_size=bs, local_blocks=local, sink_blocks=sink, causal=causal)
    ids = R.select_blocks(iq, ik, **opts_kw, **case.kw())
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, exp_ids)
    assert_ascending_then_pad(ids)

    num_keys = {} if case.kind == "varlen" else dict(num_keys=case.seqs[0][1])
    ids2 = R.topk_blocks(got.astype(np.float32), **opts_kw, **num_keys, **case.kw())
    np.testing.assert_array_equal(ids2, exp_ids)


@SETTINGS
@given(cases(), heads_st, st.integers(1, 8), st.sampled_from(DTYPES), st.booleans(),
       st.integers(1, 6), st.one_of(st.none(), st.floats(0.05, 2.0)), seeds)
def test_sparse_attention_matches_brute_force(case_bs, heads, d, dtype, causal, slots, scale, seed):
    case, bs = case_bs
    hkv, g = heads
    rng = np.random.default_rng(seed)
    (q, q_p), (k, k_p), (v, v_p) = case.make_qkv(rng, hkv, g, d, dtype)
    parts = []
    for nq, nk in case.seqs:  # random ids of the sequence's own blocks, -1s, duplicates, any order
        nb_s = bf_n_blocks(nk, bs)
        ids = rng.integers(-1, max(nb_s, 1), (nq, hkv, slots)) if nb_s else np.full((nq, hkv, slots), -1)
        parts.append(ids.astype(np.int32))
    if case.kind == "batched":  # one block count for all entries
        parts = [parts[0]] * len(parts)
    bi = case.join(parts)
    out, lse = R.sparse_attention(q, k, v, bi, block_size=bs, causal=causal, scale=scale,
                                  return_lse=True, **case.kw())
    eff_scale = 1.0 / math.sqrt(d) if scale is None else scale
    exp_out, exp_lse = bf_attention_all(case, q_p, k_p, v_p, parts, bs, causal, eff_scale)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    np.testing.assert_allclose(out, exp_out, **TOL)
    np.testing.assert_allclose(lse, exp_lse, **TOL)
    out_only = R.sparse_attention(q, k, v, bi, block_size=bs, causal=causal, scale=scale, **case.kw())
    np.testing.assert_array_equal(out_only, out)


@SETTINGS
@given(cases(), heads_st, st.integers(1, 4), st.sampled_from(DTYPES), st.booleans(), st.booleans(),
       st.booleans(), selection_options(), seeds)
def test_attention_matches_brute_force(case_bs, heads, d, dtype, causal, given_index, shared, opts, seed):
    case, bs = case_bs
    hkv, g = heads
    top_k, local, sink = opts
    rng = np.random.default_rng(seed)
    (q, q_p), (k, k_p), (v, v_p) = case.make_qkv(rng, hkv, g, d, dtype, integer_qk=True)
    if given_index:
        iq, iq_p = case.make(rng, 0, hkv, d, dtype, integer=True)
        ik, ik_p = case.make(rng, 1, 1 if shared else hkv, d, dtype, integer=True)
        index = dict(index_q=iq, index_k=ik)
    else:  # training-free default: mean of the group's query heads, the group's own key head
        iq_p = [bf_training_free_index(x, hkv, dtype) for x in q_p]
        ik_p = k_p
        index = {}
    scores = bf_scores_all(case, iq_p, ik_p, bs, causal)
    sel = bf_topk_all(case, scores, bs, top_k, local, sink, causal)
    exp_out, exp_lse = bf_attention_all(case, q_p, k_p, v_p, sel, bs, causal, 1.0 / math.sqrt(d))
    out, lse, ids = R.attention(q, k, v, **index, block_size=bs, top_k=top_k, local_blocks=local,
                                sink_blocks=sink, causal=causal, return_lse=True,
                                return_indices=True, **case.kw())
    np.testing.assert_array_equal(ids, case.join(sel))
    np.testing.assert_allclose(out, exp_out, **TOL)
    np.testing.assert_allclose(lse, exp_lse, **TOL)


def test_negative_position_sees_nothing():
    """Causal, Nq > Nk: the first Nq - Nk queries sit before key 0: out 0, lse -inf, ids -1."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 8)).astype(np.float32)
    out, lse, ids = R.attention(q, k, k, index_q=q[:, :2], index_k=k, block_size=4, top_k=2,
                                return_lse=True, return_indices=True)
    assert np.all(out[:3] == 0) and np.all(lse[:3] == -np.inf) and np.all(ids[:3] == -1)
    assert np.all(np.isfinite(lse[3:])) and np.all(ids[3:, :, 0] == 0)
    # non-causal: the same queries see everything, local block clamped to block 0
    out, ids = R.attention(q, k, k, index_q=q[:, :2], index_k=k, block_size=4, top_k=2,
                           causal=False, return_indices=True)
    assert np.all(ids[..., 0] == 0) and np.all(ids[..., 1] == -1)
    np.testing.assert_allclose(out, R.dense_attention(q, k, k, causal=False), **TOL)


def test_decode_and_chunk_alignment():
    """Decode (Nq = 1) sits at the last key; a chunk of Nq queries at the end of the cache."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((37, 1, 4))
    q = rng.standard_normal((3, 2, 4))
    full_q = np.concatenate([rng.standard_normal((34, 2, 4)), q])
    chunk = R.dense_attention(q, k, k)
    full = R.dense_attention(full_q, k, k)
    np.testing.assert_allclose(chunk, full[-3:], **TOL)
    ids = R.select_blocks(q[-1:, :1], k, block_size=8, top_k=2, local_blocks=1)
    assert ids[0, 0, -1] == 36 // 8  # local block is the last valid entry


# =========================================================================== 2. invariants


@SETTINGS
@given(cases(), heads_st, st.integers(1, 4), st.sampled_from(DTYPES), st.booleans(), st.booleans(),
       st.integers(0, 3), seeds)
def test_top_k_at_least_n_blocks_is_dense(case_bs, heads, d, dtype, causal, shared, extra, seed):
    case, bs = case_bs
    hkv, g = heads
    rng = np.random.default_rng(seed)
    (q, q_p), (k, k_p), (v, v_p) = case.make_qkv(rng, hkv, g, d, dtype)
    iq, _ = case.make(rng, 0, hkv, d, dtype, integer=False)
    ik, _ = case.make(rng, 1, 1 if shared else hkv, d, dtype, integer=False)
    top_k = max(case.nb_max(bs), 1) + extra
    local = min(1, top_k)
    out, lse = R.attention(q, k, v, index_q=iq, index_k=ik, block_size=bs, top_k=top_k,
                           local_blocks=local, causal=causal, return_lse=True, **case.kw())
    every = [np.broadcast_to(np.arange(top_k, dtype=np.int32), (nq, hkv, top_k)) for nq, _ in case.seqs]
    exp_out, exp_lse = bf_attention_all(case, q_p, k_p, v_p, every, bs, causal, 1.0 / math.sqrt(d))
    np.testing.assert_allclose(out, exp_out, **TOL)
    np.testing.assert_allclose(lse, exp_lse, **TOL)
    d_out, d_lse = R.dense_attention(q, k, v, causal=causal, return_lse=True, **case.kw())
    np.testing.assert_allclose(d_out, exp_out, **TOL)
    np.testing.assert_allclose(d_lse, exp_lse, **TOL)


@st.composite
def score_maps(draw, allow_pos_inf=False):
    """Random (Nq, Hkv, n_blocks) score maps with frequent ties, -inf and NaN."""
    bs = draw(st.sampled_from([4, 8, 16]))
    nk = draw(st.integers(0, 12 * bs))
    nq = draw(st.integers(0, 6))
    hkv = draw(st.integers(1, 3))
    alphabet = [0.0, 1.0, 2.0, -1.0, NEG_INF, float("nan")] + ([float("inf")] if allow_pos_inf else [])
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    nb = bf_n_blocks(nk, bs)
    scores = rng.choice(np.array(alphabet), size=(nq, hkv, nb))
    return scores, bs, nq, nk


@SETTINGS
@given(score_maps(), selection_options(), st.booleans(), st.sampled_from([np.float32, np.float64]),
       st.one_of(st.integers(-1000, 1000).map(float), st.sampled_from([0.5, -0.25, 1e6])))
def test_topk_matches_brute_force_and_shift_invariant(smap, opts, causal, sdtype, c):
    scores, bs, nq, nk = smap
    scores = scores.astype(sdtype)
    top_k, local, sink = opts
    kw = dict(top_k=top_k, block_size=bs, num_keys=nk, local_blocks=local, sink_blocks=sink, causal=causal)
    ids = R.topk_blocks(scores, **kw)
    np.testing.assert_array_equal(ids, bf_topk_seq(scores, nq, nk, bs, top_k, local, sink, causal))
    assert_ascending_then_pad(ids)
    # adding a constant to every score of a row does not change the selection
    shifted = (scores.astype(np.float64) + c).astype(sdtype)
    np.testing.assert_array_equal(R.topk_blocks(shifted, **kw), ids)
    # NaN counts as -inf
    no_nan = np.where(np.isnan(scores), -np.inf, scores).astype(sdtype)
    np.testing.assert_array_equal(R.topk_blocks(no_nan, **kw), ids)
    # batched (B, Nq, Hkv, nb) gives the same rows (nb = 0: see test_topk_batched_no_keys)
    if scores.shape[-1]:
        np.testing.assert_array_equal(R.topk_blocks(np.stack([scores, scores]), **kw), np.stack([ids, ids]))


@SETTINGS
@given(cases(), st.integers(1, 2), st.integers(1, 3), st.booleans(), selection_options(), seeds)
def test_forced_blocks_always_selected(case_bs, hkv, di, causal, opts, seed):
    case, bs = case_bs
    top_k, local, sink = opts
    rng = np.random.default_rng(seed)
    iq, _ = case.make(rng, 0, hkv, di, np.float32, integer=True)
    ik, _ = case.make(rng, 1, hkv, di, np.float32, integer=True)
    ids = R.select_blocks(iq, ik, top_k=top_k, block_size=bs, local_blocks=local, sink_blocks=sink,
                          causal=causal, **case.kw())
    for part, (nq, nk) in zip(case.split(ids, 0), case.seqs):
        for i in range(nq):
            pos = bf_position(i, nq, nk)
            if nk == 0 or (causal and pos < 0):
                assert np.all(part[i] == -1)
                continue
            loc = min(max(pos, 0), nk - 1) // bs
            window = set(range(max(loc - local + 1, 0), loc + 1)) if local else set()
            sinks = {b for b in range(min(sink, bf_n_blocks(nk, bs))) if not causal or b <= loc}
            for g in range(hkv):
                row = set(part[i, g].tolist())
                assert window <= row and sinks <= row, (i, g, part[i, g], window, sinks)
                valid = [x for x in part[i, g] if x >= 0]
                if causal and local:
                    assert valid[-1] == loc  # the local block is the last valid entry
                assert len(valid) == min(top_k, loc + 1 if causal else bf_n_blocks(nk, bs))


def test_ties_go_to_lower_block_id():
    nb, nk, bs = 10, 40, 4
    flat = np.full((1, 1, nb), 3.0)
    ids = R.topk_blocks(flat, top_k=4, block_size=bs, num_keys=nk, local_blocks=0, causal=False)
    assert ids.tolist() == [[[0, 1, 2, 3]]]
    ids = R.topk_blocks(flat, top_k=4, block_size=bs, num_keys=nk, local_blocks=1, causal=True)
    assert ids.tolist() == [[[0, 1, 2, 9]]]
    planted = np.array([[[1.0, 5.0, 2.0, 5.0, 5.0, 0.0, 2.0, 5.0, 1.0, 0.0]]])
    ids = R.topk_blocks(planted, top_k=4, block_size=bs, num_keys=nk, local_blocks=1, sink_blocks=1)
    assert ids.tolist() == [[[0, 1, 3, 9]]]
    # through the index branch: every block of a constant key sequence scores the same
    iq = np.ones((1, 1, 2), np.float32)
    ik = np.ones((nk, 1, 2), np.float32)
    ids = R.select_blocks(iq, ik, top_k=3, block_size=bs, local_blocks=1)
    assert ids.tolist() == [[[0, 1, 9]]]


def test_nan_index_inputs_select_consistently():
    """Whatever a NaN key does to its block score, select_blocks == topk_blocks(block_scores)."""
    rng = np.random.default_rng(3)
    iq = rng.standard_normal((6, 2, 4))
    ik = rng.standard_normal((20, 1, 4))
    ik[[2, 9, 10, 11], 0, 1] = np.nan  # NaN scores in blocks 0 and 2 (one key) and 2 (all keys)
    for causal in (True, False):
        kw = dict(block_size=4, causal=causal)
        sel = dict(top_k=3, local_blocks=1, sink_blocks=0)
        sc = R.block_scores(iq, ik, **kw)
        ids = R.select_blocks(iq, ik, **sel, **kw)
        np.testing.assert_array_equal(R.topk_blocks(sc, num_keys=20, **sel, **kw), ids)
        assert_ascending_then_pad(ids)


def test_nan_and_neg_inf_never_picked():
    s = np.array([[[np.nan, -np.inf, np.nan, 1.0, np.nan]]])
    ids = R.topk_blocks(s, top_k=4, block_size=2, num_keys=10, local_blocks=1)
    assert ids.tolist() == [[[3, 4, -1, -1]]]  # the forced local block 4 is kept whatever its score
    ids = R.topk_blocks(s, top_k=4, block_size=2, num_keys=10, local_blocks=0, causal=False)
    assert ids.tolist() == [[[3, -1, -1, -1]]]


@SETTINGS
@given(st.integers(2, 4), st.integers(0, 5), st.integers(0, 40), heads_st, st.booleans(),
       st.sampled_from(DTYPES), selection_options(), seeds)
def test_batch_permutation_permutes_outputs(b, nq, nk, heads, causal, dtype, opts, seed):
    hkv, g = heads
    top_k, local, sink = opts
    rng = np.random.default_rng(seed)
    case = Case("batched", [(nq, nk)] * b)
    q, _ = case.make(rng, 0, hkv * g, 4, dtype, integer=True)
    k, _ = case.make(rng, 1, hkv, 4, dtype, integer=True)
    v, _ = case.make(rng, 1, hkv, 4, dtype, integer=False)
    perm = rng.permutation(b)
    kw = dict(block_size=4, top_k=top_k, local_blocks=local, sink_blocks=sink, causal=causal,
              return_lse=True, return_indices=True)
    out, lse, ids = R.attention(q, k, v, **kw)
    p_out, p_lse, p_ids = R.attention(q[perm], k[perm], v[perm], **kw)
    np.testing.assert_array_equal(p_out, out[perm])
    np.testing.assert_array_equal(p_lse, lse[perm])
    np.testing.assert_array_equal(p_ids, ids[perm])
    iq = q[:, :, ::g]
    np.testing.assert_array_equal(R.block_scores(iq[perm], k[perm], block_size=4, causal=causal),
                                  R.block_scores(iq, k, block_size=4, causal=causal)[perm])


@SETTINGS
@given(cases(kinds=("varlen",)), heads_st, st.integers(1, 4), st.sampled_from(DTYPES), st.booleans(),
       st.booleans(), selection_options(), seeds)
def test_varlen_equals_per_sequence_calls(case_bs, heads, d, dtype, causal, shared, opts, seed):
    case, bs = case_bs
    hkv, g = heads
    top_k, local, sink = opts
    rng = np.random.default_rng(seed)
    q, _ = case.make(rng, 0, hkv * g, d, dtype, integer=True)
    k, _ = case.make(rng, 1, hkv, d, dtype, integer=True)
    v, _ = case.make(rng, 1, hkv, d, dtype, integer=False)
    iq, _ = case.make(rng, 0, hkv, d, dtype, integer=True)
    ik, _ = case.make(rng, 1, 1 if shared else hkv, d, dtype, integer=True)
    sel = dict(top_k=top_k, local_blocks=local, sink_blocks=sink)
    kw = dict(block_size=bs, causal=causal)
    nb = case.nb_max(bs)
    scores = R.block_scores(iq, ik, **kw, **case.kw())
    ids = R.select_blocks(iq, ik, **sel, **kw, **case.kw())
    ids_topk = R.topk_blocks(scores, **sel, **kw, **case.kw())
    out, lse, ids_att = R.attention(q, k, v, index_q=iq, index_k=ik, **sel, **kw, return_lse=True,
                                    return_indices=True, **case.kw())
    np.testing.assert_array_equal(ids_topk, ids)
    np.testing.assert_array_equal(ids_att, ids)
    # columns past a sequence's own block count are not blocks of it: their content is ignored
    garbage = scores.copy()
    garbage[garbage == -np.inf] = 1e9
    starts = np.cumsum([0] + [nq for nq, _ in case.seqs])
    for (nq, nk), q0 in zip(case.seqs, starts):
        nb_s = bf_n_blocks(nk, bs)
        garbage[q0:q0 + nq, :, :nb_s] = scores[q0:q0 + nq, :, :nb_s]
    np.testing.assert_array_equal(R.topk_blocks(garbage, **sel, **kw, **case.kw()), ids)
    pieces = zip(*(case.split(x, 0) for x in (q, iq, scores, ids, out, lse)),
                 *(case.split(x, 1) for x in (k, v, ik)), case.seqs)
    for q_s, iq_s, sc_s, ids_s, out_s, lse_s, k_s, v_s, ik_s, (nq, nk) in pieces:
        nb_s = bf_n_blocks(nk, bs)
        one = R.block_scores(iq_s, ik_s, **kw)
        np.testing.assert_array_equal(sc_s[..., :nb_s], one)
        assert np.all(sc_s[..., nb_s:] == -np.inf)
        np.testing.assert_array_equal(ids_s, R.select_blocks(iq_s, ik_s, **sel, **kw))
        np.testing.assert_array_equal(ids_s, R.topk_blocks(one, num_keys=nk, **sel, **kw))
        o, l = R.sparse_attention(q_s, k_s, v_s, ids_s, **kw, return_lse=True)
        np.testing.assert_array_equal(out_s, o)
        np.testing.assert_array_equal(lse_s, l)
        o2 = R.attention(q_s, k_s, v_s, index_q=iq_s, index_k=ik_s, **sel, **kw)
        np.testing.assert_array_equal(out_s, o2)
    assert scores.shape == (q.shape[0], hkv, nb)


@SETTINGS
@given(cases(), heads_st, st.integers(1, 4), st.booleans(), st.integers(1, 5), seeds)
def test_block_indices_are_a_set(case_bs, heads, d, causal, slots, seed):
    """Order, duplicates and extra -1 slots of block_indices do not change sparse_attention."""
    case, bs = case_bs
    hkv, g = heads
    rng = np.random.default_rng(seed)
    q, _ = case.make(rng, 0, hkv * g, d, np.float32, integer=False)
    k, _ = case.make(rng, 1, hkv, d, np.float32, integer=False)
    v, _ = case.make(rng, 1, hkv, d, np.float32, integer=False)
    nb_min = min(bf_n_blocks(nk, bs) for _, nk in case.seqs)
    lead = q.shape[:-2]
    bi = (rng.integers(-1, nb_min, (*lead, hkv, slots)) if nb_min else np.full((*lead, hkv, slots), -1))
    bi = bi.astype(np.int32)
    kw = dict(block_size=bs, causal=causal, return_lse=True, **case.kw())
    out, lse = R.sparse_attention(q, k, v, bi, **kw)
    shuffled = np.ascontiguousarray(rng.permuted(bi, axis=-1))
    doubled = np.concatenate([bi, shuffled, np.full_like(bi, -1)], axis=-1)
    for other in (shuffled, doubled):
        o, l = R.sparse_attention(q, k, v, other, **kw)
        np.testing.assert_allclose(o, out, **TOL)
        np.testing.assert_allclose(l, lse, **TOL)


# =========================================================================== 3. bad input


def _arr(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


Q4, K4 = _arr((2, 5, 4, 8)), _arr((2, 9, 2, 8))
Q3, K3 = _arr((5, 4, 8)), _arr((9, 2, 8))
IQ3, IK3 = _arr((5, 2, 8)), _arr((9, 1, 8))
CQ, CK = np.array([0, 2, 5], np.int32), np.array([0, 4, 9], np.int32)
BI3 = np.zeros((5, 2, 2), np.int32)
SC3 = np.zeros((5, 2, 3))


def _cu(cq=CQ, ck=CK):
    return dict(cu_seqlens_q=cq, cu_seqlens_k=ck)


BAD_INPUTS = [
    # (id, call, exception, regex naming the argument)
    ("q rank 2", lambda: R.sparse_attention(_arr((5, 8)), K3, K3, BI3), ValueError, r"^q must have"),
    ("q rank 5", lambda: R.attention(_arr((1, 2, 5, 4, 8)), K4, K4), ValueError, r"^q must have"),
    ("k rank differs", lambda: R.attention(Q4, K3, K3), ValueError, r"q and k must have the same rank"),
    ("index rank", lambda: R.block_scores(_arr((5, 8)), IK3), ValueError, r"index_q must have"),
    ("head dim", lambda: R.attention(Q3, _arr((9, 2, 4)), _arr((9, 2, 4))), ValueError, r"head dim"),
    ("k v shapes", lambda: R.attention(Q3, K3, _arr((9, 1, 8))), ValueError, r"k and v"),
    ("batch sizes", lambda: R.attention(Q4, _arr((3, 9, 2, 8)), _arr((3, 9, 2, 8))), ValueError,
     r"batch size"),
    ("Hq % Hkv", lambda: R.attention(_arr((5, 3, 8)), K3, K3), ValueError, r"q heads \(3\).*k heads \(2\)"),
    ("int32 q", lambda: R.attention(_arr((5, 4, 8), np.int32), K3, K3), TypeError, r"^q must have dtype"),
    ("int32 index_q", lambda: R.block_scores(_arr((5, 2, 8), np.int32), IK3), TypeError,
     r"^index_q must have dtype"),
    ("mixed qkv dtypes", lambda: R.attention(Q3, _arr((9, 2, 8), np.float16), K3), TypeError, r"q, k and v"),
    ("index dim", lambda: R.block_scores(IQ3, _arr((9, 1, 4))), ValueError, r"index_q and index_k"),
    ("index_k heads", lambda: R.block_scores(IQ3, _arr((9, 3, 8))), ValueError, r"^index_k must have 1 head"),
    ("index_k heads attn", lambda: R.attention(Q3, K3, K3, index_q=IQ3, index_k=_arr((9, 3, 8))),
     ValueError, r"^index_k"),
    ("index_q heads attn", lambda: R.attention(Q3, K3, K3, index_q=_arr((5, 4, 8)), index_k=IK3),
     ValueError, r"^index_q must have one head per KV head"),
    ("index_q alone", lambda: R.attention(Q3, K3, K3, index_q=IQ3), ValueError, r"index_q and index_k"),
    ("index tokens", lambda: R.attention(Q3, K3, K3, index_q=_arr((4, 2, 8)), index_k=IK3), ValueError,
     r"index_q/index_k"),
    ("cu decreasing", lambda: R.attention(Q3, K3, K3, **_cu(np.array([0, 3, 2, 5], np.int32),
                                                             np.array([0, 3, 6, 9], np.int32))),
     ValueError, r"cu_seqlens_q must be non-decreasing"),
    ("cu start", lambda: R.attention(Q3, K3, K3, **_cu(ck=np.array([1, 4, 9], np.int32))), ValueError,
     r"cu_seqlens_k must start at 0"),
    ("cu last q", lambda: R.attention(Q3, K3, K3, **_cu(np.array([0, 2, 4], np.int32))), ValueError,
     r"cu_seqlens_q\[-1\]"),
    ("cu last k", lambda: R.block_scores(IQ3, IK3, **_cu(ck=np.array([0, 4, 8], np.int32))), ValueError,
     r"cu_seqlens_k\[-1\]"),
    ("cu only q", lambda: R.attention(Q3, K3, K3, cu_seqlens_q=CQ), ValueError, r"cu_seqlens_q and cu_seqlens_k"),
    ("cu only k", lambda: R.select_blocks(IQ3, IK3, cu_seqlens_k=CK), ValueError,
     r"cu_seqlens_q and cu_seqlens_k"),
    ("cu rank 4", lambda: R.attention(Q4, K4, K4, **_cu(np.array([0, 10], np.int32), np.array([0, 18], np.int32))),
     ValueError, r"cu_seqlens"),
    ("cu lengths", lambda: R.attention(Q3, K3, K3, **_cu(ck=np.array([0, 9], np.int32))), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must have the same length"),
    ("cu dtype", lambda: R.attention(Q3, K3, K3, **_cu(CQ.astype(np.int64))), TypeError, r"cu_seqlens_q"),
    ("cu 2-d", lambda: R.attention(Q3, K3, K3, **_cu(ck=CK[None])), ValueError, r"cu_seqlens_k"),
    ("cu list", lambda: R.attention(Q3, K3, K3, **_cu(ck=[0, 4, 9])), TypeError, r"cu_seqlens_k"),
    ("top_k 0", lambda: R.attention(Q3, K3, K3, top_k=0), ValueError, r"top_k"),
    ("top_k -1 select", lambda: R.select_blocks(IQ3, IK3, top_k=-1), ValueError, r"top_k"),
    ("top_k topk", lambda: R.topk_blocks(SC3, top_k=0, block_size=4, num_keys=9), ValueError, r"top_k"),
    ("top_k float", lambda: R.attention(Q3, K3, K3, top_k=2.0), TypeError, r"top_k"),
    ("forced > top_k", lambda: R.attention(Q3, K3, K3, top_k=2, local_blocks=2, sink_blocks=1),
     ValueError, r"local_blocks \+ sink_blocks"),
    ("forced > top_k topk", lambda: R.topk_blocks(SC3, top_k=1, block_size=4, num_keys=9, local_blocks=2),
     ValueError, r"local_blocks"),
    ("local_blocks < 0", lambda: R.select_blocks(IQ3, IK3, local_blocks=-1), ValueError, r"local_blocks"),
    ("sink_blocks < 0", lambda: R.select_blocks(IQ3, IK3, sink_blocks=-1), ValueError, r"sink_blocks"),
    ("block_size 0", lambda: R.block_scores(IQ3, IK3, block_size=0), ValueError, r"block_size"),
    ("block_size 0 sparse", lambda: R.sparse_attention(Q3, K3, K3, BI3, block_size=0), ValueError,
     r"block_size"),
    ("scale inf", lambda: R.sparse_attention(Q3, K3, K3, BI3, scale=float("inf")), ValueError, r"scale"),
    ("scale str", lambda: R.sparse_attention(Q3, K3, K3, BI3, scale="1"), TypeError, r"scale"),
    ("bi dtype", lambda: R.sparse_attention(Q3, K3, K3, BI3.astype(np.int64)), TypeError,
     r"^block_indices must have dtype int32, got int64"),
    ("bi rank", lambda: R.sparse_attention(Q3, K3, K3, BI3[0]), ValueError,
     r"^block_indices must have 3 or 4 dimensions, got shape \(2, 2\)"),
    ("bi groups", lambda: R.sparse_attention(Q3, K3, K3, np.zeros((5, 1, 2), np.int32)), ValueError,
     r"^block_indices must have shape \(5, 2\) \+ \(k,\), got \(5, 1, 2\)"),
    ("bi tokens", lambda: R.sparse_attention(Q3, K3, K3, np.zeros((4, 2, 2), np.int32)), ValueError,
     r"^block_indices must have shape \(5, 2\) \+ \(k,\), got \(4, 2, 2\)"),
    ("bi no slots", lambda: R.sparse_attention(Q3, K3, K3, np.zeros((5, 2, 0), np.int32)), ValueError,
     r"^block_indices must have at least one slot"),
    ("bi id too big", lambda: R.sparse_attention(Q3, K3, K3, np.full((5, 2, 2), 3, np.int32), block_size=4),
     ValueError, r"^block_indices hold 20 entries .*-1.* \(values in \[3, 3\], sequences have up to 3 key blocks\)"),
    ("bi id < -1", lambda: R.sparse_attention(Q3, K3, K3, np.full((5, 2, 2), -2, np.int32), block_size=4),
     ValueError, r"^block_indices hold 20 entries .*-1.* \(values in \[-2, -2\], sequences have up to 3 key blocks\)"),
    ("bi id batched", lambda: R.sparse_attention(Q4, K4, K4, np.full((2, 5, 2, 1), 9, np.int32), block_size=1),
     ValueError, r"^block_indices hold 20 entries .*-1.* \(values in \[9, 9\], sequences have up to 9 key blocks\)"),
    ("num_keys missing", lambda: R.topk_blocks(np.zeros((2, 5, 2, 3)), block_size=4, top_k=2), ValueError,
     r"num_keys"),
    ("num_keys missing 3d", lambda: R.topk_blocks(SC3, block_size=4, top_k=2), ValueError, r"num_keys"),
    ("num_keys and cu", lambda: R.topk_blocks(SC3, block_size=4, top_k=2, num_keys=9, **_cu()), ValueError,
     r"num_keys"),
    ("num_keys negative", lambda: R.topk_blocks(SC3, block_size=4, top_k=2, num_keys=-1), ValueError,
     r"num_keys"),
    ("scores width", lambda: R.topk_blocks(SC3, block_size=4, top_k=2, num_keys=20), ValueError, r"scores"),
    ("scores dtype", lambda: R.topk_blocks(SC3.astype(np.float16), block_size=4, top_k=2, num_keys=9),
     TypeError, r"scores"),
    ("scores rank", lambda: R.topk_blocks(np.zeros((5, 3)), block_size=4, top_k=2, num_keys=9), ValueError,
     r"scores"),
    ("scores rank 4 with cu", lambda: R.topk_blocks(np.zeros((1, 5, 2, 3)), block_size=4, top_k=2, **_cu()),
     ValueError, r"scores"),
    ("scores cu last", lambda: R.topk_blocks(SC3[:4], block_size=4, top_k=2, **_cu()), ValueError,
     r"cu_seqlens_q\[-1\]"),
]


BAD_INPUTS += [
    ("attention scale str", lambda: R.attention(Q3, K3, K3, scale="1"), TypeError, r"scale"),
    ("attention scale nan", lambda: R.attention(Q3, K3, K3, scale=float("nan")), ValueError, r"scale"),
]


def _param(b):
    return b if isinstance(b, type(pytest.param(0))) else pytest.param(*b, id=b[0])


@pytest.mark.parametrize("name, call, exc, match", [_param(b) for b in BAD_INPUTS])
def test_bad_input_raises_before_work(monkeypatch, name, call, exc, match):
    def no_work(*args, **kwargs):
        raise AssertionError("per-sequence work started before the arguments were checked")

    for name in ("sequence_block_scores", "sequence_topk", "sequence_sparse_attention"):
        monkeypatch.setattr(R, name, no_work)
    with pytest.raises(exc, match=match):
        call()


def test_good_inputs_reach_the_work(monkeypatch):
    """The no-work guard above would catch a call that got past the checks."""
    called = []
    monkeypatch.setattr(R, "sequence_sparse_attention", lambda *a, **k: called.append(1) or (0, 0))
    R.sparse_attention(Q3, K3, K3, BI3, block_size=4)
    assert called


# =========================================================================== edge cases (once reference bugs)


def test_varlen_block_ids_checked_before_work(monkeypatch):
    monkeypatch.setattr(R, "sequence_sparse_attention",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started")))
    bi = np.zeros((5, 2, 2), np.int32)
    bi[2:] = 2  # sequence 1 has 5 keys = 2 blocks of 4: id 2 is out of range only for it...
    cq, ck = np.array([0, 2, 5], np.int32), np.array([0, 12, 17], np.int32)  # ...sequence 0 has 3
    with pytest.raises(ValueError, match="block_indices"):
        R.sparse_attention(Q3, _arr((17, 2, 8)), _arr((17, 2, 8)), bi, block_size=4,
                           cu_seqlens_q=cq, cu_seqlens_k=ck)


def test_pos_inf_score_does_not_displace_forced_block():
    s = np.array([[[np.inf, 1.0]]])
    ids = R.topk_blocks(s, top_k=1, block_size=4, num_keys=8, local_blocks=1)
    assert ids.tolist() == [[[1]]]  # the local block (position 7 -> block 1) is forced


def test_dense_attention_varlen_unequal_lengths():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 1, 4))
    k = rng.standard_normal((7, 1, 4))
    cq, ck = np.array([0, 2, 3], np.int32), np.array([0, 5, 7], np.int32)
    out = R.dense_attention(q, k, k, cu_seqlens_q=cq, cu_seqlens_k=ck)
    np.testing.assert_allclose(out[:2], R.dense_attention(q[:2], k[:5], k[:5]), **TOL)
    np.testing.assert_allclose(out[2:], R.dense_attention(q[2:], k[5:], k[5:]), **TOL)


def test_dense_attention_no_keys():
    q = np.ones((1, 2, 1, 4))
    k = np.ones((1, 0, 1, 4))
    out, lse = R.dense_attention(q, k, k, causal=False, return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_empty_batch_keeps_shape():
    iq = np.zeros((0, 3, 1, 4), np.float32)
    ik = np.zeros((0, 9, 1, 4), np.float32)
    assert R.block_scores(iq, ik, block_size=4).shape == (0, 3, 1, 3)


def test_topk_batched_no_keys():
    ids = R.topk_blocks(np.zeros((2, 3, 1, 0)), top_k=2, block_size=4, num_keys=0)
    assert ids.shape == (2, 3, 1, 2) and np.all(ids == -1)
