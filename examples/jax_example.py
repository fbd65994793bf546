"""MSA from JAX: jax.Array in, jax.Array out (through DLPack, no copies).

    python examples/jax_example.py
"""
import jax
import jax.numpy as jnp
import numpy as np

import msa_cupy
from msa_cupy import reference, testing

B, N, HQ, HKV, D = 1, 16384, 32, 4, 128
keys = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(keys[0], (B, N, HQ, D), jnp.bfloat16)
k = jax.random.normal(keys[1], (B, N, HKV, D), jnp.bfloat16)
v = jax.random.normal(keys[2], (B, N, HKV, D), jnp.bfloat16)

# no index given: the training-free default (mean of each group's query heads vs its key head)
out, block_indices = msa_cupy.attention(q, k, v, top_k=16, return_indices=True)
print(type(out).__name__, out.shape, out.dtype)
print("blocks picked by the last query of group 0:", block_indices[0, -1, 0].tolist())
print("output mean |x|:", float(jnp.abs(out.astype(jnp.float32)).mean()))

# sampled rows against the float64 reference over the same selection (query i sits at key position i)
rows = np.array([0, 8191, N - 1])
host = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731  (bf16 -> float32 is exact)
ref_out, _ = reference.sequence_sparse_attention(host(q[0, rows]), host(k[0]), host(v[0]),
                                                 np.asarray(block_indices[0, rows]), rows)
print(f"relative error against the reference: {testing.rel_error(host(out[0, rows]), ref_out):.1e}")
