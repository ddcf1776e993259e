r"""Array backends: which array module an array belongs to, and how to move it.

minipeft never keeps a global "current backend" flag. Every array knows its own
module, so compute code asks the data: ``xp = backend.xp(a)`` and then
``xp.exp(a)``. The same line of code then runs on NumPy (CPU), on CuPy (an
NVIDIA GPU), or on the *strict* stand-in defined here.

The strict stand-in exists so that the GPU code path cannot rot on machines
without a GPU. It keeps a NumPy array underneath but refuses exactly what CuPy
refuses:

* implicit conversion to NumPy (``np.asarray(a)``, ``float(a)`` of a non-scalar),
* mixing with plain NumPy arrays in one operation (``strict + np.ones(3)``).

Code that passes its tests on the strict backend will not trip over CuPy's
host/device boundary. Explicit moves (:func:`to_device`, :func:`asnumpy`) are
allowed, as they are on CuPy.

This module also holds the few operations whose spelling differs between NumPy
and CuPy: the scatter-add used by gradients of gathers, random generators, and
the identity of an array's underlying buffer (the activation ledger
deduplicates by it).
"""

from __future__ import annotations

import ctypes
import types
from typing import Any

import numpy as np
import numpy.lib.mixins

DEVICES = ("cpu", "gpu", "strict")

# float32 is the default for everything minipeft creates; float64 is used on
# request (the gradient checks). Anything else is refused at Tensor creation.
DEFAULT_DTYPE = np.float32
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------
# CuPy, when it can be used
# ---------------------------------------------------------------------------

_cupy: Any = None
_cupy_error: str | None = None


