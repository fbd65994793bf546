"""GPU tests of the prefill schedule: the tile-outer kernels (sparse_prefill_tile.cu, and
sparse_prefill_tile_sm90.cu on sm_90 at D = Bk = 128), the tile classification
(tile_schedule.cu) and the hybrid of both paths, against the float64 oracle.
Random and coherent selections, causal and not, varlen batches with empty and one-token
sequences, D 64/128, Bk 64/128, G 1..16; schedules "tile", "kv" and "auto" agree with each
other and with the oracle.  Outputs are poisoned before each run.  (NaN and Inf:
test_nonfinite_gpu.py, which runs these schedules too.)"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_cupy import reference, sparse, testing
from msa_cupy._bench import patterns
from msa_cupy._layout import query_positions, varlen_layout
from test_sparse_gpu import _check_case, _draw_problem, _run, _varlen_case

pytestmark = pytest.mark.gpu


def _selection(rng, lengths, hkv, top_k, block_size, causal, mode):
    """int32 (total_q, Hkv, top_k) picks: the test kit's random modes, or "coherent" (the
    oracle's selection over a coherent index: neighbouring queries share most blocks)."""
    if mode != "coherent":
        return testing.random_block_indices(rng, lengths, hkv, top_k, block_size, mode=mode, causal=causal)
    iqs, iks = [], []
    for nq, nk in lengths:
        iq, ik = patterns.index_inputs(rng, "coherent", nq, nk, hkv, 16, np.float32, window=64, block_size=block_size)
        iqs.append(iq)
        iks.append(ik)
    cu_q, cu_k = testing.cu_seqlens([nq for nq, _ in lengths]), testing.cu_seqlens([nk for _, nk in lengths])
    return reference.select_blocks(np.concatenate(iqs), np.concatenate(iks), top_k=top_k, block_size=block_size,
                                   causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def _case(*args, **kwargs):
    """test_sparse_gpu's varlen case with this file's selections (coherent included)."""
    return _varlen_case(*args, select=_selection, **kwargs)


def _bitwise(a, b):
    return np.array_equal(a.get().view(np.uint16 if a.dtype.itemsize == 2 else np.uint32),
                          b.get().view(np.uint16 if b.dtype.itemsize == 2 else np.uint32))


@st.composite
def _cases(draw):
    problem = _draw_problem(draw, max_q=400, modes=["random", "local", "all", "coherent"])
    return (*problem, draw(st.sampled_from(["tile", "auto"])), draw(st.sampled_from([64, 128])),
            draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])), draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_cases())
def test_tile_and_auto_schedules_match_reference(case):
    *problem, schedule, tile_rows, min_useful, seed = case
    _check_case((*problem, "prefill", seed), select=_selection, schedule=schedule, tile_rows=tile_rows,
                tile_min_useful=min_useful)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_cases(), kernel=st.sampled_from(["wgmma", "wgmma_producer", "mma"]))
def test_tile_kernels_at_d128_bk128(case, kernel):
    """Every tile-outer kernel (sm_90 wgmma, with and without a producer warpgroup; mma.sync) at
    the shape where sm_90 defaults to wgmma."""
    from msa_cupy import _jit

    if kernel.startswith("wgmma") and not _jit.has_wgmma():
        pytest.skip("the wgmma kernel runs on sm_90 only")
    group, hkv, _, _, dtype_name, causal, lengths, top_k, mode, schedule, tile_rows, min_useful, seed = case
    _check_case((group, hkv, 128, 128, dtype_name, causal, lengths, top_k, mode, "prefill", seed), select=_selection,
                schedule=schedule, tile_rows=tile_rows, tile_min_useful=min_useful, tile_kernel=kernel[:5],
                tile_producer=kernel == "wgmma_producer")


@pytest.mark.parametrize("mode", ["coherent", "random"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group,hkv,top_k,tile_rows,stages", [(16, 2, 16, 128, 2), (16, 1, 5, 64, 3), (4, 2, 6, 128, 2),
                                                               (1, 1, 4, 128, 2), (2, 2, 3, 64, 3)])
