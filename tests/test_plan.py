"""Decode plans without a GPU: argument checks (before any GPU is needed), the workspace
layout, and the reference over paged and contiguous caches."""
import numpy as np
import pytest

import msa_cupy
from msa_cupy import plan, reference
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
    views = plan.workspace_layout(max_batch=8, queries_per_seq=1, num_q_heads=64, num_kv_heads=4, head_dim=128,
                                  top_k=16, max_pages=8192, dtype=np.dtype(np.float16), splits=4,
                                  training_free=False)
    sizes = {name: int(np.prod(shape)) * np.dtype(dt).itemsize for name, shape, dt in views}
    entries = 8 * 4 * 16  # one partial per pick
    assert sizes["part_o"] == entries * 16 * 128 * 2 and sizes["part_lse"] == entries * 16 * 4
    assert sizes["block_table"] == 8 * 8192 * 4 and sizes["partial"] == 8 * 4 * 4 * 16 * 8
    assert "index_q" not in sizes
    total = plan.workspace_bytes(views)
    assert total >= sum(sizes.values()) and total % 256 == 0 and total - sum(sizes.values()) < 256 * len(views)


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
