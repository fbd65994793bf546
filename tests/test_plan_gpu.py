"""Decode plans on the GPU: against the float64 reference (decode, MTP, paged and contiguous
caches, learned and training-free index), paged == contiguous bitwise, CUDA-graph capture
(PyTorch and CuPy) replaying bitwise what eager runs give, after updates too, scratch safety,
a growing-cache loop with no host sync and no memory growth, and queued one-call decodes with
distinct lengths (cu_seqlens lifetime).  The host fast path: host-array updates through pinned
staging, arguments checked again when their layout changes; the one-call decode through cached
plans bitwise equal to the earlier path (shapes drawn by hypothesis, growing caches, PyTorch),
plans dropped while their work is queued, and 200 queued steps with no host sync.  The
programmatic launch of the attention (sm_90) against ordinary launches, bitwise."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msa_cupy
from msa_cupy import reference
from msa_cupy.testing import (DTYPES, TOLERANCE, assert_attention_close, assert_selection_matches, bits, cache_case,
                              paged_cache, plan_options, randn, rel_error, run_plan, to_device)

pytestmark = pytest.mark.gpu
SETTINGS = settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw):
    hkv = draw(st.sampled_from([1, 2, 4]))
    g = draw(st.sampled_from([1, 2, 4, 8, 16]))
    block = draw(st.sampled_from([64, 128]))
    nq = draw(st.sampled_from([1, 1, 2, 4, 16]))
    batch = draw(st.integers(1, 4))
    max_len = draw(st.integers(nq, 1500))
    lens = [draw(st.integers(0, max_len)) for _ in range(batch)]
    return dict(hkv=hkv, g=g, d=draw(st.sampled_from([64, 128])), block=block, nq=nq, batch=batch,
                max_len=max_len, lens=lens, top_k=draw(st.integers(1, 8)),
                page_size=draw(st.sampled_from([None, 64, 128, 32])), learned=draw(st.booleans()),
                shared=draw(st.booleans()), dtype=draw(st.sampled_from(sorted(DTYPES))),
                max_batch=batch + draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**31)))


def _setup(p):
    host = cache_case(p, (p["batch"], p["nq"]))
    plan = msa_cupy.DecodePlan(**plan_options(p, host), queries_per_seq=p["nq"])
    return plan, host, to_device(host)


@SETTINGS
@given(problems())
def test_plan_matches_reference(p):
    plan, host, dev = _setup(p)
    plan.update(host["lens"] if p["seed"] % 2 else dev["lens"], host["table"] if p["seed"] % 2 else dev["table"])
    plan.workspace["out"].view(np.uint16).fill(0x7FFF)  # poison: every row must be written
    out, lse = run_plan(plan, dev)
    ids = plan.block_indices.get()
    ws = plan.workspace  # the merges' arrival counters are left at zero for the next run (or replay)
    assert not ws["select_count"].any() and not ws["decode_count"].any()
    opts = dict(block_size=p["block"], top_k=p["top_k"])
    index = dict(index_q=host["iq"], index_k_cache=host["ik"]) if p["learned"] else {}
    ref_out, ref_lse, ref_ids = reference.decode_attention(host["q"], host["k"], host["v"], host["lens"],
                                                           block_table=host["table"], return_lse=True,
                                                           return_indices=True, **index, **opts)
    # the same attention over the plan's own selection, and the selection by reference scores
    rows = reference.cache_rows(host["lens"], host["k"].shape[1], host["table"])
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    k_seq, v_seq = flat(host["k"])[rows], flat(host["v"])[rows]
    b, nq = p["batch"], p["nq"]
    cu_q = (np.arange(b + 1) * nq).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(host["lens"])]).astype(np.int32)
    same_out, same_lse = reference.sparse_attention(flat(host["q"]), k_seq, v_seq, flat(ids), block_size=p["block"],
                                                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    out, lse = out.get(), lse.get()
    assert_attention_close(flat(out), same_out, host["q"].dtype, flat(lse), same_lse)
    if p["learned"]:
        iq, ik = flat(host["iq"]), flat(host["ik"])[rows]
    else:  # the plan's own index_q (fp32 sums of the heads), the group's key head
        iq, ik = plan.workspace["index_q"][:b * nq].get(), k_seq
    assert_selection_matches(flat(ids), iq, ik, top_k=p["top_k"], block_size=p["block"], cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k)
    if np.array_equal(ids, ref_ids):
        assert rel_error(flat(out), flat(ref_out)) < TOLERANCE[p["dtype"]]


def test_paged_is_bitwise_contiguous_with_permuted_and_shared_pages():
    import cupy as cp

    rng = np.random.default_rng(3)
    b, s, hkv, g, d, page = 3, 1000, 2, 8, 128, 64
    dt = DTYPES["bfloat16"]
    k, v = randn(rng, (b, s, hkv, d), dt), randn(rng, (b, s, hkv, d), dt)
    k[1, :256], v[1, :256] = k[0, :256], v[0, :256]  # a shared prefix of 4 pages
    q = randn(rng, (b, 2, hkv * g, d), dt)
    lens = np.array([1000, 700, 129], np.int32)
    kp, table = paged_cache(k, lens, page, rng)
    vp = randn(rng, kp.shape, dt)
    flat_v = v.reshape(-1, hkv, d)
    for si, n in enumerate(lens):  # the same page ids for v
        for p_ in range(-(-n // page)):
            rows = flat_v[si * s + p_ * page: si * s + min((p_ + 1) * page, n)]
            vp[table[si, p_], :len(rows)] = rows
    table[1, :4] = table[0, :4]  # sequence 1 reads sequence 0's prefix pages
    common = dict(max_batch=b, max_cache_len=s, num_q_heads=hkv * g, num_kv_heads=hkv, head_dim=d, dtype="bfloat16",
                  top_k=4, queries_per_seq=2)
    contiguous = msa_cupy.DecodePlan(**common)
    paged = msa_cupy.DecodePlan(**common, page_size=page, num_pages=kp.shape[0])
    contiguous.update(lens)
    paged.update(cp.asarray(lens), cp.asarray(table))
    out_c, lse_c = contiguous.run(cp.asarray(q), cp.asarray(k), cp.asarray(v), return_lse=True)
    out_p, lse_p = paged.run(cp.asarray(q), cp.asarray(kp), cp.asarray(vp), return_lse=True)
    assert cp.array_equal(contiguous.block_indices, paged.block_indices)
    assert cp.array_equal(bits(out_c), bits(out_p)) and cp.array_equal(bits(lse_c), bits(lse_p))
    assert paged.clamped_entries() == 0


def _graph_problem(rng, paged=True):
    p = dict(hkv=4, g=16, d=128, block=128, nq=1, batch=4, max_len=3000, lens=[2999, 1500, 200, 2000], top_k=8,
             page_size=128 if paged else None, learned=False, shared=False, dtype="bfloat16", max_batch=4,
             seed=int(rng.integers(2**31)))
    return p


def test_torch_graph_replays_eager_bitwise_after_updates():
    import cupy as cp
    import torch

    rng = np.random.default_rng(11)
    p = _graph_problem(rng)
    plan, host, dev = _setup(p)
    tq, tk, tv = (torch.from_dlpack(dev[n]) for n in ("q", "k", "v"))
    t_lens, t_table = torch.from_dlpack(dev["lens"]), torch.from_dlpack(dev["table"])
    out = torch.empty_like(tq)
    lse = torch.empty(tq.shape[:-1], dtype=torch.float32, device=tq.device)
    plan.update(t_lens, t_table)
    plan.run(tq, tk, tv, out=out, lse=lse)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # default global capture mode
        plan.run(tq, tk, tv, out=out, lse=lse)
    for step in range(4):
        lens = torch.tensor([2999 - 3 * step, 1500 + step, 200 + 100 * step, 2000], dtype=torch.int32, device="cuda")
        table = t_table.clamp(min=0)
        if step >= 2:  # new block tables too: the same pages in another order
            table = table[:, torch.randperm(table.shape[1], device="cuda")].contiguous()
        tq.copy_(torch.randn_like(tq))
        plan.update(lens, table)
        graph.replay()
        replayed = (out.clone(), lse.clone())
        eager_out, eager_lse = plan.run(tq, tk, tv, return_lse=True)
        torch.cuda.synchronize()
        assert torch.equal(replayed[0].view(torch.int16), eager_out.view(torch.int16))
        assert torch.equal(replayed[1].view(torch.int32), eager_lse.view(torch.int32))
    assert plan.clamped_entries() == 0
    # scratch safety: memory taken after the capture is never written by replays
    later = [torch.full((1 << 16,), i, dtype=torch.int32, device="cuda") for i in range(48)]
    later_cp = [cp.full((1 << 16,), i, dtype=cp.int32) for i in range(48)]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert all(bool((t == i).all()) for i, t in enumerate(later))
    assert all(bool((a == i).all()) for i, a in enumerate(later_cp))


def test_cupy_graph_replays_eager_bitwise():
    import cupy as cp

    rng = np.random.default_rng(12)
    p = _graph_problem(rng, paged=False)
    plan, host, dev = _setup(p)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        plan.update(dev["lens"])
        out = cp.empty_like(dev["q"])
        lse = cp.empty(dev["q"].shape[:-1], cp.float32)
        plan.run(dev["q"], dev["k"], dev["v"], out=out, lse=lse)
        stream.begin_capture()
        plan.run(dev["q"], dev["k"], dev["v"], out=out, lse=lse)
        graph = stream.end_capture()
        later = [cp.full((1 << 16,), i, dtype=cp.int32) for i in range(48)]
        for step in range(3):
            plan.update(cp.asarray(np.array([2999 - step, 1 + step, 3000, 129], np.int32)))
            graph.launch(stream)
            replayed = (out.copy(), lse.copy())
            eager_out, eager_lse = plan.run(dev["q"], dev["k"], dev["v"], return_lse=True)
            stream.synchronize()
            assert cp.array_equal(bits(replayed[0]), bits(eager_out))
            assert cp.array_equal(bits(replayed[1]), bits(eager_lse))
        assert all(bool((a == i).all()) for i, a in enumerate(later))


def test_programmatic_attention_launch_gives_the_ordinary_launch_bitwise(monkeypatch):
    """On sm_90 the decode attention is launched programmatically after the selection (it may
    start while the selection merges, and waits for it before reading the ids): its results,
    eager and replayed in a CUDA graph over changing lengths, are bitwise those of ordinary
    launches, on the paper's group size and a training-free index (the group mean launch
    comes first)."""
    import cupy as cp

    from msa_cupy import _jit

    rng = np.random.default_rng(13)
    p = _graph_problem(rng, paged=True)
    plans = {}
    for programmatic in (True, False):
        monkeypatch.setattr(_jit, "PROGRAMMATIC_LAUNCH", programmatic)
        plans[programmatic], host, dev = _setup(p)
        plans[programmatic].update(dev["lens"], dev["table"])
        plans[programmatic].run(dev["q"], dev["k"], dev["v"])  # the launches are prepared here
    def attention_launch(plan):
        return next(program for key, program in plan._programs.items() if key[0] == "run").launches[-1]

    assert (attention_launch(plans[True])._config is not None) == (_jit.device_capability() >= (9, 0))
    assert attention_launch(plans[False])._config is None
    stream = cp.cuda.Stream(non_blocking=True)
    results = {}
    with stream:
        for programmatic, plan in plans.items():
            out = cp.empty_like(dev["q"])
            lse = cp.empty(dev["q"].shape[:-1], cp.float32)
            stream.begin_capture()
            plan.run(dev["q"], dev["k"], dev["v"], out=out, lse=lse)
            graph = stream.end_capture()
            steps = []
            for step in range(6):
                lens = cp.asarray(np.array([2999 - 97 * step, 1 + 131 * step, 3000, 129 + step], np.int32))
                plan.update(lens, dev["table"])
                eager = [x.copy() for x in plan.run(dev["q"], dev["k"], dev["v"], return_lse=True)]
                graph.launch(stream)
                steps.append((eager, out.copy(), lse.copy()))
            results[programmatic] = steps
        stream.synchronize()
    for (eager, out, lse), (eager0, out0, lse0) in zip(results[True], results[False]):
        for a, b in ((eager[0], eager0[0]), (eager[1], eager0[1]), (out, out0), (lse, lse0), (out, eager0[0])):
            assert cp.array_equal(bits(a), bits(b))


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def test_growing_cache_loop_has_no_host_sync_and_no_memory_growth():
    import cupy as cp

    rng = np.random.default_rng(13)
    p = _graph_problem(rng)
    p.update(max_len=4096, lens=[1, 500, 1000, 3000])
    plan, host, dev = _setup(p)
    lens = cp.asarray(np.array(p["lens"], np.int32))
    # every page a sequence may grow into is mapped (pages may repeat: shared pages are allowed)
    table = cp.asarray(np.random.default_rng(1).integers(0, dev["k"].shape[0], (4, 4096 // 128)).astype(np.int32))
    plan.update(lens, table)
    plan.run(dev["q"], dev["k"], dev["v"])
    cp.cuda.Stream.null.synchronize()
    pool = cp.get_default_memory_pool()
    spin = cp.RawKernel(_SPIN, "spin")
    lens += 0  # CuPy compiles its add kernel on first use: not inside the timed window
    spin((1,), (1,), (np.int64(1000),))
    cp.cuda.Stream.null.synchronize()
    # 1) while the GPU is busy for ~0.5 s, 100 steps must be queued without waiting for it
    spin((1,), (1,), (np.int64(int(1.8e9 * 0.5)),))
    done = cp.cuda.Event()
    done.record()
    spin_end = cp.cuda.Event()
    for _ in range(100):
        lens += 1
        plan.update(lens, table)
        plan.run(dev["q"], dev["k"], dev["v"])
    spin_end.record()
    assert not done.done, "a decode step waited for the GPU (host sync) while it was busy"
    spin_end.synchronize()
    # 2) 1,000 steps: no pool growth
    used = pool.used_bytes()
    for _ in range(1000):
        lens += 1
        lens %= 4096
        plan.update(lens, table)
        plan.run(dev["q"], dev["k"], dev["v"])
    cp.cuda.Stream.null.synchronize()
    assert pool.used_bytes() == used
    assert plan.clamped_entries() == 0
    # the final state against the reference
    out = plan.run(dev["q"], dev["k"], dev["v"]).get()
    ref = reference.decode_attention(host["q"], cp.asnumpy(dev["k"]), cp.asnumpy(dev["v"]), lens.get(),
                                     block_table=table.get(), top_k=p["top_k"], block_size=p["block"])
    ids = plan.block_indices.get()
    ref_ids = reference.decode_attention(host["q"], cp.asnumpy(dev["k"]), cp.asnumpy(dev["v"]), lens.get(),
                                         block_table=table.get(), top_k=p["top_k"], block_size=p["block"],
                                         return_indices=True)[1]
    if np.array_equal(ids, ref_ids):
        assert rel_error(out, ref) < TOLERANCE["bfloat16"]


def test_device_updates_clamp_and_count_bad_entries():
    import cupy as cp

    rng = np.random.default_rng(14)
    plan, host, dev = _setup(_graph_problem(rng))
    table = dev["table"].copy()
    table[0, 0] = 10**6
    plan.update(cp.asarray(np.array([5000, 10, 10, 10], np.int32)), table)
    plan.run(dev["q"], dev["k"], dev["v"])
    cp.cuda.Stream.null.synchronize()
    assert plan.clamped_entries() >= 2
    with pytest.raises(ValueError, match=r"seq_lens\[0\]"):
        plan.update(np.array([5000, 10, 10, 10], np.int32), host["table"])
    bad = host["table"].copy()
    bad[1, 0] = -5
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        plan.update(host["lens"], bad)


def test_queued_one_call_decodes_with_distinct_lengths():
    """300 decode calls with distinct cache lengths queued on one stream without a sync: each
    call's cu_seqlens must live until its kernels ran."""
    import cupy as cp

    rng = np.random.default_rng(15)
    dt = DTYPES["bfloat16"]
    hq, hkv, d = 8, 2, 64
    k = cp.asarray(randn(rng, (1, 700, hkv, d), dt))
    v = cp.asarray(randn(rng, (1, 700, hkv, d), dt))
    q = cp.asarray(randn(rng, (1, 1, hq, d), dt))
    outs = [msa_cupy.attention(q, k[:, :n], v[:, :n], block_size=64, top_k=2) for n in range(400, 700)]
    cp.cuda.Stream.null.synchronize()
    for n, out in zip(range(400, 700), outs):
        again = msa_cupy.attention(q, cp.ascontiguousarray(k[:, :n]), cp.ascontiguousarray(v[:, :n]),
                                   block_size=64, top_k=2)
        assert cp.array_equal(bits(out), bits(again)), f"length {n}"


