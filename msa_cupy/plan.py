"""Decode plans: MSA decode and multi-token prediction over a KV cache, planned once and run
every step with kernel launches only, so that one captured CUDA graph serves every step.

    plan = msa_cupy.DecodePlan(max_batch=8, max_cache_len=1 << 20, num_q_heads=64, num_kv_heads=4,
                               head_dim=128, dtype="bfloat16", page_size=128, num_pages=65536)
    plan.workspace_bytes                  # known before anything is allocated
    plan.update(seq_lens, block_table)    # each step, outside any graph: host or device arrays
    out = plan.run(q, k_cache, v_cache)   # launches only: no sync, no allocation, capturable

A step is: (training-free index) the group mean of q, one launch; the fused selection over the
cached index keys (split-K, then the merge of the partial lists); the split-K decode attention
over the picked blocks; the log-sum-exp combine.  Every grid is sized for the plan's maxima;
the kernels read the step's lengths from ``cu_q``/``cu_k`` on the device, so nothing in
``run`` depends on host-side lengths.

Caches.  Contiguous: ``k_cache``/``v_cache`` ``(max_batch, max_cache_len, Hkv, D)``, sequence
``s`` in row ``s`` (``index_k_cache`` ``(max_batch, max_cache_len, 1 | Hkv, Di)`` alike).  Paged:
``(num_pages, page_size, Hkv, D)`` with an int32 ``block_table`` ``(batch, pages)``: key ``j``
of sequence ``s`` is row ``j % page_size`` of page ``block_table[s, j // page_size]`` (page ids
arbitrary: permuted, shared prefix pages).  Both go through the same kernels (a contiguous
cache is one page per sequence).  The new tokens' keys must already be in the cache:
``seq_lens`` counts them, and the ``queries_per_seq`` queries of a sequence are its last
tokens (bottom-right causal, so MTP queries see each other causally).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from . import _interop, _jit, selection, sparse
from ._layout import key_rows

UPDATE_THREADS = 256
MAX_QUERIES_PER_SEQ = 16  # multi-token prediction: up to 16 new queries per sequence
_ALIGN = 256  # bytes: every workspace view starts on a 256-byte boundary (16-byte loads need 16)

_jit.declare("plan_update.cu", "plan_update_kernel", (UPDATE_THREADS,))
_jit.declare("plan_update.cu", "uniform_cu_seqlens")
_jit.declare("group_mean.cu", "group_mean_kernel", ("bf16",), ("f16",))


def group_mean(q, index_q, n_groups: int):
    """Training-free index_q (rows, Hkv, D) = the mean of each group's query heads of q
    (rows, Hq, D), in one launch (group_mean.cu) on the current stream."""
    rows, n_heads, head_dim = q.shape
    n = rows * n_groups * (head_dim // 8)
    if n == 0:
        return index_q
    kernel = _jit.kernel("group_mean.cu", "group_mean_kernel", (_jit.dtype_template(q.dtype),))
    kernel((-(-n // 256),), (256,), (q, index_q, np.int64(rows), np.int32(n_groups), np.int32(n_heads // n_groups),
                                     np.int32(head_dim)))
    return index_q


def uniform_cu_seqlens(n_seq: int, q_len: int, k_len: int):
    """Device (cu_q, cu_k) int32 of n_seq sequences of equal lengths, written by one launch on
    the current stream: a fresh pool allocation per call, so no cached array can be freed
    while queued kernels still read it."""
    import cupy

    cu = cupy.empty((2, n_seq + 1), cupy.int32)
    kernel = _jit.kernel("plan_update.cu", "uniform_cu_seqlens")
    kernel((max(1, min(-(-(n_seq + 1) // 256), 1024)),), (256,),
           (np.int32(n_seq), np.int32(q_len), np.int32(k_len), cu[0], cu[1]))
    return cu[0], cu[1]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def workspace_layout(*, max_batch, queries_per_seq, num_q_heads, num_kv_heads, head_dim, top_k, max_pages, dtype,
                     splits, training_free) -> list:
    """The views of a decode plan's workspace, (name, shape, dtype), in allocation order."""
    rows = max_batch * queries_per_seq
    group = num_q_heads // num_kv_heads
    entries = rows * num_kv_heads * top_k  # one partial (o, lse) per pick
    views = [
        ("cu_q", (max_batch + 1,), np.int32),
        ("cu_k", (max_batch + 1,), np.int32),
        ("block_table", (max_batch, max_pages), np.int32),
        ("errors", (1,), np.int32),
        ("ids", (rows, num_kv_heads, top_k), np.int32),
        ("part_lse", (entries * group,), np.float32),
        ("part_o", (entries * group * head_dim,), dtype),
        ("out", (rows, num_q_heads, head_dim), dtype),
        ("lse", (rows, num_q_heads), np.float32),
    ]
    if splits > 1:
        views.append(("partial", (rows, num_kv_heads, splits, top_k), np.uint64))
    if training_free:
        views.append(("index_q", (rows, num_kv_heads, head_dim), dtype))
    return views


