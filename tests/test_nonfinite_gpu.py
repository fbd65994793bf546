"""NaN and Inf on the GPU (README, "NaN and Inf"), every path forced in turn: the decode
kernel, the mma.sync and wgmma KV-outer prefill kernels (each with the combine), the
tile-outer prefill kernels alone (wgmma where it fits, and mma.sync) and mixed with the KV-outer
path (schedule "auto"), the plain CuPy path,
the public sparse_attention and attention end to end (fast and plain).

Each run plants NaN and Inf in v and k of keys a query does not see (a later key of its own
block under causal masking, a key of a block it did not pick) and of keys it sees, and NaN in
q (tests/test_nonfinite.py: planted_case), then checks
  * exactly which elements of out and lse are non-finite, against the rule;
  * the finite elements against the float64 reference on the same inputs;
  * rows that see no planted value are equal to a run without the plants.
Outputs of the kernel path are poisoned with NaN before the kernels run, so an unwritten
element shows up as an extra non-finite one."""
from __future__ import annotations

import numpy as np
import pytest

from msa_cupy.testing import DTYPES, TOLERANCE
from msa_cupy import reference
from test_nonfinite import _sees_a_planted_key, expected_nonfinite, planted_case

pytestmark = pytest.mark.gpu

LSE_TOLERANCE = 1e-3

PREFILL = dict(nq=300, nk=300, hkv=2, group=4, top_k=3, causal=True)
SHAPES = {
    "prefill-d128-bk128": dict(PREFILL, d=128, block_size=128),
    "prefill-d64-bk64": dict(PREFILL, d=64, block_size=64),
    "prefill-g16": dict(PREFILL, nq=200, nk=260, hkv=1, group=16, d=128, block_size=128),
    "noncausal": dict(PREFILL, nq=100, nk=330, d=128, block_size=64, causal=False),
    "decode": dict(nq=4, nk=700, hkv=2, group=8, top_k=4, d=128, block_size=128, causal=True),
}


def _kernel_run(path):
    """f(q, k, v, block_indices, case) -> (out, lse) on the device for the named path."""
    import cupy

    from msa_cupy import _jit, _plain, sparse
    from msa_cupy._layout import single_layout

    def run(q, k, v, bi, case):
        nq, nk = q.shape[0], k.shape[0]
        layout = single_layout(nq, nk)
        args = [cupy.asarray(x) for x in (q, k, v, bi)]
        if path == "plain":
            return _plain.sparse_attention(*args, layout, block_size=case.block_size, causal=case.causal,
                                           scale=case.scale)
        tuning = dict(decode=sparse.SparseTuning(path="decode"),
                      mma=sparse.SparseTuning(path="prefill", prefill_kernel="mma", schedule="kv"),
                      wgmma=sparse.SparseTuning(path="prefill", prefill_kernel="wgmma", schedule="kv"),
                      tile=sparse.SparseTuning(path="prefill", schedule="tile"),  # wgmma on sm_90 at D = Bk = 128
                      tile_mma=sparse.SparseTuning(path="prefill", schedule="tile", tile_kernel="mma"),
                      tile_producer=sparse.SparseTuning(path="prefill", schedule="tile", tile_kernel="wgmma",
                                                        tile_producer=True),
                      # tiles of both kinds in one call at the Bk = 128 shapes (a quarter to a half KV-outer)
                      auto=sparse.SparseTuning(path="prefill", schedule="auto", tile_min_useful=0.58))[path]
        wgmma = _jit.has_wgmma() and q.shape[-1] == 128 and case.block_size == 128
        if path in ("wgmma", "tile_producer") and not wgmma:
            pytest.skip("the wgmma prefill kernel runs on sm_90 at head_dim = block_size = 128")
        cu_q = cupy.asarray([0, nq], cupy.int32)
        cu_k = cupy.asarray([0, nk], cupy.int32)
        sparse._poison_outputs = True
        try:
            return sparse.sparse_attention(*args, layout, cu_q, cu_k, block_size=case.block_size, causal=case.causal,
                                           scale=case.scale, tuning=tuning)
        finally:
            sparse._poison_outputs = False

    return run


def _api_run(q, k, v, bi, case):
    import cupy

    import msa_cupy

    return msa_cupy.sparse_attention(*(cupy.asarray(x) for x in (q, k, v, bi)), block_size=case.block_size,
                                     causal=case.causal, scale=case.scale, return_lse=True)


def _host(out, lse):
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    return np.asarray(out.get()).astype(np.float64), np.asarray(lse.get()).astype(np.float64)


