"""GPU tests of msa_cupy.sparse (KV-outer prefill, decode split-K, combine) against the
NumPy oracle.  Every test is marked ``gpu``; cupy is imported inside the tests."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_cupy import reference, testing
from msa_cupy._layout import query_positions, varlen_layout


def _run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, **tuning):
    """sparse_attention with poisoned outputs; ``tuning``: SparseTuning fields."""
    import cupy

    from msa_cupy import sparse

    layout = varlen_layout(np.asarray(cu_q), np.asarray(cu_k))
    sparse._poison_outputs = True
    try:
        out, lse = sparse.sparse_attention(
            cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), cupy.asarray(bi), layout,
            cupy.asarray(cu_q, cupy.int32), cupy.asarray(cu_k, cupy.int32),
            block_size=block_size, causal=causal, scale=scale, return_lse=True,
            tuning=sparse.SparseTuning(**tuning))
        cupy.cuda.runtime.deviceSynchronize()
    finally:
        sparse._poison_outputs = False
    return out, lse


def _random_picks(rng, lengths, hkv, top_k, block_size, causal, mode):
    return testing.random_block_indices(rng, lengths, hkv, top_k, block_size, mode=mode, causal=causal)


def _varlen_case(rng, lengths, group, hkv, head_dim, dtype_name, top_k, block_size, causal, mode, scale=None,
                 select=_random_picks):
    """Random varlen q/k/v and picks for `lengths` [(nq, nk), ...] (``select``: the test kit's
    random modes unless given), with the oracle's answer."""
    a = testing.attention_inputs(rng, lengths, n_kv_heads=hkv, group_size=group, head_dim=head_dim, dt=dtype_name)
    q, k, v, cu_q, cu_k = (a[name] for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"))
    bi = select(rng, lengths, hkv, top_k, block_size, causal, mode)
    scale = 1 / np.sqrt(head_dim) if scale is None else scale
    ref_out, ref_lse = reference.sparse_attention(q, k, v, bi, block_size=block_size, causal=causal, scale=scale,
                                                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    return (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse)


def _draw_problem(draw, *, max_q, modes):
    """(group, hkv, head_dim, block_size, dtype_name, causal, lengths, top_k, mode) of a varlen case."""
    return (draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([64, 128])),
            draw(st.sampled_from([64, 128])), draw(st.sampled_from(sorted(testing.DTYPES))), draw(st.booleans()),
            draw(testing.lengths(max_q=max_q, max_k=700, max_seqs=3)), draw(st.integers(1, 8)),
            draw(st.sampled_from(modes)))


@st.composite
def _cases(draw):
    problem = _draw_problem(draw, max_q=700, modes=["random", "local", "all"])  # 700 rows: several items per block
    return (*problem, draw(st.sampled_from([None, "prefill", "decode"])), draw(st.integers(0, 2**31 - 1)))


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
                prefill_kernel=kernel, schedule="kv")


def _check_case(case, select=_random_picks, **tuning):
    """One drawn case against the oracle, then repeated bitwise (``select``: how picks are made)."""
    group, hkv, head_dim, block_size, dtype_name, causal, lengths, top_k, mode, path, seed = case
    rng = np.random.default_rng(seed)
    if mode == "all":
        top_k = max(top_k, max((-(-nk // block_size) for _, nk in lengths), default=1), 1)
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _varlen_case(
        rng, lengths, group, hkv, head_dim, dtype_name, top_k, block_size, causal, mode,
        scale=float(rng.uniform(0.5, 1.5)) / np.sqrt(head_dim), select=select)
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, path=path, **tuning)
    testing.assert_attention_close(out, ref_out, dtype_name, lse, ref_lse)
    out2, lse2 = _run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, path=path, **tuning)
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
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, True, 1 / np.sqrt(head_dim), path=path)
    testing.assert_attention_close(out, ref_out, "bfloat16", lse, ref_lse)
    if path == "decode":
        auto, _ = _run(q, k, v, bi, cu_q, cu_k, block_size, True, 1 / np.sqrt(head_dim))
        assert np.array_equal(auto.get().view(np.uint16), out.get().view(np.uint16))


@st.composite
def _cluster_cases(draw):
    """Decode-shaped cases whose top_k a cluster takes (1-16 queries per sequence: some rows past
    a sequence's keys, repeated and -1 picks among the random modes)."""
    from msa_cupy import sparse

    group, hkv, head_dim, block_size, dtype_name, causal, lengths, _, mode = _draw_problem(
        draw, max_q=16, modes=["random", "local"])
    return (group, hkv, head_dim, block_size, dtype_name, causal, lengths, draw(st.sampled_from(sparse.DECODE_CLUSTERS)),
            mode, "decode", draw(st.integers(0, 2**31 - 1)))


@pytest.mark.gpu
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_cluster_cases())
def test_decode_cluster_combine_gives_the_last_cta_bits(case):
    """sm_90: the cluster of a row's top_k CTAs combines through distributed shared memory what
    the last CTA combines from global memory: the same sums in the same order, the same bits
    (and both against the oracle)."""
    from msa_cupy import _jit

    if not _jit.has_wgmma():
        pytest.skip("clusters: sm_90")
    _check_case(case, decode_combine="cluster")
    group, hkv, head_dim, block_size, dtype_name, causal, lengths, top_k, mode, path, seed = case
    rng = np.random.default_rng(seed)
    (q, k, v, bi, cu_q, cu_k, scale), _ = _varlen_case(rng, lengths, group, hkv, head_dim, dtype_name, top_k,
                                                       block_size, causal, mode)
    runs = [_run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, path="decode", decode_combine=c)
            for c in ("cluster", "last_cta")]
    assert np.array_equal(runs[0][0].get().view(np.uint16), runs[1][0].get().view(np.uint16))
    assert np.array_equal(runs[0][1].get().view(np.uint32), runs[1][1].get().view(np.uint32))


@pytest.mark.gpu
def test_decode_cluster_combine_refuses_what_it_cannot_take(rng):
    from msa_cupy import _jit, sparse

    combine_ok = _jit.has_wgmma()
    for top_k in (3, 32) if combine_ok else (16,):
        with pytest.raises(ValueError, match="decode_combine='cluster' needs an sm_90 GPU and top_k"):
            sparse.decode_kernel(np.dtype("float16"), 128, 4, 128, top_k, "cluster", pairs=1)


