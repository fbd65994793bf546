"""GPU tests of msa_cupy.sparse (KV-outer prefill, decode split-K, combine) against the
NumPy oracle.  Every test is marked ``gpu``; cupy is imported inside the tests."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_cupy import reference
from msa_cupy._layout import query_positions, varlen_layout

TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3}
LSE_TOLERANCE = 1e-3


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16)


def _random_picks(rng, nq, nk, hkv, top_k, block_size, causal, mode):
    """(nq, hkv, top_k) int32 valid block ids: -1 padding, unordered, duplicates, or all blocks."""
    nb = -(-nk // block_size)
    if nb == 0:
        return np.full((nq, hkv, top_k), -1, np.int32)
    if mode == "all":  # every block: dense attention
        ids = np.broadcast_to(rng.permutation(nb).astype(np.int32), (nq, hkv, nb))
        pad = np.full((nq, hkv, max(top_k - nb, 0)), -1, np.int32)
        return np.ascontiguousarray(np.concatenate([ids, pad], axis=-1))
    ids = rng.integers(0, nb, size=(nq, hkv, top_k)).astype(np.int32)  # unordered, may repeat
    if mode == "local" and causal:  # the local block in a random slot, as a selector would
        local = np.clip(query_positions(nq, nk), 0, nk - 1) // block_size
        slot = rng.integers(0, top_k, size=(nq, hkv))
        np.put_along_axis(ids, slot[..., None], np.broadcast_to(local[:, None, None], (nq, hkv, 1)).astype(np.int32), -1)
    ids[rng.random(ids.shape) < 0.2] = -1
    return ids


def _run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, force_path=None, **tuning):
    import cupy

    from msa_cupy import sparse

    layout = varlen_layout(np.asarray(cu_q), np.asarray(cu_k))
    sparse._poison_outputs = True
    try:
        out, lse = sparse.sparse_attention(
            cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), cupy.asarray(bi), layout,
            cupy.asarray(cu_q, cupy.int32), cupy.asarray(cu_k, cupy.int32),
            block_size=block_size, causal=causal, scale=scale, return_lse=True, force_path=force_path, **tuning)
        cupy.cuda.runtime.deviceSynchronize()
    finally:
        sparse._poison_outputs = False
    return out, lse


def _check(out, lse, ref_out, ref_lse, dtype_name):
    out = np.asarray(out.get()).astype(np.float64)
    lse = lse.get().astype(np.float64)
    assert not np.isnan(out).any(), "unwritten (poisoned) output elements"
    assert not np.isnan(lse).any(), "unwritten (poisoned) lse elements"
    denom = max(np.linalg.norm(ref_out), 1e-30)
    err = np.linalg.norm(out - ref_out) / denom
    assert err < TOLERANCE[dtype_name], f"relative error {err:.2e}"
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "lse = -inf rows differ"
    finite = np.isfinite(ref_lse)
    if finite.any():
        assert np.max(np.abs(lse[finite] - ref_lse[finite])) < LSE_TOLERANCE
    assert np.all(out[np.isneginf(ref_lse)] == 0), "queries that see no key must give 0"


def _varlen_case(rng, lengths, group, hkv, head_dim, dtype_name, top_k, block_size, causal, mode, scale=None):
    """Random varlen q/k/v and picks for `lengths` [(nq, nk), ...], with the oracle's answer."""
    dt = _dtype(dtype_name)
    cu_q = np.concatenate([[0], np.cumsum([nq for nq, _ in lengths])]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum([nk for _, nk in lengths])]).astype(np.int64)
    q = rng.standard_normal((cu_q[-1], group * hkv, head_dim)).astype(dt)
    k = rng.standard_normal((cu_k[-1], hkv, head_dim)).astype(dt)
    v = rng.standard_normal((cu_k[-1], hkv, head_dim)).astype(dt)
    bi = np.concatenate([_random_picks(rng, nq, nk, hkv, top_k, block_size, causal, mode)
                         for nq, nk in lengths]).reshape(-1, hkv, top_k).astype(np.int32)
    scale = 1 / np.sqrt(head_dim) if scale is None else scale
    ref_out, ref_lse = reference.sparse_attention(
        q, k, v, bi, block_size=block_size, causal=causal, scale=scale,
        cu_seqlens_q=cu_q.astype(np.int32), cu_seqlens_k=cu_k.astype(np.int32), return_lse=True)
    return (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse)


@st.composite
def _cases(draw):
    group = draw(st.sampled_from([1, 2, 4, 8, 16]))
    hkv = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([64, 128]))
    block_size = draw(st.sampled_from([64, 128]))
    dtype_name = draw(st.sampled_from(["bfloat16", "float16"]))
    causal = draw(st.booleans())
    n_seq = draw(st.integers(1, 3))
    lengths = []
    for _ in range(n_seq):
        nk = draw(st.sampled_from([0, 1, 5, 63, 64, 130, 257, 400, 700]))
        nq = draw(st.sampled_from([0, 1, 3, 17, 40, 100, nk, nk + 3]))
        lengths.append((nq, nk))
    top_k = draw(st.integers(1, 8))
    mode = draw(st.sampled_from(["random", "local", "all"]))
    path = draw(st.sampled_from([None, "prefill", "decode"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return group, hkv, head_dim, block_size, dtype_name, causal, lengths, top_k, mode, path, seed


@pytest.mark.gpu
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_cases())
def test_sparse_attention_matches_reference(case):
    _check_case(case)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_cases(), kernel=st.sampled_from(["wgmma", "mma"]))
def test_prefill_kernels_at_d128_bk128(case, kernel):
    """Both prefill kernels (sm_90 wgmma, mma.sync) at the shape where sm_90 defaults to wgmma."""
    from msa_cupy import _jit

    if kernel == "wgmma" and not _jit.has_wgmma():
        pytest.skip("the wgmma kernel runs on sm_90 only")
    group, hkv, _, _, dtype_name, causal, lengths, top_k, mode, _, seed = case
    _check_case((group, hkv, 128, 128, dtype_name, causal, lengths, top_k, mode, "prefill", seed),
                prefill_kernel=kernel)


def _check_case(case, **tuning):
    group, hkv, head_dim, block_size, dtype_name, causal, lengths, top_k, mode, path, seed = case
    rng = np.random.default_rng(seed)
    if mode == "all":
        top_k = max(top_k, max((-(-nk // block_size) for _, nk in lengths), default=1), 1)
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _varlen_case(
        rng, lengths, group, hkv, head_dim, dtype_name, top_k, block_size, causal, mode,
        scale=float(rng.uniform(0.5, 1.5)) / np.sqrt(head_dim))
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, force_path=path, **tuning)
    _check(out, lse, ref_out, ref_lse, dtype_name)
    out2, lse2 = _run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, force_path=path, **tuning)
    assert np.array_equal(out.get().view(np.uint16), out2.get().view(np.uint16)), "repeat not bitwise identical"
    assert np.array_equal(lse.get().view(np.uint32), lse2.get().view(np.uint32)), "repeat lse not bitwise identical"


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
def test_decode_shaped_batch(rng, group, path):
    """Decode-shaped batch (1-16 queries per sequence, long caches), both paths vs the oracle;
    the automatic choice takes the decode path (bitwise equal to forcing it)."""
    hkv, head_dim, block_size, top_k = 2, 128, 128, 16
    lengths = [(1, 5000), (16, 3000), (0, 100), (7, 1)]
    (q, k, v, bi, cu_q, cu_k, _), (ref_out, ref_lse) = _varlen_case(
        rng, lengths, group, hkv, head_dim, "bfloat16", top_k, block_size, True, "local")
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, True, 1 / np.sqrt(head_dim), force_path=path)
    _check(out, lse, ref_out, ref_lse, "bfloat16")
    if path == "decode":
        auto, _ = _run(q, k, v, bi, cu_q, cu_k, block_size, True, 1 / np.sqrt(head_dim))
        assert np.array_equal(auto.get().view(np.uint16), out.get().view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("warps,stages,mt", [(8, 2, 1), (4, 3, 1), (4, 2, 2), (8, 2, 2)])
@pytest.mark.parametrize("group,head_dim", [(16, 128), (2, 64)])
def test_prefill_tile_variants(rng, warps, stages, mt, group, head_dim):
    """Non-default prefill tilings (benchmarked alternatives) stay correct."""
    hkv, block_size, top_k = 2, 64, 5
    lengths = [(300, 700), (1, 1), (130, 130)]
    (q, k, v, bi, cu_q, cu_k, _), (ref_out, ref_lse) = _varlen_case(
        rng, lengths, group, hkv, head_dim, "float16", top_k, block_size, True, "local")
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, True, 1 / np.sqrt(head_dim), force_path="prefill",
                    prefill_warps=warps, prefill_stages=stages, prefill_mt=mt, prefill_kernel="mma")
    _check(out, lse, ref_out, ref_lse, "float16")


def _realistic_picks(nq, nk, hkv, top_k, block_size, rng):
    """Local block + (top_k - 1) distinct random earlier blocks, ascending (SPEC layout)."""
    pos = query_positions(nq, nk)
    local = pos // block_size
    r = np.sort(rng.random((nq, hkv, top_k - 1)), axis=-1)
    span = np.maximum(local - (top_k - 1) + 1, 1)[:, None, None]
    earlier = (r * span).astype(np.int64) + np.arange(top_k - 1)  # distinct, < local when local >= top_k - 1
    earlier = np.where(earlier < local[:, None, None], earlier, -1)
    ids = np.concatenate([earlier, np.broadcast_to(local[:, None, None], (nq, hkv, 1))], axis=-1)
    return ids.astype(np.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("nq,nk,hq,hkv,dtype_name", [(131072, 131072, 16, 2, "bfloat16"),
                                                      (2048, 131072, 32, 4, "float16")])
def test_long_context_sampled_rows(rng, nq, nk, hq, hkv, dtype_name):
    """128K keys: full kernel run, rows sampled and checked with sequence_sparse_attention."""
    import cupy

    from msa_cupy import sparse

    head_dim, block_size, top_k = 128, 128, 16
    cdt = cupy.float16 if dtype_name == "float16" else None
    dt = _dtype(dtype_name)
    q = cupy.random.standard_normal((nq, hq, head_dim), dtype=cupy.float32).astype(cdt or dt)
    k = cupy.random.standard_normal((nk, hkv, head_dim), dtype=cupy.float32).astype(cdt or dt)
    v = cupy.random.standard_normal((nk, hkv, head_dim), dtype=cupy.float32).astype(cdt or dt)
    bi = _realistic_picks(nq, nk, hkv, top_k, block_size, rng)
    layout = varlen_layout(np.array([0, nq]), np.array([0, nk]))
    sparse._poison_outputs = True
    try:
        out, lse = sparse.sparse_attention(q, k, v, cupy.asarray(bi), layout, cupy.array([0, nq], cupy.int32),
                                           cupy.array([0, nk], cupy.int32), block_size=block_size, causal=True,
                                           scale=1 / np.sqrt(head_dim))
        cupy.cuda.runtime.deviceSynchronize()
    finally:
        sparse._poison_outputs = False
    rows = np.unique(np.concatenate([rng.integers(0, nq, 40), [0, nq - 1]]))
    kh, vh = k.get(), v.get()
    ref_out, ref_lse = reference.sequence_sparse_attention(
        q[rows].get(), kh, vh, bi[rows], query_positions(nq, nk)[rows], block_size=block_size, causal=True,
        scale=1 / np.sqrt(head_dim))
    _check(out[rows], lse[rows], ref_out, ref_lse, dtype_name)
    assert not bool(cupy.isnan(lse).any()), "unwritten lse"


@pytest.mark.gpu
def test_64bit_offsets(rng):
    """total_q * Hq * D > 2^31: rows past the 32-bit boundary checked on samples."""
    import cupy
    import ml_dtypes

    from msa_cupy import sparse

    nq = nk = 270_000
    hq, hkv, head_dim, block_size, top_k = 64, 4, 128, 128, 4
    assert nq * hq * head_dim > 2**31
    dt = np.dtype(ml_dtypes.bfloat16)
    q = cupy.random.standard_normal((nq, hq, head_dim), dtype=cupy.float32).astype(dt)
    k = cupy.random.standard_normal((nk, hkv, head_dim), dtype=cupy.float32).astype(dt)
    v = cupy.random.standard_normal((nk, hkv, head_dim), dtype=cupy.float32).astype(dt)
    bi = _realistic_picks(nq, nk, hkv, top_k, block_size, rng)
    layout = varlen_layout(np.array([0, nq]), np.array([0, nk]))
    out, lse = sparse.sparse_attention(q, k, v, cupy.asarray(bi), layout, cupy.array([0, nq], cupy.int32),
                                       cupy.array([0, nk], cupy.int32), block_size=block_size, causal=True,
                                       scale=1 / np.sqrt(head_dim))
    cupy.cuda.runtime.deviceSynchronize()
    rows = np.array([5, nq // 2, 2**31 // (hq * head_dim) + 3, nq - 2, nq - 1])
    ref_out, ref_lse = reference.sequence_sparse_attention(
        q[rows].get(), k.get(), v.get(), bi[rows], query_positions(nq, nk)[rows], block_size=block_size,
        causal=True, scale=1 / np.sqrt(head_dim))
    _check(out[rows], lse[rows], ref_out, ref_lse, "bfloat16")


@pytest.mark.gpu
def test_public_api_runs_the_kernels(rng):
    """msa_cupy.sparse_attention on CuPy arrays (batched layout) reaches these kernels and
    matches the oracle; lse comes back when asked."""
    import cupy

    import msa_cupy

    batch, nq, nk, hq, hkv, head_dim, block_size, top_k = 2, 70, 300, 8, 2, 64, 64, 3
    dt = _dtype("bfloat16")
    q = rng.standard_normal((batch, nq, hq, head_dim)).astype(dt)
    k = rng.standard_normal((batch, nk, hkv, head_dim)).astype(dt)
    v = rng.standard_normal((batch, nk, hkv, head_dim)).astype(dt)
    bi = np.stack([_random_picks(rng, nq, nk, hkv, top_k, block_size, True, "local") for _ in range(batch)])
    ref_out, ref_lse = reference.sparse_attention(q, k, v, bi, block_size=block_size, return_lse=True)
    out, lse = msa_cupy.sparse_attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), cupy.asarray(bi),
                                         block_size=block_size, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.shape == q.shape and lse.shape == (batch, nq, hq)
    _check(out.reshape(-1, hq, head_dim), lse.reshape(-1, hq), ref_out.reshape(-1, hq, head_dim),
           ref_lse.reshape(-1, hq), "bfloat16")