def test_group_mean_kernel_is_the_fp32_sum_divided():
    import cupy as cp

    from msa_cupy import plan as plan_mod

    rng = np.random.default_rng(16)
    for dt in DTYPES.values():
        q = randn(rng, (37, 4 * 16, 128), dt)
        got = plan_mod.group_mean(cp.asarray(q), cp.empty((37, 4, 128), dt), 4).get()
        acc = np.zeros((37, 4, 128), np.float32)
        for h in range(16):
            acc += q.reshape(37, 4, 16, 128)[:, :, h].astype(np.float32)
        want = (acc / np.float32(16)).astype(dt)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_caller_workspace_gives_the_plans_own_results_bitwise():
    import cupy as cp

    rng = np.random.default_rng(21)
    p = _graph_problem(rng)
    plan, host, dev = _setup(p)
    plan.update(dev["lens"], dev["table"])
    own_out, own_lse = (x.copy() for x in run_plan(plan, dev))
    raw = cp.full(plan.workspace_bytes + 512, 0xA5, cp.uint8)  # poison: nothing may be read before written
    other = msa_cupy.DecodePlan(
        max_batch=p["max_batch"], max_cache_len=p["max_len"], num_q_heads=p["hkv"] * p["g"], num_kv_heads=p["hkv"],
        head_dim=p["d"], dtype=p["dtype"], block_size=p["block"], top_k=p["top_k"], page_size=p["page_size"],
        num_pages=host["k"].shape[0])
    other.use_workspace(raw[256:])
    other.update(dev["lens"], dev["table"])
    out, lse = run_plan(other, dev)
    assert out.data.ptr >= raw.data.ptr and out.data.ptr < raw.data.ptr + raw.size  # a view of the caller's buffer
    assert cp.array_equal(bits(out), bits(own_out)) and cp.array_equal(bits(lse), bits(own_lse))
    assert other.clamped_entries() == 0
    # the same memory handed in again (a new view of it, poisoned again) keeps its views; other
    # memory gets views of its own
    views = other.workspace["ids"]
    for start, same in ((256, True), (512, False)):
        raw.fill(0xA5)
        other.use_workspace(raw[start:])
        assert (other.workspace["ids"] is views) == same
        assert other.workspace["ids"].data.ptr >= raw.data.ptr + start
        other.update(dev["lens"], dev["table"])
        out, lse = run_plan(other, dev)
        assert cp.array_equal(bits(out), bits(own_out)) and cp.array_equal(bits(lse), bits(own_lse))
    with pytest.raises(ValueError, match="workspace must be a 1-D uint8 array"):
        other.use_workspace(raw[:plan.workspace_bytes - 1])
    with pytest.raises(ValueError, match="256-byte boundary"):
        other.use_workspace(raw[16:])  # 16-byte aligned (what every kernel array needs), not 256