def _load_cupy():
    """Import CuPy once and check that a CUDA device answers; remember why not."""
    global _cupy, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy  # noqa: PLC0415

        cupy.cuda.runtime.getDeviceCount()
        cupy.zeros(1).sum()  # a real allocation and kernel: the device works
        _cupy = cupy
    except ImportError:
        _cupy_error = (
            "CuPy is not installed. Install the GPU extra: `pip install -e .[gpu]` "
            "(CUDA 12 wheel cupy-cuda12x; on CUDA 13 `pip install cupy-cuda13x`)."
        )
    except Exception as exc:  # a driver or device problem
        _cupy_error = f"CuPy is installed but no usable CUDA device was found ({exc})."
    return _cupy


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device runs a kernel."""
    return _load_cupy() is not None


def require_gpu():
    """Return the cupy module, or raise a RuntimeError that says what to install."""
    cp = _load_cupy()
    if cp is None:
        raise RuntimeError(f"device 'gpu' requested, but {_cupy_error}")
    return cp


# ---------------------------------------------------------------------------
# The strict stand-in: NumPy underneath, CuPy's manners on top
# ---------------------------------------------------------------------------


class StrictError(TypeError):
    """Raised where CuPy would refuse an operation on a device array."""


def _unwrap(obj, fname):
    """Strip StrictArray wrappers from (nested) arguments; refuse plain ndarrays."""
    if isinstance(obj, StrictArray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise StrictError(
            f"{fname}: a plain NumPy array was mixed with a device (strict) array. "
            "CuPy refuses this too; move it first with backend.to_device(arr, 'strict')."
        )
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, fname) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, fname) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """Wrap ndarray results (nested in tuples/lists) back into StrictArray.

    NumPy scalars become 0-d arrays, as CuPy's reductions return 0-d device
    arrays rather than host scalars.
    """
    if isinstance(obj, np.ndarray):
        return StrictArray(obj)
    if isinstance(obj, np.generic):
        return StrictArray(np.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class StrictArray(numpy.lib.mixins.NDArrayOperatorsMixin):
    """A NumPy array that behaves like a CuPy array at the host boundary.

    Arithmetic operators come from ``NDArrayOperatorsMixin`` and route through
    ``__array_ufunc__``; NumPy functions route through ``__array_function__``.
    Both unwrap, refuse plain NumPy operands, compute, and wrap the result.
    ``__array__`` refuses implicit conversion, as ``cupy.ndarray`` does.
    """

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        self._a = a

    # -- the host boundary ------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise StrictError(
            "Implicit conversion to a NumPy array is not allowed (CuPy refuses it too). "
            "Use backend.asnumpy(arr) to copy to the host explicitly."
        )

    def get(self):
        """Explicit copy to the host, as ``cupy.ndarray.get()``."""
        return self._a.copy()

    # -- dispatch ---------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        name = f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__
        inputs = _unwrap(inputs, name)
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], name)
        return _wrap(getattr(ufunc, method)(*inputs, **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        return _wrap(func(*_unwrap(args, name), **_unwrap(kwargs, name)))

    # -- ndarray surface used by the engine ---------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray(self._a.T))

    @property
    def base(self):
        return None if self._a.base is None else _wrap(self._a.base)

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return "strict" + repr(self._a)[5:] if repr(self._a).startswith("array") else repr(self._a)

    def __getitem__(self, idx):
        return _wrap(self._a[_unwrap(idx, "__getitem__")])

    def __setitem__(self, idx, value):
        self._a[_unwrap(idx, "__setitem__")] = _unwrap(value, "__setitem__")

    def __iter__(self):
        return (_wrap(x) for x in self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def item(self):
        return self._a.item()

    def __getattr__(self, name):
        # Methods such as reshape, sum, astype, fill: call on the inner array.
        # Never forward dunders: NumPy converts through __array_interface__ /
        # __array_struct__ before it tries __array__, so forwarding them would
        # let np.asarray(strict) succeed silently, which CuPy refuses.
        if name.startswith("__") or name == "_a":
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                return _wrap(attr(*_unwrap(args, name), **_unwrap(kwargs, name)))
            return method
        return _wrap(attr)

    def __reduce__(self):
        raise StrictError("Pickling a device array is refused; use backend.asnumpy first.")

    def __deepcopy__(self, memo):
        # a copy on the same device, as copy.deepcopy of a cupy.ndarray gives
        return StrictArray(self._a.copy())


class _StrictModule(types.ModuleType):
    """The ``xp`` of strict arrays: numpy's namespace with CuPy's manners.

    ``strict.exp(a)`` is ``np.exp`` on the inner array, wrapped back.
    ``asarray`` and ``array`` accept host data (an explicit transfer, as in
    CuPy); every other function refuses a plain NumPy array argument.
    """

    _creators = {"asarray", "array", "ascontiguousarray"}

    def __init__(self):
        super().__init__("minipeft.backend.strict")

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            return _StrictUfunc(attr)
        if not callable(attr) or isinstance(attr, type):
            return attr  # constants and dtypes pass through
        if name in self._creators:
            def create(obj, *args, **kwargs):
                if isinstance(obj, StrictArray):
                    obj = obj._a
                return StrictArray(attr(obj, *args, **kwargs))
            return create

        def wrapped(*args, **kwargs):
            return _wrap(attr(*_unwrap(args, name), **_unwrap(kwargs, name)))
        return wrapped

    @property
    def random(self):  # pragma: no cover - use backend.Generator instead
        raise StrictError("use backend.Generator(device, seed) for random numbers")


class _StrictUfunc:
    """A NumPy ufunc seen through the strict module: ``strict.exp(host_array)``
    is refused, as ``cupy.exp`` refuses a NumPy array; methods such as
    ``strict.add.at`` follow the same rule."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return self._call(self._ufunc, self._ufunc.__name__, args, kwargs)

    def __getattr__(self, name):
        attr = getattr(self._ufunc, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._call(attr, f"{self._ufunc.__name__}.{name}",
                                                  args, kwargs)

    @staticmethod
    def _call(fn, name, args, kwargs):
        return _wrap(fn(*_unwrap(args, name), **_unwrap(kwargs, name)))


strict = _StrictModule()


# ---------------------------------------------------------------------------
# Which module, which device, moving between them
# ---------------------------------------------------------------------------


def xp(array) -> Any:
    """The array module that owns ``array``: numpy, cupy or the strict stand-in."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return np
    if isinstance(array, StrictArray):
        return strict
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    raise TypeError(f"not an array minipeft knows: {type(array).__name__}")


def is_array(obj) -> bool:
    """Whether ``obj`` is an array of a module minipeft knows (not a scalar, a list or None)."""
    if obj is None or np.isscalar(obj):
        return False
    try:
        xp(obj)
    except TypeError:
        return False
    return True


def device_of(array) -> str:
    """'cpu', 'gpu' or 'strict' for an array."""
    mod = xp(array)
    return "cpu" if mod is np else "strict" if mod is strict else "gpu"


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(
            f"unknown device {device!r}: expected one of {', '.join(map(repr, DEVICES))}"
        )
    return device


def asnumpy(array) -> np.ndarray:
    """Copy (or pass through) any backend's array to a NumPy array on the host."""
    if isinstance(array, np.ndarray):
        return array
    if isinstance(array, StrictArray):
        return array._a.copy()
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def to_device(array, device: str):
    """Move an array to 'cpu', 'gpu' or 'strict' (a no-op when already there)."""
    check_device(device)
    if device_of(array) == device:
        return array
    host = asnumpy(array)
    if device == "cpu":
        return host
    if device == "strict":
        return StrictArray(host.copy())
    return require_gpu().asarray(host)


def module_for(device: str):
    """The array module that arrays on ``device`` use."""
    check_device(device)
    if device == "cpu":
        return np
    if device == "strict":
        return strict
    return require_gpu()


# ---------------------------------------------------------------------------
# Operations spelled differently per backend
# ---------------------------------------------------------------------------


def scatter_add(target, indices, values) -> None:
    r"""In place ``target[indices] += values`` that counts repeated indices.

    ``target[idx] += v`` would apply a repeated index only once (the last
    write wins); the gradient of a gather must sum every occurrence:
    :math:`\partial L/\partial W_i = \sum_{n: idx_n = i} g_n`.
    """
    mod = xp(target)
    if mod is np:
        np.add.at(target, indices, values)
    elif mod is strict:
        np.add.at(target._a, _unwrap(indices, "scatter_add"), _unwrap(values, "scatter_add"))
    else:
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, indices, values)


