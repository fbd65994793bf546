"""msa_cupy.torch: custom ops under torch.compile and CUDA graphs.

CPU part (needs torch, no GPU): the ops and their schemas, fake implementations (shapes and
dtypes on meta tensors and under FakeTensorMode), argument errors, torch.compile tracing the
ops into one graph (msa_cupy.attention included), and the decode ops' ordering through the
workspace they mutate (with a stand-in plan).  GPU part (marked gpu): the ops against
msa_cupy's own calls bitwise, torch.compile (fullgraph, reduce-overhead, plain) and
torch.cuda.graph replays against eager, scratch safety, streams.
"""
import contextlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the msa_cupy.torch tests need it")

import msa_cupy  # noqa: E402
import msa_cupy.torch as msa_torch  # noqa: E402
from msa_cupy import _interop, reference  # noqa: E402
from msa_cupy.testing import TOLERANCE, rel_error  # noqa: E402

BF16 = torch.bfloat16
OPS = ("attention", "attention_out", "decode_update", "decode_run", "decode_run_out")


def _meta(*shape, dtype=BF16):
    return torch.empty(shape, dtype=dtype, device="meta")


# --------------------------------------------------------------------------- CPU: registration, fakes


def test_import_msa_cupy_does_not_import_torch():
    code = "import sys, msa_cupy; assert 'torch' not in sys.modules, 'import msa_cupy imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ops_are_registered_with_their_mutations():
    schemas = {name: str(getattr(torch.ops.msa_cupy, name).default._schema) for name in OPS}
    assert "-> (Tensor, Tensor, Tensor)" in schemas["attention"] and "!" not in schemas["attention"]
    assert "!) out" in schemas["attention_out"] and "!)? lse" in schemas["attention_out"]
    for name in ("decode_update", "decode_run", "decode_run_out"):
        assert "!) workspace" in schemas[name], name  # orders update before run; never dead code
    assert "!) out" in schemas["decode_run_out"]


@pytest.mark.parametrize("learned", [False, True])
def test_attention_fake_shapes_and_dtypes(learned):
    q, k = _meta(2, 300, 16, 128), _meta(2, 1000, 4, 128)
    index = dict(index_q=_meta(2, 300, 4, 64), index_k=_meta(2, 1000, 1, 64)) if learned else {}
    out, lse, ids = msa_torch.attention(q, k, k, top_k=8, return_lse=True, return_indices=True, **index)
    assert (out.shape, out.dtype) == (q.shape, BF16)
    assert (lse.shape, lse.dtype) == ((2, 300, 16), torch.float32)
    assert (ids.shape, ids.dtype) == ((2, 300, 4, 8), torch.int32)
    assert msa_torch.attention(q, k, k).shape == q.shape  # out alone by default


def test_attention_fake_varlen_and_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(700, 8, 64, dtype=torch.float16), torch.empty(900, 2, 64, dtype=torch.float16)
        cu_q, cu_k = torch.empty(4, dtype=torch.int32), torch.empty(4, dtype=torch.int32)
        out, lse, ids = msa_torch.attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=64, top_k=4,
                                            return_lse=True, return_indices=True)
        assert out.shape == (700, 8, 64) and out.dtype == torch.float16
        assert lse.shape == (700, 8) and ids.shape == (700, 2, 4)
        out = torch.empty_like(q)
        assert msa_torch.attention_out(q, k, k, out, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) is out


def test_decode_fakes():
    q, cache, ws = _meta(3, 2, 16, 128), _meta(100, 64, 4, 128), _meta(4096, dtype=torch.uint8)
    out, lse = torch.ops.msa_cupy.decode_run(q, cache, cache, None, None, ws, 1)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, BF16, (3, 2, 16), torch.float32)
    torch.ops.msa_cupy.decode_run_out(q, cache, cache, None, None, ws, _meta(3, 2, 16, 128),
                                      _meta(3, 2, 16, dtype=torch.float32), 1)
    torch.ops.msa_cupy.decode_update(_meta(3, dtype=torch.int32), _meta(3, 9, dtype=torch.int32), ws, 1)
    with pytest.raises(ValueError, match="seq_lens"):
        torch.ops.msa_cupy.decode_update(_meta(3, dtype=torch.int64), None, ws, 1)
    with pytest.raises(ValueError, match="q must be"):
        torch.ops.msa_cupy.decode_run(_meta(3, 16, 128), cache, cache, None, None, ws, 1)