# --------------------------------------------------------------------------- host fast path of plans


def test_host_array_updates_through_pinned_staging_match_device_updates():
    """Many host-array updates in a row (staging buffers reused while copies are queued) give
    the bits of device-array updates."""
    import cupy as cp

    rng = np.random.default_rng(22)
    p = _graph_problem(rng)
    plan, host, dev = _setup(p)
    table = host["table"]
    steps = [np.array([2999 - 7 * i, 1500 + i, 200 + 20 * (i % 3), 2000], np.int32) for i in range(24)]
    by_host, by_device = [], []
    for lens in steps:
        plan.update(lens, table)
        by_host.append([x.copy() for x in run_plan(plan, dev)])
    for lens in steps:
        plan.update(cp.asarray(lens), cp.asarray(table))
        by_device.append([x.copy() for x in run_plan(plan, dev)])
    for (ho, hl), (do, dl) in zip(by_host, by_device):
        assert cp.array_equal(bits(ho), bits(do)) and cp.array_equal(bits(hl), bits(dl))
    assert plan.clamped_entries() == 0


def test_known_arguments_are_checked_again_when_their_layout_changes():
    import cupy as cp

    rng = np.random.default_rng(23)
    plan, host, dev = _setup(_graph_problem(rng, paged=False))
    plan.update(dev["lens"])
    run_plan(plan, dev)  # every argument known now
    q = dev["q"]
    with pytest.raises(ValueError, match="q must have shape"):
        plan.run(q[:, :, :8], dev["k"], dev["v"])
    with pytest.raises(ValueError, match="q must be C-contiguous"):
        plan.run(cp.asfortranarray(q), dev["k"], dev["v"])
    moved = q.copy()
    plan.run(moved, dev["k"], dev["v"])
    moved.shape = (q.shape[0], q.shape[1], q.shape[2] * 2, q.shape[3] // 2)  # the same array reshaped in place
    with pytest.raises(ValueError, match="q must have shape"):
        plan.run(moved, dev["k"], dev["v"])
    with pytest.raises(ValueError, match="seq_lens must be a 1-D int32"):
        plan.update(dev["lens"].astype(cp.int64))
    with pytest.raises(ValueError, match="seq_lens must be C-contiguous"):
        plan.update(cp.zeros(8, cp.int32)[::2])
    plan.update(cp.asarray(np.array([7, 2999, 1500, 200, 2000], np.int32))[1:])  # any int32 offset will do
    # distinct length arrays each step (rows of one buffer): each is read, none is stale
    lens_rows = cp.asarray(np.array([[2999 - s, 1 + s, 3000, 129 + s] for s in range(5)], np.int32))
    for s in range(5):
        plan.update(lens_rows[s])
        out = run_plan(plan, dev)[0].copy()
        plan.update(cp.asarray(np.array([2999 - s, 1 + s, 3000, 129 + s], np.int32)))
        again = run_plan(plan, dev)[0]
        assert cp.array_equal(bits(out), bits(again))


# --------------------------------------------------------------------------- one-call decode through plans


class _EarlierPath:
    """Context: the one-call attention through the earlier path (no plans)."""

    def __enter__(self):
        from msa_cupy import _plan_cache

        self.was, _plan_cache.enabled = _plan_cache.enabled, False

    def __exit__(self, *exc):
        from msa_cupy import _plan_cache

        _plan_cache.enabled = self.was


def _both_paths(*args, **kwargs):
    """(through a plan, through the earlier path) of msa_cupy.attention; the first must have
    run a plan step (cached plans are reused across calls, as in use)."""
    from msa_cupy import _plan_cache

    steps, step = [], _plan_cache._run
    _plan_cache._run = lambda *a, **k: steps.append(1) or step(*a, **k)
    try:
        planned = msa_cupy.attention(*args, **kwargs)
    finally:
        _plan_cache._run = step
    assert steps, "the call did not go through a decode plan"
    with _EarlierPath():
        earlier = msa_cupy.attention(*args, **kwargs)
    return planned, earlier


def _assert_samebits(a, b):
    import cupy as cp

    a, b = (a,) if not isinstance(a, tuple) else a, (b,) if not isinstance(b, tuple) else b
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert cp.array_equal(bits(x), bits(y))


@st.composite
def one_calls(draw):
    hkv = draw(st.sampled_from([1, 2, 4]))
    return dict(hkv=hkv, g=draw(st.sampled_from([1, 4, 16])), d=draw(st.sampled_from([64, 128])),
                block=draw(st.sampled_from([64, 128])), nq=draw(st.sampled_from([1, 1, 2, 3, 8, 16])),
                batch=draw(st.integers(1, 5)), nk=draw(st.integers(1, 2500)), top_k=draw(st.integers(1, 12)),
                local=draw(st.integers(0, 2)), sink=draw(st.integers(0, 1)),
                index=draw(st.sampled_from(["free", "shared", "per_group"])),
                layout=draw(st.sampled_from(["batched", "single", "varlen"])),
                dtype=draw(st.sampled_from(sorted(DTYPES))), lse=draw(st.booleans()), ids=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31)))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(one_calls())
def test_one_call_decode_through_plans_is_bitwise_the_earlier_path(p):
    import cupy as cp

    if p["local"] + p["sink"] > p["top_k"]:
        p["local"] = 0
    rng = np.random.default_rng(p["seed"])
    dt = DTYPES[p["dtype"]]
    hq, hkv, d, nq, b, nk = p["hkv"] * p["g"], p["hkv"], p["d"], p["nq"], p["batch"], p["nk"]
    kw = dict(block_size=p["block"], top_k=p["top_k"], local_blocks=p["local"], sink_blocks=p["sink"],
              return_lse=p["lse"], return_indices=p["ids"])
    ik_heads = {"free": 0, "shared": 1, "per_group": hkv}[p["index"]]
    if p["layout"] == "varlen":  # uneven queries (some sequences with none) and keys
        q_lens = rng.integers(0, nq + 1, b)
        q_lens[0] = max(q_lens[0], 1)
        k_lens = np.maximum(rng.integers(0, nk + 1, b), q_lens)
        cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(np.int32)
        qs, ks = (int(cu_q[-1]),), (int(cu_k[-1]),)
        kw.update(cu_seqlens_q=cp.asarray(cu_q), cu_seqlens_k=cp.asarray(cu_k))
    else:
        qs, ks = ((b, nq), (b, nk)) if p["layout"] == "batched" else ((nq,), (nk,))
    q = cp.asarray(randn(rng, (*qs, hq, d), dt))
    k, v = cp.asarray(randn(rng, (*ks, hkv, d), dt)), cp.asarray(randn(rng, (*ks, hkv, d), dt))
    if ik_heads:
        kw.update(index_q=cp.asarray(randn(rng, (*qs, hkv, d), dt)), index_k=cp.asarray(randn(rng, (*ks, ik_heads, d), dt)))
    planned, earlier = _both_paths(q, k, v, **kw)
    _assert_samebits(planned, earlier)


