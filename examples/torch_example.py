"""MSA from PyTorch: CUDA tensors in, CUDA tensors out, on the current PyTorch stream.

    python examples/torch_example.py
"""
import numpy as np
import torch

import msa_cupy
from msa_cupy import reference, testing

B, N, HQ, HKV, D = 1, 16384, 32, 4, 128
q = torch.randn(B, N, HQ, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, N, HKV, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(B, N, HKV, D, device="cuda", dtype=torch.bfloat16)
index_q = torch.randn(B, N, HKV, 128, device="cuda", dtype=torch.bfloat16)  # a learned index would go here
index_k = torch.randn(B, N, 1, 128, device="cuda", dtype=torch.bfloat16)

stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):  # msa_cupy queues its kernels on this stream
    out, lse, block_indices = msa_cupy.attention(q, k, v, index_q=index_q, index_k=index_k, top_k=16,
                                                 return_lse=True, return_indices=True)
    loss_like = out.float().square().mean()  # ordinary torch work, same stream, no extra sync
torch.cuda.current_stream().wait_stream(stream)  # the default stream reads the results below
print(type(out).__name__, tuple(out.shape), out.dtype, "lse", tuple(lse.shape))
print("query 10000, group 0 attends to key blocks", block_indices[0, 10000, 0].tolist())
print("mean square of the output:", loss_like.item())

# sampled rows against the float64 reference over the same selection (query i sits at key position i)
rows = np.array([0, 10000, N - 1])
host = lambda x: x.float().cpu().numpy()  # noqa: E731  (bf16 -> float32 is exact)
ref_out, _ = reference.sequence_sparse_attention(host(q[0, rows]), host(k[0]), host(v[0]),
                                                 block_indices[0, rows].cpu().numpy(), rows)
print(f"relative error against the reference: {testing.rel_error(host(out[0, rows]), ref_out):.1e}")
