"""GPU selection kernels (msa_cupy.selection) against the NumPy oracle (msa_cupy.reference).

block_scores: within fp32-accumulation tolerance of the float64 reference computed on the same
fp16/bf16-rounded inputs, -inf exactly where the reference has -inf.  topk_blocks on given
float32 scores: exact (no arithmetic, ties included).  select_blocks (fused): exact index sets
where the k-th and (k+1)-th reference scores are separated by more than the tolerance, score
threshold agreement otherwise.  Every output is poisoned before the run; repeated runs are
bitwise identical.
"""
from __future__ import annotations

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover
    pytest.skip("hypothesis is needed for these tests", allow_module_level=True)

from msa_cupy import _jit, reference
from msa_cupy._interop import BFLOAT16
from msa_cupy._layout import query_positions, varlen_layout

pytestmark = pytest.mark.gpu

ID_POISON = -7
SCORE_POISON = 3.0e38
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _dtype(name):
    return np.float16 if name == "f16" else BFLOAT16


def _layout(seqs):
    cu_q = np.concatenate([[0], np.cumsum([q for q, _ in seqs])]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum([k for _, k in seqs])]).astype(np.int64)
    return varlen_layout(cu_q, cu_k)


def _device_cu(layout):
    import cupy

    return cupy.asarray(layout.cu_q.astype(np.int32)), cupy.asarray(layout.cu_k.astype(np.int32))


def _index_inputs(rng, layout, hkv, shared, di, dtype, scale=1.0):
    iq = (scale * rng.standard_normal((layout.total_q, hkv, di))).astype(dtype)
    ik = (scale * rng.standard_normal((layout.total_k, 1 if shared else hkv, di))).astype(dtype)
    return iq, ik


def _ref_scores(iq, ik, layout, block_size, causal):
    """float64 (total_q, Hkv, W) reference block scores on the rounded inputs."""
    width = layout.n_blocks(block_size)
    out = np.full((layout.total_q, iq.shape[1], width), -np.inf)
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0:
            continue
        s = reference.sequence_block_scores(iq[q0:q0 + nq], ik[k0:k0 + nk], query_positions(nq, nk),
                                            block_size=block_size, causal=causal)
        out[q0:q0 + nq, :, :s.shape[-1]] = s
    return out


def _score_tol(iq, ik):
    """Bound on the fp32 accumulation error of one dot product (plus slack)."""
    di = iq.shape[-1]
    amax = float(np.abs(iq.astype(np.float64)).max(initial=0)) * float(np.abs(ik.astype(np.float64)).max(initial=0))
    return 4.0 * di * 6e-8 * amax * np.sqrt(di) + 1e-6


