"""The native XLA handler of msa_cupy.jax's decode step (msa_cupy/xla_ffi.c, msa_cupy/_native.py),
without a GPU: it compiles with the system C compiler against jaxlib's XLA FFI header; a
flattened program run through it binds every slot to the right buffer (operands, results, the
aligned workspace) and keeps the constant arguments, launch geometry and launch attributes, as
a stand-in driver records them; malformed programs are refused; and XLA itself (the CPU
runtime) calls the handler with its attribute and reports its errors by name.  On the GPU the
handler runs the real step (test_jax.py, marked gpu)."""
import ctypes
import types

import numpy as np
import pytest

from msa_cupy import _jit, _native

jax = pytest.importorskip("jax")


@pytest.fixture(scope="module")
def lib():
    if _native.compiler() is None:
        pytest.skip("no C compiler")
    found = _native.library()
    assert found is not None, _native.unavailable
    return found


class _Kernel:
    def __init__(self, ptr, name):
        self.function, self.name = types.SimpleNamespace(ptr=ptr), name

    def reserve_shared(self, nbytes):
        pass


class _Buffer(ctypes.Structure):  # XLA_FFI_Buffer
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("data", ctypes.c_void_p), ("rank", ctypes.c_int64), ("dims", ctypes.c_void_p)]


_LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_jit._LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                           ctypes.c_void_p)
_MEMSET = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t, ctypes.c_void_p)


class _Driver:
    """cuLaunchKernelEx and cuMemsetD8Async stand-ins that record what they are asked."""

    def __init__(self, cells_of, fail_at=None):
        self.launches, self.memsets, self.cells_of, self.fail_at = [], [], cells_of, fail_at
        self.launch = _LAUNCH(self._launch)
        self.memset = _MEMSET(self._memset)

    def _launch(self, config, function, params, extra):
        c = config.contents
        n = self.cells_of[function]
        cells = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_uint64))[0] for i in range(n)]
        attrs = [(c.attrs[i].id, c.attrs[i].value[0]) for i in range(c.n_attrs)]
        self.launches.append(dict(function=function, grid=tuple(c.grid), block=tuple(c.block), shared=c.shared,
                                  stream=c.stream, attrs=attrs, cells=cells))
        return 700 if len(self.launches) == self.fail_at else 0

    def _memset(self, ptr, value, nbytes, stream):
        self.memsets.append((ptr, value, nbytes, stream))
        return 0

    def entry_points(self):
        return (ctypes.cast(self.launch, ctypes.c_void_p).value, ctypes.cast(self.memset, ctypes.c_void_p).value)


def _programs():
    """Two programs in the shape a decode step has: constants, pointer slots, a programmatic launch."""
    P = _jit.Pointer
    update = _jit.Launch(_Kernel(0x1000, "update"), (3,), (256,), (P("seq_lens"), np.int32(7), P("cu_k"),
                                                                    np.float32(0.5), None))
    select = _jit.Launch(_Kernel(0x2000, "select"), (4, 2), (128, 1), (P("iq"), P("ik"), P("ids"), np.int64(-3)),
                         shared_mem=9000)
    decode = _jit.Launch(_Kernel(0x3000, "decode"), (16, 4, 1), (128,), (P("q"), P("ids"), P("out"), P("lse")),
                         shared_mem=123)
    decode._config = object()  # as overlapping_previous leaves it: launched with programmatic serialization
    empty = _jit.Launch(_Kernel(0x4000, "empty"), (0,), (32,), (P("q"),))
    return _jit.Program([update]), _jit.Program([select, decode, empty])


def _call(lib, words, buffers, n_args, stream=0x77):
    structs = [_Buffer(data=b) for b in buffers]
    pointers = (ctypes.c_void_p * len(structs))(*[ctypes.addressof(s) for s in structs])
    failed = ctypes.c_int(-2)
    rets = ctypes.cast(ctypes.byref(pointers, n_args * ctypes.sizeof(ctypes.c_void_p)), ctypes.c_void_p)
    status = lib.msa_cupy_run_program(words.ctypes.data, ctypes.cast(pointers, ctypes.c_void_p), n_args, rets,
                                      len(buffers) - n_args, stream, ctypes.byref(failed))
    return status, failed.value


SOURCES = {"seq_lens": (3, 0), "iq": (0, 16), "ik": (1, 0), "q": (2, 0), "out": (4, 0), "lse": (5, 0),
           "cu_k": (_native.SOURCE_WORKSPACE, 512), "ids": (_native.SOURCE_WORKSPACE, 4096)}


