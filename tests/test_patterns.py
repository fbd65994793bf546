"""Selection patterns of the benchmarks (msa_cupy._bench.patterns) on the CPU: the index
generators, and the statistics against hand counts and brute force."""
from __future__ import annotations

import numpy as np
import pytest

from msa_cupy import reference
from msa_cupy._bench import patterns


def test_stats_by_hand():
    ids = np.array([[[0, 1, 2, -1]],
                    [[2, 1, 1, 3]],     # repeated 1 counts once; shares {1, 2} with the row above
                    [[7, 8, 9, 3]]])    # shares {3}
    assert patterns.adjacent_overlap(ids) == pytest.approx((2 + 1) / (2 * 4))
    assert patterns.tile_union(ids, 2) == 4  # one whole tile: {0, 1, 2, 3}
    assert patterns.tile_union(ids, 3) == 7
    assert patterns.tile_union(ids, 8) == 7  # fewer queries than a tile: one tile of all
    assert patterns.mean_picks(ids) == pytest.approx((3 + 3 + 4) / 3)
    stats = patterns.selection_stats(ids, tiles=(2,))
    assert set(stats) == {"overlap", "picks", "union_t2"}
    assert patterns.adjacent_overlap(ids[:1]) == 0.0 and patterns.tile_union(ids[:0], 4) == 0.0


def test_stats_against_brute_force(rng, monkeypatch):
    monkeypatch.setattr(patterns, "CHUNK_ROWS", 16)  # several chunks
    ids = rng.integers(-1, 12, size=(70, 3, 5)).astype(np.int32)
    sets = [[set(ids[t, g][ids[t, g] >= 0].tolist()) for g in range(3)] for t in range(70)]
    overlap = np.mean([len(sets[t][g] & sets[t + 1][g]) / 5 for t in range(69) for g in range(3)])
    assert patterns.adjacent_overlap(ids) == pytest.approx(overlap)
    for tile in (4, 8):
        unions = [len(set().union(*(sets[t][g] for t in range(a, a + tile)))) for a in range(0, 70 - tile + 1, tile)
                  for g in range(3)]
        assert patterns.tile_union(ids, tile) == pytest.approx(np.mean(unions))
    assert patterns.mean_picks(ids) == pytest.approx(np.mean([len(s) for row in sets for s in row]))


def test_moving_average_has_unit_variance_and_is_smooth(rng, monkeypatch):
    monkeypatch.setattr(patterns, "CHUNK_ROWS", 1000)  # chunks shorter than the run, longer than the window
    x = patterns.moving_average_noise(rng, 5000, (2, 64), 64, np.float32)
    assert x.shape == (5000, 2, 64) and x.dtype == np.float32
    assert 0.9 < x.std() < 1.1 and 0.9 < x[:64].std() < 1.1  # the short windows at the start too
    corr = np.mean(x[1:] * x[:-1])
    assert corr > 0.95
    # rows a window apart share no noise
    assert np.mean(x[64:] * x[:-64]) < 0.2


def test_moving_average_matches_a_direct_sum(monkeypatch):
    monkeypatch.setattr(patterns, "CHUNK_ROWS", 7)
    got = patterns.moving_average_noise(np.random.default_rng(3), 30, (2,), 5, np.float64)
    z = np.random.default_rng(3)
    noise = np.concatenate([z.standard_normal((min(7, 30 - a), 2), dtype=np.float32) for a in range(0, 30, 7)])
    want = np.stack([noise[max(0, t - 4):t + 1].sum(0) / np.sqrt(min(t + 1, 5)) for t in range(30)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("pattern", patterns.PATTERNS)
def test_index_inputs_shapes(rng, pattern):
    iq, ik = patterns.index_inputs(rng, pattern, 100, 300, 2, 16, np.float16, block_size=32)
    assert iq.shape == (100, 2, 16) and ik.shape == (300, 1, 16)
    assert iq.dtype == ik.dtype == np.float16 and np.isfinite(iq).all() and iq.std() > 0


def test_patterns_are_told_apart_by_overlap_and_union(rng):
    """A selection from the coherent index shares most picks between neighbours, a random one
    little; the tile union grows with the tile for random picks, hardly for coherent ones."""
    nk, block, top_k = 2048, 16, 8
    stats = {}
    for pattern in ("random", "coherent", "needle"):
        iq, ik = patterns.index_inputs(rng, pattern, nk, nk, 2, 16, np.float32, window=512, block_size=block)
        ids = reference.select_blocks(iq, ik, top_k=top_k, block_size=block)
        stats[pattern] = patterns.selection_stats(ids[nk // 2:])  # queries that see many more blocks than top_k
    assert stats["random"]["overlap"] < 0.3
    assert stats["coherent"]["overlap"] > 0.8 and stats["needle"]["overlap"] > 0.8
    assert stats["coherent"]["union_t8"] < 2 * top_k < stats["random"]["union_t8"]


def test_check_patterns():
    assert patterns.check_patterns("random") == ("random",)
    assert patterns.check_patterns(["coherent", "needle"]) == ("coherent", "needle")
    with pytest.raises(ValueError, match="patterns"):
        patterns.check_patterns(["smooth"])
    with pytest.raises(ValueError, match="patterns"):
        patterns.check_patterns([])
    with pytest.raises(ValueError, match="pattern"):
        patterns.index_inputs(np.random.default_rng(0), "smooth", 4, 4, 1, 8, np.float16)
