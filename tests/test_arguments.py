"""The API boundary: scalar options normalized once, odd arguments named before any work, the
reference's bounds on top_k and block_size, and the one routing function between the fast
kernels and the plain CuPy path."""
import tracemalloc

import numpy as np
import pytest

import msa_cupy
from msa_cupy import _api, _interop, _jit, _plain, reference, selection, sparse

PLAIN_TYPES = (int, bool, float, type(None))


def qkv(rng, b=1, nq=24, nk=200, hq=4, hkv=2, d=16, dtype=np.float32):
    def r(*s):
        return rng.standard_normal(s).astype(dtype)

    return r(b, nq, hq, d), r(b, nk, hkv, d), r(b, nk, hkv, d)


def index_pair(rng, nq=24, nk=200, groups=2, di=16):
    return rng.standard_normal((1, nq, groups, di)), rng.standard_normal((1, nk, groups, di))


def spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def record(*args, **kwargs):
        calls.append((name, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, record)


def assert_plain(calls):
    assert calls, "the spied function was never called"
    for name, kwargs in calls:
        for key, value in kwargs.items():
            if key in ("top_k", "block_size", "local_blocks", "sink_blocks", "num_keys", "causal", "scale",
                       "return_lse", "return_indices"):
                assert type(value) in PLAIN_TYPES, f"{name} got {key}={value!r} of type {type(value).__name__}"


# NumPy scalars of narrow types: np.int16(128) and np.uint8 overflow in launch arithmetic
NUMPY_SCALARS = dict(top_k=np.uint8(3), block_size=np.int16(64), local_blocks=np.int64(1), sink_blocks=np.uint8(1),
                     causal=np.bool_(True))


# --------------------------------------------------------------------------- one normalization


def test_scalar_options_are_plain_python_values():
    options = _interop.scalar_options(**NUMPY_SCALARS, num_keys=np.int32(200), scale=np.float16(0.25),
                                      return_lse=np.bool_(False), return_indices=True)
    assert options == dict(top_k=3, block_size=64, local_blocks=1, sink_blocks=1, causal=True, num_keys=200,
                           scale=0.25, return_lse=False, return_indices=True)
    assert all(type(v) in PLAIN_TYPES for v in options.values()), {k: type(v) for k, v in options.items()}
    assert _interop.scalar_options(num_keys=None, scale=None) == dict(num_keys=None, scale=None)


def _call_inputs(rng):
    """q, k, v, index_q, index_k and the reference's float32 block scores and ids for them."""
    q, k, v = qkv(rng)
    iq, ik = index_pair(rng)
    scores = reference.block_scores(iq, ik, block_size=64).astype(np.float32)
    return q, k, v, iq, ik, scores, reference.select_blocks(iq, ik, top_k=3, block_size=64)


def _public_calls(rng):
    q, k, v, iq, ik, scores, ids = _call_inputs(rng)
    return {
        "block_scores": lambda m, o: m.block_scores(iq, ik, block_size=o["block_size"], causal=o["causal"]),
        "topk_blocks": lambda m, o: m.topk_blocks(scores, num_keys=np.int64(200), **o),
        "select_blocks": lambda m, o: m.select_blocks(iq, ik, **o),
        "sparse_attention": lambda m, o: m.sparse_attention(q, k, v, ids, block_size=o["block_size"],
                                                            causal=o["causal"], scale=np.float32(0.3),
                                                            return_lse=np.bool_(True)),
        "attention": lambda m, o: m.attention(q, k, v, scale=np.float32(0.3), return_lse=np.bool_(True),
                                              return_indices=np.bool_(True), **o),
    }


@pytest.mark.parametrize("fn", ["block_scores", "topk_blocks", "select_blocks", "sparse_attention", "attention"])
def test_public_functions_hand_the_reference_plain_scalars(fn, rng, monkeypatch):
    """NumPy callers: the reference sees the normalized options, not the caller's NumPy scalars."""
    run = _public_calls(rng)[fn]
    calls = []
    spy(monkeypatch, reference, fn, calls)
    result = run(msa_cupy, NUMPY_SCALARS)
    assert_plain(calls)
    expected = run(msa_cupy, {k: v.item() for k, v in NUMPY_SCALARS.items()})
    for got, want in zip(result if isinstance(result, tuple) else (result,),
                         expected if isinstance(expected, tuple) else (expected,)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fn", ["block_scores", "topk_blocks", "select_blocks", "sparse_attention", "attention"])
def test_reference_functions_normalize_their_scalars(fn, rng, monkeypatch):
    """The oracle's per-sequence functions only ever see Python int/bool/float."""
    calls = []
    for name in ("sequence_block_scores", "sequence_topk", "sequence_sparse_attention"):
        spy(monkeypatch, reference, name, calls)
    _public_calls(rng)[fn](reference, NUMPY_SCALARS)
    assert_plain(calls)


BAD_SCALARS = [
    ("causal None", dict(causal=None), TypeError, "causal must be a bool"),
    ("causal int", dict(causal=1), TypeError, "causal must be a bool"),
    ("causal str", dict(causal="no"), TypeError, "causal must be a bool"),
    ("return_lse None", dict(return_lse=None), TypeError, "return_lse must be a bool"),
    ("return_indices str", dict(return_indices="yes"), TypeError, "return_indices must be a bool"),
    ("top_k np.float", dict(top_k=np.float32(3)), TypeError, "top_k must be an int"),
    ("block_size bool", dict(block_size=True), TypeError, "block_size must be an int"),
    ("local_blocks negative", dict(local_blocks=np.int8(-1)), ValueError, "local_blocks must be >= 0"),
    ("scale bool", dict(scale=np.bool_(True)), TypeError, "scale must be a float"),
    ("scale inf", dict(scale=np.float32("inf")), ValueError, "scale must be finite"),
]


@pytest.mark.parametrize("module", [msa_cupy, reference], ids=["api", "reference"])
@pytest.mark.parametrize("case", BAD_SCALARS, ids=[c[0] for c in BAD_SCALARS])
def test_bad_scalars_raise_naming_the_option_before_any_work(case, module, rng, monkeypatch):
    _, bad, exc, match = case
    q, k, v = qkv(rng)
    before = [x.copy() for x in (q, k, v)]
    calls = []
    for name in ("sequence_block_scores", "sequence_topk", "sequence_sparse_attention"):
        spy(monkeypatch, reference, name, calls)
    with pytest.raises(exc, match=match):
        module.attention(q, k, v, **{**dict(block_size=64, top_k=3), **bad})
    assert not calls, "work ran before the error"
    for x, b in zip((q, k, v), before):
        np.testing.assert_array_equal(x, b)


@pytest.mark.parametrize("module", [msa_cupy, reference], ids=["api", "reference"])
def test_causal_none_is_refused_everywhere(module, rng):
    q, k, v = qkv(rng)
    iq, ik = index_pair(rng)
    scores = reference.block_scores(iq, ik, block_size=64)
    ids = reference.select_blocks(iq, ik, top_k=3, block_size=64)
    calls = [
        lambda: module.block_scores(iq, ik, block_size=64, causal=None),
        lambda: module.topk_blocks(scores, top_k=3, block_size=64, num_keys=200, causal=None),
        lambda: module.select_blocks(iq, ik, top_k=3, block_size=64, causal=None),
        lambda: module.sparse_attention(q, k, v, ids, block_size=64, causal=None),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="causal must be a bool"):
            call()


# --------------------------------------------------------------------------- odd arguments


def _required_arrays(rng):
    q, k, v, iq, ik, scores, ids = _call_inputs(rng)
    return {
        "block_scores": (lambda m, a: m.block_scores(a["index_q"], a["index_k"], block_size=64),
                         dict(index_q=iq, index_k=ik)),
        "topk_blocks": (lambda m, a: m.topk_blocks(a["scores"], top_k=3, block_size=64, num_keys=200),
                        dict(scores=scores)),
        "select_blocks": (lambda m, a: m.select_blocks(a["index_q"], a["index_k"], top_k=3, block_size=64),
                          dict(index_q=iq, index_k=ik)),
        "sparse_attention": (lambda m, a: m.sparse_attention(a["q"], a["k"], a["v"], a["block_indices"],
                                                             block_size=64),
                             dict(q=q, k=k, v=v, block_indices=ids)),
        "attention": (lambda m, a: m.attention(a["q"], a["k"], a["v"], block_size=64, top_k=3),
                      dict(q=q, k=k, v=v)),
    }


def _each_required(rng):
    for fn, (call, arrays) in _required_arrays(rng).items():
        for name in arrays:
            yield fn, name


@pytest.mark.parametrize("module", [msa_cupy, reference], ids=["api", "reference"])
@pytest.mark.parametrize("fn,name", list(_each_required(np.random.default_rng(0))))
@pytest.mark.parametrize("bad", [None, [[1.0, 2.0]], 3.0], ids=["None", "list", "float"])
def test_non_arrays_raise_a_type_error_naming_the_argument(module, fn, name, bad, rng):
    call, arrays = _required_arrays(rng)[fn]
    with pytest.raises(TypeError, match=rf"^{name}\b"):
        call(module, {**arrays, name: bad})


class _Producer:
    """A DLPack producer that is not an array library the API knows."""

    def __init__(self, shape, device):
        self.shape, self.ndim, self.dtype, self._device = shape, len(shape), np.dtype(np.float16), device

    def __dlpack__(self, stream=None):
        raise AssertionError("must not be imported")

    def __dlpack_device__(self):
        if isinstance(self._device, Exception):
            raise self._device
        return self._device


@pytest.mark.parametrize("device,match", [
    (RuntimeError("driver gone"), r"index_q.__dlpack_device__\(\) failed \(RuntimeError: driver gone\)"),
    ((1, 0), "index_q lives on DLPack device type 1, not a CUDA GPU"),
    ("cuda", r"index_q.__dlpack_device__\(\) failed"),
], ids=["raises", "host", "malformed"])
def test_dlpack_device_is_asked_and_named_before_the_gpu_is_needed(device, match):
    producer = _Producer((1, 24, 2, 64), device)
    with pytest.raises(TypeError, match=match):
        msa_cupy.block_scores(producer, producer, block_size=64)


@pytest.mark.parametrize("module", [msa_cupy, reference], ids=["api", "reference"])
def test_zero_head_dim_is_named(module, rng):
    q, k, v = qkv(rng, d=0)
    with pytest.raises(ValueError, match="head dim >= 1"):
        module.attention(q, k, v, block_size=64, top_k=3)
    ids = np.zeros((1, 24, 2, 3), np.int32)
    with pytest.raises(ValueError, match="head dim >= 1"):
        module.sparse_attention(q, k, v, ids, block_size=64, scale=0.5)
    iq, ik = index_pair(rng, di=0)
    with pytest.raises(ValueError, match="index dim >= 1"):
        module.select_blocks(iq, ik, top_k=3, block_size=64)


# --------------------------------------------------------------------------- reference bounds


def _peak_bytes(fn):
    """fn's result and the peak of NumPy and Python allocations while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _raises_within(nbytes, exc, match, fn):
    tracemalloc.start()
    try:
        with pytest.raises(exc, match=match):
            fn()
        assert tracemalloc.get_traced_memory()[1] < nbytes
    finally:
        tracemalloc.stop()


TOP_K_REF_BOUND = 64  # _interop.GPU_MAX_TOP_K: the reference takes any top_k the GPU takes


@pytest.mark.parametrize("module", [msa_cupy, reference], ids=["api", "reference"])
def test_huge_top_k_is_refused_before_allocating(module, rng):
    """top_k may exceed the key blocks up to max(GPU_MAX_TOP_K, key blocks): beyond that it is a
    ValueError, raised before a (..., top_k) selection is allocated."""
    q, k, v = qkv(rng, nq=8, nk=40)
    iq, ik = index_pair(rng, nq=8, nk=40)
    scores = reference.block_scores(iq, ik, block_size=8).astype(np.float32)
    for call in (lambda: module.attention(q, k, v, block_size=8, top_k=10**6),
                 lambda: module.select_blocks(iq, ik, block_size=8, top_k=10**6),
                 lambda: module.topk_blocks(scores, block_size=8, top_k=10**6, num_keys=40)):
        _raises_within(1 << 20, ValueError, r"top_k must be <= max\(64, key blocks of the longest sequence = 5\)",
                       call)


def test_top_k_beyond_the_key_blocks_selects_them_all(rng):
    assert _interop.GPU_MAX_TOP_K == TOP_K_REF_BOUND
    iq, ik = index_pair(rng, nq=8, nk=40)
    ids = reference.select_blocks(iq, ik, block_size=8, top_k=TOP_K_REF_BOUND, local_blocks=0, causal=False)
    assert ids.shape == (1, 8, 2, TOP_K_REF_BOUND)
    np.testing.assert_array_equal(ids[..., :5], np.broadcast_to(np.arange(5), (1, 8, 2, 5)))
    assert (ids[..., 5:] == -1).all()
    with pytest.raises(ValueError, match="top_k must be <= max"):
        reference.select_blocks(iq, ik, block_size=8, top_k=TOP_K_REF_BOUND + 1)
    # past GPU_MAX_TOP_K, top_k may reach the longest sequence's block count (and no further)
    iq, ik = index_pair(rng, nq=4, nk=600)
    ids = reference.select_blocks(iq, ik, block_size=8, top_k=75, local_blocks=0, causal=False)
    np.testing.assert_array_equal(ids, np.broadcast_to(np.arange(75), (1, 4, 2, 75)))
    with pytest.raises(ValueError, match="key blocks of the longest sequence = 75"):
        reference.select_blocks(iq, ik, block_size=8, top_k=76)


@pytest.mark.parametrize("fn", ["block_scores", "select_blocks", "attention"])
def test_huge_block_size_is_one_block_without_allocating_by_it(fn, rng):
    """A block longer than a sequence's keys holds all of them: the same result as block_size =
    the key count, computed without memory proportional to block_size."""
    q, k, v = qkv(rng, nq=16, nk=50, d=8)
    iq, ik = index_pair(rng, nq=16, nk=50, di=8)
    calls = {
        "block_scores": lambda bs: reference.block_scores(iq, ik, block_size=bs),
        "select_blocks": lambda bs: reference.select_blocks(iq, ik, block_size=bs, top_k=2),
        "attention": lambda bs: reference.attention(q, k, v, block_size=bs, top_k=2, return_indices=True),
    }
    huge, peak = _peak_bytes(lambda: calls[fn](10**6))
    same = calls[fn](50)
    for a, b in zip(huge if isinstance(huge, tuple) else (huge,), same if isinstance(same, tuple) else (same,)):
        np.testing.assert_array_equal(a, b)
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB for 16 queries of 50 keys"


def test_block_size_beyond_the_keys_with_varlen_sequences(rng):
    iq, ik = rng.standard_normal((30, 2, 8)), rng.standard_normal((70, 2, 8))
    cu_q, cu_k = np.array([0, 10, 10, 30], np.int32), np.array([0, 20, 20, 70], np.int32)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    np.testing.assert_array_equal(reference.block_scores(iq, ik, block_size=10**6, **kw),
                                  reference.block_scores(iq, ik, block_size=50, **kw))


# --------------------------------------------------------------------------- one home each


def test_block_ids_are_checked_per_sequence_in_one_place(rng):
    """An id valid in the longest sequence but not in its own is refused, by the reference and the
    API alike, through _interop.check_block_ids."""
    from msa_cupy._layout import varlen_layout

    layout = varlen_layout(np.array([0, 2, 5]), np.array([0, 64, 384]))  # 1 and 5 blocks of 64
    ok = np.array([[[0, -1]], [[-1, 0]], [[4, 1]], [[0, 2]], [[-1, -1]]], np.int32)
    _interop.check_block_ids(ok, layout, 64)
    for row, bad in ((0, 1), (2, 5), (4, -2)):
        ids = ok.copy()
        ids[row, 0, 0] = bad
        with pytest.raises(ValueError, match="block_indices hold 1 entries"):
            _interop.check_block_ids(ids, layout, 64)
    q = rng.standard_normal((5, 2, 16))
    k = rng.standard_normal((384, 1, 16))
    ids = ok.copy()
    ids[1, 0, 0] = 3  # sequence 0 has one block
    cu = dict(cu_seqlens_q=np.array([0, 2, 5], np.int32), cu_seqlens_k=np.array([0, 64, 384], np.int32))
    for module in (msa_cupy, reference):
        with pytest.raises(ValueError, match="block_indices hold 1 entries"):
            module.sparse_attention(q, k, k, ids, block_size=64, **cu)


def test_limits_and_maps_have_one_home():
    assert not any(hasattr(m, "MAX_TOP_K") for m in (_interop, selection, sparse))
    assert _interop.SELECT_KERNEL_MAX_TOP_K <= _interop.GPU_MAX_TOP_K <= _interop.SPARSE_KERNEL_MAX_SLOTS
    assert not hasattr(selection, "_dtype_name") and not hasattr(sparse, "_type_name")
    assert _jit.dtype_template(np.float16) == "f16"
    assert _jit.dtype_template(_interop.BFLOAT16) == "bf16"
    with pytest.raises(TypeError, match="float16 or bfloat16, got float32"):
        _jit.dtype_template(np.float32)
    assert reference.topk_layout is _interop.topk_layout


def test_topk_layout_names_the_array_it_reads():
    with pytest.raises(ValueError, match="num_keys is required for batched block_indices"):
        _interop.topk_layout(np.zeros((1, 4, 2, 3), np.int32), None, None, None, name="block_indices")
    with pytest.raises(TypeError, match="scores must be an array, got list"):
        _interop.topk_layout([1, 2], 10, None, None)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must be given together"):
        _interop.topk_layout(np.zeros((4, 2, 3)), None, np.array([0, 4], np.int32), None)


# --------------------------------------------------------------------------- routing


SPARSE_SHAPE = dict(head_dim=128, block_size=128, group_size=4, top_k=16)


def test_route_picks_the_kernels_for_covered_shapes_and_plain_otherwise(monkeypatch):
    monkeypatch.delenv("MSA_CUPY_PLAIN", raising=False)
    assert _api._route("sparse_attention", **SPARSE_SHAPE) is sparse
    assert _api._route("sparse_attention", **{**SPARSE_SHAPE, "group_size": 3}) is _plain
    assert _api._route("sparse_attention", **{**SPARSE_SHAPE, "head_dim": 96}) is _plain
    assert _api._route("sparse_attention", **{**SPARSE_SHAPE, "top_k": _interop.SPARSE_KERNEL_MAX_SLOTS}) is sparse
    assert _api._route("sparse_attention", **{**SPARSE_SHAPE, "top_k": _interop.SPARSE_KERNEL_MAX_SLOTS + 1}) is _plain
    limit = _interop.SELECT_KERNEL_MAX_TOP_K
    assert _api._route("select_blocks", top_k=limit, block_size=64, index_dim=64) is selection
    assert _api._route("select_blocks", top_k=limit + 1, block_size=64, index_dim=64) is _plain
    assert _api._route("select_blocks", top_k=8, block_size=64, index_dim=96) is _plain
    assert _api._route("topk_blocks", top_k=limit) is selection
    assert _api._route("topk_blocks", top_k=limit + 1) is _plain
    assert _api._route("block_scores", block_size=128, index_dim=64) is selection
    assert _api._route("block_scores", block_size=128, index_dim=96) is _plain


def test_each_op_is_asked_only_what_it_depends_on():
    """block_scores keeps no top-k list and topk_blocks computes no index products: their
    questions take no top_k, resp. no index_dim."""
    with pytest.raises(TypeError):
        _api._route("block_scores", top_k=1, block_size=128, index_dim=128)
    with pytest.raises(TypeError):
        _api._route("topk_blocks", top_k=8, block_size=128, index_dim=128)


def test_plain_env_forces_the_plain_path(monkeypatch):
    monkeypatch.setenv("MSA_CUPY_PLAIN", "1")
    assert _api._route("sparse_attention", **SPARSE_SHAPE) is _plain
    assert _api._route("select_blocks", top_k=8, block_size=64, index_dim=64) is _plain
    assert _api._route("topk_blocks", top_k=8) is _plain
    assert _api._route("block_scores", block_size=64, index_dim=64) is _plain


def test_the_kernel_modules_are_plain_imports():
    assert _api.selection is selection and _api.sparse is sparse
    assert not hasattr(_api, "_fast") and not hasattr(_api, "importlib")


# --------------------------------------------------------------------------- GPU


def _gpu_inputs(rng, nq=96, nk=700, hq=8, hkv=2, d=64):
    import cupy as cp

    def r(*s):
        return cp.asarray(rng.standard_normal(s).astype(np.float32).astype(np.float16))

    return r(1, nq, hq, d), r(1, nk, hkv, d), r(1, nk, hkv, d)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [np.int16(128), np.uint8(64)], ids=["int16-128", "uint8-64"])
def test_numpy_scalars_on_the_gpu_match_python_ints(block_size, rng, monkeypatch):
    """np.int16(128) once sized decode shared memory wrong and np.uint8 overflowed after kernels
    started: the kernels must see Python ints and give the bits that Python ints give."""
    import cupy as cp

    q, k, v = _gpu_inputs(rng)
    calls = []
    for module, names in ((selection, ("block_scores", "topk_blocks", "select_blocks")),
                          (sparse, ("sparse_attention",)), (_plain, ("sparse_attention", "select_blocks"))):
        for name in names:
            spy(monkeypatch, module, name, calls)
    top_k, bs = np.uint8(8), block_size
    iq = q[:, :, ::4].copy()  # one index head per KV head
    scores = msa_cupy.block_scores(iq, k, block_size=bs)
    scores_py = msa_cupy.block_scores(iq, k, block_size=int(bs))
    assert cp.array_equal(scores, scores_py)
    ids = msa_cupy.topk_blocks(scores, top_k=top_k, block_size=bs, num_keys=np.int32(700),
                               local_blocks=np.uint8(1), sink_blocks=np.uint8(1))
    assert cp.array_equal(ids, msa_cupy.topk_blocks(scores, top_k=8, block_size=int(bs), num_keys=700,
                                                    local_blocks=1, sink_blocks=1))
    sel = msa_cupy.select_blocks(iq, k, top_k=top_k, block_size=bs)
    assert cp.array_equal(sel, msa_cupy.select_blocks(iq, k, top_k=8, block_size=int(bs)))
    for nq in (96, 3):  # prefill and decode kernels (the last nq queries keep their positions)
        qn, seln = q[:, -nq:].copy(), sel[:, -nq:].copy()
        out, lse = msa_cupy.sparse_attention(qn, k, v, seln, block_size=bs, causal=np.bool_(True),
                                             scale=np.float32(0.125), return_lse=np.bool_(True))
        out_py, lse_py = msa_cupy.sparse_attention(qn, k, v, seln, block_size=int(bs), scale=0.125, return_lse=True)
        assert cp.array_equal(out.view(cp.uint16), out_py.view(cp.uint16)) and cp.array_equal(lse, lse_py)
        ref = reference.sparse_attention(qn.get(), k.get(), v.get(), seln.get(), block_size=int(bs), scale=0.125)
        assert np.abs(out.get().astype(np.float64) - ref).max() < 1e-2
    out, ids2 = msa_cupy.attention(q, k, v, top_k=top_k, block_size=bs, return_indices=np.bool_(True))
    out_py, ids_py = msa_cupy.attention(q, k, v, top_k=8, block_size=int(bs), return_indices=True)
    assert cp.array_equal(out.view(cp.uint16), out_py.view(cp.uint16)) and cp.array_equal(ids2, ids_py)
    assert_plain(calls)


@pytest.mark.gpu
def test_odd_arguments_on_the_gpu_leave_the_inputs_untouched(rng, monkeypatch):
    import cupy as cp

    q, k, v = _gpu_inputs(rng)
    before = [x.copy() for x in (q, k, v)]
    routed = []
    monkeypatch.setattr(_api, "_route", lambda *a, **kw: routed.append(a))
    for bad, exc, match in ((dict(causal=None), TypeError, "causal must be a bool"),
                            (dict(top_k=65), ValueError, "top_k must be <= 64 on the GPU"),
                            (dict(return_lse=None), TypeError, "return_lse must be a bool")):
        with pytest.raises(exc, match=match):
            msa_cupy.attention(q, k, v, block_size=64, **bad)
    with pytest.raises(TypeError, match="^v must be an array, got None"):
        msa_cupy.attention(q, k, None)
    with pytest.raises(TypeError, match="^k: expected"):
        msa_cupy.attention(q, [[1.0]], v)
    with pytest.raises(ValueError, match="block_indices hold"):
        msa_cupy.sparse_attention(q, k, v, cp.full((1, 96, 2, 4), 11, cp.int32), block_size=64)
    assert not routed, "a route was taken before the error"
    for x, b in zip((q, k, v), before):
        assert cp.array_equal(x.view(cp.uint16), b.view(cp.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("plain_env", [False, True], ids=["default", "MSA_CUPY_PLAIN=1"])
def test_public_calls_run_where_the_route_says(plain_env, rng, monkeypatch):
    """Covered shapes reach the fast kernels; uncovered ones (G = 3, top_k past the selection
    kernels' list) and every call under MSA_CUPY_PLAIN=1 take the plain path."""
    import cupy as cp

    if plain_env:
        monkeypatch.setenv("MSA_CUPY_PLAIN", "1")
    else:
        monkeypatch.delenv("MSA_CUPY_PLAIN", raising=False)
    seen = []
    for module in (selection, sparse, _plain):
        for op in ("block_scores", "select_blocks", "sparse_attention"):
            if hasattr(module, op):
                monkeypatch.setattr(module, op, _tagging(getattr(module, op), seen, module.__name__))

    def first_run(call):
        seen.clear()
        result = call()
        cp.cuda.runtime.deviceSynchronize()
        return result, seen[0]

    fast = not plain_env
    for hq, covered in ((8, True), (6, False)):  # G = 4 and G = 3
        q, k, v = _gpu_inputs(rng, hq=hq)
        ids = reference.select_blocks(q[:, :, :2].get(), k.get(), top_k=4, block_size=64)
        out, where = first_run(lambda: msa_cupy.sparse_attention(q, k, v, cp.asarray(ids), block_size=64))
        assert where == ("msa_cupy.sparse" if fast and covered else "msa_cupy._plain", "sparse_attention")
        ref = reference.sparse_attention(q.get(), k.get(), v.get(), ids, block_size=64)
        assert np.abs(out.get().astype(np.float64) - ref).max() < 1e-2

    q, k, v = _gpu_inputs(rng)
    iq = q[:, :, ::4].copy()
    for op, call, covered in (
            ("select_blocks", lambda: msa_cupy.select_blocks(iq, k, top_k=8, block_size=64), True),
            ("select_blocks", lambda: msa_cupy.select_blocks(iq, k, top_k=40, block_size=64), False),
            ("block_scores", lambda: msa_cupy.block_scores(iq, k, block_size=64), True)):
        result, where = first_run(call)
        assert where == ("msa_cupy.selection" if fast and covered else "msa_cupy._plain", op)
        if op == "block_scores":
            ref = reference.block_scores(iq.get(), k.get(), block_size=64)
            finite = np.isfinite(ref)
            assert np.array_equal(np.isfinite(result.get()), finite)
            assert np.abs(result.get()[finite] - ref[finite]).max() < 1e-1 * np.abs(ref[finite]).max()


def _tagging(fn, seen, module_name):
    def tagged(*args, **kwargs):
        seen.append((module_name, fn.__name__))
        return fn(*args, **kwargs)

    return tagged
