"""GPU index-branch selection: block scores, exp-free top-k and the fused select.

Kernels: ``cuda/select.cu`` (tensor-core index GEMM with a block-max epilogue that either
writes block scores or feeds a running top-k; mma.sync, sm_80+), ``cuda/select_sm90.cu`` (the
same on wgmma, for prefill on sm_90), ``cuda/topk.cu`` (warp top-k over materialized
scores).  With split-K the last split CTA of a row tile merges the splits' partial lists
(``select_tile.cuh``: a counter per tile, zero before and after each launch).  Inputs arrive
validated, contiguous and in varlen form: ``index_q`` (total_q, Hkv, Di), ``index_k``
(total_k, 1 | Hkv, Di), fp16/bf16, ``cu_q``/``cu_k`` device int32 (n_seq + 1), ``layout`` the
host-side :class:`Layout`.

Launch code: ``select_config`` (kernel and grid) with ``launch_select``, which decode plans
also call, and ``launch_topk``; the public functions configure from the layout, allocate their
outputs and run these.  Tuning and test choices
travel in one :class:`SelectTuning`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from . import _jit
from ._interop import SELECT_KERNEL_MAX_TOP_K
from ._layout import CONTIGUOUS_KEYS, Layout

KEY_TILE = 128               # keys per pipeline step of select.cu
TOPK_WARPS = 8               # rows (warps) per CTA of topk.cu
BLOCK_SIZES = (64, 128)
INDEX_DIMS = (64, 128)
PREFILL_WARPS = (8, 1)       # (WM, WN): 256 rows x 128 keys per CTA; 8% faster than (4, 1) on an
                             # H200 (28.9 vs 31.4 ms at 128K), same ids; both tested
SMALL_SMEM_WARPS = (4, 1)    # 128 rows: fits 99 KB of shared memory at top_k 32 (sm_86, sm_89)
DECODE_WARPS = (1, 4)        # 32 rows, each warp a 32-key slice: for few rows per sequence
DECODE_WARPS_16 = (1, 8, 1)  # 16 rows (one m16 tile a warp), each warp a 16-key slice: at most 16 rows
                             # (batch-1 decode: Hkv rows), twice the warps on the key stream per SM
                             # (the key loop is issue-latency bound with 2 warps per scheduler)
WGMMA = "wgmma"              # `warps` value of select_sm90.cu: two warpgroups, 256 rows (sm_90 prefill)
WGMMA_ROWS = 256
WGMMA_STAGES = (4, 3)        # key-ring depths, deepest first that fits shared memory (prefetch distance 2 or 1)
EPI_SCORES, EPI_TOPK = 0, 1
MIN_TILES_PER_SPLIT = 4      # split-K never gives a CTA fewer key tiles than this
CTAS_PER_SM_TARGET = 2       # split-K until the grid has about this many CTAs per SM


def _with_mt(warps: tuple) -> tuple:
    """(WM, WN, MT) of a select.cu warp grid: MT m16 row tiles per warp, 2 unless given."""
    return tuple(warps) if len(warps) == 3 else (*warps, 2)


# every variant this module may launch, for `python -m msa_cupy check`
_jit.declare("select.cu", "select_kernel", *[
    (_di, _bs, _wm, _wn, _mt, _epi, _t) for _di in INDEX_DIMS for _bs in BLOCK_SIZES
    for _wm, _wn, _mt in map(_with_mt, (PREFILL_WARPS, SMALL_SMEM_WARPS, DECODE_WARPS, DECODE_WARPS_16))
    for _epi in (EPI_SCORES, EPI_TOPK) for _t in ("bf16", "f16")])
_jit.declare("select_sm90.cu", "select_sm90_kernel", *[
    (_di, _bs, _st, _epi, _t, _producer) for _di in INDEX_DIMS for _bs in BLOCK_SIZES for _st in WGMMA_STAGES
    for _epi in (EPI_SCORES, EPI_TOPK) for _t in ("bf16", "f16") for _producer in (0, 1)], arch_specific=True)
_jit.declare("topk.cu", "topk_kernel", (4, TOPK_WARPS), (1, TOPK_WARPS))


def supports_block_scores(*, block_size: int, index_dim: int) -> bool:
    """Shapes select.cu covers when it writes block scores; the caller falls back to the plain
    CuPy path otherwise (as for the two below)."""
    return block_size in BLOCK_SIZES and index_dim in INDEX_DIMS


def supports_topk(*, top_k: int) -> bool:
    """topk.cu over materialized scores: any width and block size; top_k fits the warp list."""
    return 1 <= top_k <= SELECT_KERNEL_MAX_TOP_K


def supports(*, top_k: int, block_size: int, index_dim: int) -> bool:
    """The fused selection (select_blocks): block scores feeding the warp list."""
    return supports_topk(top_k=top_k) and supports_block_scores(block_size=block_size, index_dim=index_dim)


@dataclass(frozen=True)
class SelectTuning:
    """Choices the launch heuristics otherwise make, for tests and tuning: ``splits`` key-range
    splits per CTA (None: enough CTAs for CTAS_PER_SM_TARGET per SM), ``warps`` the (WM, WN)
    warp grid of select.cu (or (WM, WN, MT) with MT m16 row tiles a warp, 2 by default) or
    ``WGMMA`` for select_sm90.cu (None: by rows, card and shared memory); ``producer``:
    select_sm90.cu with a producer warpgroup (pipeline.cuh) where it runs."""

    splits: int | None = None
    warps: tuple | str | None = None
    producer: bool = False

    def __post_init__(self):
        if self.splits is not None and (isinstance(self.splits, bool) or not isinstance(self.splits, int)
                                        or self.splits < 1):
            raise ValueError(f"splits must be None or a positive int, got {self.splits!r}")
        grid = (isinstance(self.warps, tuple) and len(self.warps) in (2, 3)
                and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.warps))
        if self.warps is not None and self.warps != WGMMA and not grid:
            raise ValueError(f"warps must be None, {WGMMA!r} or a (WM, WN) / (WM, WN, MT) tuple of positive ints, "
                             f"got {self.warps!r}")
        if not isinstance(self.producer, bool):
            raise ValueError(f"producer must be a bool, got {self.producer!r}")
        if self.producer and grid:
            raise ValueError(f"producer: a variant of select_sm90.cu (warps None or {WGMMA!r}), not of the "
                             f"select.cu grid {self.warps!r}")


DEFAULT_TUNING = SelectTuning()

_DEVICE_ATTRS: dict = {}
_ATTR_MULTIPROCESSOR_COUNT = 16  # cudaDevAttrMultiProcessorCount
_ATTR_SMEM_PER_BLOCK_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin


def _device_attr(attr: int) -> int:
    """An attribute of the current device (cached: a query costs ~100 us)."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), attr)
    if key not in _DEVICE_ATTRS:
        _DEVICE_ATTRS[key] = int(cupy.cuda.runtime.deviceGetAttribute(attr, key[0]))
    return _DEVICE_ATTRS[key]


