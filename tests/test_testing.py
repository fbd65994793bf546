"""The test kit (msa_cupy.testing) on the CPU: generators cover the cases they promise, and every
check fails on a wrong answer (a check that cannot fail would pass broken kernels)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from msa_cupy import reference, testing
from msa_cupy._layout import query_positions

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def test_randn_rounds_to_the_dtype_and_is_never_zero(rng):
    for name, dt in testing.DTYPES.items():
        x = testing.randn(rng, (64, 3), name)
        assert x.dtype == dt and np.count_nonzero(x) > 0.9 * x.size
        assert testing.dtype(name) == testing.dtype({"float16": "f16", "bfloat16": "bf16"}[name]) == dt


@pytest.mark.parametrize("kind", testing.SEQUENCE_KINDS)
def test_sequence_kinds(rng, kind):
    for _ in range(50):
        nq, nk = testing.sequence_lengths(kind, lambda lo, hi: int(rng.integers(lo, hi + 1)), max_q=160, max_k=700)
        assert 0 <= nq <= 160 and 0 <= nk <= 700
        assert {"chunk": nq <= nk, "full": nq == nk, "decode": 1 <= nq <= 3, "empty": nq == 0, "one": nq == 1,
                "q_gt_k": nk <= nq}[kind]


@SETTINGS
@given(seqs=testing.lengths(max_q=40, max_k=300))
def test_lengths_strategy(seqs):
    assert 1 <= len(seqs) <= 4 and all(0 <= nq <= 40 and 0 <= nk <= 300 for nq, nk in seqs)


def test_lengths_strategy_reaches_empty_one_token_and_block_edges():
    seen = set()

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(seqs=testing.lengths(max_q=40, max_k=300))
    def collect(seqs):
        for nq, nk in seqs:
            seen.update({"no queries"} if nq == 0 else set())
            seen.update({"no keys"} if nk == 0 else set())
            seen.update({"one token"} if (nq, nk) == (1, 1) else set())
            seen.update({"block edge"} if nk in (63, 64, 65, 127, 128, 129) else set())

    collect()
    assert seen == {"no queries", "no keys", "one token", "block edge"}


def test_attention_inputs_layouts(rng):
    seqs = [(3, 70), (0, 0), (1, 1), (5, 2)]
    a = testing.attention_inputs(rng, seqs, n_kv_heads=2, group_size=4, head_dim=64, index_dim=32, dt="f16",
                                 shared_index_k=False)
    assert a["q"].shape == (9, 8, 64) and a["k"].shape == a["v"].shape == (73, 2, 64)
    assert a["index_q"].shape == (9, 2, 32) and a["index_k"].shape == (73, 2, 32)
    assert a["cu_seqlens_q"].tolist() == [0, 3, 3, 4, 9] and a["cu_seqlens_k"].dtype == np.int32
    b = testing.attention_inputs(rng, [(4, 9)] * 2, n_kv_heads=1, group_size=2, head_dim=8, batched=True)
    assert b["q"].shape == (2, 4, 2, 8) and b["index_k"].shape == (2, 9, 1, 8) and b["cu_seqlens_q"] is None
    with pytest.raises(ValueError, match="equal sequences"):
        testing.attention_inputs(rng, seqs, n_kv_heads=1, group_size=1, head_dim=8, batched=True)


@pytest.mark.parametrize("mode", ["random", "local", "all"])
def test_random_block_indices_are_valid_ids_of_their_sequence(rng, mode):
    seqs, bs = [(5, 300), (0, 10), (3, 0), (4, 64)], 64
    ids = testing.random_block_indices(rng, seqs, 2, 6, bs, mode=mode)
    assert ids.shape == (12, 2, 6) and ids.dtype == np.int32
    starts = np.cumsum([0] + [nq for nq, _ in seqs])
    for (nq, nk), q0 in zip(seqs, starts):
        part = ids[q0:q0 + nq]
        assert np.all((part >= -1) & (part < -(-nk // bs)))
        if mode == "all" and nq:
            assert all(sorted(r[r >= 0].tolist()) == list(range(-(-nk // bs))) for r in part.reshape(-1, 6))
        if mode == "local" and nk:
            local = query_positions(nq, nk) // bs
            assert np.all((part == local[:, None, None]).any(-1) | (part == -1).any(-1))


def test_plausible_block_indices():
    ids = testing.plausible_block_indices(np.random.default_rng(0), 300, 5000, 2, 16, 128, n_seq=2)
    assert ids.shape == (600, 2, 16)
    local = np.tile(query_positions(300, 5000) // 128, 2)
    assert np.array_equal(ids[..., -1], np.broadcast_to(local[:, None], (600, 2)))
    valid = ids[..., :-1]
    assert np.all((valid == -1) | (valid < local[:, None, None]))
    assert all(len(set(r[r >= 0])) == int((r >= 0).sum()) for r in ids.reshape(-1, 16))


def test_random_scores_ties_and_specials(rng):
    s = testing.random_scores(rng, (20, 2, 50), levels=3, specials=True)
    assert s.dtype == np.float32
    assert np.isnan(s).any() and np.isneginf(s).any() and np.isposinf(s).any()
    assert len(np.unique(s[np.isfinite(s)])) < 20  # many exact ties


def test_rel_error_and_attention_check(rng):
    ref = rng.standard_normal((6, 4, 8))
    lse = rng.standard_normal((6, 4))
    lse[0] = -np.inf
    ref[0] = 0
    testing.assert_attention_close(ref.astype(testing.DTYPES["bfloat16"]), ref, "bfloat16", lse.astype(np.float32), lse)
    with pytest.raises(AssertionError, match="relative error"):
        testing.assert_attention_close(ref.astype(np.float16) * 1.01, ref, "float16")
    poisoned = ref.copy()
    poisoned[3, 1, 2] = np.nan
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_attention_close(poisoned, ref, "bfloat16")
    for bad, message in [(np.where(np.isinf(lse), 0.0, lse), "-inf"), (lse + 2e-3, "lse differs"),
                         (np.where(np.arange(4) == 2, np.nan, lse), "poisoned")]:
        with pytest.raises(AssertionError, match=message):
            testing.assert_attention_close(ref, ref, "bfloat16", bad, lse)
    nonzero = ref.copy()
    nonzero[0, 0, 0] = 1e-3  # a query that sees no key must give 0 (within the tolerance otherwise)
    with pytest.raises(AssertionError, match="see no key"):
        testing.assert_attention_close(nonzero, ref, "bfloat16", lse, lse)


def _selection_case(rng, seqs, top_k=4, block_size=16):
    a = testing.attention_inputs(rng, seqs, n_kv_heads=2, group_size=1, head_dim=16, dt="bf16")
    cu = dict(cu_seqlens_q=a["cu_seqlens_q"], cu_seqlens_k=a["cu_seqlens_k"])
    opts = dict(top_k=top_k, block_size=block_size, **cu)
    return a, opts, reference.select_blocks(a["index_q"], a["index_k"], **opts)


def test_selection_check_accepts_the_oracle_and_rejects_wrong_picks(rng):
    a, opts, ids = _selection_case(rng, [(20, 200), (0, 5), (1, 1), (7, 3)])
    testing.assert_selection_matches(ids, a["index_q"], a["index_k"], **opts)
    row = 10  # a query that sees 11 blocks: a free pick can be swapped for a worse block
    wrong = ids.copy()
    free = [b for b in range(11) if b not in ids[row, 0]]
    scores = reference.block_scores(a["index_q"], a["index_k"], block_size=16, **{k: opts[k] for k in opts if "cu" in k})
    worst = min(free, key=lambda b: scores[row, 0, b])
    wrong[row, 0, 0] = worst
    wrong[row, 0] = np.sort(wrong[row, 0])
    with pytest.raises(AssertionError, match="separated by"):
        testing.assert_selection_matches(wrong, a["index_q"], a["index_k"], **opts)
    unsorted = ids.copy()
    unsorted[row, 1] = unsorted[row, 1][::-1]
    with pytest.raises(AssertionError):
        testing.assert_selection_matches(unsorted, a["index_q"], a["index_k"], **opts)
    missing = ids.copy()
    missing[25, 0] = -1  # the one-token sequence: its local block is forced
    with pytest.raises(AssertionError):
        testing.assert_selection_matches(missing, a["index_q"], a["index_k"], **opts)


def test_selection_check_allows_either_side_of_a_near_tie():
    """Two blocks with equal scores up to the tolerance: either pick passes, a far one does not."""
    scores = np.array([[[5.0, 1.0, 1.0 + 1e-7, 0.0, 3.0]]])
    positions, nk = np.array([79]), 80  # 5 blocks of 16, the local block 4 forced
    opts = dict(top_k=3, block_size=16, local_blocks=1, tol=1e-5)
    for got in ([0, 2, 4], [0, 1, 4]):
        testing.assert_selection(np.array([[got]]), scores, positions, nk, **opts)
    with pytest.raises(AssertionError, match="below the cut"):
        testing.assert_selection(np.array([[[0, 3, 4]]]), scores, positions, nk, **opts)
    with pytest.raises(AssertionError, match="forced"):
        testing.assert_selection(np.array([[[0, 1, 2]]]), scores, positions, nk, **opts)


def test_score_tolerance_scales_with_the_inputs(rng):
    iq, ik = testing.randn(rng, (5, 2, 128), "bf16"), testing.randn(rng, (9, 1, 128), "bf16")
    tol = testing.score_tolerance(iq, ik)
    assert 0 < tol < 0.05
    assert testing.score_tolerance(iq * 2, ik) == pytest.approx(2 * tol, rel=1e-3)


def test_layout_of():
    assert testing.layout_of((2, 5, 4, 8), (2, 9, 2, 8)).cu_k.tolist() == [0, 9, 18]
    assert testing.layout_of((5, 4, 8), (9, 2, 8)).cu_q.tolist() == [0, 5]
    cu = testing.cu_seqlens([2, 3]), testing.cu_seqlens([4, 5])
    assert testing.layout_of((5, 4, 8), (9, 2, 8), *cu).cu_k.tolist() == [0, 4, 9]


def test_planted_data_is_the_diagnostics_generator():
    data = testing.planted_needles(256, n_kv_heads=2, head_dim=16, block_size=32)
    assert data["q"].shape == (256, 4, 16) and len(data["needle_blocks"]) == 2


@pytest.mark.parametrize("page_size", [None, 32, 128])
@pytest.mark.parametrize("learned", [False, True])
def test_cache_case_pages_hold_each_sequences_keys(page_size, learned):
    p = dict(seed=5, dtype="bfloat16", hkv=2, g=4, d=64, lens=[300, 0, 129], batch=3, max_batch=4, max_len=300,
             learned=learned, shared=False, page_size=page_size)
    case = testing.cache_case(p, (7,))
    assert case["q"].shape == (7, 8, 64) and (case["iq"] is not None) == learned
    plain = testing.cache_case({**p, "page_size": None}, (7,))  # the same draws, contiguous
    rows = reference.cache_rows(case["lens"], case["k"].shape[1], case["table"])
    for name in ("k", "v") + (("ik",) if learned else ()):
        flat = case[name].reshape(-1, *case[name].shape[2:])
        want = np.concatenate([plain[name][s, :n] for s, n in enumerate(case["lens"])])
        assert np.array_equal(testing.bits(flat[rows]), testing.bits(want))


def test_bits_tell_nan_payloads_and_signed_zeros_apart():
    a = np.array([0.0, np.nan], np.float32)
    b = np.array([-0.0, np.nan], np.float32)
    assert not np.array_equal(testing.bits(a), testing.bits(b))
    assert np.array_equal(testing.bits(a[1:]), testing.bits(b[1:]))
    assert testing.bits(np.arange(3)).dtype == np.arange(3).dtype