def workspace_bytes(views) -> int:
    """Bytes of one allocation holding every view, each on a 256-byte boundary."""
    return sum(_aligned(math.prod(shape) * np.dtype(dt).itemsize) for _, shape, dt in views)


def _dtype_of(dtype):
    """float16 / bfloat16 from a NumPy, CuPy, PyTorch or JAX dtype or its name."""
    name = str(getattr(dtype, "name", dtype)).split(".")[-1]
    found = {"float16": np.dtype(np.float16), "half": np.dtype(np.float16), "bfloat16": _interop.BFLOAT16}.get(name)
    if found is None:
        raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
    return found


class DecodePlan:
    """MSA decode over a KV cache for up to ``max_batch`` sequences of up to ``max_cache_len``
    keys, ``queries_per_seq`` new queries each (1: decode; 2-16: multi-token prediction).

    Without ``index_dim`` the plan uses the training-free index (index_q = the mean of each
    group's query heads, index keys = the group's own key head: an approximation, not the
    trained MSA index); with it, ``run`` takes ``index_q`` and an ``index_k_cache`` laid out
    like the K cache with ``index_k_heads`` (1, shared by the groups, or Hkv) heads.

    ``workspace_bytes`` is known at construction; the workspace (lengths, block table, selected
    blocks, partials, output) is allocated by :meth:`allocate` or the first :meth:`update`, and
    lives as long as the plan.  Kernels are compiled and loaded at construction, so that
    nothing but launches happens inside a captured graph.
    """

    def __init__(self, *, max_batch, max_cache_len, num_q_heads, num_kv_heads, head_dim, dtype,
                 index_dim=None, index_k_heads=1, block_size=128, top_k=16, local_blocks=1, sink_blocks=0,
                 queries_per_seq=1, page_size=None, num_pages=None, scale=None):
        check = _interop.check_int
        self.max_batch = check("max_batch", max_batch, minimum=1)
        self.max_cache_len = check("max_cache_len", max_cache_len, minimum=1)
        self.num_q_heads = check("num_q_heads", num_q_heads, minimum=1)
        self.num_kv_heads = check("num_kv_heads", num_kv_heads, minimum=1)
        self.head_dim = check("head_dim", head_dim, minimum=1)
        self.queries_per_seq = check("queries_per_seq", queries_per_seq, minimum=1)
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
                             f"decode plans, got {self.group_size}")
        if self.top_k > _interop.SELECT_KERNEL_MAX_TOP_K:
            raise ValueError(f"top_k must be <= {_interop.SELECT_KERNEL_MAX_TOP_K} for decode plans, got {self.top_k}")
        if self.queries_per_seq > MAX_QUERIES_PER_SEQ:
            raise ValueError(f"queries_per_seq must be <= {MAX_QUERIES_PER_SEQ}, got {self.queries_per_seq}")
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
        if self.max_cache_len > 2**31 - 1 - self.block_size or self.num_pages * self.page_size > 2**31 - 1:
            raise ValueError("max_cache_len and num_pages * page_size must stay below 2^31 rows")

        cp = _interop.require_cupy()
        self.device = cp.cuda.runtime.getDevice()
        self._select = selection.select_config(
            dtype=self.dtype, index_dim=self.index_dim, block_size=self.block_size, n_heads=self.num_kv_heads,
            k_heads=self.index_k_heads, n_seq=self.max_batch, max_q=self.queries_per_seq, max_k=self.max_cache_len,
            top_k=self.top_k, epilogue=selection.EPI_TOPK)
        self._decode, self._decode_smem = sparse.decode_kernel(self.dtype, self.head_dim, self.group_size,
                                                               self.block_size)
        self._merge = selection.merge_kernel(self.max_batch * self.queries_per_seq * self.num_kv_heads,
                                             self._select.splits * self.top_k)
        self._update = _jit.kernel("plan_update.cu", "plan_update_kernel", (UPDATE_THREADS,))
        if self.training_free:
            _jit.kernel("group_mean.cu", "group_mean_kernel", (_jit.dtype_template(self.dtype),))
        sparse.combine_kernel(self.dtype, self.head_dim, self.group_size)
        for kern, smem in ((self._select.kernel, self._select.smem), (self._decode, self._decode_smem)):
            kern.reserve_shared(smem)
        self._views = workspace_layout(
            max_batch=self.max_batch, queries_per_seq=self.queries_per_seq, num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, top_k=self.top_k, max_pages=self.max_pages,
            dtype=self.dtype, splits=self._select.splits, training_free=self.training_free)
        self.workspace_bytes = workspace_bytes(self._views)
        self._ws = None
        self._ws_key = None  # (address, size) of the caller's workspace the views were carved from
        self._batch = None

    # ------------------------------------------------------------------ workspace

    def allocate(self):
        """Allocate the workspace (``workspace_bytes``) on the plan's device, once."""
        if self._ws is not None:
            return self
        cp = _interop.require_cupy()
        with cp.cuda.Device(self.device):
            self._ws = self._carve(cp.empty(self.workspace_bytes, cp.uint8))
            self._ws_key = None
            self._ws["errors"].fill(0)
        return self

    @_interop.outside_torch_compile()
    def use_workspace(self, raw, *, carry_over=False):
        """Run on a caller's workspace instead of the plan's own: ``raw`` a contiguous uint8 GPU
        array of at least ``workspace_bytes`` on the plan's device (e.g. a buffer XLA or
        PyTorch's allocator handed out), owned by the caller and live while queued work reads
        it.  Nothing is kept from an earlier workspace: call :meth:`update` next.  Allocates
        nothing; one launch on the caller's stream zeroes the clamp counter.  Memory handed in
        again (same address and size, as a JAX loop hands it every step) keeps its views, so
        that a step costs the checks and that launch.

        ``carry_over=True``: ``raw`` holds a copy of the current workspace's bytes (a framework
        moved the buffer); the step set by the last :meth:`update` and the counter carry over,
        and nothing is launched."""
        cp = _interop.require_cupy()
        if carry_over and self._ws is None:
            raise RuntimeError("carry_over=True needs a workspace to carry over from")
        with cp.cuda.Device(self.device), self._stream_of(raw):  # DLPack import on the caller's stream too
            arr = self._device_array("workspace", raw)
            if np.dtype(arr.dtype) != np.uint8 or arr.ndim != 1 or arr.size < self.workspace_bytes:
                raise ValueError(f"workspace must be a 1-D uint8 array of at least {self.workspace_bytes} bytes, "
                                 f"got {arr.dtype} of shape {tuple(arr.shape)}")
            _interop.check_contiguous("workspace", arr)
            if arr.data.ptr % _ALIGN:
                raise ValueError(f"workspace must start on a {_ALIGN}-byte boundary")
            key = (arr.data.ptr, arr.size)
            if self._ws is None or self._ws_key != key:
                self._ws, self._ws_key = self._carve(arr), key
            if not carry_over:
                self._ws["errors"].fill(0)
                self._batch = None
        return self

    def _carve(self, raw) -> dict:
        ws, offset = {}, 0
        for name, shape, dt in self._views:
            nbytes = math.prod(shape) * np.dtype(dt).itemsize
            ws[name] = raw[offset:offset + nbytes].view(dt).reshape(shape)
            offset += _aligned(nbytes)
        ws["raw"] = raw
        return ws

    @property
    def workspace(self) -> dict:
        """The workspace views (CuPy arrays), e.g. ``out``, ``lse``, ``ids``, ``cu_k``, ``block_table``."""
        return self.allocate()._ws

    # ------------------------------------------------------------------ per step

    @_interop.outside_torch_compile()
    def update(self, seq_lens, block_table=None):
        """Set the step's sequences: ``seq_lens`` (batch,) int32 key counts (the new tokens
        included) and, for a paged plan, ``block_table`` (batch, pages) int32.  Host arrays are
        checked here (a ValueError names the bad entry) and copied synchronously; device arrays
        (CuPy, PyTorch, JAX) are read by one kernel on the current stream, without a host sync:
        out-of-range lengths and page ids are clamped there (no read outside the cache) and
        counted (:meth:`clamped_entries`).  Call it outside captured graphs, before ``run``."""
        cp = _interop.require_cupy()
        ws = self.workspace
        on_host = isinstance(seq_lens, (list, tuple, np.ndarray)) or np.isscalar(seq_lens)
        if self.paged and block_table is None:
            raise ValueError("block_table is required for a paged plan")
        if not self.paged and block_table is not None:
            raise ValueError("block_table is given but the plan has no page_size (contiguous cache)")
        with cp.cuda.Device(self.device), self._stream_of(seq_lens if not on_host else block_table):
            if on_host:
                self._update_from_host(np.asarray(seq_lens), block_table, ws)
                return self
            lens = self._device_array("seq_lens", seq_lens)
            batch = self._check_batch(lens.shape, lens.ndim, lens.dtype)
            table, cols = np.uint64(0), 0
            if self.paged:
                table = self._device_array("block_table", block_table)
                if table.ndim != 2 or table.shape[0] != batch or np.dtype(table.dtype) != np.int32:
                    raise ValueError(f"block_table must be int32 of shape ({batch}, pages), got "
                                     f"{table.dtype} {tuple(table.shape)}")
                _interop.check_contiguous("block_table", table)
                cols = table.shape[1]
            grid = 1 + min(-(-batch * self.max_pages // UPDATE_THREADS), 1023)
            self._update((grid,), (UPDATE_THREADS,),
                         (lens, table, np.int32(cols), np.int32(batch), np.int32(self.queries_per_seq),
                          np.int32(self.max_cache_len), np.int32(self.page_size), np.int32(self.max_pages),
                          np.int32(self.num_pages), ws["cu_q"], ws["cu_k"], ws["block_table"], ws["errors"]))
        self._batch = batch
        return self

    def _check_batch(self, shape, ndim, dtype) -> int:
        if ndim != 1 or np.dtype(dtype) != np.int32:
            raise ValueError(f"seq_lens must be a 1-D int32 array, got {np.dtype(dtype)} of shape {tuple(shape)}")
        batch = int(shape[0])
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"seq_lens must hold 1 to max_batch ({self.max_batch}) lengths, got {batch}")
        return batch

    def _update_from_host(self, lens, block_table, ws):
        if lens.ndim != 1 or lens.dtype.kind not in "iu":
            raise ValueError(f"seq_lens must be a 1-D integer array, got {lens.dtype} of shape {lens.shape}")
        batch = self._check_batch(lens.shape, 1, np.int32)
        lens = lens.astype(np.int64)
        bad = np.flatnonzero((lens < 0) | (lens > self.max_cache_len))
        if bad.size:
            raise ValueError(f"seq_lens[{bad[0]}] = {lens[bad[0]]} is outside [0, max_cache_len = "
                             f"{self.max_cache_len}]")
        table = np.zeros((batch, self.max_pages), np.int32)
        if self.paged:
            bt = np.asarray(block_table.get() if hasattr(block_table, "get") else block_table)
            if bt.ndim != 2 or bt.shape[0] != batch or bt.dtype.kind not in "iu":
                raise ValueError(f"block_table must be an integer array of shape ({batch}, pages), got {bt.dtype} "
                                 f"of shape {bt.shape}")
            need = -(-lens // self.page_size)
            if int(need.max(initial=0)) > bt.shape[1]:
                s = int(np.argmax(need > bt.shape[1]))
                raise ValueError(f"block_table has {bt.shape[1]} pages per sequence but sequence {s} needs "
                                 f"{int(need[s])} for {int(lens[s])} keys")
            used = np.arange(bt.shape[1])[None, :] < need[:, None]
            out_of_range = used & ((bt < 0) | (bt >= self.num_pages))
            if out_of_range.any():
                s, p = map(int, np.argwhere(out_of_range)[0])
                raise ValueError(f"block_table[{s}, {p}] = {int(bt[s, p])} is not a page id in [0, num_pages = "
                                 f"{self.num_pages})")
            cols = min(bt.shape[1], self.max_pages)
            table[:, :cols] = np.where(used[:, :cols], bt[:, :cols], 0)
        else:
            table[:, 0] = np.arange(batch)
        cu = np.zeros((2, batch + 1), np.int32)
        cu[0, 1:] = np.arange(1, batch + 1) * self.queries_per_seq
        cu[1, 1:] = np.cumsum(lens)
        stream = _interop.require_cupy().cuda.get_current_stream()  # ordered after queued runs
        ws["cu_q"][:batch + 1].set(cu[0], stream)
        ws["cu_k"][:batch + 1].set(cu[1], stream)
        ws["block_table"][:batch].set(table, stream)
        self._batch = batch

    def clamped_entries(self) -> int:
        """How many lengths and page ids the device-side updates clamped so far (a sync)."""
        return int(self.workspace["errors"].get()[0])

    @_interop.outside_torch_compile()
    def run(self, q, k_cache, v_cache, *, index_q=None, index_k_cache=None, out=None, lse=None, return_lse=False):
        """Attention of the step's queries ``q`` (batch, queries_per_seq, Hq, D) over their
        selected cache blocks, on the caller's stream: kernel launches only (no host sync, no
        allocation), so that it can be captured in a CUDA graph and replayed after ``update``.

        Returns ``out`` (batch, queries_per_seq, Hq, D) in the caller's array type: the caller's
        ``out`` if given, else a view of the plan's workspace (overwritten by the next run);
        with ``return_lse`` also ``lse`` (batch, queries_per_seq, Hq) float32.
        """
        if self._batch is None:
            raise RuntimeError("DecodePlan.run needs update(seq_lens, ...) first")
        cp = _interop.require_cupy()
        ws = self._ws
        batch, nq = self._batch, self.queries_per_seq
        rows = batch * nq
        with cp.cuda.Device(self.device), self._stream_of(q):
            qc = self._device_array("q", q)
            self._check_array("q", qc, (batch, nq, self.num_q_heads, self.head_dim))
            cache_shape = ((self.num_pages, self.page_size) if self.paged else (self.max_batch, self.max_cache_len))
            kc = self._device_array("k_cache", k_cache)
            vc = self._device_array("v_cache", v_cache)
            self._check_array("k_cache", kc, (*cache_shape, self.num_kv_heads, self.head_dim))
            self._check_array("v_cache", vc, (*cache_shape, self.num_kv_heads, self.head_dim))
            qf = qc.reshape(rows, self.num_q_heads, self.head_dim)
            kf = kc.reshape(-1, self.num_kv_heads, self.head_dim)
            vf = vc.reshape(-1, self.num_kv_heads, self.head_dim)
            if self.training_free:
                if index_q is not None or index_k_cache is not None:
                    raise ValueError("this plan uses the training-free index (no index_dim): pass no index_q / "
                                     "index_k_cache")
                iq = group_mean(qf, ws["index_q"][:rows], self.num_kv_heads)
                ik = kf
            else:
                if index_q is None or index_k_cache is None:
                    raise ValueError("this plan has a learned index (index_dim): run needs index_q and index_k_cache")
                iqc = self._device_array("index_q", index_q)
                ikc = self._device_array("index_k_cache", index_k_cache)
                self._check_array("index_q", iqc, (batch, nq, self.num_kv_heads, self.index_dim))
                self._check_array("index_k_cache", ikc, (*cache_shape, self.index_k_heads, self.index_dim))
                iq = iqc.reshape(rows, self.num_kv_heads, self.index_dim)
                ik = ikc.reshape(-1, self.index_k_heads, self.index_dim)
            out_c = ws["out"][:rows] if out is None else self._device_array("out", out)
            lse_c = ws["lse"][:rows] if lse is None else self._device_array("lse", lse)
            if out is not None:
                self._check_array("out", out_c, (batch, nq, self.num_q_heads, self.head_dim))
                out_c = out_c.reshape(rows, self.num_q_heads, self.head_dim)
            if lse is not None:
                self._check_array("lse", lse_c, (batch, nq, self.num_q_heads), np.float32)
                lse_c = lse_c.reshape(rows, self.num_q_heads)
            pages = key_rows(ws["block_table"], self.max_pages, self.page_size)
            cu_q, cu_k, ids = ws["cu_q"], ws["cu_k"], ws["ids"][:rows]
            partial = ws["partial"][:rows] if self._select.splits > 1 else None
            selection.launch_select(self._select, iq, ik, cu_q, cu_k, batch, causal=True, top_k=self.top_k,
                                    local_blocks=self.local_blocks, sink_blocks=self.sink_blocks,
                                    ids_out=ids if partial is None else None, partial=partial, pages=pages)
            if partial is not None:
                selection.launch_topk_merge(partial, ids, rows * self.num_kv_heads, self._select.splits, self.top_k,
                                            merge=self._merge)
            sparse.launch_decode(self._decode, self._decode_smem, qf, kf, vf, ids, cu_q, cu_k, batch, 0, rows,
                                 ws["part_o"], ws["part_lse"], causal=True,
                                 scale_log2=np.float32(self.scale * sparse.LOG2E), pages=pages)
            sparse.launch_combine(ws["part_o"], ws["part_lse"], None, ids, 0, rows, out_c, lse_c,
                                  head_dim=self.head_dim, group=self.group_size, decode=True)
            result = out_c.reshape(batch, nq, self.num_q_heads, self.head_dim)
            if return_lse:
                return self._wrap(q, result), self._wrap(q, lse_c.reshape(batch, nq, self.num_q_heads))
            return self._wrap(q, result)

    @property
    def block_indices(self):
        """The last run's selection (batch, queries_per_seq, Hkv, top_k) int32 (a workspace view)."""
        rows = (self._batch or 0) * self.queries_per_seq
        return self.workspace["ids"][:rows].reshape(self._batch or 0, self.queries_per_seq, self.num_kv_heads,
                                                     self.top_k)

    # ------------------------------------------------------------------ interop (lean: host cost counts)

    def _device_array(self, name, x):
        cp = _interop.require_cupy()
        if isinstance(x, cp.ndarray):
            arr = x
        else:
            kind = _interop.framework_of(name, x)
            if kind == "numpy":
                raise TypeError(f"{name} is a NumPy array: DecodePlan.run takes GPU arrays")
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
    def _stream_of(x):
        """The caller's stream: PyTorch's current stream for torch tensors, else CuPy's current."""
        if x is None or type(x).__module__.split(".")[0] != "torch":
            return contextlib.nullcontext()
        return _interop.torch_stream(x.device.index)

    @staticmethod
    def _wrap(like, result):
        return _interop.wrap_as(_interop.framework_of("q", like), result)
