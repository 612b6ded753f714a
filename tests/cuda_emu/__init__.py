"""Run the CUDA backend without a GPU: the real kernel source on the CPU, behind a small
NumPy-backed stand-in for CuPy.

``emu.h`` maps the CUDA constructs the kernels use to host C++ (OS threads per block, barriers
for ``__syncthreads`` and warp shuffles); :func:`kernel` compiles one instantiation with g++
into a shared library (cached on disk by source hash); :func:`fake_cupy` builds a module that
``sinkhorn_ot._cuda`` and the public API accept as ``cupy``.  Its arrays are NumPy arrays
whose ``.data.ptr`` is their host address, so kernels read and write them in place; ``empty``
poisons new memory (NaN / 0x5A bytes) so that an element no kernel wrote is visible, and
surrounds it with guard bytes that are checked after every launch (out-of-bounds writes).

What this checks: the kernels' index arithmetic, block decomposition, reductions, loop state
and every host-side launch argument (sizes are checked against the C++ signature).  What it
cannot check: speed, the GPU memory model, MUFU accuracy, register or shared-memory limits.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import mmap
import types
import weakref

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CXXFLAGS = ["-std=c++20", "-O2", "-pthread", "-fPIC", "-shared", "-ffp-contract=off",
            "-Wno-unknown-pragmas", "-w"]
N_SM = 4          # streaming multiprocessors the fake device reports
NUM_REGS = 64     # registers per thread the fake kernels report (2 blocks of 512 per SM)


def _cache_dir():
    d = os.environ.get("SINKHORN_OT_EMU_CACHE") or os.path.join(
        tempfile.gettempdir(), f"sinkhorn_ot_cuda_emu_{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


def _source():
    from sinkhorn_ot import _cuda

    return _cuda.kernel_source()


_LIBS: dict = {}


def _compile(names):
    """One shared library holding launch wrappers for ``names``."""
    with open(os.path.join(HERE, "emu.h")) as fh:
        emu = fh.read()
    body = [emu, _source()]
    for k, n in enumerate(names):
        body.append(
            f'extern "C" int sk_launch_{k}(unsigned gx, unsigned gy, unsigned bt, void** argv) '
            f'{{ try {{ sk_emu::launch_argv(&{n}, dim3{{gx, gy, 1}}, dim3{{bt, 1, 1}}, argv); '
            f'return 0; }} catch (const std::exception& e) {{ fprintf(stderr, "%s\\n", e.what());'
            f' return 1; }} }}\n'
            f'extern "C" int sk_sizes_{k}(long long* out) '
            f'{{ return sk_emu::arg_sizes(&{n}, out); }}\n')
    src = "#include <cstdio>\n" + "\n".join(body)
    key = hashlib.sha256((src + " ".join(CXXFLAGS)).encode()).hexdigest()[:20]
    so = os.path.join(_cache_dir(), f"emu_{key}.so")
    if not os.path.exists(so):
        cpp = so[:-3] + ".cpp"
        with open(cpp, "w") as fh:
            fh.write(src)
        tmp = so + f".{os.getpid()}.tmp"
        res = subprocess.run(["g++", *CXXFLAGS, "-I", HERE, cpp, "-o", tmp],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"cuda_emu: g++ failed for {names}:\n{res.stderr[-4000:]}")
        os.replace(tmp, so)
    return ctypes.CDLL(so)


class Kernel:
    """A kernel instance called like a CuPy RawKernel: ``k(grid, block, args, shared_mem=)``."""

    num_regs = NUM_REGS

    def __init__(self, name, lib, index):
        self.name = name
        self._launch = getattr(lib, f"sk_launch_{index}")
        self._launch.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                 ctypes.POINTER(ctypes.c_void_p)]
        sizes = (ctypes.c_longlong * 64)()
        n = getattr(lib, f"sk_sizes_{index}")(sizes)
        self.arg_sizes = list(sizes[:n])
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if len(args) != len(self.arg_sizes):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.arg_sizes)}")
        if shared_mem > max(self.max_dynamic_shared_size_bytes, 48 * 1024):
            raise ValueError(f"{self.name}: {shared_mem} B of dynamic shared memory without "
                             "the opt-in attribute")
        if shared_mem > 256 * 1024:
            raise ValueError(f"{self.name}: {shared_mem} B of dynamic shared memory")
        keep = []
        argv = (ctypes.c_void_p * len(args))()
        for i, (a, size) in enumerate(zip(args, self.arg_sizes)):
            if isinstance(a, np.ndarray) and a.ndim > 0 or isinstance(a, ndarray):
                if size != 8:
                    raise TypeError(f"{self.name}: argument {i} is an array for a "
                                    f"{size}-byte parameter")
                v = np.array([a.__array_interface__["data"][0]], dtype=np.uint64)
            elif isinstance(a, np.generic):
                if a.dtype.itemsize != size:
                    raise TypeError(f"{self.name}: argument {i} is {a.dtype} ({a.dtype.itemsize}"
                                    f" B) for a {size}-byte parameter")
                v = np.array([a])
            else:
                raise TypeError(f"{self.name}: argument {i} of type {type(a).__name__}")
            keep.append(v)
            argv[i] = v.ctypes.data
        if grid[2] != 1 or grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"{self.name}: grid {grid}")
        if self._launch(grid[0], grid[1], block[0], argv) != 0:
            raise RuntimeError(f"{self.name}: emulated launch failed")
        Counters.launches += 1
        check_guards(self.name)


_KERNELS: dict = {}


def kernel(name):
    k = _KERNELS.get(name)
    if k is None:
        group = _group(name)
        lib = _compile(group)
        for i, n in enumerate(group):
            _KERNELS.setdefault(n, Kernel(n, lib, i))
        k = _KERNELS[name]
    return k


def _group(name):
    """Every instance the backend may launch for the input dtype ``name`` serves, compiled
    together on the first use of one: parsing the source is most of a g++ run, so one library
    of 90 instances costs about as much as ten of one (and is cached on disk the same way)."""
    from sinkhorn_ot import _cuda

    for dtype in ("float32", "float64", "float16", "bfloat16"):
        names = _cuda.instances(dtype)
        if name in names:
            return names
    return [name]


def precompile(names):
    """Compile several instances into one library (one g++ run instead of one each)."""
    names = [n for n in dict.fromkeys(names) if n not in _KERNELS]
    if names:
        lib = _compile(names)
        for i, n in enumerate(names):
            _KERNELS[n] = Kernel(n, lib, i)


# ------------------------------------------------------------------------------------------
# A NumPy-backed stand-in for the parts of CuPy that sinkhorn_ot uses.
class _Mem:
    def __init__(self, arr):
        self.ptr = arr.__array_interface__["data"][0]
        self.device_id = 0


class _Device:
    """The one device (a context manager, as cupy.cuda.Device; also stands for a Stream)."""

    id = 0
    ptr = 0  # as a stream: the default one

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Counters:
    """Kernel launches and device-to-host reads (each a host synchronisation on a GPU)."""

    launches = 0
    reads = 0

    @classmethod
    def reset(cls):
        cls.launches = cls.reads = 0


def _read(method):
    def f(self, *a, **k):
        Counters.reads += 1
        return getattr(np.ndarray, method)(self, *a, **k)
    f.__name__ = method
    return f


class ndarray(np.ndarray):  # noqa: N801 - mirrors cupy.ndarray
    """A host array that answers like a CuPy array (``data.ptr``, ``device``, ``get``); what
    would read device memory from the host (get, float, bool, int, item, tolist) is counted."""

    @property
    def data(self):
        return _Mem(self)

    @property
    def device(self):
        return _Device()

    def get(self):
        Counters.reads += 1
        return np.array(self, copy=True).view(np.ndarray)

    __float__ = _read("__float__")
    __int__ = _read("__int__")
    __bool__ = _read("__bool__")
    __index__ = _read("__index__")
    item = _read("item")
    tolist = _read("tolist")


ndarray.__module__ = "cupy"


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, ndarray):
        return x.view(ndarray)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


# Device memory is mapped between two inaccessible pages, its end 16-byte aligned against the
# second one: an access past either end faults at once (the run dies with a segmentation fault
# and its traceback) instead of corrupting the emulation.  The < 16 bytes of slack before the
# back page hold guard bytes, checked after every launch.  (A buffer sized for float32
# partials and written as float64 faults on the first launch.)
_PAGE = mmap.PAGESIZE
_GUARD_BYTE = 0xA5
_LIVE: "weakref.WeakValueDictionary[int, np.ndarray]" = weakref.WeakValueDictionary()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _guarded(shape, dtype):
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    span = -(-(n + 16) // _PAGE) * _PAGE
    mm = mmap.mmap(-1, span + 2 * _PAGE)
    raw = np.frombuffer(mm, dtype=np.uint8)
    base = raw.__array_interface__["data"][0]
    for page in (base, base + _PAGE + span):
        if _libc.mprotect(page, _PAGE, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "cuda_emu: mprotect failed")
    end = _PAGE + span
    start = (end - n) & ~15
    raw[_PAGE:start] = _GUARD_BYTE
    raw[start + n:end] = _GUARD_BYTE
    slack = raw[start + n:end]
    _LIVE[id(slack)] = slack
    out = raw[start:start + n].view(dtype).reshape(shape).view(ndarray)
    out._sk_slack = slack  # keeps the slack view (and so its entry in _LIVE) with the array
    return out


def check_guards(after):
    for slack in list(_LIVE.values()):
        if (slack != _GUARD_BYTE).any():
            slack[...] = _GUARD_BYTE  # report once
            raise RuntimeError(f"cuda_emu: {after} wrote past the end of an allocation")


def _poisoned(shape, dtype):
    out = _guarded(shape, dtype)
    if out.dtype.kind in "fc":
        out.fill(np.nan)
    else:
        out.view(np.uint8).fill(0x5A)
    return out


def _device_copy(a, dtype=None):
    a = np.asarray(a, dtype=dtype)
    out = _guarded(a.shape, a.dtype)
    out[...] = a
    return out


def fake_cupy():
    """A module that passes for ``cupy`` with sinkhorn_ot (install it as sys.modules['cupy'])."""
    mod = types.ModuleType("cupy")

    def empty(shape, dtype=np.float64, order="C"):
        return _poisoned(shape, dtype)

    def zeros(shape, dtype=np.float64, order="C"):
        out = _guarded(shape, dtype)
        out[...] = 0
        return out

    def full(shape, fill_value, dtype=None, order="C"):
        dtype = np.asarray(fill_value).dtype if dtype is None else dtype
        out = _guarded(shape, dtype)
        out[...] = fill_value
        return out

    def asarray(a, dtype=None):
        if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return _device_copy(a, dtype)

    def ascontiguousarray(a, dtype=None):
        if isinstance(a, ndarray) and a.flags.c_contiguous and (
                dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return _device_copy(np.ascontiguousarray(np.asarray(a), dtype=dtype))

    def asnumpy(a):
        return np.array(a, copy=True).view(np.ndarray)

    def _getattr(name):
        obj = getattr(np, name)
        if callable(obj) and not isinstance(obj, type):
            def f(*a, **k):
                return _wrap(obj(*a, **k))
            f.__name__ = name
            return f
        return obj

    mod.__getattr__ = _getattr
    mod.ndarray = ndarray
    mod.empty = empty
    mod.zeros = zeros
    mod.full = full
    mod.asarray = asarray
    mod.array = lambda a, dtype=None, copy=True: asarray(np.array(a, dtype=dtype))
    mod.ascontiguousarray = ascontiguousarray
    mod.asnumpy = asnumpy

    class RawModule:
        def __init__(self, code=None, options=(), name_expressions=()):
            if code != _source():
                raise ValueError("cuda_emu: unexpected kernel source")
            self._names = list(name_expressions)

        def get_function(self, name):
            if name not in self._names:
                raise KeyError(name)
            return kernel(name)

    mod.RawModule = RawModule
    cuda = types.SimpleNamespace()
    cuda.runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDevice=lambda: 0,
        getDeviceProperties=lambda dev: {"multiProcessorCount": N_SM, "name": b"cuda_emu"})

    _stream = _Device()
    cuda.get_current_stream = lambda: _stream
    cuda.Stream = _Device
    cuda.Device = lambda i=0: _Device()
    mod.cuda = cuda
    return mod


@contextlib.contextmanager
def installed():
    """``cupy`` replaced by the emulation (and sinkhorn_ot._cuda's caches cleared) inside."""
    from sinkhorn_ot import _cuda

    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = fake_cupy()
    _cuda.clear_caches()
    try:
        yield sys.modules["cupy"]
    finally:
        _cuda.clear_caches()
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved
