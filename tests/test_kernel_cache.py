"""The kernel cache: what it loads is verified, what is damaged is compiled afresh and rewritten,
what is not the user's own is never loaded, and it works without a home directory.

CPU tests run the cache with a fake NVRTC front end and a fake driver loader (the fake driver
"crashes" on a truncated image, as the real one does); the GPU tests damage the entries of a
real kernel and make a real call in a fresh process."""
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from msa_cupy import _jit

SOURCE, ARCH, EXPR = "k.cu", "sm_80", "fill<3>"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DriverCrash(BaseException):
    """What the real driver does with a truncated cubin: the process dies (no retry can catch it)."""


class FakeToolchain:
    """NVRTC and the driver's loader, faked: images are ELF-tagged hashes of what was compiled."""

    def __init__(self):
        self.compiles = 0
        self.images: set = set()
        self.reject_all = False
        self.log: list = []

    def nvrtc(self, text, fname, options, names):
        self.compiles += 1
        self.log.append("compile")
        print("<compile runs>", file=sys.stderr, flush=True)
        cubin = b"\x7fELF" + hashlib.sha256(json.dumps([text, options, names]).encode()).digest() * 64
        self.images.add(cubin)
        return cubin, {n: f"_Z4fillILi{len(n)}EEvPi" for n in names}, ""

    def load(self, cubin, lowered_name):
        if any(image.startswith(cubin) and image != cubin for image in self.images if cubin):
            raise DriverCrash("truncated cubin reached the driver")
        if self.reject_all or cubin not in self.images:
            raise RuntimeError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid")
        return "module", ("function", lowered_name)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    cuda = tmp_path / "cuda"
    cuda.mkdir()
    (cuda / SOURCE).write_text("template <int N> __global__ void fill(int* out) { out[threadIdx.x] = N; }\n")
    monkeypatch.setattr(_jit, "CUDA_DIR", cuda)
    monkeypatch.setattr(_jit, "_warned", set(), raising=False)
    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    tools = FakeToolchain()
    monkeypatch.setattr(_jit, "_nvrtc_cupy", tools.nvrtc)
    monkeypatch.setattr(_jit, "_load_function", tools.load, raising=False)
    tools.cache = tmp_path / "cache"
    return tools


def entries(cache):
    return sorted(p for p in cache.iterdir() if p.name.endswith(".kernel"))


def load_twice(fake):
    """Two loads of one kernel: the second must come from the cache."""
    assert _jit._load(SOURCE, ARCH, EXPR)[1] == ("function", f"_Z4fillILi{len(EXPR)}EEvPi")
    first = fake.compiles
    _jit._load(SOURCE, ARCH, EXPR)
    assert fake.compiles == first, "a second load must come from the cache"


