"""Tuning and test choices of the launch modules (sparse.SparseTuning, selection.SelectTuning):
checked when made, and kept out of the stage functions that launch kernels.  CPU only."""
from __future__ import annotations

import inspect

import numpy as np

import pytest

from msa_cupy import selection, sparse

HOOKS = {"tuning", "stats", "force_path", "prefill_kernel", "prefill_warps", "prefill_stages", "prefill_mt", "schedule",
         "tile_rows", "tile_stages", "tile_min_useful", "tile_kernel", "tile_producer"}
SELECT_HOOKS = {"splits", "warps"}


def test_sparse_tuning_defaults_are_the_module_constants():
    t = sparse.SparseTuning()
    assert (t.path, t.prefill_kernel) == (None, None)
    assert (t.prefill_warps, t.prefill_stages, t.prefill_mt) == (sparse.PREFILL_WARPS, sparse.PREFILL_STAGES,
                                                                  sparse.PREFILL_MT)
    assert (t.schedule, t.tile_rows, t.tile_stages, t.tile_min_useful, t.tile_kernel) == (
        sparse.PREFILL_SCHEDULE, sparse.TILE_ROWS, sparse.TILE_STAGES, sparse.TILE_MIN_USEFUL, None)
    assert t.tile_producer is False
    assert sparse.SparseTuning(schedule="tile", tile_rows=64).changes() == {"schedule": "tile", "tile_rows": 64}
    assert t == sparse.DEFAULT_TUNING and t.changes() == {}
    assert sparse.SparseTuning(prefill_kernel="mma", prefill_warps=8).changes() == {"prefill_kernel": "mma",
                                                                                    "prefill_warps": 8}


@pytest.mark.parametrize("options,match", [
    (dict(path="prefil"), "path"),
    (dict(prefill_kernel="tma"), "prefill_kernel"),
    (dict(prefill_warps=0), "prefill_warps"),
    (dict(prefill_stages=2.0), "prefill_stages"),
    (dict(prefill_mt=True), "prefill_mt"),
    (dict(schedule="tiles"), "schedule"),
    (dict(schedule=None), "schedule"),
    (dict(tile_rows=96), "tile_rows"),
    (dict(tile_rows=True), "tile_rows"),
    (dict(tile_stages=1), "tile_stages"),
    (dict(tile_kernel="tma"), "tile_kernel"),
    (dict(tile_producer=1), "tile_producer"),
    (dict(tile_producer=True, tile_kernel="mma"), "tile_producer"),
    (dict(decode_combine="atomic"), "decode_combine"),
    (dict(tile_min_useful=1.5), "tile_min_useful"),
    (dict(tile_min_useful="0.3"), "tile_min_useful"),
])
def test_sparse_tuning_rejects(options, match):
    with pytest.raises(ValueError, match=match):
        sparse.SparseTuning(**options)


@pytest.mark.parametrize("options,match", [
    (dict(splits=0), "splits"),
    (dict(splits=1.5), "splits"),
    (dict(warps=(8,)), "warps"),
    (dict(warps=(8, 0)), "warps"),
    (dict(warps="mma"), "warps"),
    (dict(warps=[8, 1]), "warps"),
    (dict(producer=1), "producer"),
    (dict(producer=True, warps=(8, 1)), "producer"),
])
def test_select_tuning_rejects(options, match):
    with pytest.raises(ValueError, match=match):
        selection.SelectTuning(**options)


def test_select_tuning_accepts_every_warp_grid_of_the_module():
    for warps in (None, selection.PREFILL_WARPS, selection.SMALL_SMEM_WARPS, selection.DECODE_WARPS,
                  selection.DECODE_WARPS_16, selection.WGMMA):
        assert selection.SelectTuning(splits=3, warps=warps).warps == warps


@pytest.mark.parametrize("fn", [sparse.decode_kernel, sparse.launch_decode, sparse.block_offsets, sparse.reverse_index,
                                sparse.launch_prefill, sparse.combine_kernel, sparse.launch_combine,
                                sparse.query_tile_offsets, sparse.classify_query_tiles, sparse.tile_prefill_kernel,
                                sparse.launch_tile_prefill,
                                selection.launch_select, selection.launch_topk])
def test_stage_functions_take_no_tuning_or_stats(fn):
    assert HOOKS.isdisjoint(inspect.signature(fn).parameters), fn.__name__


def test_operations_take_one_tuning_object():
    """The hooks travel as tuning= (and stats=), not as loose keywords."""
    sparse_params = set(inspect.signature(sparse.sparse_attention).parameters)
    assert {"tuning", "stats"} <= sparse_params and not (HOOKS - {"tuning", "stats"}) & sparse_params
    for fn in (selection.block_scores, selection.select_blocks):
        params = set(inspect.signature(fn).parameters)
        assert "tuning" in params and not (HOOKS - {"tuning"} | SELECT_HOOKS) & params
    assert inspect.signature(sparse.sparse_attention).parameters["tuning"].default is sparse.DEFAULT_TUNING


@pytest.mark.parametrize("combine,pairs,top_k,cluster", [
    (None, 4, 16, 16),                                              # 64 CTAs: the cluster
    (None, sparse.DECODE_CLUSTER_MAX_CTAS // 16 + 1, 16, 0),        # larger grids: the last CTA
    (None, 16, 4, 4),
    (None, 1, 3, 0),                                                # no cluster of 3
    ("last_cta", 1, 16, 0),
    ("cluster", 64, 16, 16),                                        # asked for: any grid
])
def test_decode_combine_default_takes_the_cluster_on_small_grids_only(monkeypatch, combine, pairs, top_k, cluster):
    from msa_cupy import _jit

    class Stub:
        def allow_cluster(self, n):
            pass

    built = []
    monkeypatch.setattr(_jit, "has_wgmma", lambda: True)
    monkeypatch.setattr(_jit, "kernel", lambda path, name, args, **kw: built.append(args) or Stub())
    sparse.decode_kernel(np.dtype("float16"), 128, 16, 128, top_k, combine, pairs=pairs)
    assert built[-1][-1] == cluster


def test_select_producer_leaves_room_for_its_barriers(monkeypatch):
    """select_sm90.cu's producer variant has static mbarriers besides the dynamic shared memory:
    where the deepest key ring fills the device's limit to the byte, it takes the next one."""
    from msa_cupy import _jit

    built = []
    monkeypatch.setattr(_jit, "has_wgmma", lambda: True)
    monkeypatch.setattr(_jit, "kernel", lambda path, name, args, **kw: built.append(args) or object())
    monkeypatch.setattr(selection, "_device_attr", lambda attr: 232448 if attr == selection._ATTR_SMEM_PER_BLOCK_OPTIN
                        else 132)  # H100: 227 KB a block, 132 SMs
    top_k = 17  # rows 64 KB + 4 key tiles 128 KB + lists 34 KB + 1 KB: 232,448 bytes, the limit
    assert selection._smem_bytes(128, 128, selection.WGMMA, top_k, selection.EPI_TOPK, 4) == 232448
    for producer, stages, threads in ((False, 4, 256), (True, 3, 384)):
        cfg = selection.select_config(dtype=np.dtype("float16"), index_dim=128, block_size=128, n_heads=4, k_heads=1,
                                      n_seq=1, max_q=4096, max_k=4096, top_k=top_k, epilogue=selection.EPI_TOPK,
                                      tuning=selection.SelectTuning(warps=selection.WGMMA, producer=producer))
        assert built[-1] == (128, 128, stages, selection.EPI_TOPK, "f16", int(producer)) and cfg.threads == threads
