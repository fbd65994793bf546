"""Every CUDA kernel of msa_cupy once, on small shapes, each result checked against the
reference: the workload that ``python -m msa_cupy check --sanitize`` and
tests/test_sanitize_gpu.py run under compute-sanitizer's memcheck, racecheck and synccheck.

    python -m msa_cupy._sanitize [TEXT ...]   the workload in this process (only the stages
                                              whose name holds a TEXT, when given): a line per
                                              stage, exit status 1 if a result is wrong

The workload switches CuPy's memory pool off, so that each array is its own device
allocation: memcheck then sees an access past an array's end, which inside a pooled chunk
would land in a neighbour's bytes unnoticed.  Shapes are small (a few hundred tokens, two
sequences, a chunk at the end of a cache and a decode batch) because racecheck and synccheck
run each kernel one to two orders of magnitude slower.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

TOOLS = ("memcheck", "racecheck", "synccheck")
CLEAN = "ERROR SUMMARY: 0 errors"  # memcheck, synccheck, initcheck
CLEAN_RACECHECK = "RACECHECK SUMMARY: 0 hazards displayed (0 errors"  # racecheck's own summary line


def reports_clean(output: str) -> bool:
    """compute-sanitizer's summary says 0 errors (racecheck words it as 0 hazards)."""
    clean = CLEAN in output or CLEAN_RACECHECK in output
    return clean and not re.search(r"(ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: [1-9])", output)


PREFILL_SEQS = ((150, 200), (60, 333))  # (queries, keys) per sequence: queries at the end of the keys
DECODE_SEQS = ((1, 400), (3, 700))
WIDE_SEQS = ((70, 512), (20, 260))     # 8 blocks of 64: the 4-wide loads of topk.cu
HKV, GROUP, TOP_K, LOCAL, SINK = 2, 4, 4, 1, 1
INDEX_DIM, SELECT_BLOCK = 64, 64
HEAD_DIM, ATTN_BLOCK = 128, 128       # both prefill kernels run at D = BK = 128
TOLERANCE = 1e-2                       # bf16 attention, ||out - ref|| / ||ref||
LSE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------- inputs


def _bf16():
    from ._interop import BFLOAT16

    return BFLOAT16


def _layout(seqs):
    from ._layout import varlen_layout

    cu_q = np.concatenate([[0], np.cumsum([q for q, _ in seqs])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([k for _, k in seqs])]).astype(np.int32)
    return varlen_layout(cu_q, cu_k), cu_q, cu_k


def _index(rng, layout):
    """Small integers: every dot product is exact in fp32, so the selection must equal the
    float64 reference bit for bit, ties included.  index_k is shared by the groups."""
    iq = rng.integers(-2, 3, (layout.total_q, HKV, INDEX_DIM)).astype(_bf16())
    ik = rng.integers(-2, 3, (layout.total_k, 1, INDEX_DIM)).astype(_bf16())
    return iq, ik


def _device(*arrays):
    import cupy

    return [cupy.asarray(a) for a in arrays]


def _seq_kw(cu_q, cu_k):
    return dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


# --------------------------------------------------------------------------- checks


def _equal(got, ref, what):
    got = np.asarray(got)
    if got.shape != ref.shape or not np.array_equal(got.astype(np.float64), np.asarray(ref, np.float64)):
        bad = int(np.sum(got.astype(np.float64) != np.asarray(ref, np.float64))) if got.shape == ref.shape else -1
        return f"{what}: {bad} entries differ from the reference"
    return None


def _close(out, lse, ref_out, ref_lse):
    """Same non-finite elements; finite ones within the bf16 tolerance."""
    out = np.asarray(out).astype(np.float64)
    lse = np.asarray(lse).astype(np.float64)
    if not np.array_equal(np.isfinite(out), np.isfinite(ref_out)):
        return f"out: {int(np.sum(np.isfinite(out) != np.isfinite(ref_out)))} elements finite on one side only"
    if not np.array_equal(np.isfinite(lse), np.isfinite(ref_lse)) or not np.array_equal(np.isneginf(lse),
                                                                                      np.isneginf(ref_lse)):
        return "lse: non-finite elements differ from the reference"
    fin = np.isfinite(ref_out)
    err = np.linalg.norm(out[fin] - ref_out[fin]) / max(np.linalg.norm(ref_out[fin]), 1e-30)
    if err > TOLERANCE:
        return f"out: relative error {err:.2e}"
    fin = np.isfinite(ref_lse)
    if fin.any() and np.max(np.abs(lse[fin] - ref_lse[fin])) > LSE_TOLERANCE:
        return "lse: beyond tolerance"
    return None


