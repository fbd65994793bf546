"""Helpers for GPU tests: random device inputs, poisoning, error metrics."""
import numpy as np

from msa_cupy._interop import BFLOAT16

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BFLOAT16}
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}  # ||out - ref|| / ||ref||


def randn(shape, dtype, rng, scale=1.0):
    """Host random normal values rounded to dtype (so the reference sees exactly what the GPU sees)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def rel_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "non-finite values in the output"
    denom = np.linalg.norm(ref)
    return np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0)


def varlen_lengths(draw_lengths, st):
    """(cu_q, cu_k) int32 from a list of (nq, nk) pairs."""
    nq = np.array([a for a, _ in draw_lengths], np.int32)
    nk = np.array([b for _, b in draw_lengths], np.int32)
    return np.concatenate([[0], np.cumsum(nq)]).astype(np.int32), np.concatenate([[0], np.cumsum(nk)]).astype(np.int32)
