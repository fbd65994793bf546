"""The cache of decode plans behind the one-call attention, without a GPU: buckets, keys, the
least-recently-used policy, one cache per thread, and which calls plans cover."""
import threading

import numpy as np
import pytest

from msa_cupy import _plan_cache, sparse

PAPER = dict(hq=64, hkv=4, d=128, index_dim=128, index_k_heads=1, block_size=128, top_k=16, causal=True, max_q=1,
             n_seq=8, total_q=8, max_k=1 << 17)


def test_buckets_are_the_next_power_of_two():
    assert [_plan_cache.bucket(n) for n in (0, 1, 2, 3, 4, 5, 127, 128, 129, 131072, 131073)] == [
        1, 1, 2, 4, 4, 8, 128, 128, 256, 131072, 262144]


def _key(**change):
    args = dict(device=0, dtype=np.dtype(np.float16), hq=64, hkv=4, d=128, index_dim=None, index_k_heads=None,
                block_size=128, top_k=16, local_blocks=1, sink_blocks=0, scale=None, queries=1, n_seq=8, max_k=5000)
    args.update(change)
    return _plan_cache.plan_key(**args)


def test_growing_lengths_and_batches_share_a_plan_within_a_bucket():
    assert _key(max_k=4097) == _key(max_k=8192) != _key(max_k=8193)
    assert _key(n_seq=5) == _key(n_seq=8) != _key(n_seq=9)
    # everything the launches depend on is in the key
    for change in (dict(device=1), dict(dtype=np.dtype("float32")), dict(hq=32), dict(hkv=8), dict(d=64),
                   dict(index_dim=128, index_k_heads=1), dict(block_size=64), dict(top_k=8), dict(local_blocks=2),
                   dict(sink_blocks=1), dict(scale=0.1), dict(queries=2)):
        assert _key(**change) != _key(), change


def test_cache_keeps_the_most_recently_used_plans():
    cache = _plan_cache.PlanCache(capacity=2)
    made = []

    def make(name):
        return lambda: made.append(name) or name

    assert cache.get("a", make("a")) == "a" and cache.get("b", make("b")) == "b"
    assert cache.get("a", make("a2")) == "a" and made == ["a", "b"]  # a hit makes nothing
    cache.get("c", make("c"))  # b is the least recently used
    assert list(cache.plans) == ["a", "c"]
    assert cache.get("b", make("b2")) == "b2" and list(cache.plans) == ["c", "b"]


def test_each_thread_has_its_own_plans():
    """A call rewrites its plan's argument blocks: two threads never share a plan."""
    mine = _plan_cache.cache()
    assert _plan_cache.cache() is mine
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(_plan_cache.cache()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine and isinstance(theirs[0], _plan_cache.PlanCache)


def test_plans_cover_the_calls_the_earlier_path_sends_to_the_decode_kernels(monkeypatch):
    monkeypatch.delenv("MSA_CUPY_PLAIN", raising=False)
    assert _plan_cache.covers(**PAPER)
    assert _plan_cache.covers(**{**PAPER, "index_dim": None, "index_k_heads": None})  # training-free
    assert _plan_cache.covers(**{**PAPER, "max_q": sparse.DECODE_MAX_QUERIES, "total_q": 128})
    for change in (dict(causal=False), dict(max_q=sparse.DECODE_MAX_QUERIES + 1), dict(n_seq=0), dict(total_q=0),
                   dict(max_k=0), dict(d=96), dict(hq=96, hkv=4), dict(hq=4 * 32), dict(block_size=256),
                   dict(top_k=33), dict(index_dim=96), dict(index_k_heads=2)):
        assert not _plan_cache.covers(**{**PAPER, **change}), change
    monkeypatch.setenv("MSA_CUPY_PLAIN", "1")
    assert not _plan_cache.covers(**PAPER)
    monkeypatch.delenv("MSA_CUPY_PLAIN")
    monkeypatch.setattr(_plan_cache, "enabled", False)
    assert not _plan_cache.covers(**PAPER)


def test_plans_fit_calls_the_earlier_path_runs_in_one_chunk_with_bounded_scratch():
    paper = dict(queries=1, hq=64, top_k=16, d=128, itemsize=2)
    assert _plan_cache.fits(batch=64, **paper) and _plan_cache.fits(batch=256, **{**paper, "queries": 4})
    assert not _plan_cache.fits(batch=4096, **{**paper, "queries": 16})  # past the scratch bound
    # past the earlier path's chunk: it would cut the queries, a plan runs them at once
    rows = sparse._chunk_rows(1 << 20, 64, 16, 128, 2)
    assert not _plan_cache.fits(batch=rows + 1, **paper)


def test_numpy_calls_never_take_the_short_path(rng):
    q = rng.standard_normal((1, 1, 8, 64)).astype(np.float16)
    k = rng.standard_normal((1, 300, 2, 64)).astype(np.float16)
    assert _plan_cache.fast_attention(q, k, k, None, None, 64, 2, 1, 0, True, None, None, None, False, False) is None


@pytest.mark.parametrize("name", ["CACHED_PLANS", "MAX_SCRATCH_BYTES"])
def test_limits_are_positive_ints(name):
    value = getattr(_plan_cache, name)
    assert isinstance(value, int) and value > 0


def test_shapes_past_32_bit_row_ids_take_the_earlier_path():
    """64 sequences x 2^25 keys (a bucketed 33 x 20M call) would overflow a contiguous plan's
    int32 row ids: the cache answers "no plan" (the call takes the earlier path) without making one."""
    key = (0, np.dtype(np.float16), 64, 4, 128, None, None, 128, 16, 1, 0, None, 1, 64, 1 << 25)
    assert _plan_cache._plan_for(key) is None
