"""The public API on the GPU against the reference: the fast kernels and the plain CuPy path
(MSA_CUPY_PLAIN=1), on hypothesis-drawn shapes, plus a 128K-token context checked on sampled rows."""
import contextlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msa_cupy
from msa_cupy import reference, testing
from msa_cupy.testing import to_device

pytestmark = pytest.mark.gpu
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def _route(path):
    """Route the public functions to the fast kernels or (path "plain") the plain CuPy path."""
    old = os.environ.pop("MSA_CUPY_PLAIN", None)
    if path == "plain":
        os.environ["MSA_CUPY_PLAIN"] = "1"
    try:
        yield
    finally:
        os.environ.pop("MSA_CUPY_PLAIN", None)
        if old is not None:
            os.environ["MSA_CUPY_PLAIN"] = old


@pytest.fixture(autouse=True, params=["fast", "plain"])
def path(request):
    with _route(request.param):
        yield request.param


@st.composite
def problems(draw):
    varlen = draw(st.booleans())
    if varlen:
        pairs = draw(testing.lengths(max_q=40, max_k=700))
    else:
        nk = draw(st.integers(1, 700))
        pairs = [(draw(st.integers(1, 40)), nk)] * draw(st.integers(1, 2))
    return dict(varlen=varlen, pairs=pairs, hkv=draw(st.sampled_from([1, 2, 4])), g=draw(st.sampled_from([1, 2, 4, 8, 16])),
                d=draw(st.sampled_from([64, 128])), block=draw(st.sampled_from([64, 128])),
                dtype=draw(st.sampled_from(sorted(testing.DTYPES))), causal=draw(st.booleans()),
                top_k=draw(st.integers(1, 6)), shared=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


def _arrays(p):
    """Host inputs of a problem, and its cu_seqlens (None for batched inputs)."""
    a = testing.attention_inputs(np.random.default_rng(p["seed"]), p["pairs"], n_kv_heads=p["hkv"], group_size=p["g"],
                                 head_dim=p["d"], dt=p["dtype"], shared_index_k=p["shared"], batched=not p["varlen"])
    cu = dict(cu_seqlens_q=a.pop("cu_seqlens_q"), cu_seqlens_k=a.pop("cu_seqlens_k"))
    return a, cu


@SETTINGS
@given(p=problems())
def test_attention_matches_reference(p):
    a, cu = _arrays(p)
    opts = dict(block_size=p["block"], top_k=p["top_k"], causal=p["causal"])
    ref_out, ref_ids = reference.attention(**a, **cu, **opts, return_indices=True)
    out, lse, ids = msa_cupy.attention(**to_device(a), **to_device(cu), **opts, return_lse=True, return_indices=True)
    ids = ids.get()
    # the reference selects on float64 scores, the GPU on float32: compare attention over the same
    # selection, and the selections by the reference score of what each picked
    out_same, lse_same = reference.sparse_attention(a["q"], a["k"], a["v"], ids, **cu, block_size=p["block"],
                                                    causal=p["causal"], return_lse=True)
    testing.assert_attention_close(out, out_same, p["dtype"], lse, lse_same)
    testing.assert_selection_matches(ids, a["index_q"], a["index_k"], top_k=p["top_k"], block_size=p["block"],
                                     causal=p["causal"], **cu)
    if np.array_equal(ids, ref_ids):
        testing.assert_attention_close(out, ref_out, p["dtype"])


@SETTINGS
@given(p=problems())
def test_block_scores_match_reference(p):
    a, cu = _arrays(p)
    scores_ref = reference.block_scores(a["index_q"], a["index_k"], block_size=p["block"], causal=p["causal"], **cu)
    scores = msa_cupy.block_scores(to_device(a["index_q"]), to_device(a["index_k"]), block_size=p["block"],
                                   causal=p["causal"], **to_device(cu)).get()
    assert scores.dtype == np.float32 and scores.shape == scores_ref.shape
    finite = np.isfinite(scores_ref)
    assert np.array_equal(finite, np.isfinite(scores))
    assert np.allclose(scores[finite], scores_ref[finite], rtol=1e-4, atol=1e-3)


@SETTINGS
@given(p=problems(), levels=st.sampled_from([0, 3]), specials=st.booleans())
def test_topk_blocks_exact(path, p, levels, specials):
    """Top-k over the same float32 scores (many exact ties, NaN, -inf, +inf) equals the reference
    exactly.  The plain path runs the reference's own selection rules on CuPy arrays, so on that
    path the result is also held to the CUDA kernel, written independently, on the same scores."""
    a, cu = _arrays(p)
    rng = np.random.default_rng(p["seed"] + 1)
    n_blocks = -(-max(nk for _, nk in p["pairs"]) // p["block"])
    query_shape = a["index_q"].shape[:-2]
    scores = testing.random_scores(rng, (*query_shape, p["hkv"], n_blocks), levels=levels, specials=specials)
    opts = dict(top_k=p["top_k"], block_size=p["block"], causal=p["causal"],
                num_keys=None if p["varlen"] else p["pairs"][0][1])
    want = reference.topk_blocks(scores, **opts, **cu)
    got = msa_cupy.topk_blocks(to_device(scores), **opts, **to_device(cu)).get()
    assert np.array_equal(got, want), "top-k over the same float32 scores must be exact"
    if path == "plain":
        with _route("fast"):
            kernel = msa_cupy.topk_blocks(to_device(scores), **opts, **to_device(cu)).get()
        assert np.array_equal(got, kernel), "the plain path and the kernel pick different blocks"


def test_repeats_are_bitwise_identical_and_inputs_untouched():
    import cupy as cp

    rng = np.random.default_rng(1)
    q = to_device(testing.randn(rng, (2, 300, 8, 64), "bfloat16"))
    k = to_device(testing.randn(rng, (2, 300, 2, 64), "bfloat16"))
    v = to_device(testing.randn(rng, (2, 300, 2, 64), "bfloat16"))
    before = [x.copy() for x in (q, k, v)]
    first = msa_cupy.attention(q, k, v, block_size=64, top_k=2, return_lse=True, return_indices=True)
    second = msa_cupy.attention(q, k, v, block_size=64, top_k=2, return_lse=True, return_indices=True)
    for x, y in zip(first, second):
        assert cp.array_equal(x.view(cp.uint8) if x.dtype.itemsize == 2 else x, y.view(cp.uint8) if y.dtype.itemsize == 2 else y)
    for x, y in zip(before, (q, k, v)):
        assert cp.array_equal(x.view(cp.uint16), y.view(cp.uint16))


def test_128k_context_on_sampled_rows(path):
    """A long context end to end; the reference recomputes sampled rows over all keys."""
    from msa_cupy._layout import query_positions

    if path == "plain":
        pytest.skip("the plain path is the slow fallback; the long case checks the fast kernels")
    n, hq, hkv, d, block, top_k = 131072, 16, 4, 128, 128, 16
    rng = np.random.default_rng(7)
    a = testing.attention_inputs(rng, [(n, n)], n_kv_heads=hkv, group_size=hq // hkv, head_dim=d, dt="bfloat16")
    q, k, v, iq, ik = (a[name] for name in ("q", "k", "v", "index_q", "index_k"))
    out, lse, ids = msa_cupy.attention(*to_device((q, k, v)), index_q=to_device(iq), index_k=to_device(ik),
                                       return_lse=True, return_indices=True)
    rows = np.sort(np.concatenate([rng.choice(n, 12, replace=False), [0, 1, 127, 128, n - 1]]))
    out, lse, ids = out.get()[rows], lse.get()[rows], ids.get()[rows]
    pos = query_positions(n, n)[rows]
    scores = reference.sequence_block_scores(iq[rows], ik, pos, block_size=block)
    testing.assert_selection(ids, scores, pos, n, tol=testing.score_tolerance(iq, ik), top_k=top_k, block_size=block)
    ref_out, ref_lse = reference.sequence_sparse_attention(q[rows], k, v, ids, pos, block_size=block)
    testing.assert_attention_close(out, ref_out, "bfloat16", lse, ref_lse)