def test_producer_variant_is_bitwise_the_wgmma_kernel(rng, mode, causal, group, hkv, top_k, tile_rows, stages):
    """sparse_prefill_tile_sm90.cu with a producer warpgroup (the chunks through an mbarrier ring,
    the query tile read by wgmma from shared memory, the non-finite V zeroed by the producer)
    against the same kernel without one: the same products summed in the same order, so the same
    bits; and both against the oracle.  One and two computing warpgroups, 2 and 3 buffers (3 fit
    the query tile of one warpgroup only)."""
    from msa_cupy import _jit

    if not _jit.has_wgmma():
        pytest.skip("the wgmma kernel runs on sm_90 only")
    lengths = [(600, 600), (1, 1), (0, 50), (130, 1000), (5, 3), (300, 2100)]
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _case(
        rng, lengths, group, hkv, 128, "bfloat16", top_k, 128, causal, mode)
    runs = []
    for producer in (False, True):
        out, lse = _run(q, k, v, bi, cu_q, cu_k, 128, causal, scale, path="prefill", schedule="tile",
                        tile_kernel="wgmma", tile_rows=tile_rows, tile_stages=stages, tile_producer=producer)
        testing.assert_attention_close(out, ref_out, "bfloat16", lse, ref_lse)
        runs.append((out, lse))
    assert _bitwise(runs[0][0], runs[1][0]) and _bitwise(runs[0][1], runs[1][1]), "producer variant not bitwise"


@pytest.mark.parametrize("mode", ["coherent", "random"])
@pytest.mark.parametrize("group,head_dim,block_size", [(16, 128, 128), (4, 64, 64), (1, 128, 64), (8, 64, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_schedules_agree(rng, mode, group, head_dim, block_size, causal):
    """tile, kv and auto (threshold in the middle: both paths in one call) each match the
    oracle and each other, on a varlen batch with a chunk of queries at the end of a cache."""
    hkv, top_k = 2, 6
    lengths = [(600, 600), (1, 1), (0, 50), (130, 1000), (5, 3)]
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _case(
        rng, lengths, group, hkv, head_dim, "bfloat16", top_k, block_size, causal, mode)
    outs = {}
    for schedule, kernel in (("tile", None), ("tile", "mma"), ("kv", None), ("auto", None)):
        out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, causal, scale, path="prefill", schedule=schedule,
                        tile_min_useful=0.5, tile_kernel=kernel)
        testing.assert_attention_close(out, ref_out, "bfloat16", lse, ref_lse)
        outs[schedule, kernel] = out
    for key in (("tile", None), ("tile", "mma"), ("auto", None)):
        assert testing.rel_error(outs[key], outs["kv", None]) < testing.TOLERANCE["bfloat16"]


def test_auto_mixes_both_paths(rng):
    """A selection coherent in one half of a sequence and random in the other: auto sends most
    of the first half's tiles tile-outer and most of the second's KV-outer (the model's
    choice); rows of both halves match the oracle, and the whole output the kv schedule's."""
    import cupy

    group, hkv, head_dim, block_size, top_k, n = 16, 1, 64, 64, 4, 4096
    a = testing.attention_inputs(rng, [(n, n)], n_kv_heads=hkv, group_size=group, head_dim=head_dim, dt="float16")
    q, k, v, cu_q, cu_k = (a[name] for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"))
    bi = _selection(rng, [(n, n)], hkv, top_k, block_size, True, "coherent")
    bi[n // 2:] = testing.plausible_block_indices(rng, n, n, hkv, top_k, block_size)[n // 2:]
    min_useful = 0.3  # the case is built for this threshold (top_k = 4: at 0.6 half its coherent tiles go KV-outer)
    mode = sparse.tile_schedule_model(bi, cu_q, tile_tokens=8, min_useful=min_useful)
    assert mode[: n // 2].mean() > 0.7 and mode[n // 2:].mean() < 0.3, "the case must mix the two paths"
    scale = 1 / np.sqrt(head_dim)
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, True, scale, path="prefill", schedule="auto",
                    tile_min_useful=min_useful)
    kv, _ = _run(q, k, v, bi, cu_q, cu_k, block_size, True, scale, path="prefill", schedule="kv")
    assert not bool(cupy.isnan(out).any()) and not bool(cupy.isnan(lse).any()), "unwritten elements"
    assert testing.rel_error(out, kv) < testing.TOLERANCE["float16"]
    rows = np.unique(np.concatenate([rng.integers(0, n, 60), [0, n // 2 - 1, n // 2, n - 1]]))
    ref_out, ref_lse = reference.sequence_sparse_attention(q[rows], k, v, bi[rows], query_positions(n, n)[rows],
                                                           block_size=block_size, causal=True, scale=scale)
    testing.assert_attention_close(out[rows], ref_out, "float16", lse[rows], ref_lse)


@pytest.mark.parametrize("tile_tokens", [4, 8, 64])
def test_classifier_matches_its_model(rng, tile_tokens):
    """query_tile_offsets + classify_query_tiles on a chunk that starts and ends inside
    sequences (empty ones between) against sparse.tile_schedule_model."""
    import cupy

    lengths = [(70, 300), (0, 20), (45, 45), (1, 9), (200, 640)]
    hkv, top_k, block_size = 3, 5, 32
    bi = np.concatenate([_selection(rng, [ln], hkv, top_k, block_size, True, mode)
                         for ln, mode in zip(lengths, ["coherent", "random", "local", "random", "coherent"])])
    cu_q = testing.cu_seqlens([nq for nq, _ in lengths])
    cu_k = testing.cu_seqlens([nk for _, nk in lengths])
    n_seq = len(lengths)
    for q_begin, rows in [(0, int(cu_q[-1])), (33, 150), (100, 1)]:
        tile_off = cupy.full(n_seq + 1, -7, cupy.int32)
        row_mode = cupy.full((rows, hkv), 7, cupy.uint8)
        d_cu_q, d_cu_k = cupy.asarray(cu_q), cupy.asarray(cu_k)
        sparse.query_tile_offsets(d_cu_q, n_seq, q_begin, rows, tile_tokens, tile_off)
        chunk = cupy.asarray(bi[q_begin:q_begin + rows])
        for min_useful in (0.0, 0.3, 0.7):
            sparse.classify_query_tiles(chunk, d_cu_q, d_cu_k, tile_off, n_seq, q_begin, rows,
                                        tile_tokens=tile_tokens, min_useful=min_useful, row_mode=row_mode)
            want = sparse.tile_schedule_model(bi, cu_q, tile_tokens=tile_tokens, min_useful=min_useful,
                                              q_begin=q_begin, rows=rows)
            assert np.array_equal(row_mode.get(), want), (q_begin, rows, min_useful)
        per_seq = [max(0, min(int(cu_q[s + 1]), q_begin + rows) - max(int(cu_q[s]), q_begin)) for s in range(n_seq)]
        assert tile_off.get().tolist() == np.concatenate([[0], np.cumsum([-(-n // tile_tokens) for n in per_seq])]).tolist()


@pytest.mark.parametrize("schedule", ["tile", "auto"])
def test_chunks_cut_tiles(rng, monkeypatch, schedule):
    """Query chunks of 37 rows (a small partial budget): tiles end at chunk boundaries too."""
    group, hkv, head_dim, block_size, top_k = 4, 2, 64, 64, 4
    lengths = [(150, 400), (90, 90)]
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _case(
        rng, lengths, group, hkv, head_dim, "bfloat16", top_k, block_size, True, "coherent")
    per_row = group * hkv * top_k * head_dim * 2
    monkeypatch.setattr(sparse, "PARTIAL_BUDGET_BYTES", 37 * per_row)
    out, lse = _run(q, k, v, bi, cu_q, cu_k, block_size, True, scale, path="prefill", schedule=schedule)
    testing.assert_attention_close(out, ref_out, "bfloat16", lse, ref_lse)


@pytest.mark.parametrize("schedule", ["tile", "auto", "kv"])
def test_long_coherent_context_sampled_rows(rng, schedule):
    """32K tokens at the paper's group size (G = 16, D = Bk = 128, top_k 16), a coherent
    selection from the fused selector: full run, rows sampled against the oracle."""
    import cupy

    import msa_cupy

    n, hq, hkv, head_dim, block_size, top_k = 32768, 32, 2, 128, 128, 16
    q = testing.device_randn((n, hq, head_dim), "bfloat16")
    k, v = testing.device_randn((n, hkv, head_dim), "bfloat16"), testing.device_randn((n, hkv, head_dim), "bfloat16")
    iq, ik = patterns.index_inputs(cupy.random.default_rng(1), "coherent", n, n, hkv, 128, testing.DTYPES["bfloat16"],
                                   block_size=block_size)
    bi = msa_cupy.select_blocks(iq, ik, top_k=top_k, block_size=block_size)
    assert patterns.adjacent_overlap(bi) > 0.8
    layout = varlen_layout(np.array([0, n]), np.array([0, n]))
    sparse._poison_outputs = True
    try:
        out, lse = sparse.sparse_attention(q, k, v, bi, layout, cupy.array([0, n], cupy.int32),
                                           cupy.array([0, n], cupy.int32), block_size=block_size, causal=True,
                                           scale=1 / np.sqrt(head_dim), tuning=sparse.SparseTuning(schedule=schedule))
        cupy.cuda.runtime.deviceSynchronize()
    finally:
        sparse._poison_outputs = False
    assert not bool(cupy.isnan(lse).any()) and not bool(cupy.isnan(out).any()), "unwritten elements"
    rows = np.unique(np.concatenate([rng.integers(0, n, 40), [0, 1, 127, 128, n - 1]]))
    ref_out, ref_lse = reference.sequence_sparse_attention(
        q[rows].get(), k.get(), v.get(), bi[rows].get(), query_positions(n, n)[rows], block_size=block_size,
        causal=True, scale=1 / np.sqrt(head_dim))
    testing.assert_attention_close(out[rows], ref_out, "bfloat16", lse[rows], ref_lse)


def test_large_top_k_falls_back_to_kv(rng):
    """top_k past what a tile deduplicates: auto runs KV-outer (same bits as kv), and a forced
    tile schedule says why it cannot."""
    group, hkv, head_dim, block_size, top_k = 16, 1, 64, 64, 200
    lengths = [(40, 4000)]
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _case(
        rng, lengths, group, hkv, head_dim, "float16", top_k, block_size, True, "random")
    auto = _run(q, k, v, bi, cu_q, cu_k, block_size, True, scale, path="prefill", schedule="auto")
    kv = _run(q, k, v, bi, cu_q, cu_k, block_size, True, scale, path="prefill", schedule="kv")
    testing.assert_attention_close(auto[0], ref_out, "float16", auto[1], ref_lse)
    assert _bitwise(auto[0], kv[0]) and _bitwise(auto[1], kv[1])
    with pytest.raises(ValueError, match="schedule='tile'.*top_k=200"):
        _run(q, k, v, bi, cu_q, cu_k, block_size, True, scale, path="prefill", schedule="tile")


def test_decode_shapes_ignore_the_schedule(rng):
    """Sequences of at most DECODE_MAX_QUERIES queries take the decode path whatever the schedule."""
    lengths = [(3, 900), (1, 130)]
    (q, k, v, bi, cu_q, cu_k, scale), (ref_out, ref_lse) = _case(
        rng, lengths, 8, 2, 128, "bfloat16", 4, 128, True, "local")
    tile = _run(q, k, v, bi, cu_q, cu_k, 128, True, scale, schedule="tile")
    kv = _run(q, k, v, bi, cu_q, cu_k, 128, True, scale, schedule="kv")
    testing.assert_attention_close(tile[0], ref_out, "bfloat16", tile[1], ref_lse)
    assert _bitwise(tile[0], kv[0])
