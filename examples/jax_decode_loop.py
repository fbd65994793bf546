"""A jitted JAX decode loop with MSA: ``lax.scan`` over decode steps, each step writing the new
token's keys into the KV cache and attending with ``msa_cupy.jax.decode`` (inside the jitted
loop, on XLA's stream, no allocation).

    python examples/jax_decode_loop.py

On a GPU: the MSA paper's shapes (Hq=64, Hkv=4, D=Di=128, block 128, top_k 16, bf16, a
learned-style index with one shared index-key head), one sequence growing to 32K keys; the last
step against the same DecodePlan run eagerly (bitwise) and the float64 reference, and ms per
step of the jitted loop and of the eager plan.  Without a GPU the same loop runs on small shapes
through the float64 reference (``jax.pure_callback`` on the CPU).
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave CuPy room beside XLA

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import msa_cupy  # noqa: E402
import msa_cupy.jax as msa_jax  # noqa: E402
from msa_cupy import reference, testing  # noqa: E402

GPU = jax.default_backend() == "gpu" and msa_cupy.gpu_available()
if GPU:
    B, HQ, HKV, D, DI, BLOCK, TOP_K, CACHE, STEPS = 1, 64, 4, 128, 128, 128, 16, 32768, 64
else:
    B, HQ, HKV, D, DI, BLOCK, TOP_K, CACHE, STEPS = 1, 8, 2, 64, 64, 64, 4, 1024, 8
print(f"{'GPU' if GPU else 'CPU (float64 reference)'}: B={B} Hq={HQ} Hkv={HKV} D={D} cache {CACHE}, {STEPS} steps")

keys = iter(jax.random.split(jax.random.PRNGKey(0), 10))
bf16 = jnp.bfloat16
k_cache = jax.random.normal(next(keys), (B, CACHE, HKV, D), bf16)   # the prefilled cache (and room to grow)
v_cache = jax.random.normal(next(keys), (B, CACHE, HKV, D), bf16)
ik_cache = jax.random.normal(next(keys), (B, CACHE, 1, DI), bf16)   # index keys: one head shared by the groups
steps = dict(q=jax.random.normal(next(keys), (STEPS, B, 1, HQ, D), bf16),      # per step: the new token's
             iq=jax.random.normal(next(keys), (STEPS, B, 1, HKV, DI), bf16),   # query, index query and keys
             k=jax.random.normal(next(keys), (STEPS, B, HKV, D), bf16),
             v=jax.random.normal(next(keys), (STEPS, B, HKV, D), bf16),
             ik=jax.random.normal(next(keys), (STEPS, B, 1, DI), bf16))
lens = jnp.full((B,), CACHE - STEPS, jnp.int32)                      # keys cached before the loop


def step(carry, x):
    k_cache, v_cache, ik_cache, lens = carry
    rows = jnp.arange(B)
    k_cache = k_cache.at[rows, lens].set(x["k"])                      # the new token's keys, then attend
    v_cache = v_cache.at[rows, lens].set(x["v"])
    ik_cache = ik_cache.at[rows, lens].set(x["ik"])
    lens = lens + 1
    out = msa_jax.decode(x["q"], k_cache, v_cache, lens, index_q=x["iq"], index_k_cache=ik_cache,
                         block_size=BLOCK, top_k=TOP_K)
    return (k_cache, v_cache, ik_cache, lens), out


loop = jax.jit(lambda carry, xs: jax.lax.scan(step, carry, xs))
(k_cache, v_cache, ik_cache, lens), outs = loop((k_cache, v_cache, ik_cache, lens), steps)
outs.block_until_ready()
print("outputs", outs.shape, outs.dtype, "final lengths", np.asarray(lens).tolist())

last = dict(q=steps["q"][-1], iq=steps["iq"][-1])
host = {name: np.asarray(x) for name, x in dict(q=last["q"], iq=last["iq"], k=k_cache, v=v_cache, ik=ik_cache,
                                                 lens=lens, out=outs[-1]).items()}
ref = reference.decode_attention(host["q"], host["k"], host["v"], host["lens"], index_q=host["iq"],
                                 index_k_cache=host["ik"], block_size=BLOCK, top_k=TOP_K)
err = testing.rel_error(host["out"], ref)
print(f"last step against the float64 reference: relative error {err:.1e} (bf16 tolerance "
      f"{testing.TOLERANCE['bfloat16']})")

if GPU:
    import cupy as cp

    plan = msa_cupy.DecodePlan(max_batch=B, max_cache_len=CACHE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                               dtype="bfloat16", index_dim=DI, index_k_heads=1, block_size=BLOCK, top_k=TOP_K)
    q, iq, kc, vc, ikc, lens_c = (cp.from_dlpack(x) for x in (last["q"], last["iq"], k_cache, v_cache, ik_cache,
                                                                lens))
    plan.update(lens_c)
    eager = plan.run(q, kc, vc, index_q=iq, index_k_cache=ikc)
    same = np.array_equal(cp.asnumpy(eager).view(np.uint16), host["out"].view(np.uint16))
    print("last step equals the DecodePlan run eagerly, bitwise:", same)

    def per_step_ms(fn, repeats=5):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) / STEPS * 1e3)
        return float(np.median(times))

    def eager_steps():
        for _ in range(STEPS):
            plan.update(lens_c)
            plan.run(q, kc, vc, index_q=iq, index_k_cache=ikc)
        cp.cuda.get_current_stream().synchronize()

    carry = (k_cache, v_cache, ik_cache, lens - STEPS)
    jitted = per_step_ms(lambda: loop(carry, steps)[1].block_until_ready())
    print(f"ms per step: jitted loop {jitted:.4f} (cache writes included), DecodePlan eager "
          f"{per_step_ms(eager_steps):.4f}  (python -m msa_cupy bench --suite jax_decode: all modes)")
