"""Block-sparse attention on the GPU (MSA main branch): launch code of the CUDA kernels.

Three paths:

* **prefill (KV-outer)** -- ``cuda/reverse_index.cu`` inverts the selection into, per
  (sequence, KV head, key block) = *bucket*, the ascending list of query tokens that picked it
  (a CSR built on the device by a stable counting sort: deterministic, no allocation, no host
  sync) and cuts each list into work items of at most ``TILES_PER_ITEM`` query tiles, largest
  first.  ``cuda/sparse_prefill.cu``
  runs one CTA per item: one K/V block loaded once, its queries streamed through tensor cores
  in row tiles of 16 * PREFILL_MT * PREFILL_WARPS = 64 rows (64 / G tokens x G heads; 64
  rather than 128 so that two CTAs share an SM: +12% measured on H200), writing one partial
  (o, lse) per pick.  On sm_90 with D = BK = 128, ``cuda/sparse_prefill_sm90.cu`` runs the same
  items on wgmma (one warpgroup, 64-row tiles, two CTAs per SM; 13% faster on H200).
* **decode (query-outer split-K)** -- for at most ``DECODE_MAX_QUERIES`` queries per sequence,
  ``cuda/decode.cu`` makes every distinct pick its own CTA straight from block_indices (no
  sort, no reverse index, no schedule kernel: one launch in all), its key block split once
  more across the CTA's 4 warps, merged in shared memory; the last CTA of each (query, KV
  head) to finish combines its partials (a counter per pair, zero before and after the launch).
* **prefill (tile-outer)** -- ``cuda/sparse_prefill_tile.cu`` runs one CTA per (query tile,
  KV head): TILE_ROWS rows = tile tokens x G heads (G = 16: 8 consecutive tokens), walking
  the sorted union of the tile's picked blocks with online softmax in registers and a per-row
  mask, and writes out and lse once per row (no partials, no combine).  Where neighbouring
  queries pick the same blocks (trained indexes do) this is a flash-attention loop with block
  skipping.  On sm_90 with D = BK = 128, ``cuda/sparse_prefill_tile_sm90.cu`` runs the same
  tiles on wgmma (two warpgroups of 4 tokens, a whole block per step; 1.25x the mma.sync
  kernel on coherent selections, H100).  ``SparseTuning.schedule``: "kv" (default: on random
  selections the tile-outer kernels are 2.5-3.3x slower, on coherent ones 1.2-1.3x faster;
  docs/perf.md), "auto" lets ``cuda/tile_schedule.cu``
  classify each (tile, KV head) by the share of its token x block pairs that its tokens
  picked (>= ``TILE_MIN_USEFUL``: tile-outer); the other tiles' picks go KV-outer, whose
  reverse index and combine skip the tile-outer rows; "tile" forces the tile-outer path.
* ``cuda/combine.cu`` merges the <= K partials of each (query, head) of the KV-outer path by
  log-sum-exp (``cuda/combine.cuh``: the math, which the decode kernel shares).

Launch code: one stage function per kernel file (``decode_kernel``/``launch_decode``,
``block_offsets``/``reverse_index``, ``prefill_kernel``/``launch_prefill``,
``query_tile_offsets``/``classify_query_tiles``, ``tile_prefill_kernel``/``launch_tile_prefill``,
``combine_kernel``/``launch_combine``; plans call them directly); ``sparse_attention``
chooses the path, cuts the queries into chunks and runs the stages on each.  Tuning and test
choices travel in one :class:`SparseTuning`.

Partials are stored in the input dtype (half the bytes of fp32; the extra rounding is one
ulp of a normalised output, far inside the tolerances) with fp32 lse.  Queries are processed
in chunks whose partial buffer fits ``PARTIAL_BUDGET_BYTES``, which also bounds every 32-bit
list position.  Host-device synchronisation: none (the work grid is an upper bound; items past
the real count exit at once).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from . import _jit
from ._interop import SPARSE_KERNEL_MAX_SLOTS
from ._layout import CONTIGUOUS_KEYS

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (64, 128)
SUPPORTED_GROUP_SIZES = (1, 2, 4, 8, 16)
PREFILL_WARPS = 4  # 64-row query tiles: 2 CTAs per SM (measured +12% over 8 warps, H200)
PREFILL_STAGES = 2  # query tiles buffered in shared memory (STAGES - 1 in flight)
PREFILL_MT = 1  # m16 row tiles per warp (2: each K/V fragment load feeds two mma)
WGMMA_WARPGROUPS = 1  # sm_90 prefill (sparse_prefill_sm90.cu, D = BK = 128): 64-row tiles per warpgroup
WGMMA_STAGES = 2
DECODE_WARPS = 4  # split-K decode: each warp takes BK / 4 keys of the pick's block
DECODE_CLUSTERS = (4, 8, 16)  # top_k of the cluster combine (sm_90): a cluster of top_k CTAs (16: non-portable size)
DECODE_COMBINES = ("cluster", "last_cta")
DECODE_CLUSTER_MAX_CTAS = 64  # the cluster combine by default only on grids this small: measured (H100, paper
                              # shapes, cluster / last CTA) 12.8 / 15.7 us at 64 CTAs (B1), 26.1 / 17.6 at 256 (B4),
                              # 40.8 / 27.7 at 512 (B8): larger grids lose more to placing 16-CTA clusters
TILES_PER_ITEM = 8  # query tiles per prefill work item (K/V block reuse vs. load balance)
DECODE_MAX_QUERIES = 16  # sequences with at most this many queries take the decode path
SCHEDULES = ("auto", "kv", "tile")  # prefill: per query tile by the cost model, all KV-outer, all tile-outer
PREFILL_SCHEDULE = "kv"  # measured (H100, 128K, f02938c): KV-outer 55.7 / 55.6 ms (random / coherent),
                         # auto 58.4 / 61.7, tile 210.7 / 55.9: the tile-outer kernel is not yet faster
TILE_ROWS = 128  # rows of a tile-outer query tile: tokens x G heads (8 warps; at most 64 tokens)
TILE_STAGES = 2  # K/V chunks of 64 keys buffered by the tile-outer kernel
TILE_PRODUCER_STAGES = 2  # 128-key chunks the producer variant of the wgmma tile kernel buffers at 128-row tiles (3 do
# not fit with its query tile at top_k 16); what check and warmup compile, SparseTuning.tile_stages picks at run time
# A (query tile, KV head) runs tile-outer when its tokens picked at least this share of the
# tile's token x block pairs (the tile-outer kernel computes them all, or skips a warp's rows;
# the KV-outer path computes the picks only, at about 21% of the matmul ceiling, bound by its
# partial results): an estimate, to be set from measurements of both paths.
TILE_MIN_USEFUL = 0.3
TILE_MAX_ENTRIES = 1024  # tile tokens x top_k ids that a tile-outer CTA deduplicates (quadratic)
CLASSIFY_WARPS = 8  # classify_query_tiles: a warp per (tile, KV head)
PARTIAL_BUDGET_BYTES = 4 << 30
SCHEDULE_THREADS = 256
RADIX_BITS, SPLIT_TILE, SPLIT_WARPS = 8, 2048, 8  # reverse_index.cu counting sort: as the kernels'
SCAN_THREADS, SCAN_ITEMS = 1024, 8  # reverse_index.cu scans: a CTA takes SCAN_THREADS x SCAN_ITEMS elements
COMBINE_WARPS = 8
LOG2E = 1.4426950408889634

_poison_outputs = False  # test hook: fill every buffer with NaN before the kernels run

def _tile_warps(rows: int, group: int) -> int:
    """Warps (m16 row tiles) of a tile-outer CTA: rows, or fewer where rows / G would pass
    64 tokens (one mask bit per token)."""
    return min(rows, 64 * group) // 16


def _tile_warpgroups(rows: int, group: int) -> int:
    """Warpgroups (64 rows each) of a wgmma tile-outer CTA: the same tile as _tile_warps'."""
    return min(rows, 64 * group) // 64


