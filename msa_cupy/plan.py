"""Decode plans: MSA decode and multi-token prediction over a KV cache, planned once and run
every step with kernel launches only, so that one captured CUDA graph serves every step.

    plan = msa_cupy.DecodePlan(max_batch=8, max_cache_len=1 << 20, num_q_heads=64, num_kv_heads=4,
                               head_dim=128, dtype="bfloat16", page_size=128, num_pages=65536)
    plan.workspace_bytes                  # known before anything is allocated
    plan.update(seq_lens, block_table)    # each step, outside any graph: host or device arrays
    out = plan.run(q, k_cache, v_cache)   # launches only: no sync, no allocation, capturable

A step is: (training-free index) the group mean of q, one launch; the fused selection over the
cached index keys (split-K: the last split of a row tile merges the partial lists); the split-K
decode attention over the picked blocks, whose last CTA per (row, KV head) does the
log-sum-exp combine.  Those merges count arrivals in the workspace (counters that start at
zero with it and are left at zero by every launch).  Grids depend on the batch size that
``update`` sets and on the plan's maxima, never on lengths: the kernels read the step's
lengths from ``cu_q``/``cu_k`` on the device, so nothing in ``run`` depends on host-side
lengths.

Caches.  Contiguous: ``k_cache``/``v_cache`` ``(max_batch, max_cache_len, Hkv, D)``, sequence
``s`` in row ``s`` (``index_k_cache`` ``(max_batch, max_cache_len, 1 | Hkv, Di)`` alike).  Paged:
``(num_pages, page_size, Hkv, D)`` with an int32 ``block_table`` ``(batch, pages)``: key ``j``
of sequence ``s`` is row ``j % page_size`` of page ``block_table[s, j // page_size]`` (page ids
arbitrary: permuted, shared prefix pages).  Both go through the same kernels (a contiguous
cache is one page per sequence).  The new tokens' keys must already be in the cache:
``seq_lens`` counts them, and the ``queries_per_seq`` queries of a sequence are its last
tokens (bottom-right causal, so MTP queries see each other causally).

Host cost.  The launches of a step are prepared once per batch size (``_jit.Launch``: grid,
block and the argument block that cuLaunchKernel reads); a step writes the addresses of its
arrays into those blocks and makes one driver call per kernel.  An argument is checked when
first seen and then known by (address, shape, strides, dtype, device) -- CuPy arrays and
PyTorch tensors -- so a step with the same arrays, or a new array in the same place with the
same layout (a length buffer rewritten in place, a tensor the allocator hands out again),
skips the checks and the DLPack import.  Host-array updates are written into a pinned staging
buffer and copied by one asynchronous copy on the caller's stream.  The one-call
``msa_cupy.attention`` runs decode shapes through plans too (``_plan_cache.py``).
"""
from __future__ import annotations

import contextlib
import math
import sys
import weakref

import numpy as np

from . import _interop, _jit, selection, sparse
from ._layout import CONTIGUOUS_KEYS, key_rows

UPDATE_THREADS = 256
MAX_QUERIES_PER_SEQ = 16  # multi-token prediction: up to 16 new queries per sequence
MAX_QUERY_TOKENS = 1 << 22  # chunked prefill: new tokens of a step (the update's int32 scans stay in range)
STAGING_BUFFERS = 4  # pinned buffers of host-array updates in flight at once, per plan
# PrefillPlan's default schedule: measured on 4,096-token chunks (H100, c2d72d4; docs/perf.md), graph
# replay kv / auto / tile 2.45 / 2.53 / 7.62 ms random and 2.45 / 2.60 / 2.37 coherent at 32K cached,
# 4.25 / 4.28 / 10.4 and 4.20 / 4.42 / 4.20 at 128K: kv is within 4% of the best
PREFILL_PLAN_SCHEDULE = "kv"
KEPT_PROGRAMS = 64  # prepared steps (and checked shapes) kept per plan: by batch size, query rows, splits
_ALIGN = 256  # bytes: every workspace view starts on a 256-byte boundary (16-byte loads need 16)
COUNTER_VIEWS = ("errors", "select_count", "decode_count")  # adjacent workspace views, zero at the start
_LENS = "seq_lens"  # the check of a device seq_lens array (the batch size comes from it)
_RUN = ("q", "k", "v", "out", "lse")  # what a step binds (the rest: the workspace, bound once)
_RUN_INDEX = _RUN + ("iq", "ik")
_CALL = ("q", "k", "v", "iq", "ik", "out", "lse", "ids", "cu_q", "cu_k", "k_len", "width")

_jit.declare("plan_update.cu", "plan_update_kernel", (UPDATE_THREADS,))
_jit.declare("plan_update.cu", "uniform_cu_seqlens")
_jit.declare("plan_update.cu", "bound_query_rows")
_jit.declare("group_mean.cu", "group_mean_kernel", ("bf16",), ("f16",))