# --------------------------------------------------------------------------- stages


def _select_scores(rng, warps):
    from . import reference, selection

    layout, cu_q, cu_k = _layout(PREFILL_SEQS)
    iq, ik = _index(rng, layout)
    got = selection.block_scores(*_device(iq, ik), layout, *_device(cu_q, cu_k), block_size=SELECT_BLOCK,
                                 causal=True, tuning=selection.SelectTuning(warps=warps))
    ref = reference.block_scores(iq, ik, block_size=SELECT_BLOCK, causal=True, **_seq_kw(cu_q, cu_k))
    return _equal(got.get(), ref, "block scores")


def _select_topk(rng, warps, splits, seqs, producer=False):
    from . import reference, selection

    layout, cu_q, cu_k = _layout(seqs)
    iq, ik = _index(rng, layout)
    options = dict(top_k=TOP_K, block_size=SELECT_BLOCK, local_blocks=LOCAL, sink_blocks=SINK, causal=True)
    got = selection.select_blocks(*_device(iq, ik), layout, *_device(cu_q, cu_k),
                                  tuning=selection.SelectTuning(splits=splits, warps=warps, producer=producer),
                                  **options)
    ref = reference.select_blocks(iq, ik, **options, **_seq_kw(cu_q, cu_k))
    return _equal(got.get(), ref, "block ids")


