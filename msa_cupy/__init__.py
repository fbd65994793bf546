"""msa_cupy: MiniMax Sparse Attention kernels for NVIDIA GPUs (Ampere, Hopper), framework-agnostic.

Arrays come in through DLPack (CuPy, PyTorch, JAX) and go back as the caller's type; NumPy
arrays run through the float64 reference (``msa_cupy.reference``).
"""
from ._api import attention, block_scores, select_blocks, sparse_attention, topk_blocks
from ._interop import gpu_available
from .plan import DecodePlan, PrefillPlan

__version__ = "0.1.0"
__all__ = ["DecodePlan", "PrefillPlan", "attention", "block_scores", "gpu_available", "select_blocks", "sparse_attention",
           "topk_blocks"]
