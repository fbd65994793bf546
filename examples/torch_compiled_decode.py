"""A compiled PyTorch decode loop over MSA: an attention module whose step (append the new
token's keys to a paged KV cache, then msa_cupy.torch.DecodePlan's update and run) is compiled
with torch.compile(fullgraph=True, mode="reduce-overhead"), so each step replays one CUDA
graph.  Then the step timed four ways on this GPU: the plain msa_cupy.DecodePlan eager and
replayed from a torch.cuda.graph capture, against the compiled module without and with CUDA
graphs.

    python examples/torch_compiled_decode.py [--batch 8] [--cache 131072] [--steps 32]
"""
import argparse
import sys

import msa_cupy

try:
    import torch
except ImportError:
    torch = None
if torch is None or not (torch.cuda.is_available() and msa_cupy.gpu_available()):
    print("torch_compiled_decode: skipped, needs PyTorch and a CUDA GPU visible to PyTorch and CuPy")
    sys.exit(0)

import msa_cupy.torch as msa_torch  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--cache", type=int, default=131072, help="keys per sequence the cache holds")
parser.add_argument("--steps", type=int, default=32)
args = parser.parse_args()
B, CACHE, STEPS = args.batch, args.cache, args.steps
HQ, HKV, D, PAGE, TOP_K = 64, 4, 128, 128, 16  # the MSA paper's decode shapes
PAGES = CACHE // PAGE


class MSADecode(torch.nn.Module):
    """One attention layer's decode step over a paged KV cache (pages handed out shuffled)."""

    def __init__(self):
        super().__init__()
        pages = B * PAGES
        self.register_buffer("k_cache", torch.randn(pages, PAGE, HKV, D, device="cuda").to(torch.bfloat16))
        self.register_buffer("v_cache", torch.randn(pages, PAGE, HKV, D, device="cuda").to(torch.bfloat16))
        self.register_buffer("block_table", torch.randperm(pages, device="cuda").int().view(B, PAGES))
        for t in (self.k_cache, self.v_cache, self.block_table):
            torch._dynamo.mark_static_address(t)  # CUDA-graph trees read them in place, no copies
        self.plan = msa_torch.DecodePlan(max_batch=B, max_cache_len=CACHE, num_q_heads=HQ, num_kv_heads=HKV,
                                         head_dim=D, dtype=torch.bfloat16, top_k=TOP_K, page_size=PAGE,
                                         num_pages=pages)

    def forward(self, q, k_new, v_new, seq_lens):
        """q, k_new, v_new (B, 1, H, D): the new token of each sequence; seq_lens (B,) int32
        counts the keys with the new one."""
        pos = seq_lens.long() - 1
        page = self.block_table[torch.arange(B, device=q.device), pos // PAGE].long()
        self.k_cache[page, pos % PAGE] = k_new[:, 0]
        self.v_cache[page, pos % PAGE] = v_new[:, 0]
        self.plan.update(seq_lens, self.block_table)
        return self.plan.run(q, self.k_cache, self.v_cache)


def new_token():
    return (torch.randn(B, 1, HQ, D, device="cuda").to(torch.bfloat16),
            torch.randn(B, 1, HKV, D, device="cuda").to(torch.bfloat16),
            torch.randn(B, 1, HKV, D, device="cuda").to(torch.bfloat16))


module = MSADecode()
compiled = torch.compile(module, fullgraph=True, mode="reduce-overhead")
# the same step on a plain msa_cupy.DecodePlan, eagerly: what every compiled step is checked against
raw = msa_cupy.DecodePlan(max_batch=B, max_cache_len=CACHE, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                          dtype="bfloat16", top_k=TOP_K, page_size=PAGE, num_pages=B * PAGES)
raw_out = torch.empty(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)


def raw_step(q, k_new, v_new, seq_lens):
    pos = seq_lens.long() - 1
    page = module.block_table[torch.arange(B, device=q.device), pos // PAGE].long()
    module.k_cache[page, pos % PAGE] = k_new[:, 0]
    module.v_cache[page, pos % PAGE] = v_new[:, 0]
    raw.update(seq_lens, module.block_table)
    return raw.run(q, module.k_cache, module.v_cache, out=raw_out)


# ---------------------------------------------------------------- the decode loop
seq_lens = torch.randint(CACHE // 2, CACHE - STEPS, (B,), device="cuda", dtype=torch.int32)
mismatches = 0
for step in range(STEPS):
    seq_lens += 1
    token = new_token()
    out = compiled(*token, seq_lens).clone()  # reduce-overhead outputs live until the next replay
    mismatches += not torch.equal(out.view(torch.int16), raw_step(*token, seq_lens).view(torch.int16))
torch.cuda.synchronize()
print(f"{STEPS} compiled decode steps, batch {B}, up to {int(seq_lens.max())} cached keys: "
      f"{'bitwise equal to the eager plan' if not mismatches else f'{mismatches} steps DIFFER from the eager plan'}")
print("output finite:", bool(torch.isfinite(out.float()).all()), "| clamped entries:", module.plan.clamped_entries())


# ---------------------------------------------------------------- timing (same step, same inputs)
def per_call_ms(fn, calls=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


token = new_token()
eager_ms = per_call_ms(lambda: raw_step(*token, seq_lens))
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    raw_step(*token, seq_lens)
graph_ms = per_call_ms(graph.replay)
compiled_default = torch.compile(module, fullgraph=True)
default_ms = per_call_ms(lambda: compiled_default(*token, seq_lens))
reduce_ms = per_call_ms(lambda: compiled(*token, seq_lens))

name = torch.cuda.get_device_name()
print(f"\ndecode step (append + update + run), batch {B}, {int(seq_lens.max())} cached keys, {name}")
print(f"{'':34}{'ms/step':>9}  {'vs baseline':>11}")
rows = [("msa_cupy.DecodePlan, eager", eager_ms, None),
        ("torch.compile (default)", default_ms, eager_ms),
        ("msa_cupy.DecodePlan, CUDA graph", graph_ms, None),
        ("torch.compile (reduce-overhead)", reduce_ms, graph_ms)]
for label, ms, base in rows:
    print(f"{label:34}{ms:9.4f}  {'' if base is None else f'{ms / base:10.2f}x'}")
print("target: each compiled form within 10% of its baseline (<= 1.10x)")