def test_entry_is_private_verified_and_reused(fake, capfd):
    load_twice(fake)
    assert fake.compiles == 1
    (entry,) = entries(fake.cache)
    assert stat.S_IMODE(os.stat(fake.cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o600
    assert not [p for p in fake.cache.iterdir() if p.name.endswith(".tmp")]
    err = capfd.readouterr().err
    # the compile line comes before the compile runs, its time after
    line = f"msa_cupy: compiling {SOURCE} for {ARCH} (first use; cached after) ..."
    assert line in err and err.index(line) < err.index("<compile runs>")
    assert err.count("msa_cupy: compiling") == 1


def _truncated(data):
    return data[:len(data) // 2]


def _payload_garbage(data):
    start = data.index(b"\x7fELF")
    return data[:start] + np.random.default_rng(0).bytes(len(data) - start)


def _bad_names(data):
    head, _, cubin = data.partition(b"\n")[2].partition(b"\n")
    header = json.loads(head)
    header["names"] = {"other<1>": "_Z5other"}
    return _jit.ENTRY_MAGIC + json.dumps(header).encode() + b"\n" + cubin


DAMAGE = {
    "truncated": _truncated,
    "cubin cut short": lambda data: data[:-100],
    "empty": lambda data: b"",
    "garbage": lambda data: np.random.default_rng(1).bytes(len(data)),
    "payload garbage": _payload_garbage,
    "header only": lambda data: data[:data.index(b"\x7fELF")],
    "bad header json": lambda data: data.replace(b'"key"', b'"key', 1),
    "bad names": _bad_names,
    "other key": lambda data: data.replace(b'"key": "', b'"key": "0', 1),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_compiled_afresh_and_rewritten(fake, damage, capfd):
    _jit._load(SOURCE, ARCH, EXPR)
    (entry,) = entries(fake.cache)
    good = entry.read_bytes()
    entry.write_bytes(DAMAGE[damage](good))
    load_twice(fake)  # no crash, no error: one fresh compile, then the rewritten entry serves
    assert fake.compiles == 2
    assert entry.read_bytes() == good
    assert "cached copy rejected" in capfd.readouterr().err


def test_image_the_driver_refuses_is_compiled_once_more(fake, capfd):
    _jit._load(SOURCE, ARCH, EXPR)
    (entry,) = entries(fake.cache)
    good = entry.read_bytes()
    header = json.loads(good.split(b"\n")[1])
    # a well-formed entry whose cubin is garbage (written bad, e.g. by a broken toolchain)
    entry.write_bytes(_jit._entry_bytes(header["key"], b"not a cubin" * 10, header["names"]))
    load_twice(fake)
    assert fake.compiles == 2 and entry.read_bytes() == good
    assert "rejected by the driver" in capfd.readouterr().err
    # the driver refuses every image: one fresh compile, then a clear error (no loop)
    fake.reject_all = True
    with pytest.raises(RuntimeError, match=r"cannot load fill<3> of k.cu compiled for sm_80.*INVALID_IMAGE"):
        _jit._load(SOURCE, ARCH, EXPR)
    assert fake.compiles == 3


def test_fresh_image_the_driver_refuses_is_an_error(fake):
    fake.reject_all = True
    with pytest.raises(RuntimeError, match="the CUDA driver cannot load"):
        _jit._load(SOURCE, ARCH, EXPR)
    assert fake.compiles == 1


def test_symlinked_entry_is_not_followed(fake, tmp_path):
    _jit._load(SOURCE, ARCH, EXPR)
    (entry,) = entries(fake.cache)
    target = tmp_path / "elsewhere.kernel"
    target.write_bytes(entry.read_bytes())  # a valid entry: only the link makes it wrong
    entry.unlink()
    entry.symlink_to(target)
    _jit._load(SOURCE, ARCH, EXPR)
    assert fake.compiles == 2, "the link's target must not be loaded"
    assert not entry.is_symlink() and entry.is_file(), "the link is replaced by a real entry"
    assert target.read_bytes() == entry.read_bytes()  # the target is left alone


def test_fifo_entry_does_not_hang(fake):
    _jit._load(SOURCE, ARCH, EXPR)
    (entry,) = entries(fake.cache)
    entry.unlink()
    os.mkfifo(entry)
    _jit._load(SOURCE, ARCH, EXPR)
    assert fake.compiles == 2 and entry.is_file()


def test_directory_under_the_entry_name_is_compiled_around(fake):
    _jit._load(SOURCE, ARCH, EXPR)
    (entry,) = entries(fake.cache)
    entry.unlink()
    entry.mkdir()
    with pytest.warns(RuntimeWarning, match="not writable"):  # it cannot be replaced either
        assert _jit._load(SOURCE, ARCH, EXPR)[1][0] == "function"
    assert fake.compiles == 2


def test_entry_writable_by_others_is_not_loaded(fake):
    _jit._load(SOURCE, ARCH, EXPR)
    (entry,) = entries(fake.cache)
    entry.chmod(0o666)
    load_twice(fake)
    assert fake.compiles == 2 and stat.S_IMODE(entry.stat().st_mode) == 0o600


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown to another uid needs root")
def test_entry_owned_by_another_user_is_not_loaded(fake):
    _jit._load(SOURCE, ARCH, EXPR)
    (entry,) = entries(fake.cache)
    os.chown(entry, 4242, -1)
    load_twice(fake)
    assert fake.compiles == 2 and entry.stat().st_uid == 0


def _assert_memory_only(fake, why):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _jit._load(SOURCE, ARCH, EXPR)
        _jit._load(SOURCE, ARCH, EXPR)
    assert fake.compiles == 2, "an untrusted cache is neither read nor written"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # warned once
    assert str(fake.cache) in messages[0] and why in messages[0]
    return messages[0]


def test_cache_dir_writable_by_others_is_refused(fake):
    _jit._load(SOURCE, ARCH, EXPR)  # a valid entry that another user could have planted
    fake.compiles = 0
    fake.cache.chmod(0o777)
    _assert_memory_only(fake, "writable by group or others")
    assert len(entries(fake.cache)) == 1


def test_cache_dir_writable_by_group_is_refused(fake):
    fake.cache.mkdir(mode=0o700)
    fake.cache.chmod(0o770)
    _assert_memory_only(fake, "writable by group or others")
    assert entries(fake.cache) == []


def test_cache_dir_of_another_user_is_refused(fake, monkeypatch):
    _jit._load(SOURCE, ARCH, EXPR)
    fake.compiles = 0
    owner = os.stat(fake.cache).st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    _assert_memory_only(fake, f"owned by uid {owner}")


def test_symlinked_cache_dir_is_refused(fake, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    fake.cache.symlink_to(real)
    _assert_memory_only(fake, "symbolic link")
    assert list(real.iterdir()) == []


def test_writer_killed_before_rename_leaves_nothing_for_long(fake, monkeypatch):
    fake.cache.mkdir(mode=0o700)
    stale = fake.cache / "select-sm_90-0123.kernel.999999.abcd.tmp"
    fresh = fake.cache / "select-sm_90-0123.kernel.888888.beef.tmp"  # a writer still at work
    other = fake.cache / "notes.txt"
    for path in (stale, fresh, other):
        path.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    _jit._load(SOURCE, ARCH, EXPR)
    assert not stale.exists() and fresh.exists() and other.exists()
    # a rename that fails removes its own temp file, and the kernel still loads
    monkeypatch.setattr(_jit, "ENTRY_SUFFIX", ".other.kernel")  # a new entry to write
    def failing_replace(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _jit._load(SOURCE, ARCH, EXPR)[1][0] == "function"
    assert any("not writable" in str(w.message) for w in caught)
    assert sorted(p.name for p in fake.cache.iterdir() if p.name.endswith(".tmp")) == [fresh.name]


# --------------------------------------------------------------------------- where the cache lives


@pytest.fixture
def homeless(tmp_path, monkeypatch):
    """No HOME and no passwd entry for this uid, as in many containers."""
    import pwd
    import tempfile

    for name in ("HOME", "MSA_CUPY_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(*args):
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(pwd, "getpwnam", no_entry)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(_jit, "_warned", set(), raising=False)
    return tmp_path


def test_no_home_falls_back_to_a_private_temp_dir(homeless):
    where = _jit.cache_dir()
    assert where == homeless / f"msa_cupy-{os.getuid()}"
    assert where.is_dir() and stat.S_IMODE(where.stat().st_mode) == 0o700


def test_no_home_temp_dir_planted_by_another_user_is_refused(homeless):
    planted = homeless / f"msa_cupy-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.warns(RuntimeWarning, match=rf"{planted}.*writable by group or others"):
        assert _jit.cache_dir() is None


def test_no_home_no_temp_dir_means_memory_only(homeless, fake, monkeypatch):
    monkeypatch.delenv("MSA_CUPY_CACHE_DIR")
    blocker = homeless / "not-a-dir"
    blocker.write_text("")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(blocker))
    with pytest.warns(RuntimeWarning, match="cannot create a kernel cache directory"):
        assert _jit.cache_dir() is None
        _jit._load(SOURCE, ARCH, EXPR)  # kernels still load, compiled in memory
    assert fake.compiles == 1


def test_xdg_cache_home_then_explicit_dir(homeless, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(homeless / "xdg"))
    assert _jit.cache_dir() == homeless / "xdg" / "msa_cupy"
    monkeypatch.setenv("MSA_CUPY_CACHE_DIR", str(homeless / "mine"))
    assert _jit.cache_dir() == homeless / "mine"


def test_compile_options_take_no_defines():
    assert _jit.compile_options("sm_90a") == [*_jit.BASE_OPTIONS, "-arch=sm_90a"]
    with pytest.raises(TypeError):
        _jit.get_kernel("decode.cu", "sparse_decode_kernel", defines={"X": 1})


# --------------------------------------------------------------------------- GPU: the real driver

SCRIPT = """
import sys
import cupy as cp
import numpy as np
import msa_cupy
from msa_cupy import reference

rng = np.random.default_rng(int(sys.argv[1]))
iq = rng.standard_normal((1, 300, 2, 128)).astype(np.float16)
ik = rng.standard_normal((1, 300, 2, 128)).astype(np.float16)
got = cp.asnumpy(msa_cupy.block_scores(cp.asarray(iq), cp.asarray(ik), block_size=64))
ref = reference.block_scores(iq.astype(np.float64), ik.astype(np.float64), block_size=64)
seen = np.isfinite(ref)
assert (np.isfinite(got) == seen).all()
np.testing.assert_allclose(got[seen], ref[seen], rtol=1e-3, atol=1e-2)
print("scores match the reference")
"""


def _run_call(cache, seed):
    env = dict(os.environ, MSA_CUPY_CACHE_DIR=str(cache), PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(seed)], env=env, capture_output=True, text=True,
                          timeout=600)


def _cubin_start(data):
    return data.index(b"\x7fELF")


GPU_DAMAGE = {
    "truncated": lambda data: data[:_cubin_start(data) + (len(data) - _cubin_start(data)) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: data[:_cubin_start(data)] + np.random.default_rng(2).bytes(len(data) - _cubin_start(data)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("damage", [*GPU_DAMAGE, "well-formed garbage"])
def test_damaged_cache_heals_in_a_real_call(tmp_path, damage):
    cache = tmp_path / "cache"
    first = _run_call(cache, 1)
    assert first.returncode == 0, first.stderr
    images = [p for p in cache.iterdir() if p.is_file() and b"\x7fELF" in p.read_bytes()]
    assert images, "the call must have cached at least one kernel"
    for path in images:
        data = path.read_bytes()
        if damage == "well-formed garbage":  # passes every check; only the driver can refuse it
            header = json.loads(data[len(_jit.ENTRY_MAGIC):].split(b"\n")[0])
            bad = _jit._entry_bytes(header["key"], np.random.default_rng(3).bytes(4096), header["names"])
        else:
            bad = GPU_DAMAGE[damage](data)
        path.write_bytes(bad)
    second = _run_call(cache, 2)
    assert second.returncode == 0, f"rc {second.returncode}: {second.stderr[-3000:]}"
    assert "scores match the reference" in second.stdout
    assert second.stderr.count("msa_cupy: compiling") == len(images), second.stderr
    assert ("rejected by the driver" in second.stderr) == (damage == "well-formed garbage")
    third = _run_call(cache, 3)  # healed: everything from the cache
    assert third.returncode == 0 and "msa_cupy: compiling" not in third.stderr, third.stderr
