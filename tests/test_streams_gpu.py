"""Embedding: work queued on the caller's stream, no extra synchronization, concurrent streams."""
import numpy as np
import pytest

import msa_cupy
from msa_cupy import testing

pytestmark = pytest.mark.gpu
BUSY_CYCLES = 50_000_000  # torch.cuda._sleep: tens of milliseconds of a busy stream


def _torch_inputs(torch, seed, n=2048, hq=16, hkv=4, d=128):
    """bf16 torch tensors (1, n, H, d) for q, k, v, drawn by the test kit."""
    a = testing.attention_inputs(np.random.default_rng(seed), [(n, n)], n_kv_heads=hkv, group_size=hq // hkv,
                                 head_dim=d, batched=True)
    return tuple(torch.from_dlpack(testing.to_device(a[name])) for name in ("q", "k", "v"))


def test_side_stream_producer_and_consumer_need_no_sync():
    torch = pytest.importorskip("torch")
    q, k, v = _torch_inputs(torch, 0)
    expected = msa_cupy.attention(q, k, v).float()
    q2 = torch.full_like(q, float("nan"))  # what an unordered read would see
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # a busy producer: q2 is written only after a long kernel on the side stream; msa_cupy
        # must queue its kernels behind it, or it reads the NaN and the result differs
        torch.cuda._sleep(BUSY_CYCLES)
        q2.copy_(q)
        out = msa_cupy.attention(q2, k, v)
        got = out.float() * 1.0
    stream.synchronize()
    assert torch.equal(got, expected)


def test_varlen_cu_seqlens_made_on_a_side_stream():
    """cu_seqlens computed on the caller's stream are read after that stream's work."""
    torch = pytest.importorskip("torch")
    q, k, v = (x[0] for x in _torch_inputs(torch, 3))
    lengths = torch.tensor([700, 0, 1, 1347], device="cuda", dtype=torch.int32)
    expected = msa_cupy.attention(q, k, v, cu_seqlens_q=torch.nn.functional.pad(lengths.cumsum(0).int(), (1, 0)),
                                  cu_seqlens_k=torch.nn.functional.pad(lengths.cumsum(0).int(), (1, 0))).float()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(BUSY_CYCLES)  # keep the stream busy so that an unordered read sees garbage
        cu = torch.nn.functional.pad((lengths * 1).cumsum(0).int(), (1, 0))
        got = msa_cupy.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu).float()
    stream.synchronize()
    assert torch.equal(got, expected)


def test_two_streams_concurrently():
    torch = pytest.importorskip("torch")
    inputs = [_torch_inputs(torch, s) for s in (1, 2)]
    expected = [msa_cupy.attention(*x).float() for x in inputs]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in inputs]
    outs = []
    for _ in range(3):
        for s, x in zip(streams, inputs):
            with torch.cuda.stream(s):
                outs.append(msa_cupy.attention(*x).float())
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        assert torch.equal(out, expected[i % 2]), "results must not depend on what runs beside them"


def test_jax_computation_feeds_msa_without_sync():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    key = jax.random.PRNGKey(0)
    q0 = jax.random.normal(key, (1, 1024, 8, 64), jnp.float16)
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1024, 2, 64), jnp.float16)
    v = jax.random.normal(jax.random.PRNGKey(2), (1, 1024, 2, 64), jnp.float16)
    q = jax.jit(lambda x: (x * 2.0).astype(jnp.float16))(q0)  # still computing when handed over
    out = msa_cupy.attention(q, k, v, block_size=64, top_k=4)
    ref = msa_cupy.attention(np.asarray(q0) * np.float16(2), np.asarray(k), np.asarray(v), block_size=64, top_k=4)
    assert np.abs(np.asarray(out, np.float32) - ref.astype(np.float32)).max() < 2e-2
