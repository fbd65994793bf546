"""The JIT layer: header inlining, cache keys that see headers, unwritable caches; prepared
launches (argument blocks, slots, launch functions recorded with stand-ins)."""
import warnings

import pytest

from msa_cupy import _jit


@pytest.fixture
def cuda_dir(tmp_path, monkeypatch):
    (tmp_path / "a.cuh").write_text("#pragma once\n#define A_VALUE 1\n")
    (tmp_path / "b.cuh").write_text('#pragma once\n#include "a.cuh"\n#define B_VALUE 2\n')
    (tmp_path / "k.cu").write_text(
        '#include "a.cuh"\n#include "b.cuh"\n'
        "template <int N> __global__ void fill(int* out) { out[threadIdx.x] = N + A_VALUE + B_VALUE; }\n")
    monkeypatch.setattr(_jit, "CUDA_DIR", tmp_path)
    return tmp_path


def test_headers_are_inlined_once(cuda_dir):
    text = _jit.source_text("k.cu")
    assert text.count("#define A_VALUE") == 1 and "#define B_VALUE" in text
    assert '#include "' not in text


def test_missing_source_is_named(cuda_dir):
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        _jit.source_text("nope.cu")


def test_every_declared_source_exists():
    import msa_cupy.__main__ as cli

    for source in cli._declared_variants():
        assert (_jit.CUDA_DIR / source).is_file(), source


def test_cuda_python_compiles_for_sm80_and_sm90(cuda_dir):
    pytest.importorskip("cuda.bindings")
    for arch in ("sm_80", "sm_90", "sm_90a"):
        cubin, lowered, log = _jit.compile_cubin("k.cu", arch, ["fill<3>"], verbose=True,
                                                 frontend=_jit._nvrtc_cuda_python)
        assert len(cubin) > 0 and lowered["fill<3>"].startswith("_Z")
        assert "registers" in log


def test_compile_errors_carry_the_log(cuda_dir):
    pytest.importorskip("cuda.bindings")
    (cuda_dir / "bad.cu").write_text("__global__ void k() { undeclared_thing(); }\n")
    with pytest.raises(_jit.CompileError, match="undeclared_thing"):
        _jit.compile_cubin("bad.cu", "sm_80", [], frontend=_jit._nvrtc_cuda_python)


