"""The public API: argument checks (one test per class of bad input), NumPy routing, and DLPack
round trips with CuPy, PyTorch and JAX on the GPU."""
import numpy as np
import pytest

import msa_cupy
from msa_cupy import reference
from msa_cupy._interop import BFLOAT16


def arrays(rng, b=1, nq=40, nk=300, hq=8, hkv=2, d=64, dtype=np.float16):
    def r(*s):
        return rng.standard_normal(s).astype(np.float32).astype(dtype)

    return r(b, nq, hq, d), r(b, nk, hkv, d), r(b, nk, hkv, d)


# --------------------------------------------------------------------------- NumPy route


def test_numpy_inputs_run_the_reference_and_keep_the_callers_dtype(rng):
    q, k, v = arrays(rng, dtype=BFLOAT16)
    out, lse, ids = msa_cupy.attention(q, k, v, block_size=64, top_k=3, return_lse=True, return_indices=True)
    assert out.dtype == BFLOAT16 and lse.dtype == np.float32 and ids.dtype == np.int32
    ref = reference.attention(q, k, v, block_size=64, top_k=3)
    assert np.allclose(out.astype(np.float32), ref, atol=1e-2)
    assert ids.shape == (1, 40, 2, 3)


BAD = [
    ("rank", lambda q, k, v: msa_cupy.attention(q[0, 0], k, v), ValueError, "q must have 3 or 4"),
    ("heads", lambda q, k, v: msa_cupy.attention(q[:, :, :3], k, v), ValueError, "multiple of k heads"),
    ("dims", lambda q, k, v: msa_cupy.attention(q[..., :32], k, v), ValueError, "head dim"),
    ("dtype", lambda q, k, v: msa_cupy.attention(q.astype(np.int32), k, v), TypeError, "q must have dtype"),
    ("mixed dtype", lambda q, k, v: msa_cupy.attention(q, k.astype(np.float32), v), TypeError, "share one dtype"),
    ("kv shape", lambda q, k, v: msa_cupy.attention(q, k, v[:, :10]), ValueError, "k and v must have the same shape"),
    ("batch", lambda q, k, v: msa_cupy.attention(q, np.concatenate([k, k]), np.concatenate([v, v])), ValueError,
     "batch size"),
    ("top_k", lambda q, k, v: msa_cupy.attention(q, k, v, top_k=0), ValueError, "top_k"),
    ("top_k type", lambda q, k, v: msa_cupy.attention(q, k, v, top_k=2.5), TypeError, "top_k"),
    ("forced", lambda q, k, v: msa_cupy.attention(q, k, v, top_k=2, local_blocks=2, sink_blocks=1), ValueError,
     "local_blocks \\+ sink_blocks"),
    ("block_size", lambda q, k, v: msa_cupy.attention(q, k, v, block_size=0), ValueError, "block_size"),
    ("scale", lambda q, k, v: msa_cupy.attention(q, k, v, scale=float("nan")), ValueError, "scale"),
    ("index pair", lambda q, k, v: msa_cupy.attention(q, k, v, index_q=q[:, :, :2]), ValueError, "index_q and index_k"),
    ("index heads", lambda q, k, v: msa_cupy.attention(q, k, v, index_q=q[:, :, :3], index_k=k), ValueError,
     "index_k must have 1 head"),
    ("cu pair", lambda q, k, v: msa_cupy.attention(q[0], k[0], v[0], cu_seqlens_q=np.array([0, 40], np.int32)),
     ValueError, "cu_seqlens_q and cu_seqlens_k"),
    ("cu rank", lambda q, k, v: msa_cupy.attention(q, k, v, cu_seqlens_q=np.array([0, 40], np.int32),
                                                   cu_seqlens_k=np.array([0, 300], np.int32)), ValueError, "cu_seqlens"),
    ("cu dtype", lambda q, k, v: msa_cupy.attention(q[0], k[0], v[0], cu_seqlens_q=np.array([0, 40]),
                                                   cu_seqlens_k=np.array([0, 300])), TypeError, "cu_seqlens_q must have dtype int32"),
    ("cu order", lambda q, k, v: msa_cupy.attention(q[0], k[0], v[0], cu_seqlens_q=np.array([0, 30, 20, 40], np.int32),
                                                   cu_seqlens_k=np.array([0, 100, 200, 300], np.int32)), ValueError,
     "non-decreasing"),
    ("cu total", lambda q, k, v: msa_cupy.attention(q[0], k[0], v[0], cu_seqlens_q=np.array([0, 39], np.int32),
                                                   cu_seqlens_k=np.array([0, 300], np.int32)), ValueError,
     "cu_seqlens_q\\[-1\\]"),
    ("indices dtype", lambda q, k, v: msa_cupy.sparse_attention(q, k, v, np.zeros((1, 40, 2, 4), np.int64)), TypeError,
     "block_indices must have dtype int32"),
    ("indices shape", lambda q, k, v: msa_cupy.sparse_attention(q, k, v, np.zeros((1, 40, 3, 4), np.int32)),
     ValueError, "block_indices must have shape"),
    ("indices range", lambda q, k, v: msa_cupy.sparse_attention(q, k, v, np.full((1, 40, 2, 4), 9, np.int32)),
     ValueError, "block_indices"),
    ("num_keys", lambda q, k, v: msa_cupy.topk_blocks(np.zeros((1, 40, 2, 3), np.float32)), ValueError, "num_keys"),
    ("scores blocks", lambda q, k, v: msa_cupy.topk_blocks(np.zeros((1, 40, 2, 3), np.float32), num_keys=1000),
     ValueError, "scores must have 8 key blocks"),
    ("not an array", lambda q, k, v: msa_cupy.attention([[1.0]], k, v), TypeError, "expected a NumPy, CuPy"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_argument(case, rng):
    _, fn, exc, match = case
    q, k, v = arrays(rng)
    with pytest.raises(exc, match=match):
        fn(q, k, v)


def test_gpu_functions_name_the_missing_piece_without_a_gpu():
    from msa_cupy import _interop

    if _interop.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="GPU"):
        _interop.require_cupy()


# --------------------------------------------------------------------------- GPU route


@pytest.mark.gpu
def test_gpu_only_checks_raise_before_any_work(rng):
    import cupy as cp

    q, k, v = (cp.asarray(x) for x in arrays(rng, d=64))
    with pytest.raises(TypeError, match="q must have dtype float16, bfloat16 on the GPU"):
        msa_cupy.attention(q.astype(cp.float32), k.astype(cp.float32), v.astype(cp.float32))
    q96, k96, v96 = (cp.asarray(x) for x in arrays(rng, d=96))
    with pytest.raises(ValueError, match="head dim must be one of"):
        msa_cupy.attention(q96, k96, v96)
    with pytest.raises(ValueError, match="q must be C-contiguous"):
        msa_cupy.attention(q[:, ::2], k, v)
    with pytest.raises(TypeError, match="NumPy array"):
        msa_cupy.attention(q, k.get(), v)
    with pytest.raises(ValueError, match="block_size must be one of"):
        msa_cupy.attention(q, k, v, block_size=32)
    flat = cp.asarray(arrays(rng, d=64)[0]).ravel()
    shifted = cp.concatenate([flat[:1], flat])[1:].reshape(q.shape)  # contiguous, 2 bytes off 16
    with pytest.raises(ValueError, match="q must start at a 16-byte aligned address"):
        msa_cupy.attention(shifted, k, v)
    ids = cp.full((1, 40, 2, 4), 7, cp.int32)  # 300 keys = 3 blocks of 128
    out_before = q.copy()
    with pytest.raises(ValueError, match="block_indices"):
        msa_cupy.sparse_attention(q, k, v, ids)
    assert cp.array_equal(q.view(cp.uint16), out_before.view(cp.uint16))


@pytest.mark.gpu
def test_torch_round_trip_on_a_side_stream(rng):
    torch = pytest.importorskip("torch")
    q, k, v = arrays(rng, nq=64, nk=512, dtype=np.float16)
    ref = msa_cupy.attention(q, k, v, block_size=64, top_k=3)  # NumPy route
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = msa_cupy.attention(tq, tk, tv, block_size=64, top_k=3)
        assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float16
        res = out.float().cpu().numpy()  # ordered after the kernels on the same stream
    assert np.abs(res - ref.astype(np.float32)).max() < 2e-2


@pytest.mark.gpu
def test_torch_inputs_are_not_copied(rng):
    torch = pytest.importorskip("torch")
    import cupy as cp

    from msa_cupy._interop import Call

    t = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    call = Call({"q": t})
    assert call.arrays["q"].data.ptr == t.data_ptr()
    back = call.wrap(cp.zeros(3))
    assert isinstance(back, torch.Tensor)


@pytest.mark.gpu
def test_jax_round_trip(rng):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    q, k, v = arrays(rng, nq=64, nk=512, dtype=np.float16)
    ref = msa_cupy.attention(q, k, v, block_size=64, top_k=3)
    out = msa_cupy.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block_size=64, top_k=3)
    assert isinstance(out, jax.Array)
    assert np.abs(np.asarray(out, np.float32) - ref.astype(np.float32)).max() < 2e-2
