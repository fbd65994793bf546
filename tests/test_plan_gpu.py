"""Decode plans on the GPU: against the float64 reference (decode, MTP, paged and contiguous
caches, learned and training-free index), paged == contiguous bitwise, CUDA-graph capture
(PyTorch and CuPy) replaying bitwise what eager runs give, after updates too, scratch safety,
a growing-cache loop with no host sync and no memory growth, and queued one-call decodes with
distinct lengths (cu_seqlens lifetime)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msa_cupy
from msa_cupy import reference
from msa_cupy.testing import DTYPES, TOLERANCE, assert_attention_close, assert_selection_matches, randn, rel_error

pytestmark = pytest.mark.gpu
SETTINGS = settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))


def _bits(x):
    import cupy as cp

    x = cp.asarray(x)
    return x.view(cp.uint16) if x.dtype.itemsize == 2 else x.view(cp.uint32) if x.dtype.itemsize == 4 else x


def _paged(cache, lens, page_size, rng, extra_pages=3):
    """The contiguous cache (B, S, H, D) as permuted pages (P, page_size, H, D) + block table."""
    batch = cache.shape[0]
    need = [-(-int(n) // page_size) for n in lens]
    n_pages = sum(need) + extra_pages
    ids = rng.permutation(n_pages)
    table = np.full((batch, max(max(need, default=1), 1) + 1), -1, np.int32)  # -1 past the used pages
    pages = randn(rng, (n_pages, page_size, *cache.shape[2:]), cache.dtype)  # unused rows: noise
    used = 0
    for s, n in enumerate(need):
        for p in range(n):
            pid = ids[used]
            used += 1
            table[s, p] = pid
            rows = cache[s, p * page_size:(p + 1) * page_size]
            pages[pid, :len(rows)] = rows
    return pages, table


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
    import cupy as cp

    rng = np.random.default_rng(p["seed"])
    dt = DTYPES[p["dtype"]]
    hq, hkv, d, nq, b = p["hkv"] * p["g"], p["hkv"], p["d"], p["nq"], p["batch"]
    lens = np.array(p["lens"], np.int32)
    k = randn(rng, (p["max_batch"], p["max_len"], hkv, d), dt)
    v = randn(rng, (p["max_batch"], p["max_len"], hkv, d), dt)
    q = randn(rng, (b, nq, hq, d), dt)
    ik_heads = 1 if p["shared"] else hkv
    iq = randn(rng, (b, nq, hkv, d), dt) if p["learned"] else None
    ik = randn(rng, (p["max_batch"], p["max_len"], ik_heads, d), dt) if p["learned"] else None
    host = dict(q=q, k=k, v=v, iq=iq, ik=ik, lens=lens, table=None)
    if p["page_size"]:
        prng = np.random.default_rng(p["seed"] + 1)
        host["k"], host["table"] = _paged(k[:b], lens, p["page_size"], prng)
        host["v"], _ = _paged(v[:b], lens, p["page_size"], np.random.default_rng(p["seed"] + 1))
        if p["learned"]:
            host["ik"], _ = _paged(ik[:b], lens, p["page_size"], np.random.default_rng(p["seed"] + 1))
    plan = msa_cupy.DecodePlan(
        max_batch=p["max_batch"], max_cache_len=p["max_len"], num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
        dtype=p["dtype"], index_dim=d if p["learned"] else None, index_k_heads=ik_heads, block_size=p["block"],
        top_k=p["top_k"], queries_per_seq=nq, page_size=p["page_size"],
        num_pages=host["k"].shape[0] if p["page_size"] else None)
    dev = {name: (None if x is None else cp.asarray(x)) for name, x in host.items()}
    return plan, host, dev


def _run(plan, dev, **kw):
    index = dict(index_q=dev["iq"], index_k_cache=dev["ik"]) if dev["iq"] is not None else {}
    return plan.run(dev["q"], dev["k"], dev["v"], return_lse=True, **index, **kw)


@SETTINGS
@given(problems())
def test_plan_matches_reference(p):
    plan, host, dev = _setup(p)
    plan.update(host["lens"] if p["seed"] % 2 else dev["lens"], host["table"] if p["seed"] % 2 else dev["table"])
    plan.workspace["out"].view(np.uint16).fill(0x7FFF)  # poison: every row must be written
    out, lse = _run(plan, dev)
    ids = plan.block_indices.get()
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
    kp, table = _paged(k, lens, page, rng)
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
    assert cp.array_equal(_bits(out_c), _bits(out_p)) and cp.array_equal(_bits(lse_c), _bits(lse_p))
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
            assert cp.array_equal(_bits(replayed[0]), _bits(eager_out))
            assert cp.array_equal(_bits(replayed[1]), _bits(eager_lse))
        assert all(bool((a == i).all()) for i, a in enumerate(later))


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
        assert cp.array_equal(_bits(out), _bits(again)), f"length {n}"


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
    own_out, own_lse = (x.copy() for x in _run(plan, dev))
    raw = cp.full(plan.workspace_bytes + 512, 0xA5, cp.uint8)  # poison: nothing may be read before written
    other = msa_cupy.DecodePlan(
        max_batch=p["max_batch"], max_cache_len=p["max_len"], num_q_heads=p["hkv"] * p["g"], num_kv_heads=p["hkv"],
        head_dim=p["d"], dtype=p["dtype"], block_size=p["block"], top_k=p["top_k"], page_size=p["page_size"],
        num_pages=host["k"].shape[0])
    other.use_workspace(raw[256:])
    other.update(dev["lens"], dev["table"])
    out, lse = _run(other, dev)
    assert out.data.ptr >= raw.data.ptr and out.data.ptr < raw.data.ptr + raw.size  # a view of the caller's buffer
    assert cp.array_equal(_bits(out), _bits(own_out)) and cp.array_equal(_bits(lse), _bits(own_lse))
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
        out, lse = _run(other, dev)
        assert cp.array_equal(_bits(out), _bits(own_out)) and cp.array_equal(_bits(lse), _bits(own_lse))
    with pytest.raises(ValueError, match="workspace must be a 1-D uint8 array"):
        other.use_workspace(raw[:plan.workspace_bytes - 1])
    with pytest.raises(ValueError, match="256-byte boundary"):
        other.use_workspace(raw[16:])
