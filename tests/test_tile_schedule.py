"""The prefill schedule on the CPU: the cost model of classify_query_tiles (its NumPy model,
sparse.tile_schedule_model), the query tiles it cuts, and the tile-outer kernel's declared
variants and launch shape."""
from __future__ import annotations

import numpy as np
import pytest

from msa_cupy import _jit, reference, sparse
from msa_cupy._bench import patterns


def _model(ids, cu_q, tile_tokens=4, min_useful=0.3, **kw):
    return sparse.tile_schedule_model(ids, cu_q, tile_tokens=tile_tokens, min_useful=min_useful, **kw)


def test_shared_picks_go_tile_outer_distinct_picks_kv_outer():
    shared = np.tile(np.array([3, 7, 9, 12], np.int32), (4, 1, 1))  # 4 tokens, 1 group: u = 4, p = 16
    assert _model(shared, [0, 4]).tolist() == [[1]] * 4
    distinct = np.arange(16, dtype=np.int32).reshape(4, 1, 4)  # u = 16, p = 16: 16 / 64 of the pairs
    assert _model(distinct, [0, 4]).tolist() == [[0]] * 4
    assert _model(distinct, [0, 4], min_useful=0.25).tolist() == [[1]] * 4  # p = 0.25 * 4 * 16: at the bound
    assert _model(distinct, [0, 4], min_useful=0.0).tolist() == [[1]] * 4


def test_repeats_and_unused_slots_count_once():
    ids = np.array([[[5, 5, -1, 6]], [[6, -1, -1, -1]]], np.int32)  # picks {5, 6}, {6}: p = 3, u = 2
    assert _model(ids, [0, 2], tile_tokens=2, min_useful=0.75).tolist() == [[1], [1]]  # 3 >= 0.75 * 2 * 2
    assert _model(ids, [0, 2], tile_tokens=2, min_useful=0.76).tolist() == [[0], [0]]
    empty = np.full((3, 2, 4), -1, np.int32)  # nothing picked: the tile-outer kernel writes the zeros
    assert _model(empty, [0, 3]).tolist() == [[1, 1]] * 3


def test_tiles_start_at_sequences_and_at_the_chunk():
    """Tiles of 4 tokens from each sequence's first token in the chunk: a tile never spans two
    sequences or two chunks.  Each token here picks its own block, except in runs that the
    expected tiles hold together (shared picks: tile-outer)."""
    cu_q = [0, 5, 5, 12]  # an empty sequence in the middle
    ids = np.arange(12, dtype=np.int32).reshape(12, 1, 1) + 100
    # chunk rows 2 .. 9: tiles {2, 3, 4} (sequence 0), {5, 6, 7, 8}, {9} (sequence 2)
    ids[2:5] = 1
    ids[5:9] = 2
    got = _model(ids, cu_q, q_begin=2, rows=8, min_useful=0.9)
    assert got[:, 0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]
    ids[4] = 3  # breaks the first tile only
    got = _model(ids, cu_q, q_begin=2, rows=8, min_useful=0.9)
    assert got[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    # the same tokens in a chunk from row 0: tiles {0..3}, {4}, {5..8}, {9, 10, 11}
    full = _model(ids, cu_q, min_useful=0.9)
    assert full[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]


def test_the_threshold_separates_the_benchmark_patterns(rng):
    """At tiles of 8 tokens, a coherent selection runs tile-outer almost everywhere and a random
    one KV-outer: the default threshold sits between them."""
    nk, block, top_k = 2048, 16, 8
    share = {}
    for pattern in ("random", "coherent"):
        iq, ik = patterns.index_inputs(rng, pattern, nk, nk, 2, 16, np.float32, block_size=block)
        ids = reference.select_blocks(iq, ik, top_k=top_k, block_size=block)[nk // 2:]
        share[pattern] = _model(ids, [0, len(ids)], tile_tokens=8, min_useful=sparse.TILE_MIN_USEFUL).mean()
    assert share["coherent"] > 0.9 and share["random"] < 0.1, share


def test_chunk_tiles_bounds_the_tiles():
    for rows, tt, lengths in [(8, 4, [5, 0, 7]), (37, 8, [3, 3, 3, 30]), (1, 64, [1])]:
        tiles = sum(-(-n // tt) for n in lengths)
        assert sparse.chunk_tiles(rows, tt, len(lengths)) >= tiles


@pytest.mark.parametrize("group,rows,tokens", [(16, 128, 8), (16, 64, 4), (2, 128, 64), (1, 128, 64), (1, 64, 64)])
def test_tile_tokens_per_group(group, rows, tokens):
    assert sparse.tile_tokens(group, rows) == tokens and 16 * sparse._tile_warps(rows, group) <= rows
    assert 64 * sparse._tile_warpgroups(rows, group) == 16 * sparse._tile_warps(rows, group)  # the wgmma kernel's tile


def test_tile_kernels_are_declared():
    import msa_cupy.__main__ as cli

    variants = cli._declared_variants()
    tile = variants["sparse_prefill_tile.cu"]
    for dt in ("bf16", "f16"):
        for d in sparse.SUPPORTED_HEAD_DIMS:
            for g in sparse.SUPPORTED_GROUP_SIZES:
                for bk in sparse.SUPPORTED_BLOCK_SIZES:
                    name = (f"sparse_prefill_tile_kernel<{dt}, {d}, {g}, {bk}, "
                            f"{sparse._tile_warps(sparse.TILE_ROWS, g)}, {sparse.TILE_STAGES}>")
                    assert name in tile, name
    assert set(variants["tile_schedule.cu"]) == {"query_tile_offsets", f"classify_query_tiles<{sparse.CLASSIFY_WARPS}>"}
    assert set(variants["sparse_prefill_tile_sm90.cu"]) == {
        f"sparse_prefill_tile_sm90_kernel<{dt}, 128, {g}, 128, {min(2, g)}, {stages}, {producer}>"
        for dt in ("bf16", "f16") for g in sparse.SUPPORTED_GROUP_SIZES
        for stages, producer in ((sparse.TILE_STAGES, 0), (sparse.TILE_PRODUCER_STAGES, 1))}
    assert all(variants["sparse_prefill_tile_sm90.cu"].values())  # arch-specific: sm_90a


def test_tile_kernels_compile_for_sm80_and_sm90():
    """The paper's shape of the tile-outer kernel and the schedule kernels, through NVRTC (the
    full set: `python -m msa_cupy check`)."""
    pytest.importorskip("cuda.bindings")
    for source, names, archs in [
            ("sparse_prefill_tile.cu", ["sparse_prefill_tile_kernel<bf16, 128, 16, 128, 8, 2>"], ("sm_80", "sm_90")),
            ("sparse_prefill_tile_sm90.cu", ["sparse_prefill_tile_sm90_kernel<bf16, 128, 16, 128, 2, 2, 0>",
                                             "sparse_prefill_tile_sm90_kernel<bf16, 128, 16, 128, 2, 2, 1>"], ("sm_90a",)),
            ("tile_schedule.cu", ["query_tile_offsets", f"classify_query_tiles<{sparse.CLASSIFY_WARPS}>"],
             ("sm_80", "sm_90"))]:
        for arch in archs:
            cubin, lowered, log = _jit.compile_cubin(source, arch, names, verbose=True,
                                                     frontend=_jit._nvrtc_cuda_python)
            assert len(cubin) > 0 and set(lowered) == set(names)
            assert "spill stores" in log and " 0 bytes spill stores" in log


def test_attention_kernels_keep_their_arrays_in_registers():
    """No stack frame in the prefill attention kernels, whose loops hold S, O and Q fragments in
    register arrays: an unrolled select over such an array (the non-finite V add-back's) once
    became an indexed load that moved the array to local memory, in the hot loop.  (`check`
    fails any kernel with local memory; this pins the four at the paper's shape.)"""
    pytest.importorskip("cuda.bindings")
    from msa_cupy.__main__ import parse_ptxas

    for source, name, arch in [
            ("sparse_prefill.cu", "sparse_prefill_kernel<bf16, 128, 16, 128, 4, 2, 1>", "sm_80"),
            ("sparse_prefill_sm90.cu", "sparse_prefill_sm90_kernel<bf16, 128, 16, 128, 1, 2>", "sm_90a"),
            ("sparse_prefill_tile.cu", "sparse_prefill_tile_kernel<bf16, 128, 16, 128, 8, 2>", "sm_90"),
            ("sparse_prefill_tile_sm90.cu", "sparse_prefill_tile_sm90_kernel<bf16, 128, 16, 128, 2, 2, 0>", "sm_90a"),
            ("sparse_prefill_tile_sm90.cu", "sparse_prefill_tile_sm90_kernel<bf16, 128, 16, 128, 2, 2, 1>", "sm_90a")]:
        _, lowered, log = _jit.compile_cubin(source, arch, [name], verbose=True, frontend=_jit._nvrtc_cuda_python)
        regs, frame, spill_st, spill_ld = parse_ptxas(log)[lowered[name]]
        assert (frame, spill_st, spill_ld) == (0, 0, 0), (name, frame, spill_st, spill_ld)


def test_producer_variants_start_with_the_registers_they_move():
    """The producer variants (384 threads) must be given the launch bounds' 168 registers a
    thread: setmaxnreg then moves them, 128 x 40 (producer) + 256 x 232 (computing) = 384 x 168.
    A kernel given fewer would wait forever for registers the CTA does not hold.  No spills in
    either role's budget."""
    pytest.importorskip("cuda.bindings")
    from msa_cupy.__main__ import parse_ptxas

    for source, name in [("sparse_prefill_tile_sm90.cu", "sparse_prefill_tile_sm90_kernel<bf16, 128, 16, 128, 2, 2, 1>"),
                         ("select_sm90.cu", "select_sm90_kernel<128, 128, 4, 1, bf16, 1>"),
                         ("select_sm90.cu", "select_sm90_kernel<64, 64, 3, 0, f16, 1>")]:
        _, lowered, log = _jit.compile_cubin(source, "sm_90a", [name], verbose=True, frontend=_jit._nvrtc_cuda_python)
        assert parse_ptxas(log)[lowered[name]] == (168, 0, 0, 0), (name, parse_ptxas(log)[lowered[name]])


def test_tile_smem_counts_the_union():
    mma = sparse.TilePrefillKernel(None, 256, 8, 2, 128, 64, 0)  # sparse_prefill_tile.cu: 64-key chunks
    assert mma.smem_bytes(16) == 2 * 2 * 64 * 128 * 2 + 8 * 16 * (8 + 4 + 4 + 1)
    assert mma.smem_bytes(3) == 2 * 2 * 64 * 128 * 2 + 416  # 24 * 17 = 408, rounded to 16
    wgmma = mma._replace(threads=256, chunk_keys=128, align=1024)  # sparse_prefill_tile_sm90.cu: whole blocks
    assert wgmma.smem_bytes(16) == 1024 + 2 * 2 * 128 * 128 * 2 + 8 * 16 * 17


def test_the_producer_variant_adds_a_warpgroup_and_the_query_region(monkeypatch):
    """The wgmma tile kernel's producer variant: 128 more threads, and the query tile (128 rows x
    128 dims) in a region of its own; wgmma only."""
    monkeypatch.setattr(sparse, "_wgmma_prefill_fits", lambda head_dim, block_size: True)  # as on sm_90
    shape = {p: sparse.tile_prefill_kernel(np.dtype("float16"), 128, 16, 128, variant="wgmma", producer=p, load=False)
             for p in (False, True)}
    assert (shape[False].threads, shape[True].threads) == (256, 384)
    assert shape[True].smem_bytes(16) == shape[False].smem_bytes(16) + 128 * 128 * 2
    with pytest.raises(ValueError, match="producer"):
        sparse.tile_prefill_kernel(np.dtype("float16"), 64, 16, 64, variant="mma", producer=True, load=False)


def test_every_kernel_compiles_for_sm80_and_sm90_with_no_local_memory():
    """Every kernel of every source, at its paper-shape variant or its first declared one, through
    NVRTC for sm_80 and sm_90 (sm_90a for the wgmma kernels): no stack frame, no spills.  (Every
    variant: `python -m msa_cupy check`, too slow for this suite.)"""
    pytest.importorskip("cuda.bindings")
    from msa_cupy.__main__ import _declared_variants, parse_ptxas

    paper = ("bf16, 128, 16, 128", "128, 128, 1, 8, 1, 1, bf16", "128, 128, 4, 1, bf16")  # decode/prefill, select
    for source, variants in sorted(_declared_variants().items()):
        chosen = {}
        for expr, arch_specific in variants.items():
            kernel = expr.split("<")[0]
            if kernel not in chosen or any(p in expr for p in paper):
                chosen[kernel] = (expr, arch_specific)
        names = [expr for expr, _ in chosen.values()]
        archs = ("sm_90a",) if any(a for _, a in chosen.values()) else ("sm_80", "sm_90")
        for arch in archs:
            _, lowered, log = _jit.compile_cubin(source, arch, names, verbose=True, frontend=_jit._nvrtc_cuda_python)
            stats = parse_ptxas(log)
            for name in names:
                regs, frame, spill_st, spill_ld = stats[lowered[name]]
                assert (frame, spill_st, spill_ld) == (0, 0, 0), (source, arch, name, frame, spill_st, spill_ld)