def _flat(driver, **changes):
    kwargs = dict(n_args=4, n_rets=3, counter_span=(1024, 40), align=256, entry_points=driver.entry_points())
    kwargs.update(changes)
    return _native.flat_program(_programs(), SOURCES, **kwargs)


def test_a_flattened_step_binds_every_slot_and_keeps_the_rest(lib):
    driver = _Driver({0x1000: 5, 0x2000: 4, 0x3000: 4})
    words, keep = _flat(driver)
    assert lib.msa_cupy_check_program(words.ctypes.data, words.size) == -1
    buffers = [0x10000, 0x20000, 0x30000, 0x40000, 0x50000, 0x60000, 0x70010]  # 4 operands, 3 results
    assert _call(lib, words, buffers, 4) == (0, -1)
    ws = 0x70100  # the last result, rounded up to the 256-byte alignment
    assert driver.memsets == [(ws + 1024, 0, 40, 0x77)]
    update, select, decode = driver.launches  # the empty launch is not a launch
    assert update == dict(function=0x1000, grid=(3, 1, 1), block=(256, 1, 1), shared=0, stream=0x77, attrs=[],
                          cells=[0x40000, 7, ws + 512, int(np.float32(0.5).view(np.uint32)), 0])
    assert select["grid"] == (4, 2, 1) and select["shared"] == 9000 and select["attrs"] == []
    assert select["cells"] == [0x10010, 0x20000, ws + 4096, int(np.int64(-3).view(np.uint64))]
    assert decode["attrs"] == [(6, 1)] and decode["shared"] == 123  # programmatic stream serialization
    assert decode["cells"] == [0x30000, ws + 4096, 0x50000, 0x60000]


def test_a_failing_launch_is_reported_with_its_index(lib):
    driver = _Driver({0x1000: 5, 0x2000: 4, 0x3000: 4}, fail_at=2)
    words, keep = _flat(driver)
    assert _call(lib, words, [0x1000 * i for i in range(1, 8)], 4) == (700, 1)
    assert len(driver.launches) == 2


def test_a_slot_without_a_source_or_a_scalar_slot_is_refused():
    driver = _Driver({})
    with pytest.raises(ValueError, match="slot 'ids' has no source"):
        _native.flat_program(_programs(), {k: v for k, v in SOURCES.items() if k != "ids"}, n_args=4, n_rets=3,
                             counter_span=(0, 0), align=256, entry_points=driver.entry_points())
    scalar = _jit.Program([_jit.Launch(_Kernel(0x5000, "uniform"), (1,), (32,), (_jit.Scalar("k_len", np.int32),))])
    with pytest.raises(ValueError, match="scalar slot 'k_len'"):
        _native.flat_program([scalar], SOURCES, n_args=4, n_rets=3, counter_span=(0, 0), align=256,
                             entry_points=driver.entry_points())


@pytest.mark.parametrize("word, value", [(0, 1), (4, 3), (3, 0), (-3, 99), (-2, 9)])
def test_malformed_programs_are_refused(lib, word, value):
    words, keep = _flat(_Driver({}))
    words = words.copy()
    words[word] = value  # the magic, the alignment, no results, a bind's cell or source out of range
    assert lib.msa_cupy_check_program(words.ctypes.data, words.size) != -1
    with pytest.raises(RuntimeError, match="malformed"):
        _native.register(lib, 1, 0, words, keep)


_TEST_TARGET = "msa_cupy_test_decode_step"


@pytest.fixture(scope="module")
def cpu_target(lib):
    """The handler registered with XLA's CPU runtime under a test name (there it stops at the
    stream, which the CPU runtime does not have, or earlier at an error of its own)."""
    jax.ffi.register_ffi_target(_TEST_TARGET, jax.ffi.pycapsule(lib.msa_cupy_decode_step), platform="cpu",
                                api_version=1)
    return _TEST_TARGET


def _ffi(x, key):
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((512,), np.uint8))
    return jax.jit(lambda x: jax.ffi.ffi_call(_TEST_TARGET, out)(x, program=np.int64(key)))(x)


def test_xla_passes_the_key_and_the_handler_names_an_unregistered_program(cpu_target):
    with pytest.raises(Exception, match="program 4242 is not registered"):
        _ffi(jax.numpy.ones(4), 4242)


def test_the_handler_checks_the_operand_count_against_the_program(lib, cpu_target):
    words, keep = _flat(_Driver({}))  # 4 operands and 3 results; the call has 1 and 2
    _native.register(lib, 4343, 0, words, keep)
    with pytest.raises(Exception, match="1 operands and 2 results, the program has 4 and 3"):
        _ffi(jax.numpy.ones(4), 4343)