@pytest.mark.parametrize("change, match", [
    (dict(k=_meta(2, 1000, 3, 128)), "k heads"),
    (dict(k=_meta(2, 1000, 4, 128, dtype=torch.float32)), "k must have dtype"),
    (dict(v=_meta(2, 999, 4, 128)), "k and v must have the same shape"),
    (dict(q=_meta(2, 300, 16, 96)), "head dim"),
    (dict(q=torch.empty(2, 128, 300, 16, dtype=BF16, device="meta").transpose(1, 3)), "q must be C-contiguous"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=65), "top_k"),
    (dict(block_size=32), "block_size"),
    (dict(causal=1), "causal"),
    (dict(scale="0.1"), "scale"),
    (dict(local_blocks=3, sink_blocks=2, top_k=4), "local_blocks"),
    (dict(index_q=_meta(2, 300, 4, 64)), "index_q and index_k"),
    (dict(index_q=_meta(2, 300, 2, 64), index_k=_meta(2, 1000, 1, 64)), "index_q must have one head per KV head"),
    (dict(index_q=_meta(2, 301, 4, 64), index_k=_meta(2, 1000, 1, 64)), "token counts"),
    (dict(cu_seqlens_q=_meta(3, dtype=torch.int32)), "cu_seqlens_q and cu_seqlens_k"),
    (dict(q=np.zeros((2, 300, 16, 128), np.float16)), "q must be a torch.Tensor"),
])
def test_argument_errors_name_the_argument(change, match):
    args = dict(q=_meta(2, 300, 16, 128), k=_meta(2, 1000, 4, 128), v=_meta(2, 1000, 4, 128))
    args.update(change)
    if "k" in change:
        args["v"] = args["k"]
    with pytest.raises((TypeError, ValueError), match=match):
        msa_torch.attention(**args)


def test_out_variant_checks_out_and_lse():
    q, k = _meta(1, 64, 8, 64), _meta(1, 128, 2, 64)
    with pytest.raises(ValueError, match="out must be"):
        msa_torch.attention_out(q, k, k, _meta(1, 64, 8, 32))
    with pytest.raises(ValueError, match="lse must be"):
        msa_torch.attention_out(q, k, k, _meta(1, 64, 8, 64), lse=_meta(1, 64, 8))  # bf16, not float32


def test_cpu_tensors_are_named():
    q = torch.zeros(1, 64, 8, 64, dtype=BF16)
    with pytest.raises(TypeError, match="q is a CPU tensor"):
        msa_torch.attention(q, q[:, :, :2], q[:, :, :2])


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("entry", ["msa_cupy.attention", "msa_cupy.torch.attention"])
def test_compile_fullgraph_traces_attention_as_the_op(entry):
    """msa_cupy.attention under torch.compile is the custom op: one graph, no break (meta inputs
    run the fake implementation, so this needs no GPU)."""
    fn = msa_cupy.attention if entry == "msa_cupy.attention" else msa_torch.attention
    torch._dynamo.reset()
    graphs = []

    def f(q, k, v):
        out, lse = fn(q * 2, k, v, top_k=4, block_size=64, return_lse=True)
        return out + 1, lse

    out, lse = torch.compile(f, backend=_recording_backend(graphs), fullgraph=True)(
        _meta(1, 256, 8, 64), _meta(1, 512, 2, 64), _meta(1, 512, 2, 64))
    assert out.shape == (1, 256, 8, 64) and lse.shape == (1, 256, 8)
    assert len(graphs) == 1 and "torch.ops.msa_cupy.attention.default" in graphs[0].code