@pytest.mark.gpu
@pytest.mark.parametrize("warps,stages,mt", [(8, 2, 1), (4, 3, 1), (4, 2, 2), (8, 2, 2)])
@pytest.mark.parametrize("group,head_dim", [(16, 128), (2, 64)])
def test_prefill_tile_variants(rng, warps, stages, mt, group, head_dim):
    """Non-default prefill tilings (benchmarked alternatives) stay correct."""
    hkv, block_size, top_k = 2, 64, 5
    lengths = [(300, 700), (1, 1), (130, 130)]
    (q, k, v, bi, cu_q, cu_k, _), (ref_out, ref_lse) = _varlen_case(
        rng, lengths, group, hkv, head_dim, "float16", top_k, block_size, True, "local")
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, True, 1 / np.sqrt(head_dim), path="prefill",
                    prefill_warps=warps, prefill_stages=stages, prefill_mt=mt, prefill_kernel="mma", schedule="kv")
    testing.assert_attention_close(out, ref_out, "float16", lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("nq,nk,hq,hkv,dtype_name", [(131072, 131072, 16, 2, "bfloat16"),
                                                      (2048, 131072, 32, 4, "float16")])
def test_long_context_sampled_rows(rng, nq, nk, hq, hkv, dtype_name):
    """128K keys: full kernel run, rows sampled and checked with sequence_sparse_attention."""
    import cupy

    from msa_cupy import sparse

    head_dim, block_size, top_k = 128, 128, 16
    q = testing.device_randn((nq, hq, head_dim), dtype_name)
    k, v = testing.device_randn((nk, hkv, head_dim), dtype_name), testing.device_randn((nk, hkv, head_dim), dtype_name)
    bi = testing.plausible_block_indices(rng, nq, nk, hkv, top_k, block_size)
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
    testing.assert_attention_close(out[rows], ref_out, dtype_name, lse[rows], ref_lse)
    assert not bool(cupy.isnan(lse).any()), "unwritten lse"


@pytest.mark.gpu
def test_64bit_offsets(rng):
    """total_q * Hq * D > 2^31: rows past the 32-bit boundary checked on samples."""
    import cupy

    from msa_cupy import sparse

    nq = nk = 270_000
    hq, hkv, head_dim, block_size, top_k = 64, 4, 128, 128, 4
    assert nq * hq * head_dim > 2**31
    q = testing.device_randn((nq, hq, head_dim), "bfloat16")
    k, v = testing.device_randn((nk, hkv, head_dim), "bfloat16"), testing.device_randn((nk, hkv, head_dim), "bfloat16")
    bi = testing.plausible_block_indices(rng, nq, nk, hkv, top_k, block_size)
    layout = varlen_layout(np.array([0, nq]), np.array([0, nk]))
    out, lse = sparse.sparse_attention(q, k, v, cupy.asarray(bi), layout, cupy.array([0, nq], cupy.int32),
                                       cupy.array([0, nk], cupy.int32), block_size=block_size, causal=True,
                                       scale=1 / np.sqrt(head_dim))
    cupy.cuda.runtime.deviceSynchronize()
    rows = np.array([5, nq // 2, 2**31 // (hq * head_dim) + 3, nq - 2, nq - 1])
    ref_out, ref_lse = reference.sequence_sparse_attention(
        q[rows].get(), k.get(), v.get(), bi[rows], query_positions(nq, nk)[rows], block_size=block_size,
        causal=True, scale=1 / np.sqrt(head_dim))
    testing.assert_attention_close(out[rows], ref_out, "bfloat16", lse[rows], ref_lse)


@pytest.mark.gpu
def test_public_api_runs_the_kernels(rng):
    """msa_cupy.sparse_attention on CuPy arrays (batched layout) reaches these kernels and
    matches the oracle; lse comes back when asked."""
    import cupy

    import msa_cupy

    batch, nq, nk, hq, hkv, head_dim, block_size, top_k = 2, 70, 300, 8, 2, 64, 64, 3
    a = testing.attention_inputs(rng, [(nq, nk)] * batch, n_kv_heads=hkv, group_size=hq // hkv, head_dim=head_dim,
                                 batched=True)
    q, k, v = a["q"], a["k"], a["v"]
    bi = testing.random_block_indices(rng, [(nq, nk)] * batch, hkv, top_k, block_size, mode="local")
    bi = bi.reshape(batch, nq, hkv, top_k)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, bi, block_size=block_size, return_lse=True)
    out, lse = msa_cupy.sparse_attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), cupy.asarray(bi),
                                         block_size=block_size, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.shape == q.shape and lse.shape == (batch, nq, hq)
    testing.assert_attention_close(out, ref_out, "bfloat16", lse, ref_lse)


def reverse_index_model(bi, cu_q, block_off, q_begin, n_blocks_total, max_queries, row_mode=None):
    """The reverse index of block_indices rows bi (rows, Hkv, K) from q_begin, on the host:
    list_q, slot_pos and the work items, as reverse_index.cu defines them."""
    rows, hkv, top_k = bi.shape
    seq = np.searchsorted(cu_q, q_begin + np.arange(rows), side="right") - 1
    keyed = []  # (bucket, entry) of every distinct pick of a row that runs KV-outer
    for r in range(rows):
        for g in range(hkv):
            if row_mode is not None and row_mode[r, g]:
                continue
            for slot in range(top_k):
                block = int(bi[r, g, slot])
                if block >= 0 and block not in bi[r, g, :slot]:
                    keyed.append((g * n_blocks_total + int(block_off[seq[r]]) + block, (r * hkv + g) * top_k + slot))
    keyed.sort()
    n_entries = rows * hkv * top_k
    list_q = np.full(n_entries, -1, np.int32)
    slot_pos = np.full(n_entries, -1, np.int32)
    for p, (_, e) in enumerate(keyed):
        list_q[p] = q_begin + e // (hkv * top_k)
        slot_pos[e] = p
    counts = np.bincount([b for b, _ in keyed], minlength=hkv * n_blocks_total)
    starts = np.concatenate([[0], np.cumsum(counts)])
    items = []  # (sort key, bucket, start, count): full items first, then by decreasing size, in bucket order
    for bucket in np.flatnonzero(counts):
        for first in range(0, counts[bucket], max_queries):
            size = min(max_queries, counts[bucket] - first)
            items.append((max_queries - size, len(items), bucket, starts[bucket] + first, size))
    items.sort()
    n_items = min(n_entries // max_queries + min(hkv * n_blocks_total, n_entries), n_entries)
    table = np.zeros((n_items, 3), np.int32)
    table[:len(items)] = [it[2:] for it in items]
    return list_q, slot_pos, table


@pytest.mark.gpu
@pytest.mark.parametrize("in_place", [False, True])
def test_exclusive_scan(rng, in_place):
    """The reverse index's scan: exact prefix sums and the total, at tile edges and over many
    tiles, in place or not, nothing written past out[n]."""
    import cupy

    from msa_cupy import sparse

    tile = sparse.SCAN_THREADS * sparse.SCAN_ITEMS
    for n in (1, 5, tile - 1, tile, tile + 1, 3 * tile + 7, (1 << 20) + 3):
        a = rng.integers(0, 300, n + 2).astype(np.int32)
        a[n:] = -5  # past the input: out[n] is overwritten with the total, out[n + 1] untouched
        dev = cupy.asarray(a)
        out = dev if in_place else cupy.full(n + 2, -7, cupy.int32)
        sums = cupy.full(sparse._scan_tiles(n) + 1, -9, cupy.int32)
        sparse.exclusive_scan(dev, n, out, sums)
        want = np.concatenate([[0], np.cumsum(a[:n])]).astype(np.int32)
        got = out.get()
        np.testing.assert_array_equal(got[:n + 1], want)
        assert got[n + 1] == (-5 if in_place else -7)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["varlen", "three_passes", "row_mode", "wide_items"])
def test_reverse_index_stage(rng, case):
    """block_offsets + reverse_index on a chunk of a varlen batch, equal to the host model: each
    bucket's list ascends, every distinct pick has its position, the work items tile the lists,
    at most max_queries each, largest first.  "three_passes": over 2^16 buckets and many warp
    tiles (the counting sort's passes and tile order), hot blocks (full items).  "wide_items":
    512 queries an item (64-row tiles, G = 1), so sizes need two passes of the class sort."""
    import cupy

    from msa_cupy import sparse

    if case == "three_passes":
        lengths, hkv, top_k, block_size, max_queries = [(1500, 1 << 19), (700, 1 << 19)], 4, 16, 64, 32
        q_begin, rows = 100, 2000
    elif case == "wide_items":
        lengths, hkv, top_k, block_size, max_queries = [(2600, 1 << 15), (900, 1 << 14)], 2, 8, 64, 512
        q_begin, rows = 300, 3000
    else:
        lengths, hkv, top_k, block_size, max_queries = [(90, 700), (40, 300)], 2, 6, 64, 16
        q_begin, rows = 50, 70  # a chunk across the sequence boundary
    bi = testing.random_block_indices(rng, lengths, hkv, top_k, block_size, mode="random", causal=False)
    bi[::3, :, -1] = bi[::3, :, 0]  # repeated ids count once
    if case in ("three_passes", "wide_items"):
        hot = rng.random(bi.shape) < 0.5
        bi[hot] = rng.integers(0, 40 if case == "three_passes" else 10, size=int(hot.sum()))
    row_mode = (rng.random((rows, hkv)) < 0.4).astype(np.uint8) if case == "row_mode" else None
    cu_q = np.concatenate([[0], np.cumsum([nq for nq, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([nk for _, nk in lengths])]).astype(np.int32)
    layout = varlen_layout(cu_q, cu_k)
    n_blocks_total = sparse._n_blocks_total(layout, block_size)
    block_off = sparse.block_offsets(cupy.asarray(cu_k), layout.n_seq, block_size)
    expect_off = np.concatenate([[0], np.cumsum([-(-nk // block_size) for _, nk in lengths])])
    assert block_off.get().tolist() == expect_off.tolist()
    n_entries = rows * hkv * top_k
    list_q, slot_pos = (cupy.full(n_entries, -7, cupy.int32) for _ in range(2))
    chunk = bi[q_begin:q_begin + rows]
    items = sparse.reverse_index(cupy.asarray(chunk), cupy.asarray(cu_q), block_off, layout.n_seq, q_begin, rows,
                                 n_blocks_total=n_blocks_total, max_queries=max_queries, list_q=list_q,
                                 slot_pos=slot_pos, row_mode=None if row_mode is None else cupy.asarray(row_mode))
    want_list, want_slot, want_items = reverse_index_model(chunk, cu_q, expect_off, q_begin, n_blocks_total,
                                                           max_queries, row_mode)
    np.testing.assert_array_equal(list_q.get(), want_list)
    np.testing.assert_array_equal(slot_pos.get(), want_slot)
    np.testing.assert_array_equal(items.get(), want_items)
    if case == "three_passes":
        assert hkv * n_blocks_total >= 1 << 16 and n_entries > 8 * sparse.SPLIT_TILE
        assert (want_items[:, 2] == max_queries).sum() > 10 and (want_items[:, 2] == 1).sum() > 10
    if case == "wide_items":  # partial items of more and of fewer than 256 queries, full ones
        sizes = want_items[:, 2]
        assert (sizes == max_queries).any() and ((sizes > 256) & (sizes < max_queries)).any()
        assert ((sizes > 0) & (sizes < 256)).any()


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_phase_times_and_explicit_tuning(rng, path):
    """Recording phase times and spelling out the default tuning change no bit of the result."""
    import cupy

    from msa_cupy import sparse

    lengths, hkv, group, head_dim, block_size = [(200 if path == "prefill" else 3, 500), (9, 260)], 2, 4, 128, 64
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _varlen_case(
        rng, lengths, group, hkv, head_dim, "bfloat16", 4, block_size, True, "random")
    layout = varlen_layout(cu_q, cu_k)
    args = [cupy.asarray(x) for x in (q, k, v, bi)] + [layout, cupy.asarray(cu_q), cupy.asarray(cu_k)]
    kw = dict(block_size=block_size, causal=True, scale=scale)
    plain_out, plain_lse = sparse.sparse_attention(*args, **kw)
    stats = sparse.PhaseTimes()
    tuning = sparse.SparseTuning(path=path if path == "decode" else None, prefill_warps=sparse.PREFILL_WARPS,
                                 prefill_stages=sparse.PREFILL_STAGES, prefill_mt=sparse.PREFILL_MT)
    out, lse = sparse.sparse_attention(*args, **kw, tuning=tuning, stats=stats)
    totals = stats.totals()
    assert set(totals) == {"reverse_index", "attention", "combine"} and all(t >= 0 for t in totals.values())
    assert np.array_equal(out.get().view(np.uint16), plain_out.get().view(np.uint16))
    assert np.array_equal(lse.get().view(np.uint32), plain_lse.get().view(np.uint32))
    testing.assert_attention_close(out, ref_out, "bfloat16", lse, ref_lse)