def test_cache_key_sees_header_edits_and_survives_unwritable_dir(cuda_dir, tmp_path, monkeypatch):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    monkeypatch.setattr(_jit, "_warned", set())
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(cache))
    cubin1, names1, from_disk = _jit._cached_cubin("k.cu", "sm_80", ["fill<1>"])
    assert not from_disk and len(list(cache.glob("*.kernel"))) == 1
    cubin1b, names1b, from_disk = _jit._cached_cubin("k.cu", "sm_80", ["fill<1>"])
    assert from_disk and cubin1b == cubin1 and names1b == names1
    (cuda_dir / "a.cuh").write_text("#pragma once\n#define A_VALUE 5\n")
    _, _, from_disk = _jit._cached_cubin("k.cu", "sm_80", ["fill<1>"])
    assert not from_disk and len(list(cache.glob("*.kernel"))) == 2, "editing a header must change the cache key"
    # a cache path that cannot be created: compile anyway, warn once
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(blocker / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cubin3, names3, _ = _jit._cached_cubin("k.cu", "sm_80", ["fill<2>"])
        _jit._cached_cubin("k.cu", "sm_80", ["fill<3>"])
    assert len(cubin3) > 0 and "fill<2>" in names3
    assert [str(w.message) for w in caught if "cannot create a kernel cache" in str(w.message)] != []
    assert len(caught) == 1


def test_arch_choice():
    assert _jit.arch_for((9, 0)) == "sm_90"
    assert _jit.arch_for((9, 0), arch_specific=True) == "sm_90a"
    assert _jit.arch_for((8, 6), arch_specific=True) == "sm_86"


# --------------------------------------------------------------------------- prepared launches


class _Function:
    ptr = 0xF00D


class _Kernel:
    """What a prepared launch takes from a Kernel: the function handle and reserve_shared."""

    function = _Function()

    def __init__(self):
        self.reserved = 0

    def reserve_shared(self, nbytes):
        self.reserved = max(self.reserved, nbytes)


def _cell(launch, i, dtype):
    import numpy as np

    return launch.values[i:i + 1].view(np.uint8)[:np.dtype(dtype).itemsize].view(dtype)[0]


def test_launch_packs_each_argument_in_its_own_cell():
    import numpy as np

    kernel = _Kernel()
    args = (np.int32(-5), np.int64(-2**40), np.float32(1.5), np.uint64(2**63 + 7), None, np.int16(-2),
            _jit.Pointer("q", (3, 4), np.float16), _jit.Scalar("n", np.int32), _jit.Scalar("big", np.int64))
    launch = _jit.Launch(kernel, (2, 3), (64,), args, shared_mem=4096)
    assert (launch.grid, launch.block, launch.shared_mem, launch.empty) == ((2, 3, 1), (64, 1, 1), 4096, False)
    assert kernel.reserved == 4096 and launch.function == 0xF00D
    assert _cell(launch, 0, np.int32) == -5 and _cell(launch, 1, np.int64) == -2**40
    assert _cell(launch, 2, np.float32) == np.float32(1.5) and int(launch.values[3]) == 2**63 + 7
    assert int(launch.values[4]) == 0 and _cell(launch, 5, np.int16) == -2
    # the driver reads the argument block through an array of cell addresses
    base = launch.values.ctypes.data
    assert [int(a) for a in launch.addresses] == [base + 8 * i for i in range(len(args))]
    assert launch._args == launch.addresses.ctypes.data
    assert [(name, index) for name, _, index in launch.slots] == [("q", 6), ("n", 14), ("big", 8)]
    program = _jit.Program([launch])
    program.bind("q", 0xDEAD0000BEEF)
    program.bind("n", -7)
    program.bind("big", 2**40 + 3)
    program.bind("absent", 1)  # a name no launch has: nothing
    assert int(launch.values[6]) == 0xDEAD0000BEEF and _cell(launch, 7, np.int32) == -7
    assert _cell(launch, 8, np.int64) == 2**40 + 3
    program.bind("n", 9)  # rebinding rewrites the low four bytes only
    assert _cell(launch, 7, np.int32) == 9 and launch.values[7:8].view(np.int32)[1] == 0
    bind = program.binder(("big", "absent", "q", "n"))  # one call per step, the lookups made once
    assert program.binder(("big", "absent", "q", "n")) is bind
    bind(5, 6, 0x1234, -1)
    assert _cell(launch, 8, np.int64) == 5 and int(launch.values[6]) == 0x1234 and _cell(launch, 7, np.int32) == -1


def test_launch_refuses_arguments_without_a_fixed_width():
    for bad in (5, 1.5, "x", [1]):
        with pytest.raises(TypeError, match="argument 0"):
            _jit.Launch(_Kernel(), (1,), (32,), (bad,))


def test_programmatic_launch_config_is_laid_out_as_cuda_h(monkeypatch):
    """cuLaunchKernelEx reads CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out (no
    header here: the offsets are written down); a programmatic launch passes its stream, grid,
    block, shared memory and argument block, and refuses nothing on its own."""
    import ctypes

    import numpy as np

    cfg, attr = _jit._LaunchConfig, _jit._LaunchAttribute
    assert ctypes.sizeof(attr) == 72 and attr.value.offset == 8
    assert ctypes.sizeof(cfg) == 56
    assert [getattr(cfg, f).offset for f in ("grid", "block", "shared", "stream", "attrs", "n_attrs")] == \
        [0, 12, 24, 32, 40, 48]
    assert _jit._SERIALIZATION.id == 6 and _jit._SERIALIZATION.value[0] == 1

    calls = []

    def fake_launch_ex(config, function, args, extra):
        c = cfg.from_address(config)
        calls.append((tuple(c.grid), tuple(c.block), c.shared, c.stream, c.attrs.contents.id, c.n_attrs, function,
                      args, extra))
        return 0

    monkeypatch.setattr(_jit, "_programmatic_launch_ready", lambda device: True)
    monkeypatch.setattr(_jit, "_launch_ex", fake_launch_ex)
    launch = _jit.Launch(_Kernel(), (5, 2), (128,), (np.int32(3),), shared_mem=81920)
    assert launch.overlapping_previous(0) is launch
    launch(0xABC0)
    assert calls == [((5, 2, 1), (128, 1, 1), 81920, 0xABC0, 6, 1, 0xF00D, launch._args, None)]
    monkeypatch.setattr(_jit, "_launch_ex", lambda *a: 1)  # CUDA_ERROR_INVALID_VALUE: raised (CuPy's driver
    with pytest.raises(Exception):                         # error; without libcuda, CuPy's load error)
        launch(0)
    monkeypatch.setattr(_jit, "PROGRAMMATIC_LAUNCH", False)  # switched off: an ordinary launch
    assert _jit.Launch(_Kernel(), (1,), (32,), ())._config is None
    assert _jit.Launch(_Kernel(), (1,), (32,), ()).overlapping_previous(0)._config is None


def test_empty_grids_launch_nothing():
    import numpy as np

    kernel = _Kernel()
    launch = _jit.Launch(kernel, (0, 4), (32,), (np.int32(1), _jit.Pointer("x")), shared_mem=1 << 20)
    assert launch.empty and kernel.reserved == 0
    launch(0)  # no driver call (none is there to make without a GPU)
    program = _jit.Program([launch])
    assert program.launches == () and "x" in program.slots
    program(0)


def test_recorded_stage_functions_keep_their_argument_order():
    """A launch function given a Recorder prepares the launch it would make; Pointer stand-ins
    become slots at their places, everything else is written once."""
    import numpy as np

    from msa_cupy import _layout, selection, sparse

    P = _jit.Pointer
    rows, hq, hkv, d, top_k = 6, 16, 2, 128, 4
    q, k, v = P("q", (rows, hq, d), np.float16), P("k", (0, hkv, d), np.float16), P("v", (0, hkv, d), np.float16)
    ids = P("ids", (rows, hkv, top_k), np.int32)
    pages = _layout.key_rows(P("block_table"), 7, 64)
    recorder = _jit.Recorder(_Kernel())
    out, lse = P("out", (rows, hq, d), np.float16), P("lse", (rows, hq), np.float32)
    sparse.launch_decode(recorder, 1000, q, k, v, ids, P("cu_q"), P("cu_k"), 3, 0, rows, P("part_o"), P("part_lse"),
                         P("decode_count"), out, lse, causal=True, scale_log2=np.float32(0.125), pages=pages)
    launch = recorder.launch
    assert launch.grid == (rows * hkv * top_k, 1, 1) and launch.shared_mem == 1000
    assert [name for name, _, _ in launch.slots] == ["q", "k", "v", "ids", "cu_q", "cu_k", "part_o", "part_lse",
                                                      "decode_count", "out", "lse", "block_table"]
    ints = [_cell(launch, i, np.int32) for i in (6, 7, 8, 9, 10, 16, 19, 20)]
    assert ints == [3, 0, hq, hkv, top_k, 1, 7, 64] and _cell(launch, 17, np.float32) == np.float32(0.125)

    recorder = _jit.Recorder(_Kernel())
    cfg = selection.SelectLaunch(None, 128, 2048, 1, 1, 5, 32)
    selection.launch_select(cfg._replace(kernel=recorder), P("iq", (rows, hkv, d)), P("ik", (0, 1, d)), P("cu_q"),
                            P("cu_k"), 3, causal=True, top_k=top_k, local_blocks=1, sink_blocks=0,
                            ids_out=ids, partial=P("partial"), counters=P("select_count"),
                            pages=_layout.CONTIGUOUS_KEYS)
    launch = recorder.launch
    assert launch.grid == (3, 1, 5) and [name for name, _, _ in launch.slots] == ["iq", "ik", "cu_q", "cu_k", "ids",
                                                                                  "partial", "select_count"]
    assert int(launch.values[4]) == 0 and int(launch.values[17]) == 0  # null pointers
    assert [_cell(launch, i, np.int32) for i in range(8, 17)] == [hkv, 1, 0, 1, top_k, 1, 0, 1, 5]

    recorder = _jit.Recorder(_Kernel())
    sparse.launch_combine(P("part_o"), P("part_lse"), P("slot_pos"), P("cu_q"), 3, 0, rows, out, lse, head_dim=d,
                          group=hq // hkv, top_k=top_k, kernel=recorder)
    assert [name for name, _, _ in recorder.launch.slots] == ["part_o", "part_lse", "slot_pos", "cu_q", "out", "lse"]
    assert int(recorder.launch.values[3]) == 0  # no row_mode


def _kernel_parameters(source: str, name: str) -> list:
    """The parameter list of __global__ `name` in cuda/`source`, split at top-level commas."""
    import re

    text = _jit.source_text(source)
    match = re.search(r"__global__[^;{]*?\b" + name + r"\s*\(", text)
    assert match, f"no __global__ {name} in {source}"
    depth, start, params = 1, match.end(), []
    for i in range(start, len(text)):
        c = text[i]
        depth += c in "(<"
        depth -= c in ")>"
        if depth == 1 and c == ",":
            params.append(text[start:i].strip())
            start = i + 1
        if depth == 0:
            params.append(text[start:i].strip())
            return params
    raise AssertionError(f"unterminated parameter list of {name}")


class _Stub:
    """A kernel that records what a stage function passes it."""

    def __init__(self, source, name):
        self.source, self.name, self.args = source, name, None

    def __call__(self, grid, block, args, shared_mem=0):
        self.args = args

    def reserve_shared(self, nbytes):
        pass


def test_every_stage_function_passes_its_kernels_parameter_list(monkeypatch):
    """Each launch function, recorded with Pointer stand-ins, passes as many arguments as its
    kernel declares: a parameter added to a .cu file and not to its launch (or the reverse)
    fails here, without a GPU."""
    import numpy as np

    from msa_cupy import _layout, plan, selection, sparse

    stubs = []

    def stub(source, name, template=None, **_):
        stubs.append(_Stub(source, name))
        return stubs[-1]

    monkeypatch.setattr(_jit, "kernel", stub)
    P = _jit.Pointer
    rows, hq, hkv, d, top_k, f16 = 6, 16, 2, 128, 4, np.float16
    q, k, v = P("q", (rows, hq, d), f16), P("k", (0, hkv, d), f16), P("v", (0, hkv, d), f16)
    ids, cu_q, cu_k = P("ids", (rows, hkv, top_k), np.int32), P("cu_q"), P("cu_k")
    out, lse = P("out", (rows, hq, d), f16), P("lse", (rows, hq), np.float32)
    pages = _layout.key_rows(P("block_table"), 7, 64)
    kw = dict(causal=True, scale_log2=np.float32(0.1), pages=pages)

    def last(fn):
        return lambda *a, **k: (fn(*a, **k), stubs[-1])[1]

    recorded = [
        last(lambda: sparse.launch_decode(stub("decode.cu", "sparse_decode_kernel"), 0, q, k, v, ids, cu_q, cu_k, 2,
                                          0, rows, P("po"), P("pl"), P("count"), out, lse, **kw))(),
        last(lambda: sparse.launch_prefill(
            sparse.PrefillKernel(stub("sparse_prefill.cu", "sparse_prefill_kernel"), 128, 0, 4), q, k, v,
            P("items", (5, 3)), P("list_q"), cu_q, cu_k, P("block_off"), 2, 9, P("po"), P("pl"), **kw))(),
        last(lambda: sparse.launch_tile_prefill(
            sparse.TilePrefillKernel(stub("sparse_prefill_tile.cu", "sparse_prefill_tile_kernel"), 256, 8, 2, d, 64, 0), q, k,
            v, ids, cu_q, cu_k, P("tile_off"), 2, 0, rows, None, out, lse, **kw))(),
        last(lambda: sparse.query_tile_offsets(cu_q, 2, 0, rows, 8, P("tile_off")))(),
        last(lambda: sparse.classify_query_tiles(ids, cu_q, cu_k, P("tile_off"), 2, 0, rows, tile_tokens=8,
                                                 min_useful=0.3, row_mode=P("mode")))(),
        last(lambda: sparse.launch_combine(P("po"), P("pl"), P("slot_pos"), cu_q, 2, 0, rows, out, lse, head_dim=d,
                                           group=8, top_k=top_k))(),
        last(lambda: selection.launch_select(
            selection.SelectLaunch(stub("select.cu", "select_kernel"), 128, 0, 1, 1, 1, 32), P("iq", (rows, hkv, d)),
            P("ik", (0, 1, d)), cu_q, cu_k, 2, causal=True, top_k=top_k, ids_out=ids, partial=P("partial"),
            counters=P("count"), pages=pages))(),
        last(lambda: selection.launch_topk(P("scores", (rows, hkv, 9), np.float32), cu_q, cu_k, ids, 2, top_k=top_k,
                                           block_size=64, local_blocks=1, sink_blocks=0, causal=True))(),
        last(lambda: plan.group_mean(q, P("iq", (rows, hkv, d)), hkv))(),
        last(lambda: plan.launch_uniform_cu_seqlens(2, 1, 100, cu_q, cu_k))(),
        last(lambda: plan.launch_bound_query_rows(cu_q, 2, rows, P("cu_q_run"), P("errors")))(),
    ]
    before = len(stubs)  # the reverse index: a dozen launches of its own kernels
    sparse.reverse_index(ids, cu_q, P("block_off"), 2, 0, rows, n_blocks_total=9, max_queries=16, list_q=P("list_q"),
                         slot_pos=P("slot_pos"), row_mode=P("mode"), buffers={
                             name: P(name, shape, dt) for name, shape, dt in
                             sparse.reverse_index_buffers(rows * hkv * top_k, hkv * 9, 16)})
    index_stubs = stubs[before:]
    assert {s.name for s in index_stubs} == {"fill_int", "reverse_index_keys", "split_histogram", "exclusive_scan",
                                             "scan_tile_sums", "scan_tiles", "split_scatter", "reverse_index_fill",
                                             "item_classes", "build_work_items"}
    for s in recorded + index_stubs:
        params = _kernel_parameters(s.source, s.name)
        assert len(s.args) == len(params), (s.source, s.name, len(s.args), params)
    assert len({(s.source, s.name) for s in recorded}) == len(recorded)
    # the sm_90 kernels take the launches of their mma.sync twins
    for twin, sm90 in ((("sparse_prefill.cu", "sparse_prefill_kernel"),
                        ("sparse_prefill_sm90.cu", "sparse_prefill_sm90_kernel")),
                       (("sparse_prefill_tile.cu", "sparse_prefill_tile_kernel"),
                        ("sparse_prefill_tile_sm90.cu", "sparse_prefill_tile_sm90_kernel")),
                       (("select.cu", "select_kernel"), ("select_sm90.cu", "select_sm90_kernel"))):
        assert len(_kernel_parameters(*twin)) == len(_kernel_parameters(*sm90)), sm90


def test_plan_update_launch_passes_the_kernels_parameter_list():
    """The decode and prefill plans' update launch (built in plan.py, not by a stage function)."""
    from msa_cupy import plan

    params = _kernel_parameters("plan_update.cu", "plan_update_kernel")
    fake = type("Plan", (), dict(max_pages=3, paged=True, max_rows=8, max_batch=2, max_cache_len=100, page_size=64,
                                 num_pages=9, _kernels={"update": _Kernel()}))()
    for query_lens in (False, True):
        launch = plan._CachePlan._update_launch(fake, 2, 3, query_lens)
        assert len(launch.values) == len(params)
        assert ("query_lens" in [name for name, _, _ in launch.slots]) == query_lens