def _one_sequence_cache(rng, n, hq=64, hkv=4, d=128):
    """q (1, 1, Hq, D), K/V caches (1, n, Hkv, D), index_q (1, 1, Hkv, D), one shared index-key
    head (1, n, 1, D): bf16 CuPy arrays at the paper's head counts."""
    import cupy as cp

    dt = DTYPES["bfloat16"]
    k, v = cp.asarray(randn(rng, (1, n, hkv, d), dt)), cp.asarray(randn(rng, (1, n, hkv, d), dt))
    ik = cp.asarray(randn(rng, (1, n, 1, d), dt))
    q, iq = cp.asarray(randn(rng, (1, 1, hq, d), dt)), cp.asarray(randn(rng, (1, 1, hkv, d), dt))
    return q, k, v, iq, ik


def test_one_call_decode_in_a_growing_cache_is_bitwise_the_earlier_path():
    import cupy as cp

    rng = np.random.default_rng(24)
    dt = DTYPES["bfloat16"]
    hq, hkv, d = 64, 4, 128
    q, k, v, iq, ik = _one_sequence_cache(rng, 1500)
    lengths = list(range(1, 40)) + list(range(120, 1500, 7))
    for n in lengths:  # one sequence: slices of the cache are contiguous
        learned = dict(index_q=iq, index_k=ik[:, :n])
        for index in ({}, learned):
            planned, earlier = _both_paths(q, k[:, :n], v[:, :n], top_k=8, return_lse=True, **index)
            _assert_samebits(planned, earlier)
    kb, vb = (cp.asarray(randn(rng, (3, 1100, hkv, d), dt)) for _ in range(2))
    qb = cp.asarray(randn(rng, (3, 2, hq, d), dt))
    for n in range(2, 1100, 53):  # a batch: contiguous copies per length, as a caller would pass
        planned, earlier = _both_paths(qb, cp.ascontiguousarray(kb[:, :n]), cp.ascontiguousarray(vb[:, :n]),
                                       top_k=4, return_indices=True)
        _assert_samebits(planned, earlier)


