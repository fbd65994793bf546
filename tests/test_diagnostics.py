"""msa_cupy.diagnostics: every metric on cases with known answers, and against the reference."""
import math
import sys

import numpy as np
import pytest

from msa_cupy import diagnostics as dg
from msa_cupy import reference as ref
from msa_cupy import testing


def _random_qkv(rng, shape_q, shape_k, dtype=np.float32):
    return testing.randn(rng, shape_q, dtype), testing.randn(rng, shape_k, dtype), testing.randn(rng, shape_k, dtype)


def _two_block_case():
    """One query at position 3, four keys in two blocks of 2, two query heads in one group.

    scale = 1.  Head 0 reads coordinate 0: logits [0, 0, ln 2, ln 2] -> block masses 1/3, 2/3.
    Head 1 reads coordinate 1: logits [ln 4.5, ln 4.5, 0, 0] -> block masses 9/11, 2/11.
    """
    q = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # (Nq=1, Hq=2, D=2)
    k = np.zeros((4, 1, 2))
    k[2:, 0, 0] = math.log(2.0)
    k[:2, 0, 1] = math.log(4.5)
    mass = np.array([(1 / 3 + 9 / 11) / 2, (2 / 3 + 2 / 11) / 2])
    return q, k, mass


# --------------------------------------------------------------------------- block mass


def test_block_mass_two_block_case_known_softmax():
    q, k, want = _two_block_case()
    mass = dg.block_attention_mass(q, k, block_size=2, scale=1.0)
    assert mass.shape == (1, 1, 2)
    np.testing.assert_allclose(mass[0, 0], want, rtol=1e-12)