def tile_tokens(group: int, rows: int = TILE_ROWS) -> int:
    """Tokens of a tile-outer query tile of ``rows`` rows (G heads a token)."""
    return 16 * _tile_warps(rows, group) // group


# every variant this module may launch, for `python -m msa_cupy check`
for _t in ("bf16", "f16"):
    for _d in SUPPORTED_HEAD_DIMS:
        _jit.declare("combine.cu", "sparse_combine_kernel", *[(_t, _d, _g, COMBINE_WARPS) for _g in SUPPORTED_GROUP_SIZES])
        _jit.declare("sparse_prefill.cu", "sparse_prefill_kernel",
                     *[(_t, _d, _g, _bk, PREFILL_WARPS, PREFILL_STAGES, PREFILL_MT) for _g in SUPPORTED_GROUP_SIZES
                       for _bk in SUPPORTED_BLOCK_SIZES])
        _jit.declare("decode.cu", "sparse_decode_kernel",
                     *[(_t, _d, _g, _bk, DECODE_WARPS, 0) for _g in SUPPORTED_GROUP_SIZES for _bk in SUPPORTED_BLOCK_SIZES])
        _jit.declare("decode.cu", "sparse_decode_kernel",
                     *[(_t, _d, _g, _bk, DECODE_WARPS, _c) for _g in SUPPORTED_GROUP_SIZES for _bk in SUPPORTED_BLOCK_SIZES
                       for _c in DECODE_CLUSTERS], arch_specific=True)
_jit.declare("sparse_prefill_sm90.cu", "sparse_prefill_sm90_kernel",
             *[(_t, 128, _g, 128, WGMMA_WARPGROUPS, WGMMA_STAGES) for _t in ("bf16", "f16")
               for _g in SUPPORTED_GROUP_SIZES], arch_specific=True)
for _t in ("bf16", "f16"):
    _jit.declare("sparse_prefill_tile.cu", "sparse_prefill_tile_kernel",
                 *[(_t, _d, _g, _bk, _tile_warps(TILE_ROWS, _g), TILE_STAGES) for _d in SUPPORTED_HEAD_DIMS
                   for _g in SUPPORTED_GROUP_SIZES for _bk in SUPPORTED_BLOCK_SIZES])
_jit.declare("sparse_prefill_tile_sm90.cu", "sparse_prefill_tile_sm90_kernel",
             *[(_t, 128, _g, 128, _tile_warpgroups(TILE_ROWS, _g), _stages, _producer) for _t in ("bf16", "f16")
               for _g in SUPPORTED_GROUP_SIZES for _stages, _producer in ((TILE_STAGES, 0), (TILE_PRODUCER_STAGES, 1))],
             arch_specific=True)
_jit.declare("tile_schedule.cu", "query_tile_offsets")
_jit.declare("tile_schedule.cu", "classify_query_tiles", (CLASSIFY_WARPS,))
# reverse_index.cu's kernels that reverse_index launches: name -> (template argument, threads a CTA)
_INDEX_KERNELS = {
    **{name: (SCHEDULE_THREADS, SCHEDULE_THREADS) for name in
       ("fill_int", "reverse_index_keys", "reverse_index_fill", "item_classes", "build_work_items")},
    **{name: (SPLIT_WARPS, 32 * SPLIT_WARPS) for name in ("split_histogram", "split_scatter")},
    **{name: (SCAN_THREADS, SCAN_THREADS) for name in ("exclusive_scan", "scan_tile_sums", "scan_tiles")},
}
for _name, (_template, _) in _INDEX_KERNELS.items():
    _jit.declare("reverse_index.cu", _name, (_template,))
_jit.declare("reverse_index.cu", "block_offsets", *[(_bk,) for _bk in SUPPORTED_BLOCK_SIZES])


def supports(*, head_dim: int, block_size: int, group_size: int, top_k: int) -> bool:
    """True when the CUDA kernels handle this configuration (else the caller falls back)."""
    return (head_dim in SUPPORTED_HEAD_DIMS and block_size in SUPPORTED_BLOCK_SIZES
            and group_size in SUPPORTED_GROUP_SIZES and 1 <= top_k <= SPARSE_KERNEL_MAX_SLOTS)


def _empty(shape, dtype):
    import cupy

    a = cupy.empty(shape, dtype)
    if _poison_outputs:  # 0x7FFF is a NaN in fp16 and bf16, 0x7FFFFFFF in fp32
        a.view(cupy.uint16 if a.itemsize == 2 else cupy.uint32).fill(0x7FFF if a.itemsize == 2 else 0x7FFFFFFF)
    return a