def _check_selection(got, ref_scores, layout, *, top_k, block_size, local_blocks, sink_blocks, causal, tol):
    """Exact where the reference cut is well separated, threshold agreement otherwise."""
    got = np.asarray(got)
    for q0, nq, k0, nk in layout.sequences():
        if nq == 0:
            continue
        nb = -(-nk // block_size)
        pos = query_positions(nq, nk)
        s = ref_scores[q0:q0 + nq, :, :nb]
        want = reference.sequence_topk(s, pos, nk, top_k=top_k, block_size=block_size,
                                       local_blocks=local_blocks, sink_blocks=sink_blocks, causal=causal)
        g = got[q0:q0 + nq]
        if np.array_equal(g, want):
            continue
        visible, forced = reference._forced_and_visible(pos, nk, nb, block_size, local_blocks, sink_blocks, causal)
        for i, h in zip(*np.nonzero(np.any(g != want, axis=-1))):
            row, ref_row = g[i, h], want[i, h]
            valid = row[row >= 0]
            ctx = f"query {q0 + i} group {h}: got {row.tolist()} want {ref_row.tolist()}"
            assert np.all(row[len(valid):] == -1), ctx
            assert np.all(np.diff(valid) > 0), ctx
            assert len(valid) == np.sum(ref_row >= 0), ctx
            assert np.all(valid < nb) and np.all(visible[i, valid]), ctx
            assert np.all(np.isin(np.nonzero(forced[i])[0], valid)), ctx
            key = np.where(visible[i], np.nan_to_num(s[i, h], nan=-np.inf), -np.inf)
            free = np.where(forced[i], -np.inf, key)
            picked_ref = [b for b in ref_row[ref_row >= 0] if not forced[i, b]]
            picked_got = [b for b in valid if not forced[i, b]]
            assert picked_ref, ctx
            kth = min(free[b] for b in picked_ref)
            rest = np.sort(np.delete(free, picked_ref))[::-1]
            nxt = rest[0] if rest.size else -np.inf
            assert kth - nxt <= tol, f"{ctx}: cut separated by {kth - nxt} > tol {tol}"
            assert all(free[b] >= kth - tol for b in picked_got), ctx


def _draw_layout(draw, max_q=160, max_k=700):
    n_seq = draw(st.integers(1, 4))
    seqs = []
    for _ in range(n_seq):
        kind = draw(st.sampled_from(["chunk", "full", "decode", "empty", "one", "q_gt_k"]))
        nk = draw(st.integers(0, max_k))
        if kind == "full":
            nq = min(nk, max_q)
            nk = nq
        elif kind == "chunk":
            nq = draw(st.integers(0, min(nk, max_q)))
        elif kind == "decode":
            nq = draw(st.integers(1, 3))
        elif kind == "empty":
            nq, nk = 0, draw(st.sampled_from([0, nk]))
        elif kind == "one":
            nq, nk = 1, draw(st.sampled_from([1, nk]))
        else:
            nq = draw(st.integers(0, 40))
            nk = draw(st.integers(0, nq))
        seqs.append((nq, nk))
    return _layout(seqs)


@st.composite
def selection_case(draw, decode=False):
    layout = _draw_layout(draw, max_q=3 if decode else 160, max_k=2500 if decode else 700)
    top_k = draw(st.integers(1, 32))
    local_blocks = draw(st.integers(0, min(top_k, 3)))
    sink_blocks = draw(st.integers(0, min(top_k - local_blocks, 2)))
    return dict(
        layout=layout,
        hkv=draw(st.sampled_from([1, 2, 4, 8])),
        shared=draw(st.booleans()),
        di=draw(st.sampled_from([64, 128])),
        block_size=draw(st.sampled_from([64, 128])),
        causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(["bf16", "f16"])),
        top_k=top_k,
        local_blocks=local_blocks,
        sink_blocks=sink_blocks,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _run_twice(fn, make_out, poison):
    import cupy

    outs = []
    for _ in range(2):
        out = make_out()
        out.fill(poison)
        res = fn(out)
        assert res is out
        cupy.cuda.runtime.deviceSynchronize()
        outs.append(cupy.asnumpy(out))
    same = np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
    assert same, "repeated runs differ"
    return outs[0]


# --------------------------------------------------------------------------- block_scores


@settings(max_examples=40, **SETTINGS)
@given(case=selection_case(), warps=st.sampled_from([None, (8, 1), (1, 4)]))
def test_block_scores_matches_reference(case, warps):
    import cupy

    from msa_cupy import selection

    layout, bs = case["layout"], case["block_size"]
    rng = np.random.default_rng(case["seed"])
    iq, ik = _index_inputs(rng, layout, case["hkv"], case["shared"], case["di"], _dtype(case["dtype"]))
    cu_q, cu_k = _device_cu(layout)
    diq, dik = cupy.asarray(iq), cupy.asarray(ik)
    width = layout.n_blocks(bs)
    got = _run_twice(
        lambda out: selection.block_scores(diq, dik, layout, cu_q, cu_k, block_size=bs, causal=case["causal"], out=out,
                                           warps=warps),
        lambda: cupy.empty((layout.total_q, case["hkv"], width), cupy.float32), SCORE_POISON)
    want = _ref_scores(iq, ik, layout, bs, case["causal"])
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "-inf pattern differs"
    fin = np.isfinite(want)
    assert np.all(np.isfinite(got[fin]))
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=_score_tol(iq, ik))


# --------------------------------------------------------------------------- topk over scores