def test_other_public_calls_run_outside_the_trace(monkeypatch):
    """Plain torch.compile of msa_cupy's other calls: one graph break, the call runs eagerly
    (NumPy inputs here: the reference), never traced through CuPy or NumPy code."""
    torch._dynamo.reset()
    rng = np.random.default_rng(0)
    iq, ik = rng.standard_normal((40, 2, 16)), rng.standard_normal((90, 1, 16))

    def f(x):
        return x + 1, msa_cupy.select_blocks(iq, ik, top_k=3, block_size=16)

    _, ids = torch.compile(f, backend="eager")(torch.zeros(3))
    assert np.array_equal(ids, reference.select_blocks(iq, ik, top_k=3, block_size=16))


class _StandInPlan:
    """What the decode ops need of a plan: the step's lengths go into the workspace on update
    and come back out of it on run (lse = the sequence's length), so that a run ordered before
    its update, or an update dropped, shows in the result."""

    def __init__(self):
        self.binds = 0

    def use_workspace(self, workspace, carry_over=False):
        self.ws, self.binds = workspace, self.binds + 1

    def update(self, seq_lens, block_table=None):
        self.ws[:4 * len(seq_lens)].view(torch.int32).copy_(torch.as_tensor(seq_lens))

    def run(self, q, k_cache, v_cache, *, index_q=None, index_k_cache=None, out=None, lse=None):
        out.copy_(q * 2)
        lens = self.ws[:4 * q.shape[0]].view(torch.int32).float()
        lse.copy_(lens[:, None, None].expand(lse.shape))


def _stand_in(monkeypatch):
    monkeypatch.setattr(_interop, "torch_stream", lambda device: contextlib.nullcontext())
    plan = object.__new__(msa_torch.DecodePlan)
    plan.plan, plan.workspace = _StandInPlan(), torch.zeros(1024, dtype=torch.uint8)
    plan.plan.use_workspace(plan.workspace)
    plan._bound, plan.handle = plan.workspace.data_ptr(), 10**6
    msa_torch._PLANS[plan.handle] = plan
    return plan


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_decode_ops_keep_update_before_run_under_compile(monkeypatch, backend):
    if backend == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor on the CPU needs a C++ compiler")
    plan = _stand_in(monkeypatch)
    torch._dynamo.reset()

    def step(q, k_cache, lens):
        plan.update(lens)
        out, lse = plan.run(q, k_cache, k_cache, return_lse=True)
        return out + 1, lse

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    q, cache = torch.randn(2, 1, 8, 64), torch.randn(2, 100, 2, 64)
    for lens in ([5, 7], [11, 3], [2, 90]):
        out, lse = compiled(q, cache, torch.tensor(lens, dtype=torch.int32))
        assert torch.equal(out, q * 2 + 1)
        assert torch.equal(lse[:, 0, 0], torch.tensor(lens, dtype=torch.float32))
    if backend == "inductor":  # the workspace mutation is done in place, on the plan's own buffer
        assert plan.plan.binds == 1
    del msa_torch._PLANS[plan.handle]


def test_stale_handle_is_named():
    with pytest.raises(ValueError, match="handle 123456789"):
        torch.ops.msa_cupy.decode_run(torch.zeros(1, 1, 8, 64), torch.zeros(1, 8, 2, 64), torch.zeros(1, 8, 2, 64),
                                      None, None, torch.zeros(8, dtype=torch.uint8), 123456789)


def test_stream_handle_of_a_generic_stream():
    class GenericStream:  # what torch.compile hands back for torch.cuda.current_stream(): no cuda_stream
        device_index, device_type, stream_id = 0, 1, 7

        @property
        def native_handle(self):
            return 0xABC0

    assert _interop.torch_stream_handle(GenericStream()) == (0xABC0, 0)


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