def test_one_call_decode_of_torch_tensors_is_bitwise_the_earlier_path():
    torch = pytest.importorskip("torch")
    import cupy as cp

    rng = np.random.default_rng(25)
    dt = DTYPES["float16"]
    q, k, v = (torch.from_dlpack(cp.asarray(randn(rng, shape, dt))) for shape in
               ((2, 3, 32, 64), (2, 900, 4, 64), (2, 900, 4, 64)))
    cp.cuda.Stream.null.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        planned, earlier = _both_paths(q, k, v, top_k=5, return_lse=True)
    stream.synchronize()
    assert isinstance(planned[0], torch.Tensor)
    _assert_samebits(tuple(cp.from_dlpack(x) for x in planned), tuple(cp.from_dlpack(x) for x in earlier))


def test_one_call_decodes_stay_right_when_plans_are_dropped_while_queued(monkeypatch):
    """A cache of one plan, calls alternating between two shapes: every call drops the other
    plan while its kernels may still be queued.  Plans hold no GPU memory, so every result
    is the one a lone call gives."""
    import cupy as cp

    from msa_cupy import _plan_cache

    monkeypatch.setattr(_plan_cache._local, "plans", _plan_cache.PlanCache(capacity=1), raising=False)
    rng = np.random.default_rng(26)
    dt = DTYPES["bfloat16"]
    k = cp.asarray(randn(rng, (1, 900, 2, 64), dt))
    v = cp.asarray(randn(rng, (1, 900, 2, 64), dt))
    q = cp.asarray(randn(rng, (1, 1, 8, 64), dt))
    calls = [(n, 2 + n % 2) for n in range(500, 900)]  # top_k 2 and 3: two plans
    outs = [msa_cupy.attention(q, k[:, :n], v[:, :n], block_size=64, top_k=top_k) for n, top_k in calls]
    assert len(_plan_cache.cache().plans) == 1
    assert all(found._raw is None for found in _plan_cache.cache().plans.values())  # no GPU memory of their own
    cp.cuda.Stream.null.synchronize()
    with _EarlierPath():
        for (n, top_k), out in zip(calls, outs):
            alone = msa_cupy.attention(q, k[:, :n], v[:, :n], block_size=64, top_k=top_k)
            assert cp.array_equal(bits(out), bits(alone)), f"length {n}"