def _wgmma_prefill_fits(head_dim, block_size) -> bool:
    """sparse_prefill_sm90.cu covers D = BK = 128 on sm_90."""
    return head_dim == 128 and block_size == 128 and _jit.has_wgmma()


def _wgmma_smem_bytes(head_dim, block_size, group_size) -> int:
    """K and V blocks + WGMMA_STAGES query tiles + their per-token key limits + 1 KB to align
    the swizzle atoms."""
    rows = 64 * WGMMA_WARPGROUPS
    return ((2 * block_size + WGMMA_STAGES * rows) * head_dim * 2 + WGMMA_STAGES * (rows // group_size) * 4
            + 1024)


def _decode_merge_bytes(head_dim, warps):
    """decode.cu's fp32 merge of the warps (decode_merge_bytes: m_s, l_s, o_s)."""
    return (2 * warps * 16 + warps * 16 * head_dim) * 4


def _smem_bytes(head_dim, block_size, warps, group_size, decode, stages=2, mt=1):
    if decode:  # per warp: its K and V slice + a 16-row copy of the query; then the fp32 merge
        loads = warps * (2 * (block_size // warps) * head_dim + 16 * head_dim) * 2
        return max(loads, _decode_merge_bytes(head_dim, warps))
    rows = 16 * mt * warps
    return 2 * (2 * block_size * head_dim + stages * rows * head_dim) + stages * (rows // group_size) * 4


def _n_blocks_total(layout, block_size) -> int:
    """Key blocks of all sequences together (host, from the layout: no device read)."""
    return int((-(-np.diff(layout.cu_k) // block_size)).sum())


@dataclass(frozen=True)
class SparseTuning:
    """Choices that the shapes otherwise make, for tests and benchmarks: ``path`` None (by
    shape), "prefill" or "decode"; ``prefill_kernel`` None (wgmma on sm_90 at D = BK = 128,
    else mma.sync), "mma" (sparse_prefill.cu with the tile options below) or "wgmma"
    (sparse_prefill_sm90.cu) for the KV-outer prefill; ``prefill_warps`` / ``prefill_stages``
    / ``prefill_mt`` the mma.sync tiling (warps per CTA, query tiles buffered, m16 row tiles
    per warp).  ``schedule`` of the prefill: "auto" (per query tile, the cost model with
    ``tile_min_useful``), "kv" (all KV-outer) or "tile" (all tile-outer); ``tile_rows`` (64
    or 128) and ``tile_stages`` (>= 2) the tile-outer kernel's query tile and K/V buffers,
    ``tile_kernel`` the tile-outer kernel like ``prefill_kernel`` (None: wgmma where it fits),
    ``tile_producer`` its wgmma variant with a producer warpgroup (pipeline.cuh);
    ``decode_combine`` how the decode path combines a row's picks: "cluster" (a thread-block
    cluster of its top_k CTAs, sm_90, top_k in DECODE_CLUSTERS), "last_cta" (the CTA that
    finishes last), None (the cluster where it can and the grid has at most
    DECODE_CLUSTER_MAX_CTAS CTAs, else the last CTA)."""

    path: str | None = None
    prefill_kernel: str | None = None
    prefill_warps: int = PREFILL_WARPS
    prefill_stages: int = PREFILL_STAGES
    prefill_mt: int = PREFILL_MT
    schedule: str = PREFILL_SCHEDULE
    tile_rows: int = TILE_ROWS
    tile_stages: int = TILE_STAGES
    tile_min_useful: float = TILE_MIN_USEFUL
    tile_kernel: str | None = None
    tile_producer: bool = False
    decode_combine: str | None = None

    def __post_init__(self):
        if self.path not in (None, "prefill", "decode"):
            raise ValueError(f"path must be None, 'prefill' or 'decode', got {self.path!r}")
        for name in ("prefill_kernel", "tile_kernel"):
            if getattr(self, name) not in (None, "mma", "wgmma"):
                raise ValueError(f"{name} must be None, 'mma' or 'wgmma', got {getattr(self, name)!r}")
        if self.decode_combine not in (None, *DECODE_COMBINES):
            raise ValueError(f"decode_combine must be None, 'cluster' or 'last_cta', got {self.decode_combine!r}")
        for name in ("prefill_warps", "prefill_stages", "prefill_mt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.tile_rows, bool) or self.tile_rows not in (64, 128):
            raise ValueError(f"tile_rows must be 64 or 128, got {self.tile_rows!r}")
        if isinstance(self.tile_stages, bool) or not isinstance(self.tile_stages, int) or self.tile_stages < 2:
            raise ValueError(f"tile_stages must be an int >= 2, got {self.tile_stages!r}")
        if not isinstance(self.tile_producer, bool):
            raise ValueError(f"tile_producer must be a bool, got {self.tile_producer!r}")
        if self.tile_producer and self.tile_kernel == "mma":
            raise ValueError("tile_producer: a variant of the wgmma tile-outer kernel, not of tile_kernel='mma'")
        useful = self.tile_min_useful
        if isinstance(useful, bool) or not isinstance(useful, (int, float)) or not 0 <= useful <= 1:
            raise ValueError(f"tile_min_useful must be a number in [0, 1], got {useful!r}")

    def changes(self) -> dict:
        """The fields that differ from the defaults (a benchmark variant's name)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


DEFAULT_TUNING = SparseTuning()


class PhaseTimes:
    """Optional per-phase timing (benchmarks): CUDA events that sparse_attention records
    between its phases (reverse index, attention, combine), summed over the chunks."""

    def __init__(self):
        self.events = []

    def mark(self, name):
        import cupy

        e = cupy.cuda.Event()
        e.record()
        self.events.append((name, e))

    def totals(self):
        import cupy

        out = {}
        for (_, a), (name, b) in zip(self.events, self.events[1:]):
            b.synchronize()
            out[name] = out.get(name, 0.0) + cupy.cuda.get_elapsed_time(a, b)
        return out


# --------------------------------------------------------------------------- stages


def decode_kernel(dtype, head_dim: int, group: int, block_size: int, top_k: int, combine=None, *, pairs: int):
    """(kernel, shared memory bytes) of the split-K decode attention (decode.cu) for a grid of
    ``pairs`` (row, KV head) pairs at most, combining a row's picks as ``combine`` says
    (SparseTuning.decode_combine)."""
    tname = _jit.dtype_template(dtype)
    can_cluster = top_k in DECODE_CLUSTERS and _jit.has_wgmma()
    if combine == "cluster" and not can_cluster:
        raise ValueError(f"decode_combine='cluster' needs an sm_90 GPU and top_k in {DECODE_CLUSTERS}, got top_k={top_k}")
    smem = _smem_bytes(head_dim, block_size, DECODE_WARPS, group, True)
    if combine is None:
        combine = "cluster" if can_cluster and pairs * top_k <= DECODE_CLUSTER_MAX_CTAS else "last_cta"
    if combine == "last_cta":
        return _jit.kernel("decode.cu", "sparse_decode_kernel", (tname, head_dim, group, block_size, DECODE_WARPS, 0)), smem
    kernel = _jit.kernel("decode.cu", "sparse_decode_kernel", (tname, head_dim, group, block_size, DECODE_WARPS, top_k),
                         arch_specific=True)
    kernel.allow_cluster(top_k)
    # the pick's partial (G rows, G lse values, a flag) beyond the merge space
    partial = group * head_dim * np.dtype(dtype).itemsize + group * 4 + 4
    return kernel, max(smem, _decode_merge_bytes(head_dim, DECODE_WARPS) + partial)


def launch_decode(kernel, smem, q, k, v, block_indices, cu_q, cu_k, n_seq, q_begin, rows, part_o, part_lse, counters,
                  out, lse, *, causal, scale_log2, pages=CONTIGUOUS_KEYS):
    """decode.cu: one CTA per entry of block_indices rows [q_begin, q_begin + rows), each a
    partial (o, lse) combined into out/lse (rows at or past cu_q[n_seq] are left alone): the
    last_cta kernel writes the partials at partial row entry * G + head and the last CTA of each
    (row, KV head) combines them, counting in ``counters`` (uint32, one per (row, KV head), zero
    before the launch and left zero after it); the cluster kernel uses neither."""
    n_heads_q, n_heads_kv, top_k = q.shape[1], k.shape[-2], block_indices.shape[-1]
    kernel((rows * n_heads_kv * top_k,), (32 * DECODE_WARPS,),
           (q, k, v, block_indices, cu_q, cu_k, np.int32(n_seq), np.int32(q_begin), np.int32(n_heads_q),
            np.int32(n_heads_kv), np.int32(top_k), part_o, part_lse, counters, out, lse, np.int32(bool(causal)),
            scale_log2, *pages), shared_mem=smem)


def block_offsets(cu_k, n_seq: int, block_size: int, block_off=None, *, kernel=None):
    """reverse_index.cu block_offsets: into block_off (int32 (n_seq + 1) device; None: a new
    array) the global id of each sequence's first key block (one thread: n_seq is small).
    ``kernel``: a prefill plan passes a recorder."""
    if block_off is None:
        import cupy

        block_off = cupy.empty(n_seq + 1, cupy.int32)
    kernel = kernel if kernel is not None else _jit.kernel("reverse_index.cu", "block_offsets", (block_size,))
    kernel((1,), (1,), (cu_k, np.int32(n_seq), block_off))
    return block_off


def reverse_index_kernels() -> list:
    """Every kernel that ``reverse_index`` launches, loaded (a plan loads them before it
    prepares a step, which may happen inside a graph capture)."""
    return [_jit.kernel("reverse_index.cu", name, (template,)) for name, (template, _) in _INDEX_KERNELS.items()]


def work_item_bound(n_entries: int, n_buckets: int, max_queries: int) -> int:
    """Work items of a reverse index of n_entries picks (at most one partial item per bucket):
    the KV-outer kernel's grid, known on the host."""
    return min(n_entries // max_queries + min(n_buckets, n_entries), n_entries)


def _scan_tiles(n: int) -> int:
    return max(1, -(-n // (SCAN_THREADS * SCAN_ITEMS)))


def _launch_index_kernel(emit, name, n, args, per_cta=None):
    """A reverse_index.cu kernel over n units, per_cta of them a CTA (a thread each by
    default).  emit: as ``reverse_index``."""
    template, threads = _INDEX_KERNELS[name]
    kernel = _jit.kernel("reverse_index.cu", name, (template,))
    grid = (int(-(-n // (per_cta or threads))),)
    (kernel if emit is None else lambda *a: emit(kernel, *a))(grid, (threads,), args)


def exclusive_scan(a, n: int, out, tile_sums, *, emit=None):
    """out[i] = a[0] + ... + a[i - 1] for i <= n (int32 device arrays; out[n] the total, out may
    be a), in three launches; tile_sums: int32, at least ``_scan_tiles(n) + 1``."""
    tiles, i32 = _scan_tiles(n), np.int32
    _launch_index_kernel(emit, "scan_tile_sums", tiles, (a, i32(n), tile_sums), per_cta=1)
    _launch_index_kernel(emit, "exclusive_scan", 1, (tile_sums, i32(tiles), tile_sums), per_cta=1)
    _launch_index_kernel(emit, "scan_tiles", tiles, (a, i32(n), tile_sums, out), per_cta=1)


def reverse_index_buffers(max_entries: int, n_buckets: int, max_queries: int) -> list:
    """(name, shape, dtype) of the device buffers that ``reverse_index`` works in, for chunks of
    at most max_entries picks over n_buckets buckets (a plan carves them from its workspace)."""
    tiles = -(-max(max_entries, n_buckets) // SPLIT_TILE)
    longest_scan = max((1 << RADIX_BITS) * tiles, n_buckets)
    i32 = np.int32
    return [("ri_scan", (_scan_tiles(longest_scan) + 1,), i32), ("ri_bucket", (max_entries,), i32),
            ("ri_perm0", (max_entries,), i32), ("ri_perm1", (max_entries,), i32),
            ("ri_hist", ((1 << RADIX_BITS) * tiles + 1,), i32), ("ri_counts", (n_buckets,), i32),
            ("ri_list_start", (n_buckets + 1,), i32), ("ri_full", (n_buckets + 1,), i32),
            ("ri_class", (n_buckets,), i32), ("ri_class_order0", (n_buckets,), i32),
            ("ri_class_order1", (n_buckets,), i32),
            ("ri_items", (work_item_bound(max_entries, n_buckets, max_queries), 3), i32)]


def _head(a, n: int):
    """The first n rows of a buffer: a CuPy view, or a plan's Pointer of that shape."""
    if isinstance(a, _jit.Pointer):
        return _jit.Pointer(a.name, (n,) + a.shape[1:], a.dtype)
    return a[:n]


def reverse_index(block_indices, cu_q, block_off, n_seq: int, q_begin: int, rows: int, *, n_blocks_total: int,
                  max_queries: int, list_q, slot_pos, row_mode=None, buffers=None, emit=None):
    """reverse_index.cu for block_indices rows [q_begin, q_begin + rows): per bucket (KV head,
    global key block) the ascending list of the queries that picked it, into list_q, and each
    pick's place in those lists, into slot_pos (for the combine); returns the work items,
    int32 (n_items, 3) (bucket, list start, query count <= max_queries), largest first.
    n_items is an upper bound known on the host (no sync): items past the real count are
    empty and exit at once.  row_mode (uint8 (rows, Hkv), or None): picks of the rows marked
    1 (tile-outer) are left out.  ``buffers``: {name: array} as ``reverse_index_buffers`` (None:
    allocated here); ``emit``: None launches, a prefill plan passes a function
    (kernel, grid, block, args) that prepares the launch instead."""
    n_heads_kv, top_k = block_indices.shape[1], block_indices.shape[2]
    n_entries = rows * n_heads_kv * top_k
    n_buckets = n_heads_kv * int(n_blocks_total)
    if not 0 < max_queries < 2**31 - 1 or n_entries >= 2**31 or n_buckets >= 2**31 - 1:
        raise ValueError(f"reverse_index: max_queries={max_queries}, {n_entries} entries, {n_buckets} buckets "
                         f"out of range")
    if buffers is None:
        import cupy

        buffers = {name: cupy.empty(shape, dt) for name, shape, dt in
                   reverse_index_buffers(n_entries, n_buckets, max_queries)}
    b = buffers
    i32 = np.int32

    def launch(name, n, args, per_cta=None):
        _launch_index_kernel(emit, name, n, args, per_cta)

    def scan(a, n, out):
        exclusive_scan(a, n, out, b["ri_scan"], emit=emit)

    def sort(key, n, max_key, outs):  # stable counting sort of n keys in [0, max_key]: the order, in outs[0 or 1]
        tiles = -(-n // SPLIT_TILE)
        order = None
        for p in range(max(1, -(-int(max_key).bit_length() // RADIX_BITS))):  # RADIX_BITS a pass, low digits first
            out, shift = b[outs[p % 2]], i32(p * RADIX_BITS)
            launch("split_histogram", tiles, (key, _nullable(order), i32(n), shift, b["ri_hist"]), SPLIT_WARPS)
            scan(b["ri_hist"], tiles << RADIX_BITS, b["ri_hist"])
            launch("split_scatter", tiles, (key, _nullable(order), i32(n), shift, b["ri_hist"], out), SPLIT_WARPS)
            order = out
        return order

    launch("fill_int", n_buckets, (b["ri_counts"], i32(n_buckets), i32(0)))
    launch("reverse_index_keys", n_entries,
           (block_indices, cu_q, block_off, _nullable(row_mode), i32(n_seq), i32(q_begin), i32(rows), i32(n_heads_kv),
            i32(top_k), i32(n_blocks_total), b["ri_bucket"], b["ri_counts"]))
    order = sort(b["ri_bucket"], n_entries, n_buckets, ("ri_perm0", "ri_perm1"))  # invalid entries: n_buckets
    launch("reverse_index_fill", n_entries,
           (b["ri_bucket"], order, i32(n_entries), i32(n_buckets), i32(n_heads_kv * top_k), i32(q_begin), list_q,
            slot_pos))
    launch("item_classes", n_buckets, (b["ri_counts"], i32(n_buckets), i32(max_queries), b["ri_full"], b["ri_class"]))
    scan(b["ri_counts"], n_buckets, b["ri_list_start"])
    scan(b["ri_full"], n_buckets, b["ri_full"])
    class_order = sort(b["ri_class"], n_buckets, max_queries, ("ri_class_order0", "ri_class_order1"))
    n_items = work_item_bound(n_entries, n_buckets, max_queries)
    items = _head(b["ri_items"], n_items)
    launch("build_work_items", max(n_buckets, n_items),
           (b["ri_counts"], b["ri_list_start"], b["ri_full"], b["ri_class"], class_order, i32(n_buckets),
            i32(max_queries), i32(n_items), items))
    return items


class PrefillKernel(NamedTuple):
    """A prefill attention kernel and its launch shape; ``tile_tokens`` query tokens per
    row tile (TILES_PER_ITEM tiles make a work item)."""

    kernel: object
    threads: int
    smem: int
    tile_tokens: int


def prefill_kernel(dtype, head_dim: int, group: int, block_size: int, *, variant=None, warps=PREFILL_WARPS,
                   stages=PREFILL_STAGES, mt=PREFILL_MT) -> PrefillKernel:
    """The KV-outer attention kernel: ``variant`` None (wgmma where it fits, else mma.sync),
    "wgmma" (sparse_prefill_sm90.cu) or "mma" (sparse_prefill.cu with warps x mt m16 row
    tiles per CTA, stages tiles buffered)."""
    tname = _jit.dtype_template(dtype)
    if variant is None:
        variant = "wgmma" if _wgmma_prefill_fits(head_dim, block_size) else "mma"
    if variant == "wgmma":
        if not _wgmma_prefill_fits(head_dim, block_size):
            raise ValueError("the wgmma prefill kernel needs an sm_90 GPU and head_dim = block_size = 128")
        kernel = _jit.kernel("sparse_prefill_sm90.cu", "sparse_prefill_sm90_kernel",
                             (tname, head_dim, group, block_size, WGMMA_WARPGROUPS, WGMMA_STAGES), arch_specific=True)
        return PrefillKernel(kernel, 128 * WGMMA_WARPGROUPS, _wgmma_smem_bytes(head_dim, block_size, group),
                             64 * WGMMA_WARPGROUPS // group)
    kernel = _jit.kernel("sparse_prefill.cu", "sparse_prefill_kernel",
                         (tname, head_dim, group, block_size, warps, stages, mt))
    return PrefillKernel(kernel, 32 * warps, _smem_bytes(head_dim, block_size, warps, group, False, stages, mt),
                         16 * mt * warps // group)


def launch_prefill(prefill: PrefillKernel, q, k, v, items, list_q, cu_q, cu_k, block_off, n_seq, n_blocks_total,
                   part_o, part_lse, *, causal, scale_log2, pages=CONTIGUOUS_KEYS):
    """sparse_prefill.cu / sparse_prefill_sm90.cu: one CTA per work item, a partial (o, lse)
    per pick at its list position (list_q order).  ``pages``: the KeyRows of a paged K/V cache
    (block table, max pages, page size); every K/V row read, the NaN/Inf add-back's included,
    goes through it."""
    n_heads_q, n_heads_kv = q.shape[1], k.shape[-2]
    prefill.kernel((items.shape[0],), (prefill.threads,),
                   (q, k, v, items, list_q, cu_q, cu_k, block_off, np.int32(n_seq), part_o, part_lse,
                    np.int32(n_blocks_total), np.int32(n_heads_q), np.int32(n_heads_kv), np.int32(bool(causal)),
                    scale_log2, *pages), shared_mem=prefill.smem)


def query_tile_offsets(cu_q, n_seq: int, q_begin: int, rows: int, tile_tokens: int, tile_off, *, kernel=None):
    """tile_schedule.cu query_tile_offsets: into tile_off (int32, n_seq + 1) the first query
    tile of each sequence in the chunk of rows [q_begin, q_begin + rows), tiles of
    tile_tokens tokens (one thread).  ``kernel``: a prefill plan passes a recorder."""
    kernel = kernel if kernel is not None else _jit.kernel("tile_schedule.cu", "query_tile_offsets")
    kernel((1,), (1,), (cu_q, np.int32(n_seq), np.int32(q_begin), np.int32(rows), np.int32(tile_tokens), tile_off))


def chunk_tiles(rows: int, tile_tokens: int, n_seq: int) -> int:
    """An upper bound of the query tiles of a chunk of rows (each sequence adds at most one
    partial tile): the grid size of the tile kernels, known on the host."""
    return -(-rows // tile_tokens) + n_seq


def classify_query_tiles(block_indices, cu_q, cu_k, tile_off, n_seq: int, q_begin: int, rows: int, *,
                         tile_tokens: int, min_useful: float, row_mode, kernel=None):
    """tile_schedule.cu classify_query_tiles: per (query tile, KV head) of the chunk, a warp
    decides tile-outer (its tokens picked >= min_useful of its token x block pairs) or
    KV-outer, into row_mode (uint8, (rows, Hkv)): 1 where the row's tile runs tile-outer.
    block_indices: the chunk's rows.  ``kernel``: a prefill plan passes a recorder."""
    n_heads_kv, top_k = block_indices.shape[1], block_indices.shape[2]
    n_tiles = chunk_tiles(rows, tile_tokens, n_seq)
    warps = n_tiles * n_heads_kv
    kernel = kernel if kernel is not None else _jit.kernel("tile_schedule.cu", "classify_query_tiles",
                                                           (CLASSIFY_WARPS,))
    kernel(
        (-(-warps // CLASSIFY_WARPS),), (32 * CLASSIFY_WARPS,),
        (block_indices, cu_q, cu_k, tile_off, np.int32(n_seq), np.int32(q_begin), np.int32(rows), np.int32(n_tiles),
         np.int32(tile_tokens), np.int32(top_k), np.int32(n_heads_kv), np.float32(min_useful), row_mode),
        shared_mem=CLASSIFY_WARPS * tile_tokens * top_k * 4)


def tile_schedule_model(block_indices, cu_q, *, tile_tokens: int, min_useful: float, q_begin: int = 0,
                        rows: int | None = None) -> np.ndarray:
    """NumPy model of query_tile_offsets + classify_query_tiles (the cost model, for tests):
    uint8 (rows, Hkv) row_mode of the chunk [q_begin, q_begin + rows) of a varlen selection
    block_indices (total_q, Hkv, K) with host cu_q."""
    block_indices = np.asarray(block_indices)
    cu_q = np.asarray(cu_q, np.int64)
    rows = len(block_indices) - q_begin if rows is None else rows
    n_heads_kv = block_indices.shape[1]
    mode = np.zeros((rows, n_heads_kv), np.uint8)
    for s in range(len(cu_q) - 1):
        lo, hi = max(int(cu_q[s]), q_begin), min(int(cu_q[s + 1]), q_begin + rows)
        for t0 in range(lo, hi, tile_tokens):
            count = min(tile_tokens, hi - t0)
            for g in range(n_heads_kv):
                picks = [set(int(b) for b in block_indices[t, g] if b >= 0) for t in range(t0, t0 + count)]
                u = len(set().union(*picks))
                p = sum(len(x) for x in picks)
                mode[t0 - q_begin:t0 - q_begin + count, g] = np.float32(p) >= np.float32(min_useful) * np.float32(count * u)
    return mode


class TilePrefillKernel(NamedTuple):
    """The tile-outer attention kernel and its launch shape: ``tile_tokens`` tokens per query
    tile (rows / G), ``stages`` buffers of ``chunk_keys`` K/V rows, ``align`` bytes of shared
    memory to align them, ``query_bytes`` for a query tile kept in a region of its own (the
    producer variant).  ``kernel`` None: the shape alone (tile_prefill_kernel(load=False))."""

    kernel: object
    threads: int
    tile_tokens: int
    stages: int
    head_dim: int
    chunk_keys: int
    align: int
    query_bytes: int = 0

    def smem_bytes(self, top_k: int) -> int:
        """Dynamic shared memory for top_k: the K/V chunk buffers (and the query tile's region),
        then per id of the tile's picks a union mask (8 bytes), union id, pick and
        first-occurrence flag."""
        entries = self.tile_tokens * top_k
        return (self.align + self.stages * 2 * self.chunk_keys * self.head_dim * 2 + self.query_bytes
                + -(-entries * 17 // 16) * 16)

    def fits(self, top_k: int) -> bool:
        """The kernel takes this top_k: its ids deduplicate in bounded time, its shared memory
        fits the device (with 1 KB for static shared memory)."""
        from .selection import _ATTR_SMEM_PER_BLOCK_OPTIN, _device_attr

        return (self.tile_tokens * top_k <= TILE_MAX_ENTRIES
                and self.smem_bytes(top_k) + 1024 <= _device_attr(_ATTR_SMEM_PER_BLOCK_OPTIN))


def tile_prefill_kernel(dtype, head_dim: int, group: int, block_size: int, *, rows=TILE_ROWS, stages=TILE_STAGES,
                        variant=None, producer=False, load=True) -> TilePrefillKernel:
    """The tile-outer kernel with query tiles of ``rows`` rows (at most 64 tokens):
    ``variant`` None (wgmma where it fits, else mma.sync), "wgmma" (sparse_prefill_tile_sm90.cu,
    sm_90 at D = BK = 128: ``stages`` buffers of 128-key chunks; ``producer``: one more
    warpgroup loads them, the query tile in shared memory) or "mma" (sparse_prefill_tile.cu:
    ``stages`` buffers of 64-key chunks).  ``load`` False: the launch shape only (kernel None),
    to size shared memory before compiling."""
    if variant is None:
        variant = "wgmma" if _wgmma_prefill_fits(head_dim, block_size) else "mma"
    tokens = tile_tokens(group, rows)
    if variant == "wgmma":
        if not _wgmma_prefill_fits(head_dim, block_size):
            raise ValueError("the wgmma tile-outer kernel needs an sm_90 GPU and head_dim = block_size = 128")
        wgs = _tile_warpgroups(rows, group)
        kernel = _jit.kernel("sparse_prefill_tile_sm90.cu", "sparse_prefill_tile_sm90_kernel",
                             (_jit.dtype_template(dtype), head_dim, group, block_size, wgs, stages, int(producer)),
                             arch_specific=True) if load else None
        return TilePrefillKernel(kernel, 128 * (wgs + producer), tokens, stages, head_dim, block_size, 1024,
                                 64 * wgs * head_dim * 2 if producer else 0)
    if producer:
        raise ValueError("a producer warpgroup is a variant of the wgmma tile-outer kernel only (sm_90, "
                         "head_dim = block_size = 128)")
    warps = _tile_warps(rows, group)
    kernel = _jit.kernel("sparse_prefill_tile.cu", "sparse_prefill_tile_kernel",
                         (_jit.dtype_template(dtype), head_dim, group, block_size, warps, stages)) if load else None
    return TilePrefillKernel(kernel, 32 * warps, tokens, stages, head_dim, 64, 0)


def launch_tile_prefill(tile: TilePrefillKernel, q, k, v, block_indices, cu_q, cu_k, tile_off, n_seq: int,
                        q_begin: int, rows: int, row_mode, out, lse, *, causal, scale_log2, pages=CONTIGUOUS_KEYS):
    """sparse_prefill_tile.cu: one CTA per (query tile, KV head) of the chunk of rows
    [q_begin, q_begin + rows) (block_indices: the chunk's rows), writing out and lse of its
    rows; row_mode None (every tile) or the classification (tiles marked 1)."""
    n_heads_q, n_heads_kv, top_k = q.shape[1], k.shape[-2], block_indices.shape[-1]
    n_tiles = chunk_tiles(rows, tile.tile_tokens, n_seq)
    tile.kernel((n_tiles * n_heads_kv,), (tile.threads,),
                (q, k, v, block_indices, cu_q, cu_k, tile_off, np.int32(n_seq), np.int32(q_begin), np.int32(rows),
                 np.int32(n_tiles), _nullable(row_mode), np.int32(top_k), out, lse, np.int32(n_heads_q),
                 np.int32(n_heads_kv), np.int32(bool(causal)), scale_log2, *pages),
                shared_mem=tile.smem_bytes(top_k))


def _nullable(array):
    """A device array argument, or a null pointer for None."""
    return np.uint64(0) if array is None else array


def combine_kernel(dtype, head_dim: int, group: int):
    tname = _jit.dtype_template(dtype)
    return _jit.kernel("combine.cu", "sparse_combine_kernel", (tname, head_dim, group, COMBINE_WARPS))


def launch_combine(part_o, part_lse, slot_pos, cu_q, n_seq, q_begin, rows, out, lse, *, head_dim, group, top_k,
                   row_mode=None, kernel=None):
    """combine.cu: the log-sum-exp merge of the <= K partials of each (query, head) of rows
    [q_begin, q_begin + rows) into out/lse, the partial rows at slot_pos (rows, Hkv, top_k);
    rows at or past cu_q[n_seq] are left alone.  row_mode (uint8 (rows, Hkv), or None): rows
    marked 1 belong to the tile-outer kernel and are left alone.  ``kernel``:
    combine_kernel(...) unless given (a plan passes a recorder)."""
    combine = kernel if kernel is not None else combine_kernel(out.dtype, head_dim, group)
    n_heads_q = out.shape[1]
    pairs = rows * n_heads_q
    combine((int(-(-pairs // (2 * COMBINE_WARPS))),), (32 * COMBINE_WARPS,),  # a half-warp per pair
            (part_o, part_lse, slot_pos, _nullable(row_mode), cu_q, np.int32(n_seq), np.int32(q_begin),
             np.int32(rows), np.int32(n_heads_q), np.int32(top_k), out, lse))


# --------------------------------------------------------------------------- the operation


def _chunk_rows(total_q, n_heads_q, top_k, head_dim, itemsize) -> int:
    """Query rows per chunk: its partials fit PARTIAL_BUDGET_BYTES and every partial row
    (and list position) fits 32 bits."""
    per_token = n_heads_q * top_k * head_dim * itemsize
    return int(max(1, min(total_q, PARTIAL_BUDGET_BYTES // per_token, (2**31 - 1) // (n_heads_q * top_k))))


def sparse_attention(q, k, v, block_indices, layout, cu_q, cu_k, *, block_size, causal, scale,
                     return_lse=True, pages=CONTIGUOUS_KEYS, tuning: SparseTuning = DEFAULT_TUNING,
                     stats: PhaseTimes | None = None):
    """(out (total_q, Hq, D) q.dtype, lse (total_q, Hq) float32) over the selected blocks.

    q (total_q, Hq, D), k/v (total_k, Hkv, D) contiguous CuPy fp16/bf16; block_indices
    (total_q, Hkv, K) int32, entries -1 or a valid block id of the query's sequence, read
    as a set (order free, duplicates count once); cu_q/cu_k device int32 (n_seq + 1);
    layout the host Layout.  lse is always computed (return_lse is accepted for symmetry).
    ``pages``: where k/v rows live (_layout.key_rows).  ``tuning``: a :class:`SparseTuning`
    (tests, benchmarks).  ``stats``: a :class:`PhaseTimes` to record the phases into.
    """
    import cupy

    total_q, n_heads_q, head_dim = q.shape
    n_heads_kv = k.shape[1]
    group = n_heads_q // n_heads_kv
    top_k = block_indices.shape[-1]
    if not supports(head_dim=head_dim, block_size=block_size, group_size=group, top_k=top_k):
        raise ValueError(f"no sparse attention kernel for head_dim={head_dim}, block_size={block_size}, "
                         f"group size={group}, top_k={top_k}")
    out = _empty(q.shape, q.dtype)
    lse = _empty((total_q, n_heads_q), np.float32)
    if total_q == 0:
        return out, lse
    block_indices = block_indices.reshape(total_q, n_heads_kv, top_k)
    n_blocks_total = _n_blocks_total(layout, block_size)
    if n_blocks_total == 0:  # no keys anywhere: every query sees nothing
        out.view(cupy.uint16).fill(0)
        lse.fill(-np.inf)
        return out, lse
    cu_q = cu_q.astype(cupy.int32, copy=False)
    cu_k = cu_k.astype(cupy.int32, copy=False)
    decode = tuning.path == "decode" or (tuning.path is None and layout.max_q <= DECODE_MAX_QUERIES)
    schedule = "kv" if decode else tuning.schedule
    tile = None
    if schedule != "kv":
        tile_args = dict(rows=tuning.tile_rows, stages=tuning.tile_stages, variant=tuning.tile_kernel,
                         producer=tuning.tile_producer)
        shape = tile_prefill_kernel(q.dtype, head_dim, group, block_size, **tile_args, load=False)
        if shape.fits(top_k):
            tile = tile_prefill_kernel(q.dtype, head_dim, group, block_size, **tile_args)
        elif schedule == "tile":
            raise ValueError(f"schedule='tile': the tile-outer kernel does not take top_k={top_k} with "
                             f"{shape.tile_tokens}-token tiles (at most {TILE_MAX_ENTRIES} ids per tile, and its "
                             f"shared memory must fit the device)")
        else:
            schedule = "kv"
    kv_outer = schedule != "tile"  # some picks go KV-outer (partials and combine)
    chunk = _chunk_rows(total_q, n_heads_q, top_k, head_dim, q.dtype.itemsize)
    if decode:
        attn, smem = decode_kernel(q.dtype, head_dim, group, block_size, top_k, tuning.decode_combine,
                                   pairs=min(chunk, total_q) * n_heads_kv)
    elif kv_outer:
        prefill = prefill_kernel(q.dtype, head_dim, group, block_size, variant=tuning.prefill_kernel,
                                 warps=tuning.prefill_warps, stages=tuning.prefill_stages, mt=tuning.prefill_mt)
    scale_log2 = np.float32(scale * LOG2E)
    kernel_args = dict(causal=causal, scale_log2=scale_log2, pages=pages)

    max_entries = chunk * n_heads_kv * top_k
    slot_pos = row_mode = None
    if kv_outer:
        part_o = _empty((max_entries * group * head_dim,), q.dtype)
        part_lse = _empty((max_entries * group,), np.float32)
    if decode:
        counters = cupy.zeros(chunk * n_heads_kv, cupy.uint32)  # left zero by each chunk's launch
    if kv_outer and not decode:
        list_q = cupy.empty(max_entries, cupy.int32)
        slot_pos = cupy.empty(max_entries, cupy.int32)
        block_off = block_offsets(cu_k, layout.n_seq, block_size)
        max_queries = prefill.tile_tokens * TILES_PER_ITEM
        index_buffers = {name: cupy.empty(shape, dt) for name, shape, dt in
                         reverse_index_buffers(max_entries, n_heads_kv * n_blocks_total, max_queries)}
    if tile is not None:
        tile_off = cupy.empty(layout.n_seq + 1, cupy.int32)
        if schedule == "auto":
            row_mode = cupy.empty((chunk, n_heads_kv), cupy.uint8)

    mark = stats.mark if stats is not None else lambda name: None
    for q_begin in range(0, total_q, chunk):
        rows = min(chunk, total_q - q_begin)
        bi = block_indices[q_begin:q_begin + rows]
        mark("start")
        if decode:  # one CTA per entry of block_indices: no reverse index
            mark("reverse_index")
            launch_decode(attn, smem, q, k, v, bi, cu_q, cu_k, layout.n_seq, q_begin, rows, part_o, part_lse,
                          counters, out, lse, **kernel_args)
        else:
            if tile is not None:  # the query tiles, and which of them run tile-outer
                query_tile_offsets(cu_q, layout.n_seq, q_begin, rows, tile.tile_tokens, tile_off)
                if row_mode is not None:
                    classify_query_tiles(bi, cu_q, cu_k, tile_off, layout.n_seq, q_begin, rows,
                                         tile_tokens=tile.tile_tokens, min_useful=tuning.tile_min_useful,
                                         row_mode=row_mode)
            if kv_outer:
                items = reverse_index(bi, cu_q, block_off, layout.n_seq, q_begin, rows, n_blocks_total=n_blocks_total,
                                      max_queries=max_queries, list_q=list_q, slot_pos=slot_pos, row_mode=row_mode,
                                      buffers=index_buffers)
            mark("reverse_index")
            if kv_outer:
                launch_prefill(prefill, q, k, v, items, list_q, cu_q, cu_k, block_off, layout.n_seq, n_blocks_total,
                               part_o, part_lse, **kernel_args)
            if tile is not None:
                launch_tile_prefill(tile, q, k, v, bi, cu_q, cu_k, tile_off, layout.n_seq, q_begin, rows, row_mode,
                                    out, lse, **kernel_args)
        mark("attention")
        if kv_outer and not decode:
            launch_combine(part_o, part_lse, slot_pos, cu_q, layout.n_seq, q_begin, rows, out, lse,
                           head_dim=head_dim, group=group, top_k=top_k, row_mode=row_mode)
        mark("combine")
    return out, lse