def _inputs(seed, b=1, nq=1024, nk=1024, hq=16, hkv=4, d=128, di=None, dtype=BF16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    x = dict(q=r(b, nq, hq, d), k=r(b, nk, hkv, d), v=r(b, nk, hkv, d))
    if di:
        x.update(index_q=r(b, nq, hkv, di), index_k=r(b, nk, 1, di))
    return x


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same(a, b):
    return torch.equal(_bits(a), _bits(b))


@gpu
@pytest.mark.parametrize("case", ["batched", "learned", "varlen", "decode-shaped"])
def test_op_equals_msa_cupy_attention_bitwise(case):
    x = _inputs(1, b=2, nq=1, nk=3000) if case == "decode-shaped" else _inputs(1, di=64 if case == "learned" else None)
    opts = dict(top_k=8, return_lse=True, return_indices=True)
    if case == "varlen":
        x = {n: t[0] for n, t in x.items()}
        cu = torch.tensor([0, 300, 301, 1024], dtype=torch.int32, device="cuda")
        opts.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    got = msa_torch.attention(**x, **opts)
    want = msa_cupy.attention(**x, **opts)
    torch.cuda.synchronize()
    assert all(_same(a, b) for a, b in zip(got, want))
    assert got[0].is_contiguous() and got[1].dtype == torch.float32 and got[2].dtype == torch.int32


@gpu
def test_out_variant_writes_out_and_leaves_it_on_error():
    x = _inputs(2)
    out = torch.full_like(x["q"], float("nan"))
    lse = torch.full(x["q"].shape[:-1], float("nan"), device="cuda")
    msa_torch.attention_out(**x, out=out, lse=lse, top_k=8)
    want_out, want_lse = msa_cupy.attention(**x, top_k=8, return_lse=True)
    assert _same(out, want_out) and _same(lse, want_lse)
    poisoned = torch.full_like(out, float("nan"))
    q, k, v = (x[n][0] for n in ("q", "k", "v"))
    bad_cu = torch.tensor([0, 512, 1000], dtype=torch.int32, device="cuda")  # totals 1000 != 1024 tokens
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        msa_torch.attention_out(q, k, v, poisoned[0], cu_seqlens_q=bad_cu, cu_seqlens_k=bad_cu)
    assert torch.isnan(poisoned).all(), "nothing may be written into out on error"


class _Prefill(torch.nn.Module):
    def forward(self, q, k, v):
        out, lse = msa_cupy.attention(q * 1.5, k, v, top_k=8, return_lse=True)
        return out.float() * 2.0, lse - 1.0  # elementwise: the same bits compiled or not


@gpu
def test_compile_fullgraph_prefill_equals_eager():
    torch._dynamo.reset()
    x = _inputs(3)
    module = _Prefill()
    eager = module(**x)
    compiled = torch.compile(module, fullgraph=True)
    for _ in range(2):
        got = compiled(**x)
        assert all(torch.equal(a, b) for a, b in zip(got, eager))


def _plan_problem(seed, batch=4, max_len=3000, paged=True, learned=False):
    """A torch DecodePlan, caches (static addresses) and a step's inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(BF16)  # noqa: E731
    hkv, hq, d, page = 4, 64, 128, 128
    pages = -(-max_len // page)
    opts = dict(max_batch=batch, max_cache_len=max_len, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                dtype=BF16, top_k=8)
    if learned:
        opts.update(index_dim=128, index_k_heads=1)
    if paged:
        n_pages = batch * pages + 3
        opts.update(page_size=page, num_pages=n_pages)
        cache_shape = (n_pages, page)
        table = torch.randperm(n_pages, device="cuda")[:batch * pages].view(batch, pages).int().contiguous()
    else:
        cache_shape, table = (batch, max_len), None
    k, v = r(*cache_shape, hkv, d), r(*cache_shape, hkv, d)
    index = dict(index_k_cache=r(*cache_shape, 1, 128)) if learned else {}
    for t in (k, v, *index.values()):
        torch._dynamo.mark_static_address(t)
    plan = msa_torch.DecodePlan(**opts)
    raw = msa_cupy.DecodePlan(**opts)  # the eager plan the ops must match
    lens = torch.tensor([max_len - 1, 1500, 200, 2000][:batch], dtype=torch.int32, device="cuda")
    return plan, raw, dict(k=k, v=v, table=table, lens=lens, index=index, r=r, learned=learned)


def _q(p, batch=4):
    q = p["r"](batch, 1, 64, 128)
    return q, (dict(index_q=p["r"](batch, 1, 4, 128)) if p["learned"] else {})


def _raw_step(raw, p, q, iq, lens, table):
    raw.update(lens, table)
    return raw.run(q, p["k"], p["v"], **iq, **p["index"], return_lse=True)


@gpu
@pytest.mark.parametrize("paged, learned", [(True, False), (False, True)])
def test_decode_ops_equal_the_plan_and_the_reference(paged, learned):
    plan, raw, p = _plan_problem(4, paged=paged, learned=learned)
    q, iq = _q(p)
    plan.update(p["lens"], p["table"])
    out, lse = plan.run(q, p["k"], p["v"], **iq, **p["index"], return_lse=True)
    want_out, want_lse = _raw_step(raw, p, q, iq, p["lens"], p["table"])
    torch.cuda.synchronize()
    assert _same(out, want_out) and _same(lse, want_lse)
    assert torch.equal(plan.block_indices, torch.from_dlpack(raw.block_indices))
    # into the caller's buffers, poisoned first
    out2 = torch.full_like(q, float("nan"))
    lse2 = torch.full(q.shape[:-1], float("nan"), device="cuda")
    assert plan.run(q, p["k"], p["v"], **iq, **p["index"], out=out2, lse=lse2) is out2
    assert _same(out2, want_out) and _same(lse2, want_lse)
    # host lengths (CPU tensors): checked and copied, same step
    plan.update(p["lens"].cpu(), None if p["table"] is None else p["table"].cpu())
    assert _same(plan.run(q, p["k"], p["v"], **iq, **p["index"]), want_out)
    assert plan.clamped_entries() == 0
    # one sequence against the float64 reference over the plan's selection
    host = lambda t: t.float().cpu().numpy()  # noqa: E731
    if not paged and not learned:
        n = int(p["lens"][2])
        ref, _ = reference.sequence_sparse_attention(host(q[2]), host(p["k"][2, :n]), host(p["v"][2, :n]),
                                                     plan.block_indices[2].cpu().numpy(), np.array([n - 1]))
        assert rel_error(host(out[2]), ref) < TOLERANCE["bfloat16"]


class _Decoder(torch.nn.Module):
    """A decode step: the plan's update and run, and ordinary torch work around them."""

    def __init__(self, plan, k, v):
        super().__init__()
        self.plan, self.k, self.v = plan, k, v

    def forward(self, q, lens, table):
        self.plan.update(lens, table)
        out, lse = self.plan.run(q * 1.0, self.k, self.v, return_lse=True)
        return out * 2.0, lse


def _steps(p):
    """Lengths and block tables of a few steps: growing, shrinking, a reordered table."""
    table = p["table"]
    for step in range(4):
        lens = torch.tensor([2999 - 3 * step, 1500 + step, 200 + 100 * step, 2000], dtype=torch.int32, device="cuda")
        if step >= 2:
            table = table[:, torch.randperm(table.shape[1], device="cuda")].contiguous()
        yield lens, table


@gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decoder_equals_eager(mode):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plan, raw, p = _plan_problem(5)
    decoder = torch.compile(_Decoder(plan, p["k"], p["v"]), fullgraph=True, mode=mode)
    for lens, table in _steps(p):
        q, _ = _q(p)
        for _ in range(3):  # reduce-overhead: warm-up, record, replay
            out, lse = decoder(q, lens, table)
            out, lse = out.clone(), lse.clone()
        want_out, want_lse = _raw_step(raw, p, q, {}, lens, table)
        torch.cuda.synchronize()
        assert _same(out, want_out * 2.0) and _same(lse, want_lse)
    if mode == "reduce-overhead":
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@gpu
def test_torch_cuda_graph_replays_eager_bitwise_and_keeps_later_memory():
    plan, raw, p = _plan_problem(6)
    q, _ = _q(p)
    lens, table = p["lens"].clone(), p["table"].clone()  # static inputs of the graph
    plan.update(lens, table)
    plan.run(q, p["k"], p["v"])  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.update(lens, table)  # one launch reading the lengths on the device: captured too
        out, lse = plan.run(q, p["k"], p["v"], return_lse=True)
    for step_lens, step_table in _steps(p):
        lens.copy_(step_lens)
        table.copy_(step_table)
        q.copy_(p["r"](*q.shape))
        graph.replay()
        want_out, want_lse = _raw_step(raw, p, q, {}, step_lens, step_table)
        torch.cuda.synchronize()
        assert _same(out, want_out) and _same(lse, want_lse)
    later = [torch.full((1 << 16,), i, dtype=torch.int32, device="cuda") for i in range(48)]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert all(bool((t == i).all()) for i, t in enumerate(later))


@gpu
def test_attention_op_in_a_cuda_graph_takes_scratch_from_the_graph_pool():
    """CuPy's temporaries inside the op come from torch's allocator: in a capture they live in
    the graph's private pool, so memory handed out after the capture is never written by replays."""
    import cupy as cp

    x = _inputs(7, b=2, nq=1, nk=4096)
    want = msa_torch.attention(**x, top_k=8)  # warm-up (kernels loaded) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = msa_torch.attention(**x, top_k=8)
    later = [torch.full((1 << 16,), i, dtype=torch.int32, device="cuda") for i in range(48)]
    later_cp = [cp.full((1 << 16,), i, dtype=cp.int32) for i in range(48)]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert _same(out, want)
    assert all(bool((t == i).all()) for i, t in enumerate(later))
    assert all(bool((a == i).all()) for i, a in enumerate(later_cp))


@gpu
def test_reduce_overhead_attention_equals_eager():
    torch._dynamo.reset()
    x = _inputs(8, b=2, nq=1, nk=4096)
    want = msa_cupy.attention(**x, top_k=8)
    compiled = torch.compile(lambda q, k, v: msa_cupy.attention(q, k, v, top_k=8), mode="reduce-overhead")
    for _ in range(4):
        got = compiled(**x).clone()
    torch.cuda.synchronize()
    assert _same(got, want)


@gpu
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # CuPy frees memory mid-trace
def test_plain_compile_of_msa_cupy_calls_equals_eager():
    """Plain torch.compile (graph breaks allowed) of functions calling msa_cupy directly: the
    attention op, and the calls that run eagerly outside the trace, on the caller's stream."""
    torch._dynamo.reset()
    x = _inputs(9)
    ids = msa_cupy.select_blocks(x["q"][:, :, ::4].contiguous(), x["k"], top_k=8)
    plan, raw, p = _plan_problem(10, paged=False)
    q, _ = _q(p)
    raw.update(p["lens"])

    def f(q, k, v):
        a = msa_cupy.attention(q, k, v, top_k=8)
        b = msa_cupy.sparse_attention(q, k, v, ids)
        return a.float() + 1, b.float() + 1

    def g(q):
        return raw.run(q * 1.0, p["k"], p["v"]).float() + 1

    want_f, want_g = f(**x), g(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for stream in (torch.cuda.current_stream(), side):  # a side stream after tracing on the default one
        with torch.cuda.stream(stream):
            got_f, got_g = torch.compile(f)(**x), torch.compile(g)(q)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(got_f, want_f)) and torch.equal(got_g, want_g)


@gpu
def test_stream_of_torch_compile_is_the_cuda_stream():
    s = torch.cuda.Stream()
    generic = torch.Stream(stream_id=s.stream_id, device_index=s.device_index, device_type=s.device_type)
    assert _interop.torch_stream_handle(generic) == (s.cuda_stream, s.device_index)
    assert _interop.external_stream(generic).ptr == s.cuda_stream
    with torch.cuda.stream(s):
        assert _interop.torch_stream(s.device_index).ptr == s.cuda_stream
