"""Decode plans without a GPU: argument checks (before any GPU is needed), the workspace
layout, and the reference over paged and contiguous caches."""
import numpy as np
import pytest

import msa_cupy
from msa_cupy import plan, reference, selection
from msa_cupy.testing import randn

PAPER = dict(max_batch=8, max_cache_len=1 << 20, num_q_heads=64, num_kv_heads=4, head_dim=128, dtype="bfloat16")


@pytest.mark.parametrize("change, error, match", [
    (dict(num_q_heads=63), ValueError, "multiple of num_kv_heads"),
    (dict(head_dim=96), ValueError, "head_dim"),
    (dict(num_q_heads=4 * 32), ValueError, "num_q_heads / num_kv_heads"),
    (dict(queries_per_seq=17), ValueError, "queries_per_seq"),
    (dict(top_k=33), ValueError, "top_k"),
    (dict(top_k=2, local_blocks=2, sink_blocks=1), ValueError, "local_blocks"),
    (dict(block_size=96), ValueError, "block_size"),
    (dict(dtype="float32"), TypeError, "dtype"),
    (dict(page_size=128), ValueError, "num_pages"),
    (dict(num_pages=10), ValueError, "page_size"),
    (dict(max_batch=0), ValueError, "max_batch"),
    (dict(max_cache_len=2.5), TypeError, "max_cache_len"),
    (dict(index_dim=96), ValueError, "index_dim"),
    (dict(index_dim=128, index_k_heads=3), ValueError, "index_k_heads"),
    (dict(scale=float("nan")), ValueError, "scale"),
])
def test_bad_plan_arguments_are_named(change, error, match):
    with pytest.raises(error, match=match):
        msa_cupy.DecodePlan(**{**PAPER, **change})


def test_numpy_integer_arguments_are_plain_ints():
    args = {k: (np.int16(v) if isinstance(v, int) and v < 2**15 else v) for k, v in PAPER.items()}
    try:
        p = msa_cupy.DecodePlan(**args)
    except RuntimeError as exc:  # no GPU here: the checks passed, the GPU part is next
        assert "GPU" in str(exc)
        return
    assert type(p.max_batch) is int and type(p.num_q_heads) is int


def test_workspace_layout_at_the_paper_shapes():
    views = plan.workspace_layout(max_batch=8, rows=8, num_q_heads=64, num_kv_heads=4, head_dim=128,
                                  top_k=16, max_pages=8192, dtype=np.dtype(np.float16), splits=4,
                                  training_free=False)
    sizes = {name: int(np.prod(shape)) * np.dtype(dt).itemsize for name, shape, dt in views}
    entries = 8 * 4 * 16  # one partial per pick
    assert sizes["part_o"] == entries * 16 * 128 * 2 and sizes["part_lse"] == entries * 16 * 4
    assert sizes["block_table"] == 8 * 8192 * 4 and sizes["partial"] == 8 * 4 * 4 * 16 * 8
    assert "index_q" not in sizes
    total = plan.workspace_bytes(views)
    assert total >= sum(sizes.values()) and total % 256 == 0 and total - sum(sizes.values()) < 256 * len(views)


@pytest.mark.parametrize("attention, splits", [("decode", 4), ("decode", 1), ("kv", 3), ("tile", 1)])
def test_merge_counters_sit_together_after_the_clamp_counter(attention, splits):
    """The split-K merge counters (one per selection row tile) and the decode combine counters
    (one per row and KV head) follow the clamp counter, so that one memset zeroes them all."""
    rows, hkv = 8, 4
    views = plan.workspace_layout(max_batch=8, rows=rows, num_q_heads=64, num_kv_heads=hkv, head_dim=128, top_k=16,
                                  max_pages=64, dtype=np.dtype(np.float16), splits=splits, training_free=True,
                                  attention=attention, n_buckets=64, max_queries=32, select_tiles=5)
    names = [name for name, _, _ in views]
    first = names.index(plan.COUNTER_VIEWS[0])
    assert tuple(names[first:first + len(plan.COUNTER_VIEWS)]) == plan.COUNTER_VIEWS
    offsets = plan.workspace_offsets(views)
    after = names[first + len(plan.COUNTER_VIEWS)]
    assert plan.workspace_bytes([v for v in views if v[0] in plan.COUNTER_VIEWS]) == (
        offsets[after] - offsets[plan.COUNTER_VIEWS[0]])  # the one memset's span ends where the next view starts
    shapes = {name: shape for name, shape, _ in views}
    assert shapes["select_count"] == ((5,) if splits > 1 else (0,))
    assert shapes["decode_count"] == ((rows * hkv,) if attention == "decode" else (0,))


def test_prefill_workspace_holds_outputs_not_partials():
    views = plan.workspace_layout(max_batch=4, rows=8192, num_q_heads=64, num_kv_heads=4, head_dim=128, top_k=16,
                                  max_pages=1024, dtype=np.dtype(np.float16), splits=1, training_free=True,
                                  attention="tile")
    sizes = {name: int(np.prod(shape)) * np.dtype(dt).itemsize for name, shape, dt in views}
    assert "part_o" not in sizes and "partial" not in sizes
    assert sizes["out"] == 8192 * 64 * 128 * 2 and sizes["lse"] == 8192 * 64 * 4
    assert sizes["cu_q_run"] == sizes["tile_off"] == 5 * 4 and sizes["index_q"] == 8192 * 4 * 128 * 2
    head = [name for name, _, _ in views][:3]
    assert head == ["cu_q", "cu_k", "block_table"]  # what the pinned staging buffer mirrors


@pytest.mark.parametrize("schedule", ["kv", "auto"])
def test_prefill_workspace_of_kv_outer_schedules_holds_partials_and_the_reverse_index(schedule):
    from msa_cupy import sparse

    rows, hkv, top_k, buckets, max_queries = 4096, 4, 16, 4 * 4 * 1024, 32
    views = plan.workspace_layout(max_batch=4, rows=rows, num_q_heads=64, num_kv_heads=hkv, head_dim=128,
                                  top_k=top_k, max_pages=1024, dtype=np.dtype(np.float16), splits=1,
                                  training_free=True, attention=schedule, n_buckets=buckets, max_queries=max_queries)
    sizes = {name: int(np.prod(shape)) * np.dtype(dt).itemsize for name, shape, dt in views}
    entries = rows * hkv * top_k
    assert sizes["part_o"] == entries * 16 * 128 * 2 and sizes["list_q"] == sizes["slot_pos"] == entries * 4
    assert sizes["ri_bucket"] == sizes["ri_perm0"] == sizes["ri_perm1"] == entries * 4
    assert sizes["ri_counts"] == buckets * 4 and sizes["ri_list_start"] == (buckets + 1) * 4
    assert sizes["ri_items"] == 3 * 4 * sparse.work_item_bound(entries, buckets, max_queries)
    assert sizes["ri_hist"] == 4 * (256 * -(-entries // sparse.SPLIT_TILE) + 1)
    assert sizes["cu_q_run"] == sizes["tile_off"] == sizes["block_off"] == 5 * 4
    assert ("row_mode" in sizes) == (schedule == "auto")
    assert len(sizes) == len(views)  # no name twice


PREFILL = dict(max_batch=4, max_cache_len=1 << 16, max_query_tokens=4096, num_q_heads=64, num_kv_heads=4,
               head_dim=128, dtype="bfloat16")


@pytest.mark.parametrize("change, error, match", [
    (dict(max_query_tokens=0), ValueError, "max_query_tokens"),
    (dict(max_query_tokens=(1 << 22) + 1), ValueError, "max_query_tokens"),
    (dict(max_query_tokens=1.5), TypeError, "max_query_tokens"),
    (dict(num_q_heads=8, top_k=17, schedule="auto"), ValueError, r"top_k must be <= 16 for PrefillPlan"),
    (dict(num_q_heads=8, top_k=17, schedule="tile"), ValueError, r"top_k must be <= 16 for PrefillPlan"),
    (dict(schedule="fast"), ValueError, r"schedule must be one of \('auto', 'kv', 'tile'\)"),
    (dict(max_batch=1 << 16, max_cache_len=1 << 20, page_size=128, num_pages=1024, schedule="kv"), ValueError,
     "below 2\\^31 for schedule='kv'"),
    (dict(num_q_heads=16, top_k=32, page_size=64), ValueError, "num_pages"),
    (dict(top_k=33), ValueError, "top_k"),
    (dict(head_dim=96), ValueError, "head_dim"),
])
def test_bad_prefill_plan_arguments_are_named(change, error, match):
    with pytest.raises(error, match=match):
        msa_cupy.PrefillPlan(**{**PREFILL, **change})


def test_prefill_plan_update_needs_query_lengths():
    with pytest.raises(ValueError, match="query_lens is required"):
        object.__new__(msa_cupy.PrefillPlan).update(np.array([5], np.int32), None)


def test_prefill_plan_has_no_queries_per_seq():
    with pytest.raises(TypeError, match="queries_per_seq"):
        msa_cupy.PrefillPlan(**PREFILL, queries_per_seq=2)
    with pytest.raises(TypeError, match="max_query_tokens"):
        msa_cupy.DecodePlan(**PREFILL)


def test_reference_paged_equals_contiguous(rng):
    b, s, hkv, g, d, page = 3, 300, 2, 4, 64, 32
    dt = np.dtype(np.float32)
    k, v = randn(rng, (b, s, hkv, d), dt), randn(rng, (b, s, hkv, d), dt)
    q = randn(rng, (b, 2, hkv * g, d), dt)
    lens = np.array([300, 2, 129])
    n_pages = b * (-(-s // page))
    ids = rng.permutation(n_pages).reshape(b, -1).astype(np.int32)
    kp, vp = randn(rng, (n_pages, page, hkv, d), dt), randn(rng, (n_pages, page, hkv, d), dt)
    for si in range(b):
        for p_ in range(ids.shape[1]):
            rows = slice(p_ * page, min((p_ + 1) * page, s))
            kp[ids[si, p_], :rows.stop - rows.start] = k[si, rows]
            vp[ids[si, p_], :rows.stop - rows.start] = v[si, rows]
    opts = dict(block_size=64, top_k=3, return_lse=True, return_indices=True)
    contiguous = reference.decode_attention(q, k, v, lens, **opts)
    paged = reference.decode_attention(q, kp, vp, lens, block_table=ids, **opts)
    for a, c in zip(contiguous, paged):
        assert np.array_equal(a, c)
    # with every block selected, each sequence gets dense causal attention over its own keys
    every = reference.decode_attention(q, kp, vp, lens, block_table=ids, block_size=64, top_k=8)
    for si, n in enumerate(lens):
        dense = reference.dense_attention(q[si:si + 1], k[si:si + 1, :n], v[si:si + 1, :n], causal=True)
        assert np.allclose(every[si:si + 1], dense, atol=1e-12)
    # chunked prefill with every sequence's query count equal is the decode of its packed rows
    packed = reference.prefill_attention(q.reshape(-1, hkv * g, d), kp, vp, lens, [2, 2, 2], block_table=ids, **opts)
    for a, c in zip(packed, paged):
        assert np.array_equal(a, c.reshape(-1, *c.shape[2:]))


def test_reference_prefill_of_varlen_chunks_is_each_sequences_attention(rng):
    s, hkv, g, d = 400, 2, 2, 64
    dt = np.dtype(np.float32)
    lens, q_lens = np.array([400, 7, 250]), np.array([130, 0, 250])
    k, v = randn(rng, (3, s, hkv, d), dt), randn(rng, (3, s, hkv, d), dt)
    q = randn(rng, (int(q_lens.sum()), hkv * g, d), dt)
    out, lse = reference.prefill_attention(q, k, v, lens, q_lens, block_size=64, top_k=3, return_lse=True)
    start = 0
    for si, (n, nq) in enumerate(zip(lens, q_lens)):
        one = reference.attention(q[start:start + nq], k[si, :n], v[si, :n], block_size=64, top_k=3, return_lse=True)
        assert np.array_equal(out[start:start + nq], one[0]) and np.array_equal(lse[start:start + nq], one[1])
        start += nq


# --------------------------------------------------------------------------- host-array updates


def _views(max_batch, max_pages):
    return (np.full(max_batch + 1, -9, np.int32), np.full(max_batch + 1, -9, np.int32),
            np.full((max_batch, max_pages), -9, np.int32))


def test_host_update_packs_what_the_device_update_computes():
    cu_q, cu_k, table = _views(4, 5)
    opts = dict(max_cache_len=600, queries_per_seq=2, page_size=128, num_pages=40)
    bt = np.array([[7, 3, 9, -1, -1], [1, -1, -1, -1, -1], [30, 31, 32, 33, 39]], np.int32)
    assert plan.pack_host_update([300, 0, 600], bt, cu_q, cu_k, table, paged=True, **opts) == 3
    assert cu_q[:4].tolist() == [0, 2, 4, 6] and cu_k[:4].tolist() == [0, 300, 300, 900]
    # pages past a sequence's keys are zero (never read); rows past the batch untouched
    assert table[:3].tolist() == [[7, 3, 9, 0, 0], [0, 0, 0, 0, 0], [30, 31, 32, 33, 39]]
    assert (table[3] == -9).all()
    cu_q, cu_k, table = _views(4, 1)
    assert plan.pack_host_update(np.array([5, 6], np.int64), None, cu_q, cu_k, table, paged=False, **opts) == 2
    assert table[:2, 0].tolist() == [0, 1] and cu_k[:3].tolist() == [0, 5, 11]


def test_host_update_packs_query_lengths_of_a_chunked_prefill():
    cu_q, cu_k, table = _views(4, 1)
    opts = dict(max_cache_len=600, queries_per_seq=0, paged=False, page_size=600, num_pages=4, max_rows=64)
    assert plan.pack_host_update([300, 5, 600], None, cu_q, cu_k, table, query_lens=[10, 0, 54], **opts) == 3
    assert cu_q[:4].tolist() == [0, 10, 10, 64] and cu_k[:4].tolist() == [0, 300, 305, 905]


@pytest.mark.parametrize("q_lens, match", [
    ([10, 0], r"query_lens must be a 1-D integer array of 3"),
    ([[1, 2, 3]], r"query_lens must be a 1-D integer array of 3"),
    ([1.0, 2.0, 3.0], "1-D integer"),
    ([1, -2, 3], r"query_lens\[1\] = -2 is negative"),
    ([30, 30, 5], "sum to 65, more than max_query_tokens \\(64\\)"),
])
def test_host_query_lengths_name_the_bad_entry_and_write_nothing(q_lens, match):
    cu_q, cu_k, table = _views(4, 1)
    with pytest.raises(ValueError, match=match):
        plan.pack_host_update([300, 5, 600], None, cu_q, cu_k, table, query_lens=q_lens, max_cache_len=600,
                              queries_per_seq=0, paged=False, page_size=600, num_pages=4, max_rows=64)
    assert (cu_q == -9).all() and (cu_k == -9).all() and (table == -9).all()


@pytest.mark.parametrize("lens, bt, match", [
    ([[1, 2]], None, "1-D integer"),
    ([1.5], None, "1-D integer"),
    (np.array([], np.int32), None, "1 to max_batch"),
    ([1] * 5, None, "1 to max_batch"),
    ([601], None, r"seq_lens\[0\] = 601"),
    ([10, -1], None, r"seq_lens\[1\] = -1"),
    ([300], np.zeros((2, 3), np.int32), r"shape \(1, pages\)"),
    ([300], np.zeros((1, 2), np.float32), r"shape \(1, pages\)"),
    ([300], np.zeros((1, 2), np.int32), "needs 3 for 300 keys"),
    ([300, 10], np.array([[0, 1, 40], [2, 2, 2]]), r"block_table\[0, 2\] = 40"),
    ([300, 10], np.array([[0, 1, 2], [-3, 0, 0]]), r"block_table\[1, 0\] = -3"),
])
def test_host_update_names_the_bad_entry_and_writes_nothing_on_error(lens, bt, match):
    cu_q, cu_k, table = _views(4, 5)
    with pytest.raises(ValueError, match=match):
        plan.pack_host_update(lens, bt if bt is not None else np.zeros((len(lens), 5), np.int32), cu_q, cu_k, table,
                              max_cache_len=600, queries_per_seq=1, paged=True, page_size=128, num_pages=40)
    assert (cu_q == -9).all() and (cu_k == -9).all() and (table == -9).all()


class _FakeEvent:
    """done / record / synchronize as CUDA events have them; the test says when copies finish."""

    def __init__(self, log):
        self.done, self.log = True, log

    def record(self, stream):
        self.done = False
        self.log.append(("record", stream))

    def synchronize(self):
        self.done = True
        self.log.append(("wait",))


def test_staging_buffers_are_reused_only_after_their_copy_is_done():
    log, made = [], []
    ring = plan.StagingRing(lambda: made.append(object()) or made[-1], lambda: _FakeEvent(log), limit=3)
    first = ring.acquire()
    assert first == 0 and len(made) == 1
    ring.release(first, stream=11)
    assert ring.acquire() == 1  # buffer 0's copy is in flight: a second buffer
    ring.release(1, stream=11)
    ring.events[0].done = True  # the first copy finished
    assert ring.acquire() == 0 and len(made) == 2
    ring.release(0, stream=12)
    assert ring.acquire() == 2  # 0 and 1 in flight
    ring.release(2, stream=12)
    assert not any(entry == ("wait",) for entry in log)
    # every buffer in flight and none may be added: the oldest (1) is waited for, then reused
    assert ring.acquire() == 1 and log[-1] == ("wait",) and len(made) == 3
    ring.release(1, stream=13)
    assert [e for e in log if e[0] == "record"] == [("record", 11), ("record", 11), ("record", 12), ("record", 12),
                                                     ("record", 13)]


def test_staging_ring_waits_for_copies_before_its_buffers_go():
    import gc

    log = []
    ring = plan.StagingRing(object, lambda: _FakeEvent(log), limit=2)
    ring.release(ring.acquire(), stream=1)
    events = list(ring.events)
    del ring
    gc.collect()
    assert events[0].done and log[-1] == ("wait",)


# --------------------------------------------------------------------------- split-K sizing


def test_split_count_is_the_select_config_rule():
    for tiles, groups, max_k in [(1, 1, 1 << 20), (8, 1, 1 << 17), (3, 4, 4096), (1, 1, 100), (64, 4, 1 << 20)]:
        want = -(-2 * 132 // (tiles * groups))
        expected = max(1, min(want, (-(-max_k // 128)) // 4))
        assert selection.split_count(tiles, groups, max_k, sm_count=132) == expected


@pytest.mark.parametrize("rows_per_q, tile_rows, groups", [(4, 32, 1), (1, 32, 4), (4, 256, 1), (16, 128, 1)])
def test_partial_lists_of_a_call_plan_hold_every_call(rows_per_q, tile_rows, groups):
    """A one-call plan sizes its split-K lists for rows x splits <= split_rows_bound: every
    batch up to the bucket, uniform and uneven query counts, fits."""
    rng = np.random.default_rng(0)
    for max_batch, nq, max_k in [(1, 1, 1 << 20), (8, 1, 1 << 17), (16, 4, 4096), (64, 16, 1 << 20), (4, 3, 300)]:
        bound = selection.split_rows_bound(max_batch * nq, rows_per_q, tile_rows, groups, max_k, sm_count=132)
        assert bound <= max_batch * nq * selection.split_count(1, groups, max_k, sm_count=132)
        for n_seq in range(1, max_batch + 1):
            for q_lens in (np.full(n_seq, nq), rng.integers(0, nq + 1, n_seq)):
                rows = int(q_lens.sum())
                tiles = selection.query_tiles(q_lens, rows_per_q, tile_rows)
                assert rows * selection.split_count(tiles, groups, max_k, sm_count=132) <= bound