def _sm_count() -> int:
    return _device_attr(_ATTR_MULTIPROCESSOR_COUNT)


def _smem_bytes(di, block_size, warps, top_k, epilogue, stages=WGMMA_STAGES[-1]) -> int:
    """Double-buffered key tiles + per-warp block maxima + the top-k lists (EPI_TOPK); for
    wgmma, the resident rows + the key ring + the lists + 1 KB to align the swizzle atoms."""
    lists = top_k * 8 if epilogue == EPI_TOPK else 0
    if warps == WGMMA:
        return WGMMA_ROWS * di * 2 + stages * KEY_TILE * di * 2 + lists * WGMMA_ROWS + 1024
    wm, wn, mt = _with_mt(warps)
    bm = 16 * mt * wm
    bpw = max((KEY_TILE // wn) // block_size, 1)
    return 2 * KEY_TILE * di * 2 + wn * bpw * bm * 4 + lists * bm


_i32 = _jit.int32  # np.int32(x), or a _jit.Scalar that a prepared launch binds at each launch


class SelectLaunch(NamedTuple):
    """A selection kernel and its launch shape, fixed on the host from maxima (a decode plan
    fixes it once; the kernels read the real lengths from cu_q/cu_k on the device)."""

    kernel: object
    threads: int
    smem: int
    q_tiles: int
    group_grid: int
    splits: int
    tile_rows: int = 0  # index rows (query x group) per CTA


def select_config(*, dtype, index_dim, block_size, n_heads, k_heads, n_seq, max_q, max_k, top_k, epilogue,
                  q_lens=None, tuning: SelectTuning = DEFAULT_TUNING) -> SelectLaunch:
    """Kernel choice and grid for sequences of at most max_q queries and max_k keys.  ``q_lens``
    (host, per sequence) refines the CTA count that sets the split-K factor; without it every
    sequence counts as max_q long."""
    splits, warps = tuning.splits, tuning.warps
    if index_dim not in INDEX_DIMS or block_size not in BLOCK_SIZES:
        raise ValueError(f"fast selection covers index_dim {INDEX_DIMS} and block_size {BLOCK_SIZES}")
    rows_per_q = n_heads if k_heads == 1 else 1
    group_grid = 1 if k_heads == 1 else n_heads
    max_rows = max_q * rows_per_q
    if warps is None:
        warps = (DECODE_WARPS_16 if max_rows <= 16 else DECODE_WARPS if max_rows <= 32 * DECODE_WARPS[0]
                 else PREFILL_WARPS)
        if warps == PREFILL_WARPS and _jit.has_wgmma():
            warps = WGMMA
        if _smem_bytes(index_dim, block_size, warps, top_k, epilogue) > _device_attr(_ATTR_SMEM_PER_BLOCK_OPTIN):
            warps = SMALL_SMEM_WARPS  # cards with ~99 KB a block (sm_86, sm_89): 128-row CTAs
    if warps == WGMMA and not _jit.has_wgmma():
        raise ValueError("the wgmma selection kernel needs an sm_90 GPU")
    if warps != WGMMA:
        warps = _with_mt(warps)
        if warps[2] not in (1, 2) or (warps[2] == 1 and warps[1] == 1):
            raise ValueError(f"select.cu runs MT = 2 m-tiles a warp, or MT = 1 with WN > 1; got warps {warps}")
    bm = WGMMA_ROWS if warps == WGMMA else 16 * warps[2] * warps[0]
    q_tiles = max(-(-max_rows // bm), 1)
    if splits is None:
        tiles = n_seq * q_tiles if q_lens is None else query_tiles(q_lens, rows_per_q, bm)
        splits = split_count(tiles, group_grid, max_k)
    dt = _jit.dtype_template(dtype)
    if warps == WGMMA:
        producer = int(tuning.producer)  # a third warpgroup loads the key tiles
        # what the dynamic shared memory may take: the device's limit less the producer's
        # static mbarriers (two of 8 bytes a stage)
        limit = _device_attr(_ATTR_SMEM_PER_BLOCK_OPTIN) - producer * 16 * WGMMA_STAGES[0]
        stages = next((st for st in WGMMA_STAGES if _smem_bytes(index_dim, block_size, warps, top_k, epilogue, st) <= limit),
                      WGMMA_STAGES[-1])
        kernel = _jit.kernel("select_sm90.cu", "select_sm90_kernel",
                             (index_dim, block_size, stages, epilogue, dt, producer), arch_specific=True)
        return SelectLaunch(kernel, 256 + 128 * producer, _smem_bytes(index_dim, block_size, warps, top_k, epilogue, stages),
                            q_tiles, group_grid, splits, bm)
    kernel = _jit.kernel("select.cu", "select_kernel", (index_dim, block_size, *warps, epilogue, dt))
    return SelectLaunch(kernel, 32 * warps[0] * warps[1], _smem_bytes(index_dim, block_size, warps, top_k, epilogue),
                        q_tiles, group_grid, splits, bm)


def query_tiles(q_lens, rows_per_q: int, tile_rows: int) -> int:
    """CTAs along the query rows: each sequence's q_len * rows_per_q index rows in tiles of
    tile_rows (host q_lens, one per sequence)."""
    return int(np.sum(-(-(np.asarray(q_lens, np.int64) * rows_per_q) // tile_rows)))


def split_count(tiles: int, group_grid: int, max_k: int, *, sm_count=None) -> int:
    """Key-range splits per CTA (split-K): enough CTAs for CTAS_PER_SM_TARGET per SM, and no
    split of fewer than MIN_TILES_PER_SPLIT key tiles."""
    sms = _sm_count() if sm_count is None else sm_count
    want = -(-CTAS_PER_SM_TARGET * sms // max(tiles * group_grid, 1))
    return int(max(1, min(want, (-(-max_k // KEY_TILE)) // MIN_TILES_PER_SPLIT)))


def split_rows_bound(rows: int, rows_per_q: int, tile_rows: int, group_grid: int, max_k: int, *,
                     sm_count=None) -> int:
    """An upper bound of query rows x split_count over every call of at most ``rows`` query rows
    and ``max_k`` keys (the partial lists a split-K selection writes, per group and pick):
    splits <= ceil(T / (tiles * group_grid)) with tiles >= rows * rows_per_q / tile_rows gives
    rows * splits <= T * tile_rows / (rows_per_q * group_grid) + rows, T the CTA target."""
    sms = _sm_count() if sm_count is None else sm_count
    most = split_count(1, group_grid, max_k, sm_count=sms)  # one tile: the most splits any call gets
    bound = CTAS_PER_SM_TARGET * sms * tile_rows // (rows_per_q * group_grid) + rows
    return int(min(rows * most, bound))


def _ptr(x):
    return np.uint64(0) if x is None else x


def launch_select(cfg: SelectLaunch, index_q, index_k, cu_q, cu_k, n_seq: int, *, causal, width=0, top_k=1,
                  local_blocks=0, sink_blocks=0, scores_out=None, ids_out=None, partial=None, counters=None,
                  pages=CONTIGUOUS_KEYS):
    """select_kernel / select_sm90_kernel: block scores into scores_out, or ids into ids_out;
    with split-K each split's top-k keys go to partial (total_q, Hkv, splits, top_k) and the
    last split of a row tile merges them into ids_out, counting in ``counters`` (uint32, at
    least :func:`merge_counters` of them, zero before the launch and left zero after it).
    ``pages``: where index_k's rows live (_layout.key_rows)."""
    n_heads, k_heads = index_q.shape[1], index_k.shape[-2]
    cfg.kernel((n_seq * cfg.q_tiles, cfg.group_grid, cfg.splits), (cfg.threads,), (
        index_q, index_k, cu_q, cu_k, _ptr(scores_out), _ptr(ids_out), _ptr(partial), _ptr(counters),
        _i32(n_heads), _i32(k_heads), _i32(width), _i32(cfg.q_tiles), _i32(top_k), _i32(local_blocks),
        _i32(sink_blocks), _i32(1 if causal else 0), _i32(cfg.splits), *pages), shared_mem=cfg.smem)


def merge_counters(cfg: SelectLaunch, n_seq: int) -> int:
    """Counters a split-K launch of ``cfg`` over ``n_seq`` sequences needs: one per row tile."""
    return n_seq * cfg.q_tiles * cfg.group_grid


def launch_topk(scores, cu_q, cu_k, ids_out, n_seq: int, *, top_k, block_size, local_blocks, sink_blocks,
                causal):
    """topk_kernel: float32 scores (total_q, Hkv, W) -> ids_out (total_q, Hkv, top_k), a warp per
    (query, group) row; 4-wide loads where W allows."""
    n_heads, width = scores.shape[1], scores.shape[2]
    rows = scores.shape[0] * n_heads
    kernel = _jit.kernel("topk.cu", "topk_kernel", (4 if width % 4 == 0 else 1, TOPK_WARPS))
    kernel((-(-rows // TOPK_WARPS),), (32 * TOPK_WARPS,), (
        scores, cu_q, cu_k, ids_out, np.int64(rows), _i32(n_seq), _i32(n_heads), _i32(width),
        _i32(top_k), _i32(block_size), _i32(local_blocks), _i32(sink_blocks), _i32(1 if causal else 0)))


def _layout_config(index_q, index_k, layout: Layout, *, block_size, top_k, epilogue, tuning):
    """(select_config for this call's lengths, block-score width)."""
    q_lens, k_lens = np.diff(layout.cu_q), np.diff(layout.cu_k)  # one pass each: host cost counts in decode
    max_q, max_k = int(q_lens.max(initial=0)), int(k_lens.max(initial=0))
    cfg = select_config(dtype=index_q.dtype, index_dim=index_q.shape[2], block_size=block_size,
                        n_heads=index_q.shape[1], k_heads=index_k.shape[1], n_seq=layout.n_seq, max_q=max_q,
                        max_k=max_k, top_k=top_k, epilogue=epilogue, q_lens=q_lens, tuning=tuning)
    return cfg, -(-max_k // block_size)


def block_scores(index_q, index_k, layout: Layout, cu_q, cu_k, *, block_size, causal, out=None,
                 tuning: SelectTuning = DEFAULT_TUNING):
    """float32 (total_q, Hkv, n_blocks): max over the visible keys of each key block of
    index_q . index_k (-inf for blocks with no visible key and blocks past a sequence's end).
    ``tuning``: its warp grid counts; the scores are written in one split."""
    import cupy

    cfg, width = _layout_config(index_q, index_k, layout, block_size=block_size, top_k=1, epilogue=EPI_SCORES,
                                tuning=replace(tuning, splits=1))
    total_q, n_heads = index_q.shape[:2]
    out = out if out is not None else cupy.empty((total_q, n_heads, width), cupy.float32)
    if total_q and layout.n_seq:
        launch_select(cfg, index_q, index_k, cu_q, cu_k, layout.n_seq, causal=causal, width=width, scores_out=out)
    return out


def topk_blocks(scores, layout: Layout, cu_q, cu_k, *, top_k, block_size, local_blocks, sink_blocks,
                causal, out=None):
    """int32 (total_q, Hkv, top_k) from float32 scores (total_q, Hkv, W): forced blocks plus the
    best other visible blocks, ascending, -1 padded."""
    import cupy

    if not supports_topk(top_k=top_k):
        raise ValueError(f"fast top-k covers top_k <= {SELECT_KERNEL_MAX_TOP_K}, got {top_k}")
    total_q, n_heads = scores.shape[:2]
    out = out if out is not None else cupy.empty((total_q, n_heads, top_k), cupy.int32)
    if total_q * n_heads:
        launch_topk(scores, cu_q, cu_k, out, layout.n_seq, top_k=top_k, block_size=block_size,
                    local_blocks=local_blocks, sink_blocks=sink_blocks, causal=causal)
    return out


def select_blocks(index_q, index_k, layout: Layout, cu_q, cu_k, *, top_k, block_size, local_blocks,
                  sink_blocks, causal, out=None, tuning: SelectTuning = DEFAULT_TUNING):
    """int32 (total_q, Hkv, top_k): fused block scoring and top-k; the score map never reaches
    memory.  ``tuning``: a :class:`SelectTuning` (split-K factor, warp grid) for tests and tuning."""
    import cupy

    if not supports_topk(top_k=top_k):
        raise ValueError(f"fast selection covers top_k <= {SELECT_KERNEL_MAX_TOP_K}, got {top_k}")
    cfg, width = _layout_config(index_q, index_k, layout, block_size=block_size, top_k=top_k, epilogue=EPI_TOPK,
                                tuning=tuning)
    total_q, n_heads = index_q.shape[:2]
    out = out if out is not None else cupy.empty((total_q, n_heads, top_k), cupy.int32)
    if total_q == 0 or layout.n_seq == 0:
        return out
    partial = counters = None
    if cfg.splits > 1:
        partial = cupy.empty((total_q, n_heads, cfg.splits, top_k), cupy.uint64)
        counters = cupy.zeros(merge_counters(cfg, layout.n_seq), cupy.uint32)
    launch_select(cfg, index_q, index_k, cu_q, cu_k, layout.n_seq, causal=causal, width=width, top_k=top_k,
                  local_blocks=local_blocks, sink_blocks=sink_blocks, ids_out=out, partial=partial,
                  counters=counters)
    return out