def test_block_mass_matches_brute_force_softmax(rng):
    b, nq, nk, hq, hkv, d, bs = 2, 5, 13, 4, 2, 8, 4
    q, k, _ = _random_qkv(rng, (b, nq, hq, d), (b, nk, hkv, d))
    mass = dg.block_attention_mass(q, k, block_size=bs)
    n_blocks = -(-nk // bs)
    assert mass.shape == (b, nq, hkv, n_blocks)
    want = np.zeros_like(mass)
    for s in range(b):
        for i in range(nq):
            pos = nk - nq + i
            for h in range(hq):
                g = h // (hq // hkv)
                logits = q[s, i, h].astype(np.float64) @ k[s, :pos + 1, g].astype(np.float64).T / math.sqrt(d)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                for j, pj in enumerate(p):
                    want[s, i, g, j // bs] += pj / (hq // hkv)
    np.testing.assert_allclose(mass, want, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-12)


def test_block_mass_chunked_rows_agree(rng, monkeypatch):
    q, k, _ = _random_qkv(rng, (40, 4, 8), (40, 2, 8))
    whole = dg.block_attention_mass(q, k, block_size=8)
    monkeypatch.setattr(dg, "_LOGITS_PER_CHUNK", 7 * 40 * 2)  # 7 rows per chunk
    np.testing.assert_allclose(dg.block_attention_mass(q, k, block_size=8), whole, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_block_mass_block_longer_than_the_keys(rng, causal):
    """A block longer than the keys is one block of all of them, whatever its size (the padding
    stays bounded by the keys, as in reference.sequence_block_scores)."""
    q, k, _ = _random_qkv(rng, (5, 4, 8), (7, 2, 8))
    want = dg.block_attention_mass(q, k, block_size=7, causal=causal)
    assert want.shape == (5, 2, 1)
    np.testing.assert_allclose(want[..., 0], 1.0, rtol=1e-12)
    for block_size in (8, 1 << 40):
        np.testing.assert_array_equal(dg.block_attention_mass(q, k, block_size=block_size, causal=causal), want)


def test_block_mass_rows_without_visible_keys_are_zero(rng):
    q, k, _ = _random_qkv(rng, (6, 2, 4), (3, 1, 4))  # Nq > Nk: queries 0..2 see no key
    mass = dg.block_attention_mass(q, k, block_size=2)
    np.testing.assert_array_equal(mass[:3], 0.0)
    np.testing.assert_allclose(mass[3:].sum(-1), 1.0)


def test_varlen_equals_per_sequence(rng):
    lens_q, lens_k = [3, 0, 5, 1], [7, 2, 5, 9]
    cu_q, cu_k = testing.cu_seqlens(lens_q), testing.cu_seqlens(lens_k)
    q, k, _ = _random_qkv(rng, (cu_q[-1], 4, 8), (cu_k[-1], 2, 8))
    bs, top_k = 2, 2
    mass = dg.block_attention_mass(q, k, block_size=bs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    oracle = dg.oracle_selection(q, k, top_k=top_k, block_size=bs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    saved = dg.compute_saved(oracle, block_size=bs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, per_query=True)
    for s in range(len(lens_q)):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        one = dg.block_attention_mass(q[rows], k[keys], block_size=bs)
        nb = one.shape[-1]
        np.testing.assert_allclose(mass[rows, :, :nb], one, rtol=1e-12)
        np.testing.assert_array_equal(mass[rows, :, nb:], 0.0)
        np.testing.assert_array_equal(oracle[rows], dg.oracle_selection(q[rows], k[keys], top_k=top_k, block_size=bs))
        np.testing.assert_allclose(
            saved[rows],
            dg.compute_saved(oracle[rows], block_size=bs, num_keys=lens_k[s], per_query=True),
        )


# --------------------------------------------------------------------------- oracle selection


def test_oracle_two_block_case_picks_heavier_block():
    q, k, mass = _two_block_case()
    oracle = dg.oracle_selection(q, k, top_k=1, block_size=2, scale=1.0)
    assert oracle.dtype == np.int32
    assert oracle.tolist() == [[[int(np.argmax(mass))]]] == [[[0]]]


def test_oracle_ties_go_to_lower_block_id_and_forced_blocks():
    q = np.zeros((1, 1, 4))  # all logits equal: every full block holds the same mass
    k = np.ones((8, 1, 4))
    assert dg.oracle_selection(q, k, top_k=2, block_size=2).tolist() == [[[0, 1]]]
    # forcing the local block (block 3, where query position 7 sits) as MSA does
    assert dg.oracle_selection(q, k, top_k=2, block_size=2, local_blocks=1).tolist() == [[[0, 3]]]


def test_oracle_selects_every_visible_block_when_k_is_large(rng):
    q, k, _ = _random_qkv(rng, (5, 2, 4), (5, 1, 4))
    oracle = dg.oracle_selection(q, k, top_k=4, block_size=2)
    # query i sees blocks 0 .. i // 2
    for i in range(5):
        n = i // 2 + 1
        assert oracle[i, 0].tolist() == list(range(n)) + [-1] * (4 - n)


def test_oracle_finds_a_hand_planted_needle(rng):
    nk, d, bs = 64, 16, 8
    k = rng.standard_normal((nk, 1, d)) * 0.1
    direction = np.zeros(d)
    direction[3] = 1.0
    k[21, 0] += 10.0 * direction  # the needle sits in block 2
    q = np.tile(direction * 4.0, (nk, 2, 1)) + rng.standard_normal((nk, 2, d)) * 0.1
    oracle = dg.oracle_selection(q, k, top_k=2, block_size=bs)
    after = np.arange(nk) >= 21
    assert np.all((oracle[after, 0] == 2).any(-1))
    assert not np.any((oracle[~after, 0] == 2).any(-1))  # before it exists, nobody can pick it


def test_oracle_finds_each_groups_planted_needle():
    data = dg.planted_needles(512, n_kv_heads=3, heads_per_group=2, head_dim=32, block_size=32,
                              needle_blocks=[2, 5, 9], needle_strength=8.0, dtype=np.float32)
    q, k = data["q"], data["k"]
    oracle = dg.oracle_selection(q, k, top_k=4, block_size=32)
    for g, (block, positions) in enumerate(zip(data["needle_blocks"], data["needle_positions"])):
        after = slice(positions[-1], None)
        assert np.all((oracle[after, g] == block).any(-1)), f"group {g} oracle misses its needle"
        # another group's needle is not this group's business
        for other, other_block in enumerate(data["needle_blocks"]):
            if other != g and other_block != block:
                found = (oracle[512 - 64:, g] == other_block).any(-1)
                assert found.mean() < 0.5
    # the planted learned index finds every needle as well
    selected = ref.select_blocks(*data["learned_index"], top_k=4, block_size=32)
    for g, (block, positions) in enumerate(zip(data["needle_blocks"], data["needle_positions"])):
        assert np.all((selected[positions[-1]:, g] == block).any(-1))


def test_oracle_rejects_block_mass_of_wrong_shape(rng):
    q, k, _ = _random_qkv(rng, (8, 2, 4), (8, 1, 4))
    mass = dg.block_attention_mass(q, k, block_size=4)
    with pytest.raises(ValueError, match="block_mass must have shape"):
        dg.oracle_selection(q, k, top_k=1, block_size=2, block_mass=mass)
    with pytest.raises(ValueError, match="local_blocks"):
        dg.oracle_selection(q, k, top_k=1, block_size=2, local_blocks=2)


# --------------------------------------------------------------------------- recall metrics


def test_metrics_two_block_case():
    q, k, mass_want = _two_block_case()
    mass = dg.block_attention_mass(q, k, block_size=2, scale=1.0)
    oracle = np.array([[[0]]], np.int32)
    for selected, recall, captured in (([0], 1.0, mass_want[0]), ([1], 0.0, mass_want[1]),
                                       ([1, 0], 1.0, 1.0), ([-1], 0.0, 0.0)):
        sel = np.array([[selected]], np.int32)
        assert dg.block_recall(sel, oracle) == recall
        assert dg.score_recall(sel, oracle, mass) == recall
        assert dg.attention_mass_captured(sel, mass) == pytest.approx(captured, rel=1e-12)
    assert dg.compute_saved(np.array([[[1]]], np.int32), block_size=2, num_keys=4) == 0.5


def test_recall_counts_sets_and_weighs_by_mass():
    mass = np.array([[[0.5, 0.3, 0.15, 0.05]]])
    oracle = np.array([[[0, 1, 2]]], np.int32)
    selected = np.array([[[2, 3, 2, -1]]], np.int32)  # duplicates count once
    assert dg.block_recall(selected, oracle) == pytest.approx(1 / 3)
    assert dg.score_recall(selected, oracle, mass) == pytest.approx(0.15 / 0.95)
    assert dg.attention_mass_captured(selected, mass) == pytest.approx(0.2)


def test_selection_equal_to_oracle_recalls_everything(rng):
    q, k, _ = _random_qkv(rng, (2, 24, 4, 8), (2, 40, 2, 8))
    mass = dg.block_attention_mass(q, k, block_size=4)
    oracle = dg.oracle_selection(q, k, top_k=3, block_size=4, block_mass=mass)
    assert dg.block_recall(oracle, oracle) == 1.0
    assert dg.score_recall(oracle, oracle, mass) == pytest.approx(1.0)
    # captured mass of the oracle = the sum of its blocks' masses = the top_k largest masses
    top = np.sort(mass, axis=-1)[..., ::-1][..., :3].sum(-1)
    np.testing.assert_allclose(dg.attention_mass_captured(oracle, mass, per_query=True), top, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_all_blocks_capture_everything_and_save_nothing(rng, causal):
    b, nq, nk, bs = 2, 9, 21, 4
    q, k, _ = _random_qkv(rng, (b, nq, 4, 8), (b, nk, 2, 8))
    n_blocks = -(-nk // bs)
    every = np.broadcast_to(np.arange(n_blocks, dtype=np.int32), (b, nq, 2, n_blocks)).copy()
    mass = dg.block_attention_mass(q, k, block_size=bs, causal=causal)
    np.testing.assert_allclose(dg.attention_mass_captured(every, mass, per_query=True), 1.0, rtol=1e-12)
    assert dg.compute_saved(every, block_size=bs, num_keys=nk, causal=causal) == 0.0
    np.testing.assert_array_equal(dg.compute_saved(every, block_size=bs, num_keys=nk, causal=causal,
                                                   per_query=True), 0.0)


def test_mass_captured_matches_reference_lse(rng):
    """Mass in a selection S, per head, is exp(lse over S - lse over all keys)."""
    nq, nk, hq, hkv, d, bs = 12, 30, 4, 2, 8, 4
    q, k, v = _random_qkv(rng, (nq, hq, d), (nk, hkv, d))
    iq, ik = ref.training_free_index(q, k)
    selected = ref.select_blocks(iq, ik, top_k=3, block_size=bs)
    _, lse_sparse = ref.sparse_attention(q, k, v, selected, block_size=bs, return_lse=True)
    _, lse_dense = ref.dense_attention(q, k, v, return_lse=True)
    per_head = np.exp(lse_sparse - lse_dense)  # (Nq, Hq)
    want = per_head.reshape(nq, hkv, hq // hkv).mean(-1)
    mass = dg.block_attention_mass(q, k, block_size=bs)
    np.testing.assert_allclose(dg.attention_mass_captured(selected, mass, per_query=True), want, rtol=1e-10)


def test_compute_saved_known_answer():
    # causal, Nq = Nk = 4, block 2, each query keeps only its local block
    local = np.array([0, 0, 1, 1], np.int32).reshape(4, 1, 1)
    per_query = dg.compute_saved(local, block_size=2, num_keys=4, per_query=True)
    np.testing.assert_allclose(per_query[:, 0], [0.0, 0.0, 2 / 3, 0.5])
    # total: 6 of 10 visible (query, key) pairs computed
    assert dg.compute_saved(local, block_size=2, num_keys=4) == pytest.approx(0.4)
    assert dg.compute_saved(local, block_size=2, num_keys=4, causal=False) == pytest.approx(0.5)


def test_rows_without_keys_are_nan_and_left_out(rng):
    q, k, _ = _random_qkv(rng, (6, 2, 4), (3, 1, 4))  # queries 0..2 see no key
    mass = dg.block_attention_mass(q, k, block_size=2)
    oracle = dg.oracle_selection(q, k, top_k=1, block_size=2, block_mass=mass)
    assert np.all(oracle[:3] == -1)
    rows = dg.block_recall(oracle, oracle, per_query=True)
    assert np.all(np.isnan(rows[:3])) and np.all(rows[3:] == 1.0)
    assert dg.block_recall(oracle, oracle) == 1.0
    captured = dg.attention_mass_captured(oracle, mass, per_query=True)
    assert np.all(np.isnan(captured[:3]))
    assert np.all(np.isnan(dg.compute_saved(oracle, block_size=2, num_keys=3, per_query=True)[:3]))


def test_gpu_like_arrays_are_copied_to_host(rng):
    class FakeDeviceArray:
        def __init__(self, a):
            self.a = a

        def get(self):
            return self.a

    q, k, _ = _random_qkv(rng, (8, 2, 4), (8, 1, 4))
    mass = dg.block_attention_mass(FakeDeviceArray(q), FakeDeviceArray(k), block_size=2)
    np.testing.assert_array_equal(mass, dg.block_attention_mass(q, k, block_size=2))
    oracle = dg.oracle_selection(q, k, top_k=2, block_size=2, block_mass=mass)
    assert dg.block_recall(FakeDeviceArray(oracle), FakeDeviceArray(oracle)) == 1.0


def test_bad_inputs_name_the_argument(rng):
    q, k, _ = _random_qkv(rng, (8, 4, 4), (8, 2, 4))
    with pytest.raises(ValueError, match="multiple of k heads"):
        dg.block_attention_mass(q, np.zeros((8, 3, 4), np.float32))
    with pytest.raises(ValueError, match="must agree"):
        dg.block_recall(np.zeros((8, 2, 2), np.int32), np.zeros((7, 2, 2), np.int32))
    with pytest.raises(TypeError, match="oracle_indices"):
        dg.block_recall(np.zeros((8, 2, 2), np.int32), np.zeros((8, 2, 2), np.float32))
    with pytest.raises(ValueError, match="num_keys"):
        dg.compute_saved(np.zeros((8, 2, 2), np.int32), block_size=2)
    with pytest.raises(ValueError, match=r"hold 32 entries .* up to 2 key blocks"):
        dg.compute_saved(np.full((8, 2, 2), 3, np.int32), block_size=4, num_keys=8)


# one rule for block ids (_interop.check_block_ids): -1 or a key block id of the query's sequence

_BAD_ID = r"hold {} entries that are neither -1 \(unused\) nor a key block id of their sequence"


def test_metrics_name_the_argument_with_ids_below_minus_one():
    good = np.zeros((4, 2, 2), np.int32)
    bad = good.copy()
    bad[1, 0, 1] = -2
    with pytest.raises(ValueError, match="^oracle_indices " + _BAD_ID.format(1) + r" \(values in \[-2, 0\]\)$"):
        dg.block_recall(good, bad)
    with pytest.raises(ValueError, match="^block_indices " + _BAD_ID.format(1)):
        dg.compute_saved(bad, block_size=2, num_keys=8)


def test_selection_mask_bounds_ids_by_n_blocks():
    ids = np.array([[0, 2, -1], [3, 5, 1]])
    np.testing.assert_array_equal(dg.selection_mask(ids[:1], 3), [[True, False, True]])
    with pytest.raises(ValueError, match="^block_indices " + _BAD_ID.format(2) + r" .*up to 3 key blocks\)$"):
        dg.selection_mask(ids, 3)
    with pytest.raises(ValueError, match=_BAD_ID.format(1)):
        dg.selection_mask(np.array([[-3, 0]]), 3)


def test_compute_saved_bounds_ids_per_sequence_as_the_reference_does(rng):
    """Varlen: block 2 is valid in the long sequence and not in the short one; the message is
    the one the reference gives for the same selection."""
    cu_q, cu_k = np.array([0, 3, 5], np.int32), np.array([0, 12, 16], np.int32)
    ids = np.full((5, 1, 2), -1, np.int32)
    ids[:3, 0, 0] = 2  # sequence 0: 3 blocks of 4
    assert 0.0 < dg.compute_saved(ids, block_size=4, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=False) < 1.0
    ids[4, 0, 1] = 2  # sequence 1: blocks 0 and 1 only
    with pytest.raises(ValueError, match=_BAD_ID.format(1)) as raised:
        dg.compute_saved(ids, block_size=4, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    q, k, v = _random_qkv(rng, (5, 1, 4), (16, 1, 4))
    with pytest.raises(ValueError) as from_reference:
        ref.sparse_attention(q, k, v, ids, block_size=4, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert str(raised.value) == str(from_reference.value)


def test_recall_sweep_records(rng):
    data = dg.planted_needles(256, n_kv_heads=2, head_dim=16, block_size=16, dtype=np.float32)
    iq, ik = ref.training_free_index(data["q"], data["k"])
    records = dg.recall_sweep(data["q"], data["k"], iq, ik, top_k=(1, 2, 4), block_size=(16, 32))
    assert [(r["block_size"], r["top_k"]) for r in records] == [(16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4)]
    for r in records:
        for key in ("block_recall", "score_recall", "mass_captured", "oracle_mass", "compute_saved"):
            assert 0.0 <= r[key] <= 1.0 + 1e-12
        assert r["oracle_mass"] >= r["mass_captured"] - 1e-12  # the oracle maximises captured mass
    by_k = [r["compute_saved"] for r in records if r["block_size"] == 16]
    assert by_k[0] > by_k[1]


# --------------------------------------------------------------------------- plots


@pytest.fixture
def mpl():
    matplotlib = pytest.importorskip("matplotlib", reason="plots need matplotlib (optional)")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def test_plot_helpers_return_figures(mpl, rng):
    data = dg.planted_needles(256, n_kv_heads=2, head_dim=16, block_size=16, dtype=np.float32)
    q, k = data["q"], data["k"]
    iq, ik = ref.training_free_index(q, k)
    selected = ref.select_blocks(iq, ik, top_k=4, block_size=16)
    oracle = dg.oracle_selection(q, k, top_k=4, block_size=16)
    figs = [
        dg.plot_selection_map(selected),
        dg.plot_selection_map(selected[None], group=1, oracle_indices=oracle[None], num_keys=256, block_size=16),
        dg.plot_group_difference(selected, group_a=0, group_b=1, n_blocks=16),
    ]
    records = dg.recall_sweep(q, k, iq, ik, top_k=(2, 4), block_size=(16, 32))
    figs += [dg.plot_recall(records), dg.plot_recall(records, x="block_size", metrics="mass_captured")]
    for fig in figs:
        assert isinstance(fig, mpl)
        fig.canvas.draw()  # renders without error
    import io

    buf = io.BytesIO()
    figs[1].savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_plot_into_given_axes_and_bad_arguments(mpl, rng):
    selected = rng.integers(-1, 8, size=(10, 2, 3)).astype(np.int32)
    fig = mpl()
    axes = fig.subplots(1, 2)
    assert dg.plot_selection_map(selected, ax=axes[0], n_blocks=8) is fig
    assert dg.plot_group_difference(selected, ax=axes[1], n_blocks=8) is fig
    with pytest.raises(ValueError, match="group must be"):
        dg.plot_selection_map(selected, group=2)
    with pytest.raises(ValueError, match="x must be"):
        dg.plot_recall([{"top_k": 1, "block_size": 2, "block_recall": 1.0}], x="k")
    with pytest.raises(ValueError, match="records is empty"):
        dg.plot_recall([])


def test_plots_without_matplotlib_raise_a_clear_import_error(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        dg.plot_selection_map(np.zeros((4, 1, 1), np.int32))


def test_planted_needle_index_alone_finds_the_needles():
    """The index branch of planted_needles without q, k, v (long contexts): each group's
    selection keeps its needle block once the needle exists, and neighbours agree."""
    iq, ik = dg.planted_needle_index(1024, n_kv_heads=2, index_dim=32, block_size=32, needle_blocks=[3, 9],
                                     dtype=np.float32)
    assert iq.shape == (1024, 2, 32) and ik.shape == (1024, 1, 32) and iq.dtype == np.float32
    selected = ref.select_blocks(iq, ik, top_k=4, block_size=32)
    for g, block in enumerate([3, 9]):
        assert np.all((selected[(block + 1) * 32:, g] == block).any(-1))
    with pytest.raises(ValueError, match="needle_blocks"):
        dg.planted_needle_index(64, n_kv_heads=2, index_dim=32, block_size=32, needle_blocks=[1, 5])
