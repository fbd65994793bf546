"""Sequence layout shared by the reference, the plain CuPy path and the kernels.

Every operation works on a *varlen* view: token-major arrays ``(total, H, D)`` plus
``cu_seqlens`` offsets.  A batched ``(B, N, H, D)`` call is the special case of equal
lengths, reshaped for free; a rank-3 call without ``cu_seqlens`` is one sequence.
Query ``i`` of a sequence with ``Nq`` queries and ``Nk`` keys sits at key position
``Nk - Nq + i`` (bottom-right alignment).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Where each sequence's queries and keys sit in the flattened token axis."""

    batch_shape: tuple  # leading dims of the caller's arrays: (B,) batched, () varlen/single
    cu_q: np.ndarray  # int64, length n_seq + 1, host copy
    cu_k: np.ndarray
    uniform_q: int = 0  # per-sequence lengths of a batched call (kept even when B = 0)
    uniform_k: int = 0

    @property
    def n_seq(self) -> int:
        return len(self.cu_q) - 1

    @property
    def total_q(self) -> int:
        return int(self.cu_q[-1])

    @property
    def total_k(self) -> int:
        return int(self.cu_k[-1])

    @property
    def max_k(self) -> int:
        return self.uniform_k if self.uniform else int(np.max(np.diff(self.cu_k), initial=0))

    @property
    def max_q(self) -> int:
        return self.uniform_q if self.uniform else int(np.max(np.diff(self.cu_q), initial=0))

    @property
    def uniform(self) -> bool:
        return bool(self.batch_shape)

    def sequences(self):
        """Yield (q_start, q_len, k_start, k_len) per sequence."""
        for s in range(self.n_seq):
            q0, q1 = int(self.cu_q[s]), int(self.cu_q[s + 1])
            k0, k1 = int(self.cu_k[s]), int(self.cu_k[s + 1])
            yield q0, q1 - q0, k0, k1 - k0

    def flatten(self, x):
        """(B, N, H, D) -> (B*N, H, D), free for contiguous arrays; varlen arrays stay."""
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) if self.uniform else x

    def unflatten(self, x):
        """(total_q, ...) -> (B, Nq, ...) for batched calls."""
        return x.reshape(*self.batch_shape, self.uniform_q, *x.shape[1:]) if self.uniform else x

    @property
    def query_shape(self) -> tuple:
        """Leading dims of query-side arrays: (B, Nq) batched, (total_q,) varlen."""
        return (*self.batch_shape, self.uniform_q) if self.uniform else (self.total_q,)

    def n_blocks(self, block_size: int) -> int:
        """Key blocks of the longest sequence: the width of score and selection maps."""
        return -(-self.max_k // block_size)


def query_positions(nq: int, nk: int) -> np.ndarray:
    """Key position of each query of one sequence (bottom-right alignment)."""
    return np.arange(nq, dtype=np.int64) + (nk - nq)


def uniform_layout(batch: int, nq: int, nk: int) -> Layout:
    return Layout(
        batch_shape=(batch,),
        cu_q=np.arange(batch + 1, dtype=np.int64) * nq,
        cu_k=np.arange(batch + 1, dtype=np.int64) * nk,
        uniform_q=nq,
        uniform_k=nk,
    )


def single_layout(nq: int, nk: int) -> Layout:
    return Layout(batch_shape=(), cu_q=np.array([0, nq], np.int64), cu_k=np.array([0, nk], np.int64))


def varlen_layout(cu_q: np.ndarray, cu_k: np.ndarray) -> Layout:
    return Layout(batch_shape=(), cu_q=np.asarray(cu_q, np.int64), cu_k=np.asarray(cu_k, np.int64))


def key_rows(block_table=None, max_pages: int = 0, page_size: int = 1) -> tuple:
    """Kernel arguments that say where key token j of sequence s lives (``KeyRows`` in
    cuda/common.cuh): contiguous (varlen) arrays by default, else pages of ``page_size`` rows
    named by an int32 device ``block_table`` (n_seq, max_pages)."""
    table = np.uint64(0) if block_table is None else block_table
    return table, np.int32(max_pages), np.int32(page_size)


CONTIGUOUS_KEYS = key_rows()