def buffer_id(array) -> tuple[int, int]:
    """Identity of the memory an array views: (start address of the base, its size).

    Two views of one buffer (a reshape, a transpose) give the same id, so the
    activation ledger counts their bytes once.
    """
    if isinstance(array, StrictArray):
        array = array._a
    if isinstance(array, np.generic):
        # NumPy gives a scalar, not a 0-d array, for ufuncs on 0-d arrays
        # (an op's saved output, say); it owns its few bytes alone.
        return (id(array), array.nbytes)
    if isinstance(array, np.ndarray):
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        return (base.__array_interface__["data"][0], base.nbytes)
    # cupy: the allocation behind the view names the buffer; its size is the
    # base array's bytes, not the pool's chunk (rounded up to 512 bytes), so
    # the ledger counts the same bytes on every backend.
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
    return (array.data.mem.ptr, base.nbytes)


def base_nbytes(array) -> int:
    """Bytes of the whole buffer behind ``array`` (a view counts its base)."""
    return buffer_id(array)[1]


class Generator:
    """A seeded random generator that makes arrays on one device.

    NumPy and CuPy both offer ``default_rng``; the strict stand-in draws with
    NumPy and wraps. ``random`` gives uniform [0, 1) in the requested dtype,
    which dropout uses for its masks.
    """

    def __init__(self, device: str = "cpu", seed: int | None = None):
        self.device = check_device(device)
        if device == "gpu":
            self._rng = require_gpu().random.default_rng(seed)
        else:
            self._rng = np.random.default_rng(seed)

    def random(self, shape, dtype=DEFAULT_DTYPE):
        out = self._rng.random(shape, dtype=dtype)
        return StrictArray(out) if self.device == "strict" else out

    def standard_normal(self, shape, dtype=DEFAULT_DTYPE):
        out = self._rng.standard_normal(shape, dtype=dtype)
        return StrictArray(out) if self.device == "strict" else out


def synchronize(array=None) -> None:
    """Wait for the GPU to finish queued work (for honest timings); no-op on CPU."""
    if _cupy is not None and (array is None or device_of(array) == "gpu"):
        _cupy.cuda.get_current_stream().synchronize()


# ---------------------------------------------------------------------------
# Host memory: keep freed blocks for the next step
# ---------------------------------------------------------------------------

# glibc's malloc serves a large block (above a threshold that starts at
# 128 KiB) with a fresh mmap and returns it to the kernel when freed; memory
# freed at the top of the heap is trimmed back too. A training step allocates
# the same activation-sized arrays every step, so each one comes back as new
# pages: the kernel zeroes them and takes a page fault per 4 KiB touched
# (about 33,000 faults per step at bench's medium case, roughly 6% of the
# step). Raising both thresholds keeps freed blocks in the process for reuse:
# the medium step then takes about 20 faults. The limit is glibc's (the mmap
# threshold may not exceed 32 MiB on 64-bit; larger arrays still map their
# own pages). NumPy's tracemalloc accounting is unaffected: it counts arrays,
# not the heap behind them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Ask the C allocator to keep freed memory for reuse instead of returning it
    to the kernel; True if it did (glibc on Linux), False where there is no
    ``mallopt`` (then nothing changes). Idempotent; called by the training loops
    and the benchmark. The process keeps its peak heap until it exits, which is
    what a training process wants and a long-lived notebook may not: call it
    only where steps repeat.
    """
    global _kept
    if _kept is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _kept = False
        else:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            _kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                         and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept
