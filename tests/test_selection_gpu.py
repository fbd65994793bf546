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

from msa_cupy import _jit, reference, testing
from msa_cupy._layout import query_positions, varlen_layout
from msa_cupy.testing import ID_POISON, SCORE_POISON, run_poisoned_twice

pytestmark = pytest.mark.gpu

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _layout(seqs):
    return varlen_layout(testing.cu_seqlens([q for q, _ in seqs]), testing.cu_seqlens([k for _, k in seqs]))


def _cu(layout):
    """Host cu_seqlens (int32) of a layout, as the public functions take them."""
    return dict(cu_seqlens_q=layout.cu_q.astype(np.int32), cu_seqlens_k=layout.cu_k.astype(np.int32))


def _device_cu(layout):
    cu = _cu(layout)
    return testing.to_device(cu["cu_seqlens_q"]), testing.to_device(cu["cu_seqlens_k"])


def _index_inputs(rng, layout, case):
    """index_q (total_q, Hkv, Di), index_k (total_k, 1|Hkv, Di) in the case's dtype."""
    dt, hkv, di = case["dtype"], case["hkv"], case["di"]
    return (testing.randn(rng, (layout.total_q, hkv, di), dt),
            testing.randn(rng, (layout.total_k, 1 if case["shared"] else hkv, di), dt))


def _oracle_topk(scores, layout, **opts):
    """The oracle's selection from given scores, per sequence (rows may be wider than needed)."""
    want = np.full((layout.total_q, scores.shape[1], opts["top_k"]), -1, np.int32)
    for q0, nq, _, nk in layout.sequences():
        if nq:
            nb = -(-nk // opts["block_size"])
            want[q0:q0 + nq] = reference.sequence_topk(scores[q0:q0 + nq, :, :nb], query_positions(nq, nk), nk, **opts)
    return want


@st.composite
def selection_case(draw, decode=False):
    seqs = draw(testing.lengths(max_q=3 if decode else 160, max_k=2500 if decode else 700))
    top_k = draw(st.integers(1, 32))
    local_blocks = draw(st.integers(0, min(top_k, 3)))
    sink_blocks = draw(st.integers(0, min(top_k - local_blocks, 2)))
    return dict(
        layout=_layout(seqs),
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


def _options(case):
    return dict(top_k=case["top_k"], block_size=case["block_size"], local_blocks=case["local_blocks"],
                sink_blocks=case["sink_blocks"], causal=case["causal"])


def _assert_scores(got, iq, ik, layout, block_size, causal):
    """Within the float32 accumulation bound of the oracle's scores, -inf exactly where it has -inf."""
    want = reference.block_scores(iq, ik, block_size=block_size, causal=causal, **_cu(layout))
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "-inf pattern differs"
    fin = np.isfinite(want)
    assert np.all(np.isfinite(got[fin]))
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=testing.score_tolerance(iq, ik))


# --------------------------------------------------------------------------- block_scores


@settings(max_examples=40, **SETTINGS)
@given(case=selection_case(), warps=st.sampled_from([None, (8, 1), (1, 4), (1, 8, 1)]))
def test_block_scores_matches_reference(case, warps):
    import cupy

    from msa_cupy import selection

    layout, bs = case["layout"], case["block_size"]
    iq, ik = _index_inputs(np.random.default_rng(case["seed"]), layout, case)
    cu_q, cu_k = _device_cu(layout)
    diq, dik = cupy.asarray(iq), cupy.asarray(ik)
    got = run_poisoned_twice(
        lambda out: selection.block_scores(diq, dik, layout, cu_q, cu_k, block_size=bs, causal=case["causal"], out=out,
                                           tuning=selection.SelectTuning(warps=warps)),
        lambda: cupy.empty((layout.total_q, case["hkv"], layout.n_blocks(bs)), cupy.float32), SCORE_POISON)
    _assert_scores(got, iq, ik, layout, bs, case["causal"])


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
    scores = testing.random_scores(rng, (layout.total_q, case["hkv"], width), levels=levels, specials=specials)
    cu_q, cu_k = _device_cu(layout)
    dscores = cupy.asarray(scores)
    opts = _options(case)
    got = run_poisoned_twice(lambda out: selection.topk_blocks(dscores, layout, cu_q, cu_k, out=out, **opts),
                             lambda: cupy.empty((layout.total_q, case["hkv"], k), cupy.int32), ID_POISON)
    np.testing.assert_array_equal(got, _oracle_topk(scores, layout, **opts))


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
        np.testing.assert_array_equal(got, _oracle_topk(scores, layout, **opts))


def test_topk_long_rows(rng):
    """8,192+ blocks per row (1M tokens), one long sequence, sampled against the oracle."""
    import cupy

    from msa_cupy import selection

    nq, nk, bs, hkv = 256, (1 << 20) + 77, 128, 4
    layout = _layout([(nq, nk)])
    cu_q, cu_k = _device_cu(layout)
    for extra, k in ((0, 16), (3, 32)):  # 8,193 blocks (scalar loads) and 8,196 (float4 loads)
        scores = rng.standard_normal((nq, hkv, layout.n_blocks(bs) + extra)).astype(np.float32)
        opts = dict(top_k=k, block_size=bs, local_blocks=2, sink_blocks=1, causal=True)
        got = cupy.asnumpy(selection.topk_blocks(cupy.asarray(scores), layout, cu_q, cu_k, **opts))
        np.testing.assert_array_equal(got, _oracle_topk(scores, layout, **opts))


# --------------------------------------------------------------------------- fused select


def _check_fused(case, splits=None, warps=None, producer=False):
    import cupy

    from msa_cupy import selection

    layout = case["layout"]
    iq, ik = _index_inputs(np.random.default_rng(case["seed"]), layout, case)
    cu_q, cu_k = _device_cu(layout)
    diq, dik = cupy.asarray(iq), cupy.asarray(ik)
    opts = _options(case)
    tuning = selection.SelectTuning(splits=splits, warps=warps, producer=producer)
    got = run_poisoned_twice(lambda out: selection.select_blocks(diq, dik, layout, cu_q, cu_k, out=out, tuning=tuning,
                                                                 **opts),
                             lambda: cupy.empty((layout.total_q, case["hkv"], case["top_k"]), cupy.int32), ID_POISON)
    testing.assert_selection_matches(got, iq, ik, **opts, **_cu(layout))


@settings(max_examples=60, **SETTINGS)
@given(case=selection_case())
def test_select_blocks_prefill(case):
    _check_fused(case)


@settings(max_examples=40, **SETTINGS)
@given(case=selection_case(decode=True))
def test_select_blocks_decode_split(case):
    """Few queries, long caches: split-K partial lists, merged by the last split."""
    _check_fused(case)


@settings(max_examples=30, **SETTINGS)
@given(case=selection_case(), splits=st.integers(1, 5), warps=st.sampled_from([(4, 1), (8, 1), (2, 2), (1, 4), (1, 8, 1), (2, 4, 1)]))
def test_select_blocks_splits_and_warp_grids(case, splits, warps):
    """Every warp grid (prefill/decode shapes and the tuning variants) with split-K forced."""
    _check_fused(case, splits=splits, warps=warps)


@pytest.mark.parametrize("splits", [7, 64, 300])
@pytest.mark.parametrize("order", ["random", "descending", "ascending"])
def test_select_blocks_merge_of_many_splits(order, splits):
    """The merge in the last split CTA (merge_splits reads every split's best key, then whole
    lists only of the best top_k splits) with many splits (300: some of one key tile) and scores
    that put the whole top-k in one split (keys whose score falls or rises with their position)
    or spread it (random)."""
    import cupy

    from msa_cupy import selection

    rng = np.random.default_rng(splits)
    layout = _layout([(1, 40_000), (3, 70_001), (2, 900)])
    hkv, di, dt = 4, 64, testing.DTYPES["bfloat16"]
    iq = testing.randn(rng, (layout.total_q, hkv, di), dt)
    ik = testing.randn(rng, (layout.total_k, 1, di), dt)
    if order != "random":  # score of key j ~ +-j: strictly ordered blocks, the query's own rows vary little
        ramp = np.concatenate([np.arange(nk) / nk for _, _, _, nk in layout.sequences()])
        ik[:, 0, :] = (ik[:, 0, :].astype(np.float32) * 0.01).astype(dt)
        ik[:, 0, 0] = ((1 if order == "ascending" else -1) * 8 * ramp).astype(dt)
        iq[..., 0] = np.asarray(1 + rng.random(iq.shape[:2]), np.float32).astype(dt)
    cu_q, cu_k = _device_cu(layout)
    opts = dict(top_k=16, block_size=64, local_blocks=1, sink_blocks=1, causal=True)
    tuning = selection.SelectTuning(splits=splits)
    got = run_poisoned_twice(
        lambda out: selection.select_blocks(cupy.asarray(iq), cupy.asarray(ik), layout, cu_q, cu_k, out=out,
                                            tuning=tuning, **opts),
        lambda: cupy.empty((layout.total_q, hkv, 16), cupy.int32), ID_POISON)
    testing.assert_selection_matches(got, iq, ik, **opts, **_cu(layout))


@settings(max_examples=40, **SETTINGS)
@given(case=selection_case(), splits=st.integers(1, 5), scores=st.booleans(), producer=st.booleans())
def test_select_wgmma_kernel(case, splits, scores, producer):
    """The sm_90 wgmma kernel on every shape (decode ones too), split-K forced, both epilogues,
    with and without a producer warpgroup."""
    import cupy

    from msa_cupy import selection

    if not _jit.has_wgmma():
        pytest.skip("the wgmma kernel runs on sm_90 only")
    if not scores:
        _check_fused(case, splits=splits, warps=selection.WGMMA, producer=producer)
        return
    layout, bs = case["layout"], case["block_size"]
    iq, ik = _index_inputs(np.random.default_rng(case["seed"]), layout, case)
    cu_q, cu_k = _device_cu(layout)
    got = run_poisoned_twice(
        lambda out: selection.block_scores(cupy.asarray(iq), cupy.asarray(ik), layout, cu_q, cu_k, block_size=bs,
                                           causal=case["causal"], out=out,
                                           tuning=selection.SelectTuning(warps=selection.WGMMA, producer=producer)),
        lambda: cupy.empty((layout.total_q, case["hkv"], layout.n_blocks(bs)), cupy.float32), SCORE_POISON)
    _assert_scores(got, iq, ik, layout, bs, case["causal"])


@pytest.mark.parametrize("splits", [1, 3])
def test_select_wgmma_producer_is_bitwise_the_wgmma_kernel(splits, rng):
    """select_sm90.cu with a producer warpgroup (the key tiles through an mbarrier ring, the
    computing warpgroups out of step) computes the same products and folds: block scores and
    ids equal to the kernel without one, bit for bit (long rows: many key tiles a CTA)."""
    import cupy

    from msa_cupy import selection

    if not _jit.has_wgmma():
        pytest.skip("the wgmma kernel runs on sm_90 only")
    layout = _layout([(700, 9000), (300, 300), (1, 20_000)])
    hkv, di, bs, dt = 4, 128, 128, testing.DTYPES["bfloat16"]
    iq = cupy.asarray(testing.randn(rng, (layout.total_q, hkv, di), dt))
    ik = cupy.asarray(testing.randn(rng, (layout.total_k, 1, di), dt))
    cu_q, cu_k = _device_cu(layout)
    runs = []
    for producer in (False, True):
        tuning = selection.SelectTuning(splits=splits, warps=selection.WGMMA, producer=producer)
        scores = selection.block_scores(iq, ik, layout, cu_q, cu_k, block_size=bs, causal=True, tuning=tuning)
        ids = selection.select_blocks(iq, ik, layout, cu_q, cu_k, top_k=16, block_size=bs, local_blocks=1,
                                      sink_blocks=1, causal=True, tuning=tuning)
        runs.append((cupy.asnumpy(scores), cupy.asnumpy(ids)))
    np.testing.assert_array_equal(runs[0][0].view(np.uint32), runs[1][0].view(np.uint32))
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


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
    iq = testing.randn(rng, (nq, hkv, di), np.float16)
    ik_dev = testing.device_randn((nk, 1, di), np.float16)
    ik = cupy.asnumpy(ik_dev)
    cu_q, cu_k = _device_cu(layout)
    opts = dict(top_k=k, block_size=bs, local_blocks=1, sink_blocks=1, causal=True)
    out = cupy.full((nq, hkv, k), ID_POISON, cupy.int32)
    iq_dev = cupy.asarray(iq)
    got = cupy.asnumpy(selection.select_blocks(iq_dev, ik_dev, layout, cu_q, cu_k, out=out, **opts))
    again = cupy.asnumpy(selection.select_blocks(iq_dev, ik_dev, layout, cu_q, cu_k, **opts))
    assert np.array_equal(got, again)
    rows = np.unique(np.concatenate([[0, nq - 1], rng.integers(0, nq, size=6)]))
    positions = query_positions(nq, nk)[rows]
    scores = reference.sequence_block_scores(iq[rows], ik, positions, block_size=bs, causal=True)
    testing.assert_selection(got[rows], scores, positions, nk, tol=testing.score_tolerance(iq, ik), **opts)