def test_one_call_decode_loop_makes_no_host_sync_and_keeps_only_its_outputs():
    """200 one-call decode steps in a growing cache, queued while the GPU is busy: none waits
    for the GPU (0 host syncs), and the pool grows by the outputs the caller keeps, nothing else."""
    import cupy as cp

    q, k, v, iq, ik = _one_sequence_cache(np.random.default_rng(27), 4096)

    def step(n):
        return msa_cupy.attention(q, k[:, :n], v[:, :n], index_q=iq, index_k=ik[:, :n], top_k=16)

    warm = [step(n) for n in range(3000, 3200)]  # plans made, pool blocks for the outputs there
    cp.cuda.Stream.null.synchronize()
    del warm
    pool = cp.get_default_memory_pool()
    used = pool.used_bytes()
    spin = cp.RawKernel(_SPIN, "spin")
    outs, syncs = [], 0
    for start in (3000, 3100):  # two rounds of 100 steps, each queued behind ~0.5 s of GPU work
        spin((1,), (1,), (np.int64(int(1.8e9 * 0.5)),))
        busy = cp.cuda.Event()
        busy.record()
        outs += [step(n) for n in range(start, start + 100)]
        syncs += int(busy.done)  # the spin ended while queuing: some step waited for the GPU
        busy.synchronize()
    assert syncs == 0, "a one-call decode step waited for the GPU (host sync)"
    out_bytes = -(-outs[0].nbytes // 512) * 512  # the pool's allocation unit
    assert pool.used_bytes() - used == len(outs) * out_bytes
    with _EarlierPath():
        for n, out in zip(list(range(3000, 3200)), outs):
            if n % 25 == 0:
                assert cp.array_equal(bits(out), bits(step(n)))