def group_mean(q, index_q, n_groups: int, *, kernel=None):
    """Training-free index_q (rows, Hkv, D) = the mean of each group's query heads of q
    (rows, Hq, D), in one launch (group_mean.cu) on the current stream.  ``kernel``: the
    group_mean.cu kernel for q's dtype unless given (a decode plan passes a recorder)."""
    rows, n_heads, head_dim = q.shape
    n = rows * n_groups * (head_dim // 8)
    if n == 0:
        return index_q
    if kernel is None:
        kernel = _jit.kernel("group_mean.cu", "group_mean_kernel", (_jit.dtype_template(q.dtype),))
    kernel((-(-n // 256),), (256,), (q, index_q, np.int64(rows), np.int32(n_groups), np.int32(n_heads // n_groups),
                                     np.int32(head_dim)))
    return index_q


def launch_uniform_cu_seqlens(n_seq: int, q_len, k_len, cu_q, cu_k, *, kernel=None):
    """plan_update.cu uniform_cu_seqlens: cu_q/cu_k of n_seq sequences of q_len queries and
    k_len keys each, one launch on the current stream (``k_len`` may be a _jit.Scalar)."""
    kernel = kernel if kernel is not None else _jit.kernel("plan_update.cu", "uniform_cu_seqlens")
    kernel((max(1, min(-(-(n_seq + 1) // 256), 1024)),), (256,),
           (np.int32(n_seq), _jit.int32(q_len), _jit.int32(k_len), cu_q, cu_k))


def launch_bound_query_rows(cu_q, n_seq: int, rows: int, cu_q_run, errors, *, kernel=None):
    """plan_update.cu bound_query_rows: cu_q_run = min(cu_q, rows), one CTA on the current
    stream (a prefill plan passes a recorder)."""
    kernel = kernel if kernel is not None else _jit.kernel("plan_update.cu", "bound_query_rows")
    kernel((1,), (256,), (cu_q, np.int32(n_seq), np.int32(rows), cu_q_run, errors))


def uniform_cu_seqlens(n_seq: int, q_len: int, k_len: int):
    """Device (cu_q, cu_k) int32 of n_seq sequences of equal lengths, written by one launch on
    the current stream: a fresh pool allocation per call, so no cached array can be freed
    while queued kernels still read it."""
    import cupy

    cu = cupy.empty((2, n_seq + 1), cupy.int32)
    launch_uniform_cu_seqlens(n_seq, q_len, k_len, cu[0], cu[1])
    return cu[0], cu[1]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def workspace_layout(*, max_batch, rows, num_q_heads, num_kv_heads, head_dim, top_k, max_pages, dtype, splits,
                     training_free, attention="decode", n_buckets=0, max_queries=0, select_tiles=0) -> list:
    """The views of a cache plan's workspace, (name, shape, dtype), in allocation order, for
    steps of at most ``rows`` query rows; ``select_tiles``: the selection's row tiles (its
    merge counters, with split-K); ``attention``: "decode" (split-K: a partial (o, lse) per
    pick, and a combine counter per (row, KV head)) or a prefill plan's schedule: "tile"
    (tile-outer: bounded cu_q and the query tiles' offsets), "kv" (KV-outer: also a partial per
    pick, and the reverse index over ``n_buckets`` buckets cut into items of ``max_queries``
    tokens) or "auto" (both, and the tiles' classification)."""
    group = num_q_heads // num_kv_heads
    entries = rows * num_kv_heads * top_k
    views = [
        ("cu_q", (max_batch + 1,), np.int32),
        ("cu_k", (max_batch + 1,), np.int32),
        ("block_table", (max_batch, max_pages), np.int32),
        ("errors", (1,), np.int32),  # zeroed with the counters after it (COUNTER_VIEWS)
        ("select_count", (select_tiles if splits > 1 else 0,), np.uint32),
        ("decode_count", (rows * num_kv_heads if attention == "decode" else 0,), np.uint32),
        ("ids", (rows, num_kv_heads, top_k), np.int32),
        ("out", (rows, num_q_heads, head_dim), dtype),
        ("lse", (rows, num_q_heads), np.float32),
    ]
    if attention in ("decode", "kv", "auto"):
        views += [("part_lse", (entries * group,), np.float32), ("part_o", (entries * group * head_dim,), dtype)]
    if attention != "decode":
        views += [("cu_q_run", (max_batch + 1,), np.int32), ("tile_off", (max_batch + 1,), np.int32)]
    if attention in ("kv", "auto"):
        views += [("block_off", (max_batch + 1,), np.int32), ("list_q", (entries,), np.int32),
                  ("slot_pos", (entries,), np.int32)]
        views += sparse.reverse_index_buffers(entries, n_buckets, max_queries)
    if attention == "auto":
        views.append(("row_mode", (rows, num_kv_heads), np.uint8))
    if splits > 1:
        views.append(("partial", (rows, num_kv_heads, splits, top_k), np.uint64))
    if training_free:
        views.append(("index_q", (rows, num_kv_heads, head_dim), dtype))
    return views


def workspace_bytes(views) -> int:
    """Bytes of one allocation holding every view, each on a 256-byte boundary."""
    return sum(_aligned(math.prod(shape) * np.dtype(dt).itemsize) for _, shape, dt in views)


def workspace_offsets(views) -> dict:
    """Byte offset of each view in the workspace."""
    offsets, offset = {}, 0
    for name, shape, dt in views:
        offsets[name] = offset
        offset += _aligned(math.prod(shape) * np.dtype(dt).itemsize)
    return offsets


def rows_fit(max_cache_len: int, cache_rows: int, block_size: int) -> bool:
    """The kernels' 32-bit key-row ids reach every row: a cache of cache_rows rows (pages x page
    size; a contiguous cache is max_batch pages of max_cache_len) and keys up to a block past
    max_cache_len."""
    return max_cache_len <= 2**31 - 1 - block_size and cache_rows <= 2**31 - 1


def _dtype_of(dtype):
    """float16 / bfloat16 from a NumPy, CuPy, PyTorch or JAX dtype or its name."""
    name = str(getattr(dtype, "name", dtype)).split(".")[-1]
    found = {"float16": np.dtype(np.float16), "half": np.dtype(np.float16), "bfloat16": _interop.BFLOAT16}.get(name)
    if found is None:
        raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
    return found


def pack_host_update(seq_lens, block_table, cu_q, cu_k, table, *, max_cache_len, queries_per_seq, paged, page_size,
                     num_pages, query_lens=None, max_rows=None) -> int:
    """Check host ``seq_lens`` (and ``block_table``, and for chunked prefill ``query_lens``, at
    most ``max_rows`` in all) and write the step into the int32 views ``cu_q``/``cu_k``
    (max_batch + 1) and ``table`` (max_batch, max_pages), rows [0, batch): what
    plan_update.cu computes from device arrays, with a ValueError naming any bad entry instead
    of a clamp.  Returns the batch size."""
    lens = np.asarray(seq_lens)
    if lens.ndim != 1 or lens.dtype.kind not in "iu":
        raise ValueError(f"seq_lens must be a 1-D integer array, got {lens.dtype} of shape {lens.shape}")
    max_batch = table.shape[0]
    batch = int(lens.shape[0])
    if not 1 <= batch <= max_batch:
        raise ValueError(f"seq_lens must hold 1 to max_batch ({max_batch}) lengths, got {batch}")
    lens = lens.astype(np.int64)
    bad = np.flatnonzero((lens < 0) | (lens > max_cache_len))
    if bad.size:
        raise ValueError(f"seq_lens[{bad[0]}] = {lens[bad[0]]} is outside [0, max_cache_len = {max_cache_len}]")
    if query_lens is not None:
        q_lens = _host_query_lens(query_lens, batch, max_rows)
    if paged:
        bt = np.asarray(block_table.get() if hasattr(block_table, "get") else block_table)
        if bt.ndim != 2 or bt.shape[0] != batch or bt.dtype.kind not in "iu":
            raise ValueError(f"block_table must be an integer array of shape ({batch}, pages), got {bt.dtype} of "
                             f"shape {bt.shape}")
        need = -(-lens // page_size)
        cols = int(need.max(initial=0))
        if cols > bt.shape[1]:
            s = int(np.argmax(need > bt.shape[1]))
            raise ValueError(f"block_table has {bt.shape[1]} pages per sequence but sequence {s} needs "
                             f"{int(need[s])} for {int(lens[s])} keys")
        used = np.arange(cols)[None, :] < need[:, None]  # pages past a sequence's keys are never read
        sub = bt[:, :cols]
        out_of_range = used & ((sub < 0) | (sub >= num_pages))
        if out_of_range.any():
            s, p = map(int, np.argwhere(out_of_range)[0])
            raise ValueError(f"block_table[{s}, {p}] = {int(bt[s, p])} is not a page id in [0, num_pages = "
                             f"{num_pages})")
        table[:batch, :cols] = np.where(used, sub, 0)
        table[:batch, cols:] = 0
    else:
        table[:batch, 0] = np.arange(batch)  # one page per sequence: its row of the cache
    cu_q[0] = cu_k[0] = 0
    cu_q[1:batch + 1] = np.arange(1, batch + 1) * queries_per_seq if query_lens is None else np.cumsum(q_lens)
    cu_k[1:batch + 1] = np.cumsum(lens)
    return batch


def _host_query_lens(query_lens, batch: int, max_rows: int) -> np.ndarray:
    q_lens = np.asarray(query_lens)
    if q_lens.ndim != 1 or q_lens.dtype.kind not in "iu" or q_lens.shape[0] != batch:
        raise ValueError(f"query_lens must be a 1-D integer array of {batch} lengths (one per seq_lens entry), "
                         f"got {q_lens.dtype} of shape {q_lens.shape}")
    q_lens = q_lens.astype(np.int64)
    bad = np.flatnonzero(q_lens < 0)
    if bad.size:
        raise ValueError(f"query_lens[{bad[0]}] = {q_lens[bad[0]]} is negative")
    if q_lens.sum() > max_rows:
        raise ValueError(f"query_lens sum to {int(q_lens.sum())}, more than max_query_tokens ({max_rows})")
    return q_lens


class StagingRing:
    """Pinned host buffers for host-array updates.  A buffer is written again only after the
    copy that last read it has completed (an event recorded after that copy on its stream).
    While every buffer is in flight a new one is added, up to ``limit``; past that the oldest
    is waited for (a host sync, only when the host runs that far ahead of the GPU).
    ``new_buffer()`` and ``new_event()`` make the pieces; an event has ``done``,
    ``record(stream)`` and ``synchronize()``."""

    def __init__(self, new_buffer, new_event, limit=STAGING_BUFFERS):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._new_buffer, self._new_event, self.limit = new_buffer, new_event, limit
        self.buffers, self.events = [], []
        self._stamps = []  # when each buffer's copy was queued: the oldest goes first
        self._clock = 0
        # buffers must outlive the copies that read them: waited for before they are freed
        weakref.finalize(self, _drain, self.events, self.buffers)

    def acquire(self) -> int:
        """The index of a buffer no copy reads any more."""
        oldest_first = sorted(range(len(self.buffers)), key=self._stamps.__getitem__)
        for i in oldest_first:
            if self.events[i].done:
                return i
        if len(self.buffers) < self.limit:
            self.buffers.append(self._new_buffer())
            self.events.append(self._new_event())
            self._stamps.append(-1)
            return len(self.buffers) - 1
        i = oldest_first[0]
        self.events[i].synchronize()
        return i

    def release(self, i: int, stream: int):
        """Buffer i was just read by a copy queued on stream: record its event there."""
        self.events[i].record(stream)
        self._clock += 1
        self._stamps[i] = self._clock


def _drain(events, buffers):
    for event in events:
        with contextlib.suppress(Exception):  # a CUDA context already torn down at exit
            event.synchronize()
    buffers.clear()


class _StreamEvent:
    """A CUDA event recorded on a raw stream handle (PyTorch's streams included)."""

    def __init__(self):
        import cupy

        self.event = cupy.cuda.Event(block=False, disable_timing=True)

    @property
    def done(self) -> bool:
        return self.event.done

    def record(self, stream: int):
        import cupy

        cupy.cuda.runtime.eventRecord(self.event.ptr, stream)

    def synchronize(self):
        self.event.synchronize()


class _Staged:
    """A pinned buffer laid out like the head of the workspace (cu_q, cu_k, block_table)."""

    def __init__(self, nbytes, offsets, max_batch, max_pages):
        from cupy.cuda import pinned_memory

        self.memory = pinned_memory.PinnedMemory(nbytes)  # unpooled: freed only with this object
        pointer = pinned_memory.PinnedMemoryPointer(self.memory, 0)
        self.ptr = pointer.ptr
        raw = np.frombuffer(pointer, np.uint8, nbytes)
        cells = max_batch + 1
        self.cu_q = raw[offsets["cu_q"]:offsets["cu_q"] + 4 * cells].view(np.int32)
        self.cu_k = raw[offsets["cu_k"]:offsets["cu_k"] + 4 * cells].view(np.int32)
        start = offsets["block_table"]
        self.table = raw[start:start + 4 * max_batch * max_pages].view(np.int32).reshape(max_batch, max_pages)


_ndarray = None  # cupy.ndarray, set when a plan is made


def _host_array(x) -> bool:
    """Host lengths (checked and copied through pinned staging) rather than a device array."""
    return isinstance(x, (list, tuple, np.ndarray)) or np.isscalar(x)


def _array_key(x):
    """What the checks of a CuPy array or PyTorch tensor depend on: address, device, shape,
    strides, dtype (None for other arrays: they are checked at every call)."""
    if type(x) is _ndarray:
        mem = x.data
        return (mem.ptr, mem.device_id, x.shape, x.strides, x.dtype)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return (x.data_ptr(), x.get_device(), tuple(x.shape), x.stride(), x.dtype, x.requires_grad)
    return None


class _Wants:
    """The shapes a step checks its per-step arrays against: q rows shaped ``prefix``
    ((batch, queries_per_seq) for decode, (tokens,) for chunked prefill)."""

    def __init__(self, plan, prefix):
        self.q = ((*prefix, plan.num_q_heads, plan.head_dim), plan.dtype)
        self.index_q = ((*prefix, plan.num_kv_heads, plan.index_dim), plan.dtype)
        self.lse = ((*prefix, plan.num_q_heads), np.dtype(np.float32))


class _CachePlan:
    """What decode and chunked-prefill plans share: MSA attention over a KV cache (contiguous
    or paged) for up to ``max_batch`` sequences of up to ``max_cache_len`` keys, the workspace
    (sized at construction, allocated once), ``update`` of the step's lengths and block table,
    and ``run`` as prepared launches (see the module docstring).  Subclasses set the queries
    of a step (:meth:`_query_bounds`, :meth:`_prefix`) and the attention stage
    (:meth:`_init_attention`, :meth:`_attention_launches`)."""

    _attention = "decode"  # workspace_layout's attention views

    def __init__(self, *, max_batch, max_cache_len, num_q_heads, num_kv_heads, head_dim, dtype, index_dim,
                 index_k_heads, block_size, top_k, local_blocks, sink_blocks, page_size, num_pages, scale):
        check = _interop.check_int
        self.max_batch = check("max_batch", max_batch, minimum=1)
        self.max_cache_len = check("max_cache_len", max_cache_len, minimum=1)
        self.num_q_heads = check("num_q_heads", num_q_heads, minimum=1)
        self.num_kv_heads = check("num_kv_heads", num_kv_heads, minimum=1)
        self.head_dim = check("head_dim", head_dim, minimum=1)
        max_q, self.max_rows = self._query_bounds()  # queries of a sequence, query rows of a step
        self.top_k, self.block_size, self.local_blocks, self.sink_blocks = _interop.check_selection_options(
            top_k, block_size, local_blocks, sink_blocks, gpu=True)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.group_size = self.num_q_heads // self.num_kv_heads
        if self.head_dim not in sparse.SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {sparse.SUPPORTED_HEAD_DIMS}, got {self.head_dim}")
        if self.group_size not in sparse.SUPPORTED_GROUP_SIZES:
            raise ValueError(f"num_q_heads / num_kv_heads must be one of {sparse.SUPPORTED_GROUP_SIZES} for "
                             f"{type(self).__name__}, got {self.group_size}")
        if self.top_k > _interop.SELECT_KERNEL_MAX_TOP_K:
            raise ValueError(f"top_k must be <= {_interop.SELECT_KERNEL_MAX_TOP_K} for {type(self).__name__}, "
                             f"got {self.top_k}")
        self.dtype = _dtype_of(dtype)
        self.training_free = index_dim is None
        self.index_dim = self.head_dim if self.training_free else check("index_dim", index_dim, minimum=1)
        self.index_k_heads = self.num_kv_heads if self.training_free else check("index_k_heads", index_k_heads,
                                                                                minimum=1)
        if self.index_dim not in selection.INDEX_DIMS:
            raise ValueError(f"index_dim must be one of {selection.INDEX_DIMS}, got {self.index_dim}")
        if self.index_k_heads not in (1, self.num_kv_heads):
            raise ValueError(f"index_k_heads must be 1 (shared) or num_kv_heads ({self.num_kv_heads}), "
                             f"got {self.index_k_heads}")
        self.scale = _interop.check_scale(scale, self.head_dim)
        if page_size is None:
            if num_pages is not None:
                raise ValueError("num_pages is given without page_size: a paged cache needs both")
            self.paged, self.page_size, self.max_pages, self.num_pages = False, self.max_cache_len, 1, self.max_batch
        else:
            self.paged = True
            self.page_size = check("page_size", page_size, minimum=1)
            if num_pages is None:
                raise ValueError("a paged cache needs num_pages (the page count of k_cache/v_cache)")
            self.num_pages = check("num_pages", num_pages, minimum=1)
            self.max_pages = -(-self.max_cache_len // self.page_size)
        if not rows_fit(self.max_cache_len, self.num_pages * self.page_size, self.block_size):
            raise ValueError("max_cache_len and num_pages * page_size must stay below 2^31 rows")
        self._check_attention()

        global _ndarray
        cp = self._cp = _interop.require_cupy()
        _ndarray = cp.ndarray
        self.device = cp.cuda.runtime.getDevice()
        self._select = selection.select_config(
            dtype=self.dtype, index_dim=self.index_dim, block_size=self.block_size, n_heads=self.num_kv_heads,
            k_heads=self.index_k_heads, n_seq=self.max_batch, max_q=max_q, max_k=self.max_cache_len,
            top_k=self.top_k, epilogue=selection.EPI_TOPK)
        self._kernels = {
            "update": _jit.kernel("plan_update.cu", "plan_update_kernel", (UPDATE_THREADS,)),
            "mean": (_jit.kernel("group_mean.cu", "group_mean_kernel", (_jit.dtype_template(self.dtype),))
                     if self.training_free else None),
        }
        self._select.kernel.reserve_shared(self._select.smem)
        self._init_attention()
        cache = (self.num_pages, self.page_size) if self.paged else (self.max_batch, self.max_cache_len)
        self._want_kv = ((*cache, self.num_kv_heads, self.head_dim), self.dtype)
        self._want_index_k = ((*cache, self.index_k_heads, self.index_dim), self.dtype)
        self._size_workspace(self._select.splits)
        self._sm_count = selection._sm_count()
        self._raw = self._base = self._ws = None
        self._batch = None
        self._programs: dict = {}  # ("update" | "run" | "call", ...) -> _jit.Program
        self._wants: dict = {}  # q prefix -> _Wants
        self._seen: dict = {}  # argument name -> (key, want, checked result)
        self._results: dict = {}  # (name, q prefix, type) -> (workspace view in the caller's type, its key)
        self._staging = None
        self._last_prefix = None  # the q prefix of the last run

    # ------------------------------------------------------------------ what subclasses set

    def _query_bounds(self) -> tuple:
        """(queries of one sequence, query rows of one step) at most, from the checked arguments."""
        raise NotImplementedError

    def _check_attention(self):
        """Argument checks of the attention stage, before any GPU work."""

    def _init_attention(self):
        """Load the attention stage's kernels (before any capture) and reserve their shared memory."""
        raise NotImplementedError

    def _prefix(self, batch: int, q) -> tuple:
        """The leading dims of the step's q (and out, lse, index_q)."""
        raise NotImplementedError

    def _attention_launches(self, record, launches, *, n_seq, rows, q, k, v, ids, cu_q, cu_k, pages, out, lse):
        """Record the attention stage of a step (Pointer stand-ins) into launches."""
        raise NotImplementedError

    def _step_cu_q(self, record, n_seq: int, rows: int, cu_q):
        """The cu_q the step's kernels read (a subclass may bound it by the q rows first)."""
        return cu_q

    def _attention_sizes(self) -> dict:
        """workspace_layout's sizes of the attention stage beyond the plan's maxima."""
        return {}

    def _size_workspace(self, splits: int):
        self._views = workspace_layout(
            max_batch=self.max_batch, rows=self.max_rows, num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, top_k=self.top_k, max_pages=self.max_pages,
            dtype=self.dtype, splits=splits, training_free=self.training_free, attention=self._attention,
            select_tiles=selection.merge_counters(self._select, self.max_batch), **self._attention_sizes())
        self.workspace_bytes = workspace_bytes(self._views)
        self._offsets = workspace_offsets(self._views)
        # (offset, bytes) of the adjacent counter views: one memset zeroes them all
        self._counter_span = (self._offsets[COUNTER_VIEWS[0]],
                              workspace_bytes([v for v in self._views if v[0] in COUNTER_VIEWS]))

    # ------------------------------------------------------------------ workspace

    def allocate(self):
        """Allocate the workspace (``workspace_bytes``) on the plan's device, once."""
        if self._raw is not None:
            return self
        cp = self._cp
        with cp.cuda.Device(self.device):
            self._use(cp.empty(self.workspace_bytes, cp.uint8))
            self._zero_counters(self._base, cp.cuda.get_current_stream().ptr)
        return self

    @_interop.outside_torch_compile()
    def use_workspace(self, raw, *, carry_over=False):
        """Run on a caller's workspace instead of the plan's own: ``raw`` a contiguous uint8 GPU
        array of at least ``workspace_bytes`` on the plan's device (e.g. a buffer XLA or
        PyTorch's allocator handed out), owned by the caller and live while queued work reads
        it.  Nothing is kept from an earlier workspace: call :meth:`update` next.  Allocates
        nothing; one memset on the caller's stream zeroes the clamp and merge counters.

        ``carry_over=True``: ``raw`` holds a copy of the current workspace's bytes (a framework
        moved the buffer); the step set by the last :meth:`update` and the counter carry over,
        and nothing is launched."""
        cp = self._cp
        if carry_over and self._raw is None:
            raise RuntimeError("carry_over=True needs a workspace to carry over from")
        with cp.cuda.Device(self.device), self._stream_context(raw):  # DLPack import on the caller's stream too
            arr = self._device_array("workspace", raw)
            if np.dtype(arr.dtype) != np.uint8 or arr.ndim != 1 or arr.size < self.workspace_bytes:
                raise ValueError(f"workspace must be a 1-D uint8 array of at least {self.workspace_bytes} bytes, "
                                 f"got {arr.dtype} of shape {tuple(arr.shape)}")
            _interop.check_contiguous("workspace", arr)
            if arr.data.ptr % _ALIGN:
                raise ValueError(f"workspace must start on a {_ALIGN}-byte boundary")
            if self._raw is not None and (arr.data.ptr, arr.size) == (self._base, self._raw.size):
                self._raw = arr  # the same memory handed in again (a JAX loop, every step): views kept
            else:
                self._use(arr)
            if not carry_over:
                self._zero_counters(self._base, cp.cuda.get_current_stream().ptr)
                self._batch = self._last_prefix = None
        return self

    def _use(self, raw):
        self._raw, self._base, self._ws = raw, raw.data.ptr, None
        self._results.clear()

    def _zero_counters(self, base: int, stream: int):
        """One memset of the clamp counter and the merge counters (adjacent views) of the
        workspace at base."""
        offset, nbytes = self._counter_span
        self._cp.cuda.runtime.memsetAsync(base + offset, 0, nbytes, stream)

    def _carve(self, raw) -> dict:
        ws = {}
        for name, shape, dt in self._views:
            offset, nbytes = self._offsets[name], math.prod(shape) * np.dtype(dt).itemsize
            ws[name] = raw[offset:offset + nbytes].view(dt).reshape(shape)
        ws["raw"] = raw
        return ws

    @property
    def workspace(self) -> dict:
        """The workspace views (CuPy arrays), e.g. ``out``, ``lse``, ``ids``, ``cu_k``, ``block_table``."""
        self.allocate()
        if self._ws is None:
            self._ws = self._carve(self._raw)
        return self._ws

    # ------------------------------------------------------------------ per step

    def _update(self, seq_lens, query_lens, block_table):
        if self.paged and block_table is None:
            raise ValueError("block_table is required for a paged plan")
        if not self.paged and block_table is not None:
            raise ValueError("block_table is given but the plan has no page_size (contiguous cache)")
        cp = self._cp
        if cp.cuda.runtime.getDevice() != self.device:
            with cp.cuda.Device(self.device):
                return self._update(seq_lens, query_lens, block_table)
        if self._raw is None:
            self.allocate()
        host = _host_array(seq_lens)
        if query_lens is not None and _host_array(query_lens) != host:
            raise ValueError("seq_lens and query_lens must both be host arrays or both device arrays")
        if host:
            self._update_from_host(seq_lens, query_lens, block_table, self._stream(block_table))
            return self
        lens, batch = self._arg("seq_lens", seq_lens, _LENS)
        table, cols = self._arg("block_table", block_table, ("block_table", batch)) if self.paged else (0, 0)
        if query_lens is not None:
            q_lens, q_batch = self._arg("query_lens", query_lens, _LENS)
            if q_batch != batch:
                raise ValueError(f"query_lens must hold one length per sequence ({batch}), got {q_batch}")
        program = self._program(("update", batch, cols, query_lens is not None))
        self._bind_workspace(program)
        program.bind("seq_lens", lens)
        program.bind("table_in", table)
        if query_lens is not None:
            program.bind("query_lens", q_lens)
        _jit.launch_ready(self.device)
        program(self._stream(seq_lens))
        self._batch = batch
        return self

    def _update_from_host(self, seq_lens, query_lens, block_table, stream):
        staging = self._staging
        if staging is None:
            nbytes = self._offsets["block_table"] + 4 * self.max_batch * self.max_pages
            staging = self._staging = StagingRing(
                lambda: _Staged(nbytes, self._offsets, self.max_batch, self.max_pages), _StreamEvent)
        i = staging.acquire()
        buf = staging.buffers[i]
        batch = pack_host_update(seq_lens, block_table, buf.cu_q, buf.cu_k, buf.table,
                                 max_cache_len=self.max_cache_len, queries_per_seq=self.max_rows // self.max_batch,
                                 paged=self.paged, page_size=self.page_size, num_pages=self.num_pages,
                                 query_lens=query_lens, max_rows=self.max_rows)
        # cu_q, cu_k and the step's rows of the table in one copy: the buffer mirrors the workspace
        nbytes = self._offsets["block_table"] + 4 * batch * self.max_pages
        runtime = self._cp.cuda.runtime
        runtime.memcpyAsync(self._base, buf.ptr, nbytes, runtime.memcpyHostToDevice, stream)
        staging.release(i, stream)
        self._batch = batch

    def _check_batch(self, name, shape, ndim, dtype) -> int:
        if ndim != 1 or np.dtype(dtype) != np.int32:
            raise ValueError(f"{name} must be a 1-D int32 array, got {np.dtype(dtype)} of shape {tuple(shape)}")
        batch = int(shape[0])
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"{name} must hold 1 to max_batch ({self.max_batch}) lengths, got {batch}")
        return batch

    def clamped_entries(self) -> int:
        """How many lengths and page ids the device-side updates clamped so far, and for a
        prefill plan the runs whose tokens passed q's rows (a sync)."""
        return int(self.workspace["errors"].get()[0])

    def _run(self, q, k_cache, v_cache, index_q, index_k_cache, out, lse, return_lse):
        batch = self._batch
        if batch is None:
            raise RuntimeError(f"{type(self).__name__}.run needs update(seq_lens, ...) first")
        cp = self._cp
        if cp.cuda.runtime.getDevice() != self.device:
            with cp.cuda.Device(self.device):
                return self._run(q, k_cache, v_cache, index_q, index_k_cache, out, lse, return_lse)
        prefix = self._prefix(batch, q)
        wants = self._wants_of(prefix)
        arg = self._arg
        ptr_q = arg("q", q, wants.q)
        ptr_k = arg("k_cache", k_cache, self._want_kv)
        ptr_v = arg("v_cache", v_cache, self._want_kv)
        if self.training_free:
            if index_q is not None or index_k_cache is not None:
                raise ValueError("this plan uses the training-free index (no index_dim): pass no index_q / "
                                 "index_k_cache")
        else:
            if index_q is None or index_k_cache is None:
                raise ValueError("this plan has a learned index (index_dim): run needs index_q and index_k_cache")
            ptr_iq = arg("index_q", index_q, wants.index_q)
            ptr_ik = arg("index_k_cache", index_k_cache, self._want_index_k)
        ptr_out = self._base + self._offsets["out"] if out is None else arg("out", out, wants.q)
        ptr_lse = self._base + self._offsets["lse"] if lse is None else arg("lse", lse, wants.lse)
        program = self._program(("run", batch, math.prod(prefix)))
        self._bind_workspace(program)
        if self.training_free:
            program.binder(_RUN)(ptr_q, ptr_k, ptr_v, ptr_out, ptr_lse)
        else:
            program.binder(_RUN_INDEX)(ptr_q, ptr_k, ptr_v, ptr_out, ptr_lse, ptr_iq, ptr_ik)
        _jit.launch_ready(self.device)
        program(self._stream(q))
        self._last_prefix = prefix
        result = self._result("out", out, q, prefix)
        if return_lse:
            return result, self._result("lse", lse, q, prefix)
        return result

    def _ids_view(self, prefix):
        return self.workspace["ids"][:math.prod(prefix)].reshape(*prefix, self.num_kv_heads, self.top_k)

    # ------------------------------------------------------------------ prepared launches

    def _wants_of(self, prefix) -> _Wants:
        wants = self._wants.get(prefix)
        if wants is None:
            if len(self._wants) >= KEPT_PROGRAMS:  # a prefill plan sees a prefix per chunk size
                self._wants.clear()
            wants = self._wants[prefix] = _Wants(self, prefix)
        return wants

    def _program(self, key) -> _jit.Program:
        program = self._programs.get(key)
        if program is None:
            if len(self._programs) >= KEPT_PROGRAMS:
                self._programs.clear()
            if key[0] == "update":
                launches = [self._update_launch(*key[1:])]
            elif key[0] == "run":
                launches = self._step_launches(key[1], key[2], self._select.splits, paged_keys=True, uniform=False)
            else:
                launches = self._step_launches(*key[1:4], paged_keys=False, uniform=key[4])
            program = self._programs[key] = _jit.Program(launches)
        return program

    def _bind_workspace(self, program, base=None):
        """Bind the workspace views' addresses (once per program and workspace)."""
        base = self._base if base is None else base
        if program.tag != base:
            for name, offset in self._offsets.items():
                program.bind(name, base + offset)
            program.tag = base

    def _update_launch(self, batch, cols, query_lens):
        P = _jit.Pointer
        grid = 1 + min(-(-batch * self.max_pages // UPDATE_THREADS), 1023)
        i32 = np.int32
        return _jit.Launch(self._kernels["update"], (grid,), (UPDATE_THREADS,), (
            P("seq_lens"), P("query_lens") if query_lens else np.uint64(0),
            P("table_in") if self.paged else np.uint64(0),
            i32(cols), i32(batch), i32(self.max_rows // self.max_batch), i32(self.max_rows), i32(self.max_cache_len),
            i32(self.page_size), i32(self.max_pages), i32(self.num_pages), P("cu_q"), P("cu_k"), P("block_table"),
            P("errors")))

    def _step_launches(self, n_seq, rows, splits, *, paged_keys, uniform) -> list:
        """The launches of one step through the stage functions, with Pointer stand-ins for
        every array: [cu_seqlens (uniform one-call)], [the cu_q bound], [group mean], select,
        the attention stage.  Keys through the plan's block table (paged_keys), or
        contiguous by cu_k."""
        P, dt = _jit.Pointer, self.dtype
        hq, hkv, d, top_k = self.num_q_heads, self.num_kv_heads, self.head_dim, self.top_k
        q, k, v = P("q", (rows, hq, d), dt), P("k", (0, hkv, d), dt), P("v", (0, hkv, d), dt)
        ids = P("ids", (rows, hkv, top_k), np.int32)
        cu_q, cu_k = P("cu_q", (n_seq + 1,), np.int32), P("cu_k", (n_seq + 1,), np.int32)
        pages = key_rows(P("block_table"), self.max_pages, self.page_size) if paged_keys else CONTIGUOUS_KEYS
        launches = []

        def record(kernel, launch, *args, **kwargs):
            recorder = _jit.Recorder(kernel)
            launch(*args, kernel=recorder, **kwargs)
            launches.append(recorder.launch)

        if uniform:
            record(self._kernels["uniform"], launch_uniform_cu_seqlens, n_seq, self.queries_per_seq,
                   _jit.Scalar("k_len", np.int32), cu_q, cu_k)
        cu_q = self._step_cu_q(record, n_seq, rows, cu_q)
        if self.training_free:
            index_q, index_k = P("index_q", (rows, hkv, d), dt), k
            record(self._kernels["mean"], group_mean, q, index_q, hkv)
        else:
            index_q = P("iq", (rows, hkv, self.index_dim), dt)
            index_k = P("ik", (0, self.index_k_heads, self.index_dim), dt)
        split_k = splits > 1
        partial = P("partial", (rows, hkv, splits, top_k), np.uint64) if split_k else None
        select = _jit.Recorder(self._select.kernel)
        width = 0 if paged_keys else _jit.Scalar("width", np.int32)  # one-call: as the earlier path passes it
        selection.launch_select(self._select._replace(kernel=select, splits=splits), index_q, index_k, cu_q, cu_k,
                                n_seq, causal=True, width=width, top_k=top_k, local_blocks=self.local_blocks,
                                sink_blocks=self.sink_blocks, ids_out=ids, partial=partial,
                                counters=P("select_count") if split_k else None, pages=pages)
        launches.append(select.launch)
        self._attention_launches(record, launches, n_seq=n_seq, rows=rows, q=q, k=k, v=v, ids=ids, cu_q=cu_q,
                                 cu_k=cu_k, pages=pages, out=P("out", (rows, hq, d), dt),
                                 lse=P("lse", (rows, hq), np.float32))
        return launches

    # ------------------------------------------------------------------ arguments (host cost counts)

    def _arg(self, name, x, want):
        """The checked device address of argument x (for seq_lens and block_table: (address,
        batch) and (address, columns)), from what an earlier call checked when x has the same
        key (address, shape, strides, dtype, device)."""
        key = _array_key(x)
        seen = self._seen.get(name)
        if key is not None and seen is not None and seen[0] == key and seen[1] == want:
            return seen[2]
        with self._stream_context(x):  # a DLPack import ordered on the caller's stream
            arr = self._device_array(name, x)
        if want is _LENS:
            batch = self._check_batch(name, arr.shape, arr.ndim, arr.dtype)
            if not arr.flags.c_contiguous:  # read as int32 one by one: any int32 offset will do
                raise ValueError(f"{name} must be C-contiguous, got strides {tuple(arr.strides)} for shape "
                                 f"{tuple(arr.shape)}: make a contiguous copy first")
            found = (arr.data.ptr, batch)
        elif isinstance(want[0], str):  # the block table of `batch` sequences
            batch = want[1]
            if arr.ndim != 2 or arr.shape[0] != batch or np.dtype(arr.dtype) != np.int32:
                raise ValueError(f"block_table must be int32 of shape ({batch}, pages), got {arr.dtype} "
                                 f"{tuple(arr.shape)}")
            _interop.check_contiguous(name, arr)
            found = (arr.data.ptr, int(arr.shape[1]))
        else:
            self._check_array(name, arr, *want)
            found = arr.data.ptr
        if key is not None:
            self._seen[name] = (key, want, found)
        return found

    def _device_array(self, name, x):
        cp = self._cp
        if isinstance(x, cp.ndarray):
            arr = x
        else:
            kind = _interop.framework_of(name, x)
            if kind == "numpy":
                raise TypeError(f"{name} is a NumPy array: {type(self).__name__}.run takes GPU arrays")
            _interop._check_on_cuda(name, x, kind)
            arr = _interop._from_dlpack(name, x)
        if arr.device.id != self.device:
            raise ValueError(f"{name} is on GPU {arr.device.id}, the plan on GPU {self.device}")
        return arr

    def _check_array(self, name, arr, shape, dtype=None):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(arr.shape)}")
        if np.dtype(arr.dtype) != np.dtype(dtype or self.dtype):
            raise TypeError(f"{name} must have dtype {np.dtype(dtype or self.dtype)}, got {arr.dtype}")
        _interop.check_contiguous(name, arr)

    @staticmethod
    def _torch_tensor(x) -> bool:
        if type(x) is _ndarray or x is None:
            return False
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    def _stream(self, x) -> int:
        """The caller's stream: PyTorch's current stream for torch tensors, else CuPy's current."""
        if self._torch_tensor(x):
            import torch

            return _interop.torch_stream_handle(torch.cuda.current_stream(self.device))[0]
        return self._cp.cuda.get_current_stream().ptr

    def _stream_context(self, x):
        """PyTorch's current stream as CuPy's for torch tensors (DLPack in and out), else nothing."""
        if not self._torch_tensor(x):
            return contextlib.nullcontext()
        return _interop.torch_stream(self.device)

    def _result(self, name, given, like, prefix):
        """out / lse for the caller: the caller's own array if given (in like's framework), else
        the workspace view as like's array type (made once per q prefix and workspace)."""
        if given is not None:
            if type(given) is type(like):
                return given
            with self._stream_context(like):
                return self._wrap(like, self._device_array(name, given))
        key = (name, prefix, type(like))
        hit = self._results.get(key)
        if hit is not None and _array_key(hit[0]) == hit[1]:  # not reshaped or resized since
            return hit[0]
        if len(self._results) >= 2 * KEPT_PROGRAMS:
            self._results.clear()
        view = self.workspace[name][:math.prod(prefix)]
        view = view.reshape(*prefix, *view.shape[1:])
        with self._stream_context(like):
            result = self._wrap(like, view)
        self._results[key] = (result, _array_key(result))
        return result

    @staticmethod
    def _wrap(like, result):
        return _interop.wrap_as(_interop.framework_of("q", like), result)


_INDEX_DOC = """    Without ``index_dim`` the plan uses the training-free index (index_q = the mean of each
    group's query heads, index keys = the group's own key head: an approximation, not the
    trained MSA index); with it, ``run`` takes ``index_q`` and an ``index_k_cache`` laid out
    like the K cache with ``index_k_heads`` (1, shared by the groups, or Hkv) heads.

    ``workspace_bytes`` is known at construction; the workspace (lengths, block table, selected
    blocks, partials, output) is allocated by :meth:`allocate` or the first :meth:`update`, and
    lives as long as the plan.  Kernels are compiled and loaded at construction, so that
    nothing but launches happens inside a captured graph.  A plan serves one thread at a time.
"""


class DecodePlan(_CachePlan):
    __doc__ = """MSA decode over a KV cache for up to ``max_batch`` sequences of up to ``max_cache_len``
    keys, ``queries_per_seq`` new queries each (1: decode; 2-16: multi-token prediction).

""" + _INDEX_DOC

    def __init__(self, *, max_batch, max_cache_len, num_q_heads, num_kv_heads, head_dim, dtype,
                 index_dim=None, index_k_heads=1, block_size=128, top_k=16, local_blocks=1, sink_blocks=0,
                 queries_per_seq=1, page_size=None, num_pages=None, scale=None):
        self.queries_per_seq = queries_per_seq  # checked in _query_bounds
        super().__init__(max_batch=max_batch, max_cache_len=max_cache_len, num_q_heads=num_q_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, index_dim=index_dim,
                         index_k_heads=index_k_heads, block_size=block_size, top_k=top_k, local_blocks=local_blocks,
                         sink_blocks=sink_blocks, page_size=page_size, num_pages=num_pages, scale=scale)

    def _query_bounds(self):
        nq = self.queries_per_seq = _interop.check_int("queries_per_seq", self.queries_per_seq, minimum=1)
        if nq > MAX_QUERIES_PER_SEQ:
            raise ValueError(f"queries_per_seq must be <= {MAX_QUERIES_PER_SEQ}, got {nq}")
        return nq, self.max_batch * nq

    def _init_attention(self):
        self._decode, self._decode_smem = sparse.decode_kernel(self.dtype, self.head_dim, self.group_size,
                                                               self.block_size, self.top_k,
                                                               pairs=self.max_rows * self.num_kv_heads)
        self._decode.reserve_shared(self._decode_smem)
        self._kernels["uniform"] = _jit.kernel("plan_update.cu", "uniform_cu_seqlens")

    def _prefix(self, batch, q):
        return (batch, self.queries_per_seq)

    def _attention_launches(self, record, launches, *, n_seq, rows, q, k, v, ids, cu_q, cu_k, pages, out, lse):
        """Split-K decode: a partial per pick, combined by a cluster of the (row, KV head)'s CTAs
        (sm_90) or by its last CTA."""
        P = _jit.Pointer
        part_o, part_lse = P("part_o", (0,), self.dtype), P("part_lse", (0,), np.float32)
        decode = _jit.Recorder(self._decode)
        sparse.launch_decode(decode, self._decode_smem, q, k, v, ids, cu_q, cu_k, n_seq, 0, rows, part_o, part_lse,
                             P("decode_count"), out, lse, causal=True,
                             scale_log2=np.float32(self.scale * sparse.LOG2E), pages=pages)
        launches.append(decode.launch.overlapping_previous(self.device))  # starts during the selection's merge

    @_interop.outside_torch_compile()
    def update(self, seq_lens, block_table=None):
        """Set the step's sequences: ``seq_lens`` (batch,) int32 key counts (the new tokens
        included) and, for a paged plan, ``block_table`` (batch, pages) int32.  Host arrays
        are checked here (a ValueError names the bad entry) and copied through a pinned buffer
        by one asynchronous copy on the current stream; device arrays (CuPy, PyTorch, JAX) are
        read by one kernel on the current stream, without a host sync: out-of-range lengths
        and page ids are clamped there (no read outside the cache) and counted
        (:meth:`clamped_entries`).  Call it outside captured graphs, before ``run``."""
        return self._update(seq_lens, None, block_table)

    @_interop.outside_torch_compile()
    def run(self, q, k_cache, v_cache, *, index_q=None, index_k_cache=None, out=None, lse=None, return_lse=False):
        """Attention of the step's queries ``q`` (batch, queries_per_seq, Hq, D) over their
        selected cache blocks, on the caller's stream: kernel launches only (no host sync, no
        allocation), so that it can be captured in a CUDA graph and replayed after ``update``.

        Returns ``out`` (batch, queries_per_seq, Hq, D) in the caller's array type: the caller's
        ``out`` if given, else a view of the plan's workspace (overwritten by the next run);
        with ``return_lse`` also ``lse`` (batch, queries_per_seq, Hq) float32.
        """
        return self._run(q, k_cache, v_cache, index_q, index_k_cache, out, lse, return_lse)

    def step_programs(self, batch: int, pages: int = 0) -> tuple:
        """The prepared launches of one step of ``batch`` sequences from device lengths (and
        block tables of ``pages`` columns; 0 for a contiguous cache): update's, then run's, as
        :meth:`update` and :meth:`run` launch them once :meth:`use_workspace` zeroed the
        counters.  For a caller that binds the addresses itself and launches without Python
        (msa_cupy.jax's XLA handler): the slots are the workspace views (by name, at their
        offsets), ``seq_lens``, ``table_in`` (the block table), ``q``, ``k``, ``v``, ``out``,
        ``lse`` and, with a learned index, ``iq`` and ``ik``."""
        batch = _interop.check_int("batch", batch, minimum=1)
        if batch > self.max_batch:
            raise ValueError(f"batch must be <= max_batch ({self.max_batch}), got {batch}")
        if (pages > 0) != self.paged:
            raise ValueError("pages must be the block table's columns for a paged plan, 0 for a contiguous one")
        return (self._program(("update", batch, int(pages), False)),
                self._program(("run", batch, batch * self.queries_per_seq)))

    @property
    def block_indices(self):
        """The last run's selection (batch, queries_per_seq, Hkv, top_k) int32 (a workspace view)."""
        return self._ids_view((self._batch or 0, self.queries_per_seq))

    @classmethod
    def _for_calls(cls, **options):
        """A plan for one-call decodes (``_plan_cache``): contiguous keys read through the
        call's cu_seqlens, split-K chosen per call as the one-call path chooses it, so the
        partial lists are sized for the most any call of at most max_batch sequences gets."""
        plan = cls(**options)
        cfg, rows = plan._select, plan.max_batch * plan.queries_per_seq
        rows_per_q = plan.num_kv_heads if plan.index_k_heads == 1 else 1
        bound = selection.split_rows_bound(rows, rows_per_q, cfg.tile_rows, cfg.group_grid, plan.max_cache_len)
        plan._size_workspace(-(-bound // rows))
        return plan

    # ------------------------------------------------------------------ one-call decodes (_plan_cache)

    def _launch_call(self, stream, base, *, n_seq, rows, splits, max_k, k_len, q, k, v, index_q, index_k, out, lse,
                     ids, cu_q, cu_k):
        """The launches of one one-call decode on stream, every array an address: the scratch
        workspace at base (a fresh allocation of workspace_bytes), q/k/v (and index_q/index_k)
        of the call, its out (and lse, ids: 0 for the scratch's own).  ``k_len`` for batched
        calls (cu_seqlens written by a launch), else the call's cu_q/cu_k addresses; max_k the
        longest sequence (the selection's block-score width, as the earlier path passes it)."""
        program = self._program(("call", n_seq, rows, splits, k_len is not None))
        self._bind_workspace(program, base)
        offsets = self._offsets
        if k_len is not None:  # batched: the uniform launch writes the scratch's cu_seqlens
            cu_q, cu_k = base + offsets["cu_q"], base + offsets["cu_k"]
        self._zero_counters(base, stream)  # a fresh scratch
        program.binder(_CALL)(q, k, v, index_q, index_k, out, lse or base + offsets["lse"],
                              ids or base + offsets["ids"], cu_q, cu_k, k_len or 0, -(-max_k // self.block_size))
        _jit.launch_ready(self.device)
        program(stream)

    def _call_splits(self, tiles: int, max_k: int) -> int:
        """Split-K of a one-call decode with `tiles` query tiles: the earlier path's choice."""
        return selection.split_count(tiles, self._select.group_grid, max_k, sm_count=self._sm_count)


class PrefillPlan(_CachePlan):
    __doc__ = """MSA chunked prefill over a KV cache: up to ``max_batch`` sequences of up to
    ``max_cache_len`` keys, each with its own number of new tokens (``update``'s
    ``query_lens``), ``max_query_tokens`` new tokens in all per step.  The new tokens' keys are
    already in the cache and are each sequence's last ``query_lens[s]`` keys (bottom-right
    causal).  ``q`` is packed: the tokens of sequence 0, then 1, ... (varlen, as
    ``cu_seqlens``), at most ``max_query_tokens`` rows; the outputs of rows past the step's
    tokens are not written, so one captured graph serves every step whose tokens fit its q.

    ``schedule`` of the attention, as ``msa_cupy.sparse``'s: "kv" (default,
    ``PREFILL_PLAN_SCHEDULE``: KV-outer, a CTA per picked block and its queries, a partial per
    pick, merged by a log-sum-exp combine), "tile" (query-tile-outer: online softmax in
    registers over the union of a tile's picked blocks, out and lse written once; fastest on
    coherent selections, as trained indexes make) or "auto" (classifies each (tile of tokens x
    G heads, KV head) on the device by how much of its union its tokens picked, and runs it one
    way or the other).  Every step is launches only: the
    KV-outer path's reverse index is a counting sort on the device into the workspace.  The
    KV-outer schedules hold a partial result per pick in the workspace (``workspace_bytes``:
    about max_query_tokens x num_q_heads x top_k x head_dim x 2 bytes).  The tile-outer kernel
    deduplicates at most ``sparse.TILE_MAX_ENTRIES`` ids per tile: with "auto" and "tile",
    ``top_k`` <= 16 for G <= 2, 32 for G = 4, and the select limit above.

""" + _INDEX_DOC

    def __init__(self, *, max_batch, max_cache_len, max_query_tokens, num_q_heads, num_kv_heads, head_dim, dtype,
                 index_dim=None, index_k_heads=1, block_size=128, top_k=16, local_blocks=1, sink_blocks=0,
                 page_size=None, num_pages=None, scale=None, schedule=PREFILL_PLAN_SCHEDULE):
        self.max_query_tokens = max_query_tokens  # checked in _query_bounds
        if schedule not in sparse.SCHEDULES:
            raise ValueError(f"schedule must be one of {sparse.SCHEDULES}, got {schedule!r}")
        self.schedule = self._attention = schedule
        super().__init__(max_batch=max_batch, max_cache_len=max_cache_len, num_q_heads=num_q_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, index_dim=index_dim,
                         index_k_heads=index_k_heads, block_size=block_size, top_k=top_k, local_blocks=local_blocks,
                         sink_blocks=sink_blocks, page_size=page_size, num_pages=num_pages, scale=scale)

    def _query_bounds(self):
        rows = self.max_query_tokens = _interop.check_int("max_query_tokens", self.max_query_tokens, minimum=1)
        if rows > MAX_QUERY_TOKENS:
            raise ValueError(f"max_query_tokens must be <= {MAX_QUERY_TOKENS}, got {rows}")
        return rows, rows

    def _check_attention(self):
        tokens = sparse.tile_tokens(self.group_size)
        if self.schedule != "kv" and self.top_k > sparse.TILE_MAX_ENTRIES // tokens:
            raise ValueError(f"top_k must be <= {sparse.TILE_MAX_ENTRIES // tokens} for PrefillPlan with num_q_heads / "
                             f"num_kv_heads = {self.group_size} (its query tiles of {tokens} tokens deduplicate at "
                             f"most {sparse.TILE_MAX_ENTRIES} block ids) and schedule={self.schedule!r}, got "
                             f"{self.top_k}")
        self._n_blocks = self.max_batch * -(-self.max_cache_len // self.block_size)  # bucket stride: the most blocks
        if self.schedule != "tile" and self.num_kv_heads * self._n_blocks >= 2**31 - 1:
            raise ValueError(f"max_batch x max_cache_len / block_size x num_kv_heads must stay below 2^31 for "
                             f"schedule={self.schedule!r}: lower max_batch or max_cache_len, or use schedule='tile'")

    def _init_attention(self):
        args = (self.dtype, self.head_dim, self.group_size, self.block_size)
        if self.max_batch * self._select.q_tiles > 2**31 - 1:  # the selection grid: any sequence may hold them all
            raise ValueError(f"max_batch ({self.max_batch}) x max_query_tokens ({self.max_query_tokens}) is too large "
                             f"for one selection grid: lower either")
        self._kernels["bound"] = _jit.kernel("plan_update.cu", "bound_query_rows")
        if self.schedule != "kv":
            if not sparse.tile_prefill_kernel(*args, load=False).fits(self.top_k):
                raise ValueError(f"PrefillPlan: the tile-outer kernel's shared memory for top_k={self.top_k} does "
                                 f"not fit this GPU")
            self._tile = sparse.tile_prefill_kernel(*args)
            self._tile.kernel.reserve_shared(self._tile.smem_bytes(self.top_k))
            self._kernels["tile_offsets"] = _jit.kernel("tile_schedule.cu", "query_tile_offsets")
        if self.schedule == "auto":
            self._kernels["classify"] = _jit.kernel("tile_schedule.cu", "classify_query_tiles",
                                                    (sparse.CLASSIFY_WARPS,))
        if self.schedule != "tile":
            self._prefill = sparse.prefill_kernel(*args)
            self._kernels["block_offsets"] = _jit.kernel("reverse_index.cu", "block_offsets", (self.block_size,))
            self._kernels["combine"] = sparse.combine_kernel(self.dtype, self.head_dim, self.group_size)
            sparse.reverse_index_kernels()  # loaded now: a step may be prepared inside a capture

    def _attention_sizes(self):
        if self.schedule == "tile":
            return {}
        return dict(n_buckets=self.num_kv_heads * self._n_blocks,
                    max_queries=self._prefill.tile_tokens * sparse.TILES_PER_ITEM)

    def _prefix(self, batch, q):
        shape = tuple(getattr(q, "shape", ()))
        if len(shape) != 3 or not 1 <= shape[0] <= self.max_query_tokens:
            raise ValueError(f"q must be (tokens, num_q_heads, head_dim) with 1 <= tokens <= max_query_tokens "
                             f"({self.max_query_tokens}), got shape {shape}")
        return (int(shape[0]),)

    def _step_cu_q(self, record, n_seq, rows, cu_q):
        bounded = _jit.Pointer("cu_q_run", (n_seq + 1,), np.int32)
        record(self._kernels["bound"], launch_bound_query_rows, cu_q, n_seq, rows, bounded, _jit.Pointer("errors"))
        return bounded

    def _attention_launches(self, record, launches, *, n_seq, rows, q, k, v, ids, cu_q, cu_k, pages, out, lse):
        """By the schedule: the query tiles' offsets and classification; the reverse index,
        KV-outer attention and combine; the tile-outer attention (out and lse written once)."""
        P = _jit.Pointer
        kernel_args = dict(causal=True, scale_log2=np.float32(self.scale * sparse.LOG2E), pages=pages)
        hkv, row_mode = self.num_kv_heads, None
        if self.schedule != "kv":
            tile_off = P("tile_off", (n_seq + 1,), np.int32)
            record(self._kernels["tile_offsets"], sparse.query_tile_offsets, cu_q, n_seq, 0, rows,
                   self._tile.tile_tokens, tile_off)
        if self.schedule == "auto":
            row_mode = P("row_mode", (rows, hkv), np.uint8)
            record(self._kernels["classify"], sparse.classify_query_tiles, ids, cu_q, cu_k, tile_off, n_seq, 0, rows,
                   tile_tokens=self._tile.tile_tokens, min_useful=sparse.TILE_MIN_USEFUL, row_mode=row_mode)
        if self.schedule != "tile":
            entries = rows * hkv * self.top_k
            block_off = P("block_off", (n_seq + 1,), np.int32)
            list_q, slot_pos = P("list_q", (entries,), np.int32), P("slot_pos", (entries,), np.int32)
            part_o, part_lse = P("part_o", (0,), self.dtype), P("part_lse", (0,), np.float32)
            record(self._kernels["block_offsets"], sparse.block_offsets, cu_k, n_seq, self.block_size, block_off)
            sizes = self._attention_sizes()
            buffers = {name: P(name, shape, dt) for name, shape, dt in
                       sparse.reverse_index_buffers(entries, sizes["n_buckets"], sizes["max_queries"])}
            items = sparse.reverse_index(
                ids, cu_q, block_off, n_seq, 0, rows, n_blocks_total=self._n_blocks, max_queries=sizes["max_queries"],
                list_q=list_q, slot_pos=slot_pos, row_mode=row_mode, buffers=buffers,
                emit=lambda kernel, grid, block, args: launches.append(_jit.Launch(kernel, grid, block, args)))
            recorder = _jit.Recorder(self._prefill.kernel)
            sparse.launch_prefill(self._prefill._replace(kernel=recorder), q, k, v, items, list_q, cu_q, cu_k,
                                  block_off, n_seq, self._n_blocks, part_o, part_lse, **kernel_args)
            launches.append(recorder.launch)
        if self.schedule != "kv":
            recorder = _jit.Recorder(self._tile.kernel)
            sparse.launch_tile_prefill(self._tile._replace(kernel=recorder), q, k, v, ids, cu_q, cu_k, tile_off, n_seq,
                                       0, rows, row_mode, out, lse, **kernel_args)
            launches.append(recorder.launch)
        if self.schedule != "tile":
            record(self._kernels["combine"], sparse.launch_combine, part_o, part_lse, slot_pos, cu_q, n_seq, 0, rows,
                   out, lse, head_dim=self.head_dim, group=self.group_size, top_k=self.top_k, row_mode=row_mode)

    @_interop.outside_torch_compile()
    def update(self, seq_lens, query_lens, block_table=None):
        """Set the step's sequences: ``seq_lens`` (batch,) int32 key counts (the new tokens
        included), ``query_lens`` (batch,) int32 new tokens of each (summing to at most
        max_query_tokens; a sequence with more new tokens than keys has queries that see
        nothing) and, for a paged plan, ``block_table`` (batch, pages) int32.  Host or device
        arrays (both lengths the same kind), checked or clamped and counted as by
        :meth:`DecodePlan.update`; outside captured graphs, before ``run``."""
        if query_lens is None:
            raise ValueError("query_lens is required: the new tokens of each sequence")
        return self._update(seq_lens, query_lens, block_table)

    @_interop.outside_torch_compile()
    def run(self, q, k_cache, v_cache, *, index_q=None, index_k_cache=None, out=None, lse=None, return_lse=False):
        """Attention of the step's tokens ``q`` (tokens, Hq, D), packed by sequence, over their
        selected cache blocks, on the caller's stream: kernel launches only (no host sync, no
        allocation), capturable and replayable after ``update``.  ``index_q`` (tokens, Hkv,
        Di) for a learned index.  Rows past the step's tokens (the sum of ``query_lens``) are
        not written (nor read, but by the training-free index's group mean); a step whose tokens
        pass q's rows is cut to them (the tokens past q's end dropped: the sequence at the cut
        keeps its first tokens, aligned to its last keys) and counted (:meth:`clamped_entries`).

        Returns ``out`` (tokens, Hq, D) in the caller's array type (the caller's ``out`` if
        given, else a workspace view overwritten by the next run); with ``return_lse`` also
        ``lse`` (tokens, Hq) float32.
        """
        return self._run(q, k_cache, v_cache, index_q, index_k_cache, out, lse, return_lse)

    @property
    def block_indices(self):
        """The last run's selection (tokens, Hkv, top_k) int32 (a workspace view)."""
        return self._ids_view(self._last_prefix or (0,))