def _topk(rng, seqs):
    """topk.cu over float32 scores with NaN, -inf and ties."""
    from . import reference, selection

    layout, cu_q, cu_k = _layout(seqs)
    width = layout.n_blocks(SELECT_BLOCK)
    scores = rng.integers(-3, 4, (layout.total_q, HKV, width)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = np.nan
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    options = dict(top_k=TOP_K, block_size=SELECT_BLOCK, local_blocks=LOCAL, sink_blocks=SINK, causal=True)
    got = selection.topk_blocks(*_device(scores), layout, *_device(cu_q, cu_k), **options)
    ref = reference.topk_blocks(scores, **options, **_seq_kw(cu_q, cu_k))
    return _equal(got.get(), ref, "block ids")


def _attention_case(rng, seqs):
    """bf16 q, k, v and a selection (the reference's, on a random index), with a NaN in v of
    the last key of the first sequence: a key only its last query sees, so the prefill
    kernels take their masking path for non-finite V."""
    from . import reference

    layout, cu_q, cu_k = _layout(seqs)
    dt = _bf16()
    q = rng.standard_normal((layout.total_q, HKV * GROUP, HEAD_DIM)).astype(dt)
    k = rng.standard_normal((layout.total_k, HKV, HEAD_DIM)).astype(dt)
    v = rng.standard_normal((layout.total_k, HKV, HEAD_DIM)).astype(dt)
    v[cu_k[1] - 1, 0, 5] = np.nan
    iq = rng.standard_normal((layout.total_q, HKV, INDEX_DIM)).astype(dt)
    ik = rng.standard_normal((layout.total_k, HKV, INDEX_DIM)).astype(dt)
    ids = reference.select_blocks(iq, ik, top_k=TOP_K, block_size=ATTN_BLOCK, local_blocks=LOCAL,
                                  sink_blocks=SINK, causal=True, **_seq_kw(cu_q, cu_k))
    scale = 1 / np.sqrt(HEAD_DIM)
    ref = reference.sparse_attention(q, k, v, ids, block_size=ATTN_BLOCK, causal=True, scale=scale,
                                     return_lse=True, **_seq_kw(cu_q, cu_k))
    return layout, cu_q, cu_k, (q, k, v, ids), scale, ref


def _sparse_kernels(rng, seqs, path, prefill_kernel=None, schedule="kv", min_useful=0.3, tile_kernel="mma",
                    tile_producer=False, decode_combine=None):
    from . import sparse

    layout, cu_q, cu_k, arrays, scale, ref = _attention_case(rng, seqs)
    sparse._poison_outputs = True  # an element no kernel writes stays NaN
    try:
        tuning = sparse.SparseTuning(path=path, prefill_kernel=prefill_kernel, schedule=schedule,
                                     tile_min_useful=min_useful, tile_kernel=tile_kernel,
                                     tile_producer=tile_producer, decode_combine=decode_combine)
        out, lse = sparse.sparse_attention(*_device(*arrays), layout, *_device(cu_q, cu_k), block_size=ATTN_BLOCK,
                                           causal=True, scale=scale, tuning=tuning)
    finally:
        sparse._poison_outputs = False
    return _close(out.get(), lse.get(), *ref)


def _block_max(rng, causal):
    from . import _plain, reference

    layout, cu_q, cu_k = _layout(PREFILL_SEQS)
    iq, ik = _index(rng, layout)
    got = _plain.block_scores(*_device(iq, ik), layout, block_size=SELECT_BLOCK, causal=causal)
    ref = reference.block_scores(iq, ik, block_size=SELECT_BLOCK, causal=causal, **_seq_kw(cu_q, cu_k))
    return _equal(got.get(), ref, "block scores")


def _plain_end_to_end(rng):
    from . import _plain, reference

    layout, cu_q, cu_k, (q, k, v, _), scale, _ = _attention_case(rng, PREFILL_SEQS)
    iq, ik = _index(rng, layout)
    options = dict(top_k=TOP_K, block_size=ATTN_BLOCK, local_blocks=LOCAL, sink_blocks=SINK, causal=True)
    ids = _plain.select_blocks(*_device(iq, ik), layout, **options)
    ref_ids = reference.select_blocks(iq, ik, **options, **_seq_kw(cu_q, cu_k))
    if (msg := _equal(ids.get(), ref_ids, "block ids")) is not None:
        return msg
    out, lse = _plain.sparse_attention(*_device(q, k, v), ids, layout, block_size=ATTN_BLOCK, causal=True,
                                       scale=scale)
    ref = reference.sparse_attention(q, k, v, ref_ids, block_size=ATTN_BLOCK, causal=True, scale=scale,
                                     return_lse=True, **_seq_kw(cu_q, cu_k))
    return _close(out.get(), lse.get(), *ref)


def _cache(rng, batch, max_len, page_size):
    """(cache shape, page count or None, block table or None, k, v) of a small KV cache:
    pages in a random order (one spare) or contiguous rows."""
    if page_size:
        n_pages = batch * -(-max_len // page_size) + 1
        cache = (n_pages, page_size, HKV, HEAD_DIM)
        table = rng.permutation(n_pages)[:n_pages - 1].reshape(batch, -1).astype(np.int32)
    else:
        n_pages, cache, table = None, (batch, max_len, HKV, HEAD_DIM), None
    dt = _bf16()
    return cache, n_pages, table, rng.standard_normal(cache).astype(dt), rng.standard_normal(cache).astype(dt)


def _prefill_plan(rng, page_size, schedule="auto"):
    """A chunked-prefill plan step (plan_update.cu with query lengths, bound_query_rows,
    selection, then by the schedule tile_schedule.cu and the tile-outer kernel, the device
    reverse index, the KV-outer kernel and combine.cu) on q rows past the step's tokens,
    against the reference over the plan's own selection."""
    import msa_cupy

    from . import reference

    batch, max_len = 2, 700
    lens, q_lens = np.array([700, 129], np.int32), np.array([300, 129], np.int32)
    total = int(q_lens.sum())
    hq = HKV * GROUP
    q = rng.standard_normal((total + 20, hq, HEAD_DIM)).astype(_bf16())
    cache, n_pages, table, k, v = _cache(rng, batch, max_len, page_size)
    plan = msa_cupy.PrefillPlan(max_batch=batch, max_cache_len=max_len, max_query_tokens=total + 40,
                                num_q_heads=hq, num_kv_heads=HKV, head_dim=HEAD_DIM, dtype="bfloat16",
                                block_size=ATTN_BLOCK, top_k=TOP_K, local_blocks=LOCAL, sink_blocks=SINK,
                                page_size=page_size, num_pages=n_pages, schedule=schedule)
    plan.update(*_device(lens, q_lens, *(() if table is None else (table,))))
    out, lse = plan.run(*_device(q, k, v), return_lse=True)
    ids = plan.block_indices.get()[:total]
    rows = reference.cache_rows(lens, cache[1], table)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ref = reference.sparse_attention(q[:total], flat(k)[rows], flat(v)[rows], ids, block_size=ATTN_BLOCK,
                                     causal=True, return_lse=True, **_seq_kw(cu_q, cu_k))
    return _close(out.get()[:total], lse.get()[:total], *ref)


def _decode_plan(rng, page_size, batched_one_call=False):
    """A decode plan over a paged (or contiguous) cache with the training-free index:
    plan_update.cu from device arrays, group_mean.cu, the selection and decode.cu over
    block_table pages, against the reference; and a batched one-call decode
    (uniform_cu_seqlens)."""
    import msa_cupy

    from . import reference, testing

    batch, nq, max_len = 2, 2, 700
    lens = np.array([700, 129], np.int32)
    hq = HKV * GROUP
    q = rng.standard_normal((batch, nq, hq, HEAD_DIM)).astype(_bf16())
    cache, n_pages, table, k, v = _cache(rng, batch, max_len, page_size)
    plan = msa_cupy.DecodePlan(max_batch=batch, max_cache_len=max_len, num_q_heads=hq, num_kv_heads=HKV,
                               head_dim=HEAD_DIM, dtype="bfloat16", block_size=ATTN_BLOCK, top_k=TOP_K,
                               local_blocks=LOCAL, sink_blocks=SINK, queries_per_seq=nq, page_size=page_size,
                               num_pages=n_pages)
    plan.update(*_device(lens, *(() if table is None else (table,))))
    out, lse = plan.run(*_device(q, k, v), return_lse=True)
    ids = plan.block_indices.get()
    rows = reference.cache_rows(lens, cache[1], table)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    cu_q = (np.arange(batch + 1) * nq).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ref = reference.sparse_attention(flat(q), flat(k)[rows], flat(v)[rows], flat(ids), block_size=ATTN_BLOCK,
                                     causal=True, return_lse=True, **_seq_kw(cu_q, cu_k))
    if (msg := _close(flat(out.get()), flat(lse.get()), *ref)) is not None:
        return msg
    try:  # the selection itself, from the plan's own index_q (group_mean.cu) and the group's key head
        testing.assert_selection_matches(flat(ids), plan.workspace["index_q"][:batch * nq].get(), flat(k)[rows],
                                         top_k=TOP_K, block_size=ATTN_BLOCK, local_blocks=LOCAL, sink_blocks=SINK,
                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    except AssertionError as exc:
        return f"plan selection: {exc}"
    if not batched_one_call:
        return None
    # one-call decode of a batched (B, Nq, ...) input: device cu_seqlens from uniform_cu_seqlens
    k1, v1 = flat(k)[rows][None, :400], flat(v)[rows][None, :400]  # sequence 0's first 400 keys
    out1, lse1, ids1 = msa_cupy.attention(*_device(q[:1], k1, v1), block_size=ATTN_BLOCK, top_k=TOP_K,
                                          local_blocks=LOCAL, sink_blocks=SINK, return_lse=True, return_indices=True)
    ref1 = reference.sparse_attention(q[0], k1[0], v1[0], ids1.get()[0], block_size=ATTN_BLOCK, causal=True,
                                      return_lse=True)
    return _close(out1.get()[0], lse1.get()[0], *ref1)


def stages(wgmma: bool):
    """(name, check(rng) -> None or what is wrong) for every kernel; the sm_90 kernels where
    `wgmma`."""
    from .selection import DECODE_WARPS, DECODE_WARPS_16, PREFILL_WARPS, WGMMA

    p = functools.partial
    out = [
        ("select.cu scores epilogue, 256-row CTAs", p(_select_scores, warps=PREFILL_WARPS)),
        ("select.cu top-k epilogue, 256-row CTAs", p(_select_topk, warps=PREFILL_WARPS, splits=1, seqs=PREFILL_SEQS)),
        ("select.cu top-k epilogue, 32-row CTAs, split-K (merged by the last split)",
         p(_select_topk, warps=DECODE_WARPS, splits=2, seqs=DECODE_SEQS)),
        ("select.cu top-k epilogue, 16-row CTAs (one m-tile a warp), split-K (merged by the last split)",
         p(_select_topk, warps=DECODE_WARPS_16, splits=3, seqs=DECODE_SEQS)),
        ("topk.cu over scores, 1-wide loads", p(_topk, seqs=PREFILL_SEQS)),
        ("topk.cu over scores, 4-wide loads", p(_topk, seqs=WIDE_SEQS)),
        ("reverse_index.cu + sparse_prefill.cu (mma.sync) + combine.cu",
         p(_sparse_kernels, seqs=PREFILL_SEQS, path="prefill", prefill_kernel="mma")),
        ("tile_schedule.cu + sparse_prefill_tile.cu (every tile tile-outer)",
         p(_sparse_kernels, seqs=PREFILL_SEQS, path="prefill", schedule="tile")),
        ("tile_schedule.cu classification + sparse_prefill_tile.cu + reverse_index.cu + sparse_prefill.cu + "
         "combine.cu (schedule auto: both paths)",
         p(_sparse_kernels, seqs=PREFILL_SEQS, path="prefill", prefill_kernel="mma", schedule="auto", min_useful=0.9)),
        ("decode.cu (combined by the last CTA of each row)",
         p(_sparse_kernels, seqs=DECODE_SEQS, path="decode", decode_combine="last_cta")),
        ("block_max.cu causal (plain path)", p(_block_max, causal=True)),
        ("block_max.cu non-causal (plain path)", p(_block_max, causal=False)),
        ("plain path end to end", _plain_end_to_end),
        ("decode plan, paged: plan_update.cu + group_mean.cu + selection + decode.cu; "
         "one-call decode (plan_update.cu uniform_cu_seqlens)", p(_decode_plan, page_size=64, batched_one_call=True)),
        ("decode plan, contiguous cache; one-call decode", p(_decode_plan, page_size=None, batched_one_call=True)),
        ("prefill plan, paged, schedule tile: plan_update.cu (query lengths) + bound_query_rows + selection + "
         "tile_schedule.cu + the tile-outer kernel (sparse_prefill_tile_sm90.cu on sm_90)",
         p(_prefill_plan, page_size=64, schedule="tile")),
        ("prefill plan, paged, schedule kv: the device reverse index + the KV-outer kernel + combine.cu",
         p(_prefill_plan, page_size=64, schedule="kv")),
        ("prefill plan, contiguous, schedule auto: both paths", p(_prefill_plan, page_size=None, schedule="auto")),
    ]
    if wgmma:
        out += [
            ("select_sm90.cu scores epilogue", p(_select_scores, warps=WGMMA)),
            ("select_sm90.cu top-k epilogue", p(_select_topk, warps=WGMMA, splits=1, seqs=PREFILL_SEQS)),
            ("select_sm90.cu top-k epilogue, split-K (merged by the last split)",
             p(_select_topk, warps=WGMMA, splits=3, seqs=DECODE_SEQS)),
            ("select_sm90.cu with a producer warpgroup (mbarrier ring, pipeline.cuh), split-K",
             p(_select_topk, warps=WGMMA, splits=3, seqs=PREFILL_SEQS, producer=True)),
            ("reverse_index.cu + sparse_prefill_sm90.cu (wgmma) + combine.cu",
             p(_sparse_kernels, seqs=PREFILL_SEQS, path="prefill", prefill_kernel="wgmma")),
            ("tile_schedule.cu + sparse_prefill_tile_sm90.cu (wgmma, every tile tile-outer)",
             p(_sparse_kernels, seqs=PREFILL_SEQS, path="prefill", schedule="tile", tile_kernel="wgmma")),
            ("sparse_prefill_tile_sm90.cu with a producer warpgroup (mbarrier ring, pipeline.cuh)",
             p(_sparse_kernels, seqs=PREFILL_SEQS, path="prefill", schedule="tile", tile_kernel="wgmma",
               tile_producer=True)),
            ("decode.cu (combined by a cluster of each row's top_k CTAs)",
             p(_sparse_kernels, seqs=DECODE_SEQS, path="decode", decode_combine="cluster")),
        ]
    return out


def selected(all_stages, match=()):
    """The stages whose name holds one of the strings in ``match`` (all of them when it is
    empty); ValueError for a string no stage name holds, so that a typo does not pass as a
    clean run of nothing."""
    if not match:
        return list(all_stages)
    missing = [m for m in match if not any(m in name for name, _ in all_stages)]
    if missing:
        raise ValueError(f"no sanitizer stage matches {', '.join(map(repr, missing))}; the stages: "
                         + "; ".join(name for name, _ in all_stages))
    return [(name, check) for name, check in all_stages if any(m in name for m in match)]


def workload(log=print, match=()) -> int:
    """Run every stage once (or those ``selected`` by ``match``); returns the number of wrong results."""
    import cupy

    from . import _jit

    failures = 0
    rng = np.random.default_rng(0)
    for name, check in selected(stages(_jit.has_wgmma()), match):
        problem = check(rng)
        cupy.cuda.runtime.deviceSynchronize()
        log(f"{'ok  ' if problem is None else 'FAIL'} {name}" + ("" if problem is None else f": {problem}"))
        failures += problem is not None
    return failures


# --------------------------------------------------------------------------- compute-sanitizer


def compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else under $CUDA_HOME/bin or /usr/local/cuda/bin; None if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(exe := os.path.join(root, "bin", "compute-sanitizer"), os.X_OK):
            return exe
    return None


def run(tool: str | None = None, timeout: float = 3600, match=()) -> tuple[bool, str]:
    """The workload in a fresh process (its stages ``match`` selects), under compute-sanitizer
    --tool `tool` (None: alone).  Returns (clean, output): the workload's checks passed and,
    under a tool, the sanitizer reported 0 errors."""
    command = [sys.executable, "-m", "msa_cupy._sanitize", *match]
    if tool is not None:
        exe = compute_sanitizer()
        if exe is None:
            raise FileNotFoundError("compute-sanitizer not found on PATH, under $CUDA_HOME/bin or /usr/local/cuda/bin")
        command = [exe, "--tool", tool, "--error-exitcode", "1", *command]
    env = dict(os.environ)
    env.pop("MSA_CUPY_PLAIN", None)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    clean = proc.returncode == 0
    if tool is not None:
        clean = clean and reports_clean(output)
    return clean, output


def sanitize(tools=TOOLS, log=print, match=()) -> int:
    """The workload alone (which also compiles and caches every kernel it needs), then under
    each tool; the stages ``match`` selects.  Returns the number of failed runs (1 when
    compute-sanitizer is absent)."""
    if compute_sanitizer() is None:
        log("sanitize: compute-sanitizer not found on PATH, under $CUDA_HOME/bin or /usr/local/cuda/bin")
        return 1
    failures = 0
    for tool in (None, *tools):
        clean, output = run(tool, match=match)
        log(f"sanitize {tool or 'workload alone'}: {'clean' if clean else 'FAILED'}")
        if not clean:
            log(output[-8000:])
            failures += 1
    return failures


def main() -> int:
    import cupy

    cupy.cuda.set_allocator(None)  # one device allocation per array (see the module docstring)
    return 1 if workload(match=tuple(sys.argv[1:])) else 0


if __name__ == "__main__":
    sys.exit(main())