def _check(case, out, lse, clean_out, clean_lse, dtype_name):
    q, k, v = case.poisoned()
    exp_out, exp_lse = expected_nonfinite(case)
    assert exp_out.any(), "the planted values reach no query: the case tests nothing"
    bad_out = ~np.isfinite(out)
    assert np.array_equal(bad_out, exp_out), (
        f"{int((bad_out & ~exp_out).sum())} elements non-finite that the rule keeps finite "
        f"(rows {sorted(set(np.argwhere(bad_out & ~exp_out)[:, 0].tolist()))[:10]}), "
        f"{int((exp_out & ~bad_out).sum())} finite that the rule makes non-finite")
    np.testing.assert_array_equal(np.isnan(lse) | np.isposinf(lse), exp_lse)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, case.block_indices, block_size=case.block_size,
                                                  causal=case.causal, scale=case.scale, return_lse=True)
    fin = ~exp_out
    err = np.linalg.norm(out[fin] - ref_out[fin]) / max(np.linalg.norm(ref_out[fin]), 1e-30)
    assert err < TOLERANCE[dtype_name], f"finite elements: relative error {err:.2e}"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0) < LSE_TOLERANCE
    # rows that see no planted value: as without the plants (a masked NaN changes nothing)
    untouched = ~_sees_a_planted_key(case)
    assert np.array_equal(out[untouched], clean_out[untouched]), "masked non-finite values changed other rows"
    assert np.array_equal(lse[untouched], clean_lse[untouched])


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("path", ["decode", "mma", "wgmma", "tile", "tile_mma", "tile_producer", "auto", "plain"])
def test_kernel_paths(path, shape, dtype_name, rng):
    case = planted_case(rng, dtype=DTYPES[dtype_name], **SHAPES[shape])
    run = _kernel_run(path)
    clean = _host(*run(case.q, case.k, case.v, case.block_indices, case))
    out, lse = _host(*run(*case.poisoned(), case.block_indices, case))
    _check(case, out, lse, *clean, dtype_name)


@pytest.mark.parametrize("kinds", [("v",), ("k",), ("q",)])
@pytest.mark.parametrize("path", ["decode", "mma", "wgmma", "tile", "tile_mma", "tile_producer", "auto", "plain"])
def test_kernel_paths_one_kind_at_a_time(path, kinds, rng):
    """v only: no row NaN from a score; k only and q only: as the rule says, nothing more."""
    case = planted_case(rng, dtype=DTYPES["bfloat16"], kinds=kinds, **SHAPES["prefill-d128-bk128"])
    run = _kernel_run(path)
    clean = _host(*run(case.q, case.k, case.v, case.block_indices, case))
    out, lse = _host(*run(*case.poisoned(), case.block_indices, case))
    _check(case, out, lse, *clean, "bfloat16")


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
@pytest.mark.parametrize("shape", ["prefill-d128-bk128", "prefill-d64-bk64", "decode"])
def test_public_sparse_attention(shape, plain, rng, monkeypatch):
    if plain:
        monkeypatch.setenv("MSA_CUPY_PLAIN", "1")
    else:
        monkeypatch.delenv("MSA_CUPY_PLAIN", raising=False)
    case = planted_case(rng, dtype=DTYPES["bfloat16"], **SHAPES[shape])
    clean = _host(*_api_run(case.q, case.k, case.v, case.block_indices, case))
    out, lse = _host(*_api_run(*case.poisoned(), case.block_indices, case))
    _check(case, out, lse, *clean, "bfloat16")


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
@pytest.mark.parametrize("shape", ["prefill-d128-bk128", "decode"])
def test_attention_end_to_end(shape, plain, rng, monkeypatch):
    """Selection from a finite index, then attention over the poisoned q, k, v: the expected
    set follows the block indices the call returns."""
    import cupy

    import msa_cupy

    if plain:
        monkeypatch.setenv("MSA_CUPY_PLAIN", "1")
    else:
        monkeypatch.delenv("MSA_CUPY_PLAIN", raising=False)
    p = SHAPES[shape]
    case = planted_case(rng, dtype=DTYPES["bfloat16"], **p)
    dt = DTYPES["bfloat16"]
    index_q = cupy.asarray(rng.standard_normal((p["nq"], p["hkv"], 64)).astype(dt))
    index_k = cupy.asarray(rng.standard_normal((p["nk"], p["hkv"], 64)).astype(dt))

    def run(q, k, v):
        out, lse, ids = msa_cupy.attention(*(cupy.asarray(x) for x in (q, k, v)), index_q=index_q, index_k=index_k,
                                           block_size=case.block_size, top_k=p["top_k"], causal=case.causal,
                                           scale=case.scale, return_lse=True, return_indices=True)
        return _host(out, lse), ids.get()

    clean, ids_clean = run(case.q, case.k, case.v)
    (out, lse), ids = run(*case.poisoned())
    assert np.array_equal(ids, ids_clean), "the selection depends on the index only"
    case.block_indices = ids
    _check(case, out, lse, *clean, "bfloat16")
