"""Chunked-prefill plans on the GPU: varlen chunks over contiguous and paged caches against the
float64 reference (learned and training-free index), rows past the step's tokens left alone,
paged == contiguous bitwise, host and device updates bitwise alike, clamps counted, and a CUDA
graph captured once replaying eager runs bitwise for new lengths, block tables and chunk
sizes, with nothing allocated after the capture overwritten."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msa_cupy
from msa_cupy import reference, sparse
from msa_cupy.testing import (DTYPES, TOLERANCE, assert_attention_close, assert_selection_matches, bits, cache_case,
                              plan_options, randn, rel_error, run_plan, to_device)

pytestmark = pytest.mark.gpu
SETTINGS = settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))


def _most_top_k(g: int) -> int:
    return sparse.TILE_MAX_ENTRIES // sparse.tile_tokens(g)


@st.composite
def problems(draw):
    g = draw(st.sampled_from([1, 2, 4, 8, 16]))
    batch = draw(st.integers(1, 3))
    max_len = draw(st.integers(1, 1500))
    lens = [draw(st.integers(0, max_len)) for _ in range(batch)]
    # chunks up to the whole sequence, now and then more queries than keys (they see nothing)
    q_lens = [draw(st.integers(0, n + (3 if draw(st.integers(0, 7)) == 0 else 0))) for n in lens]
    q_lens = [min(x, 300) for x in q_lens]
    pad = draw(st.integers(0 if sum(q_lens) else 1, 40))  # q rows past the step's tokens
    return dict(hkv=draw(st.sampled_from([1, 2, 4])), g=g, d=draw(st.sampled_from([64, 128])),
                block=draw(st.sampled_from([64, 128])), batch=batch, max_len=max_len, lens=lens, q_lens=q_lens,
                pad=pad, extra_tokens=draw(st.integers(0, 50)), top_k=draw(st.integers(1, min(8, _most_top_k(g)))),
                page_size=draw(st.sampled_from([None, 64, 128, 32])), learned=draw(st.booleans()),
                shared=draw(st.booleans()), dtype=draw(st.sampled_from(sorted(DTYPES))),
                max_batch=batch + draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**31)),
                schedule=draw(st.sampled_from(sparse.SCHEDULES)))


def _setup(p):
    host = cache_case(p, (int(sum(p["q_lens"])) + p["pad"],))
    host["q_lens"] = np.array(p["q_lens"], np.int32)
    plan = msa_cupy.PrefillPlan(**plan_options(p, host), max_query_tokens=host["q"].shape[0] + p["extra_tokens"],
                                schedule=p["schedule"])
    return plan, host, to_device(host)


@SETTINGS
@given(problems())
def test_prefill_plan_matches_reference(p):
    import cupy as cp

    plan, host, dev = _setup(p)
    on_host = p["seed"] % 2
    plan.update(host["lens"] if on_host else dev["lens"], host["q_lens"] if on_host else dev["q_lens"],
                host["table"] if on_host else dev["table"])
    rows, total = host["q"].shape[0], int(host["q_lens"].sum())
    out = cp.asarray(np.full(host["q"].shape, np.nan, host["q"].dtype))  # poison: the step's rows must be
    lse = cp.full(host["q"].shape[:2], np.nan, np.float32)  # written, the pad rows left alone
    run_plan(plan, dev, out=out, lse=lse)
    ids = plan.block_indices.get()
    assert ids.shape == (rows, p["hkv"], p["top_k"])
    out, lse, ids = out.get(), lse.get(), ids[:total]
    assert np.isnan(out[total:].astype(np.float32)).all() and np.isnan(lse[total:]).all()
    out, lse = out[:total], lse[:total]
    assert plan.clamped_entries() == 0
    # the same attention over the plan's own selection, and the selection by reference scores
    k_rows = reference.cache_rows(host["lens"], host["k"].shape[1], host["table"])
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    k_seq, v_seq = flat(host["k"])[k_rows], flat(host["v"])[k_rows]
    cu_q = np.concatenate([[0], np.cumsum(host["q_lens"])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(host["lens"])]).astype(np.int32)
    q = host["q"][:total]
    same_out, same_lse = reference.sparse_attention(q, k_seq, v_seq, ids, block_size=p["block"], cu_seqlens_q=cu_q,
                                                    cu_seqlens_k=cu_k, return_lse=True)
    assert_attention_close(out, same_out, q.dtype, lse, same_lse)
    if p["learned"]:
        iq, ik = host["iq"][:total], flat(host["ik"])[k_rows]
    else:  # the plan's own index_q (fp32 sums of the heads), the group's key head
        iq, ik = plan.workspace["index_q"][:total].get(), k_seq
    assert_selection_matches(ids, iq, ik, top_k=p["top_k"], block_size=p["block"], cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k)
    index = dict(index_q=host["iq"][:total], index_k_cache=host["ik"]) if p["learned"] else {}
    ref_out, ref_ids = reference.prefill_attention(q, host["k"], host["v"], host["lens"], host["q_lens"],
                                                   block_table=host["table"], block_size=p["block"], top_k=p["top_k"],
                                                   return_indices=True, **index)
    if np.array_equal(ids, ref_ids):
        assert rel_error(out, ref_out) < TOLERANCE[p["dtype"]]


def _problem(rng, paged=True, **change):
    p = dict(hkv=4, g=16, d=128, block=128, batch=3, max_len=3000, lens=[2999, 1500, 700], q_lens=[600, 1, 700],
             pad=60, extra_tokens=0, top_k=8, page_size=64 if paged else None, learned=False, shared=False,
             dtype="bfloat16", max_batch=4, seed=int(rng.integers(2**31)), schedule="auto")
    return {**p, **change}


@pytest.mark.parametrize("schedule", sparse.SCHEDULES)
def test_prefill_plan_paged_is_bitwise_contiguous_and_host_updates_are_device_updates(schedule):
    import cupy as cp

    rng = np.random.default_rng(21)
    p = _problem(rng, paged=False, learned=True, shared=True, schedule=schedule)
    plan, host, dev = _setup(p)
    paged_p = _problem(rng, paged=True, learned=True, shared=True, seed=p["seed"], schedule=schedule)
    paged, host_p, dev_p = _setup(paged_p)
    plan.update(host["lens"], host["q_lens"])
    out_c, lse_c = (x.copy() for x in run_plan(plan, dev))
    paged.update(dev_p["lens"], dev_p["q_lens"], dev_p["table"])
    out_p, lse_p = run_plan(paged, dev_p)
    total = int(host["q_lens"].sum())
    assert cp.array_equal(plan.block_indices[:total], paged.block_indices[:total])  # pad rows: never selected
    assert cp.array_equal(bits(out_c[:total]), bits(out_p[:total]))
    assert cp.array_equal(bits(lse_c[:total]), bits(lse_p[:total]))
    plan.update(dev["lens"], dev["q_lens"])  # the device update of the same step
    out_d, lse_d = run_plan(plan, dev)
    assert cp.array_equal(bits(out_c[:total]), bits(out_d[:total]))
    assert plan.clamped_entries() == 0 and paged.clamped_entries() == 0


def test_prefill_plan_counts_what_device_updates_and_short_q_clamp():
    import cupy as cp

    rng = np.random.default_rng(22)
    p = _problem(rng, paged=False)
    plan, host, dev = _setup(p)
    rows = host["q"].shape[0]
    with pytest.raises(ValueError, match="max_query_tokens"):  # host lengths: checked, nothing written
        plan.update(host["lens"], np.array([rows, 1, 1], np.int32))
    plan.update(dev["lens"], cp.asarray(np.array([rows - 5, 3, 4], np.int32)))  # past max_query_tokens
    out, lse = run_plan(plan, dev)
    assert plan.clamped_entries() == 1  # the sequence that passes the bound
    assert bool(cp.isfinite(out[:rows].astype(cp.float32)).all())
    plan.update(dev["lens"], cp.asarray(np.array([rows, 5, 0], np.int32)))  # sequence 1 starts at the bound
    run_plan(plan, dev)
    assert plan.clamped_entries() == 2
    plan.update(dev["lens"], dev["q_lens"])
    short = dev["q"][:100]  # fewer rows than the step's tokens: the run stops at q's end
    out, _ = plan.run(short, dev["k"], dev["v"], return_lse=True)
    assert out.shape == short.shape and plan.clamped_entries() == 3
    with pytest.raises(ValueError, match=r"q must be \(tokens, num_q_heads, head_dim\)"):
        plan.run(cp.concatenate([dev["q"], dev["q"]]), dev["k"], dev["v"])
    with pytest.raises(ValueError, match="must both be host arrays or both device arrays"):
        plan.update(host["lens"], dev["q_lens"])


@pytest.mark.parametrize("schedule", sparse.SCHEDULES)
def test_prefill_plan_graph_replays_eager_bitwise_for_new_chunks(schedule):
    import cupy as cp

    rng = np.random.default_rng(23)
    p = _problem(rng, paged=True, schedule=schedule)
    plan, host, dev = _setup(p)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        plan.update(dev["lens"], dev["q_lens"], dev["table"])
        out = cp.empty_like(dev["q"])
        lse = cp.empty(dev["q"].shape[:-1], cp.float32)
        plan.run(dev["q"], dev["k"], dev["v"], out=out, lse=lse)
        stream.begin_capture()
        plan.run(dev["q"], dev["k"], dev["v"], out=out, lse=lse)
        graph = stream.end_capture()
        later = [cp.full((1 << 16,), i, dtype=cp.int32) for i in range(48)]
        steps = [([2999, 1500, 700], [600, 1, 700]), ([2000, 1, 650], [1300, 1, 60]), ([128, 1500, 129], [0, 0, 129])]
        for step, (lens, q_lens) in enumerate(steps):
            table = dev["table"].copy()
            if step == 2:  # a new block table: sequence 0's pages in reverse order
                table[0, :2] = table[0, 1::-1]
            plan.update(cp.asarray(np.array(lens, np.int32)), cp.asarray(np.array(q_lens, np.int32)), table)
            dev["q"][:] = cp.asarray(randn(rng, host["q"].shape, host["q"].dtype))
            graph.launch(stream)
            replayed = (out.copy(), lse.copy())
            eager_out, eager_lse = plan.run(dev["q"], dev["k"], dev["v"], return_lse=True)
            stream.synchronize()
            total = int(sum(q_lens))
            assert cp.array_equal(bits(replayed[0][:total]), bits(eager_out[:total]))
            assert cp.array_equal(bits(replayed[1][:total]), bits(eager_lse[:total]))
        for _ in range(10):
            graph.launch(stream)
        stream.synchronize()
        assert all(bool((a == i).all()) for i, a in enumerate(later))
        assert plan.clamped_entries() == 0