@settings(max_examples=60, **SETTINGS)
@given(case=selection_case(), levels=st.sampled_from([0, 3, 50]), specials=st.booleans())
def test_topk_blocks_exact(case, levels, specials):
    """Same float32 scores in, so the index sets must match exactly, ties and NaN included."""
    import cupy

    from msa_cupy import selection

    layout, bs, k = case["layout"], case["block_size"], case["top_k"]
    rng = np.random.default_rng(case["seed"])
    width = layout.n_blocks(bs) + int(rng.integers(0, 3))  # wider rows than needed are allowed
    scores = rng.standard_normal((layout.total_q, case["hkv"], width)).astype(np.float32)
    if levels:
        scores = np.round(scores * levels / 3).astype(np.float32)  # many exact ties
    if specials and scores.size:
        flat = scores.reshape(-1)
        for value in (np.nan, -np.inf, np.inf):
            flat[rng.integers(0, flat.size, size=max(1, flat.size // 20))] = value
    cu_q, cu_k = _device_cu(layout)
    dscores = cupy.asarray(scores)
    opts = dict(top_k=k, block_size=bs, local_blocks=case["local_blocks"], sink_blocks=case["sink_blocks"],
                causal=case["causal"])
    got = _run_twice(lambda out: selection.topk_blocks(dscores, layout, cu_q, cu_k, out=out, **opts),
                     lambda: cupy.empty((layout.total_q, case["hkv"], k), cupy.int32), ID_POISON)
    want = np.full_like(got, -1)
    for q0, nq, k0, nk in layout.sequences():
        if nq:
            nb = -(-nk // bs)
            want[q0:q0 + nq] = reference.sequence_topk(scores[q0:q0 + nq, :, :nb], query_positions(nq, nk), nk, **opts)
    np.testing.assert_array_equal(got, want)


def test_topk_forced_outrank_inf(rng):
    """Forced blocks win over +inf scores (and are kept with NaN / -inf scores of their own)."""
    import cupy

    from msa_cupy import selection

    bs, hkv, k = 64, 2, 4
    layout = _layout([(5, 20 * bs - 3), (3, 7 * bs)])
    width = layout.n_blocks(bs)
    scores = np.full((layout.total_q, hkv, width), np.inf, np.float32)
    scores[:, 0, 0] = np.nan
    scores[:, 1, :] = rng.standard_normal((layout.total_q, width)).astype(np.float32)
    scores[:, 1, ::3] = np.inf
    scores[:, 1, -1] = -np.inf
    cu_q, cu_k = _device_cu(layout)
    for causal in (True, False):
        opts = dict(top_k=k, block_size=bs, local_blocks=2, sink_blocks=1, causal=causal)
        out = cupy.full((layout.total_q, hkv, k), ID_POISON, cupy.int32)
        got = cupy.asnumpy(selection.topk_blocks(cupy.asarray(scores), layout, cu_q, cu_k, out=out, **opts))
        want = np.full_like(got, -1)
        for q0, nq, _, nk in layout.sequences():
            nb = -(-nk // bs)
            want[q0:q0 + nq] = reference.sequence_topk(scores[q0:q0 + nq, :, :nb], query_positions(nq, nk), nk, **opts)
        np.testing.assert_array_equal(got, want)


def test_topk_long_rows(rng):
    """8,192+ blocks per row (1M tokens), one long sequence, sampled against the oracle."""
    import cupy

    from msa_cupy import selection

    nq, nk, bs, hkv = 256, (1 << 20) + 77, 128, 4
    layout = _layout([(nq, nk)])
    for extra, k in ((0, 16), (3, 32)):  # 8,193 blocks (scalar loads) and 8,196 (float4 loads)
        width = layout.n_blocks(bs) + extra
        scores = rng.standard_normal((nq, hkv, width)).astype(np.float32)
        cu_q, cu_k = _device_cu(layout)
        opts = dict(top_k=k, block_size=bs, local_blocks=2, sink_blocks=1, causal=True)
        got = cupy.asnumpy(selection.topk_blocks(cupy.asarray(scores), layout, cu_q, cu_k, **opts))
        want = reference.sequence_topk(scores[..., :layout.n_blocks(bs)], query_positions(nq, nk), nk, **opts)
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- fused select


def _check_fused(case, splits=None, warps=None):
    import cupy

    from msa_cupy import selection

    layout, bs, k = case["layout"], case["block_size"], case["top_k"]
    rng = np.random.default_rng(case["seed"])
    iq, ik = _index_inputs(rng, layout, case["hkv"], case["shared"], case["di"], _dtype(case["dtype"]))
    cu_q, cu_k = _device_cu(layout)
    diq, dik = cupy.asarray(iq), cupy.asarray(ik)
    opts = dict(top_k=k, block_size=bs, local_blocks=case["local_blocks"], sink_blocks=case["sink_blocks"],
                causal=case["causal"])
    got = _run_twice(lambda out: selection.select_blocks(diq, dik, layout, cu_q, cu_k, out=out, splits=splits,
                                                         warps=warps, **opts),
                     lambda: cupy.empty((layout.total_q, case["hkv"], k), cupy.int32), ID_POISON)
    want_scores = _ref_scores(iq, ik, layout, bs, case["causal"])
    _check_selection(got, want_scores, layout, tol=_score_tol(iq, ik), **opts)


@settings(max_examples=60, **SETTINGS)
@given(case=selection_case())
def test_select_blocks_prefill(case):
    _check_fused(case)


@settings(max_examples=40, **SETTINGS)
@given(case=selection_case(decode=True))
def test_select_blocks_decode_split(case):
    """Few queries, long caches: split-K partial lists + merge kernel."""
    _check_fused(case)


@settings(max_examples=30, **SETTINGS)
@given(case=selection_case(), splits=st.integers(1, 5), warps=st.sampled_from([(4, 1), (8, 1), (2, 2), (1, 4)]))
def test_select_blocks_splits_and_warp_grids(case, splits, warps):
    """Every warp grid (prefill/decode shapes and the tuning variants) with split-K forced."""
    _check_fused(case, splits=splits, warps=warps)


@settings(max_examples=40, **SETTINGS)
@given(case=selection_case(), splits=st.integers(1, 5), scores=st.booleans())
def test_select_wgmma_kernel(case, splits, scores):
    """The sm_90 wgmma kernel on every shape (decode ones too), split-K forced, both epilogues."""
    import cupy

    from msa_cupy import selection

    if not _jit.has_wgmma():
        pytest.skip("the wgmma kernel runs on sm_90 only")
    if not scores:
        _check_fused(case, splits=splits, warps=selection.WGMMA)
        return
    layout, bs = case["layout"], case["block_size"]
    rng = np.random.default_rng(case["seed"])
    iq, ik = _index_inputs(rng, layout, case["hkv"], case["shared"], case["di"], _dtype(case["dtype"]))
    cu_q, cu_k = _device_cu(layout)
    got = _run_twice(
        lambda out: selection.block_scores(cupy.asarray(iq), cupy.asarray(ik), layout, cu_q, cu_k, block_size=bs,
                                           causal=case["causal"], out=out, warps=selection.WGMMA),
        lambda: cupy.empty((layout.total_q, case["hkv"], layout.n_blocks(bs)), cupy.float32), SCORE_POISON)
    want = _ref_scores(iq, ik, layout, bs, case["causal"])
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "-inf pattern differs"
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=_score_tol(iq, ik))


def test_supports():
    from msa_cupy import selection

    assert selection.supports(top_k=16, block_size=128, index_dim=128)
    assert selection.supports(top_k=32, block_size=64, index_dim=64)
    assert not selection.supports(top_k=33, block_size=128, index_dim=128)
    assert not selection.supports(top_k=16, block_size=32, index_dim=128)
    assert not selection.supports(top_k=16, block_size=128, index_dim=96)


@pytest.mark.parametrize("nq", [1, 4096])
def test_select_blocks_1m_tokens_sampled(nq):
    """1M cached keys (decode, and a chunk of 4,096 new queries), sampled rows vs the oracle."""
    import cupy

    from msa_cupy import selection

    rng = np.random.default_rng(nq)
    nk, hkv, di, bs, k = (1 << 20) + 33, 4, 128, 128, 16
    layout = _layout([(nq, nk)])
    iq = rng.standard_normal((nq, hkv, di)).astype(np.float16)
    ik_dev = cupy.random.standard_normal((nk, 1, di), dtype=cupy.float32).astype(cupy.float16)
    ik = cupy.asnumpy(ik_dev)
    cu_q, cu_k = _device_cu(layout)
    opts = dict(top_k=k, block_size=bs, local_blocks=1, sink_blocks=1, causal=True)
    out = cupy.full((nq, hkv, k), ID_POISON, cupy.int32)
    iq_dev = cupy.asarray(iq)
    got = cupy.asnumpy(selection.select_blocks(iq_dev, ik_dev, layout, cu_q, cu_k, out=out, **opts))
    again = cupy.asnumpy(selection.select_blocks(iq_dev, ik_dev, layout, cu_q, cu_k, **opts))
    assert np.array_equal(got, again)
    rows = np.unique(np.concatenate([[0, nq - 1], rng.integers(0, nq, size=6)]))
    iq16 = iq
    positions = query_positions(nq, nk)[rows]
    s = reference.sequence_block_scores(iq16[rows], ik, positions, block_size=bs, causal=True)
    # each sampled row is checked as a one-query sequence ending at its own position
    for j, r in enumerate(rows):
        one = _layout([(1, int(positions[j]) + 1)])
        nb = -(-(int(positions[j]) + 1) // bs)
        _check_selection(got[r:r + 1], s[j:j + 1, :, :nb], one, tol=_score_tol(iq16, ik), **opts)
