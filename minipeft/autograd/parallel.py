r"""The engine's threads on the CPU: elementwise blocks and split matrix products.

NumPy's BLAS runs a matrix product on every core, but a ufunc (exp, +=, ...)
runs on one. NumPy releases the GIL while a ufunc loops over a large array,
so a chain of in-place ufuncs applied to separate blocks of rows, one block
per thread, does run on all cores at once. The fast kernels
(:mod:`.fused`) whose work goes row by row (elementwise maps, reductions
within a row) hand such chains to :func:`in_blocks`; each element is
computed exactly as in one call, so the result does not depend on the number
of threads.

Matrix products are split the same way (:func:`split_matmul`): by batch
entries for a stack of products, else by rows of the output, one part per
thread, each part BLAS's product on a slice. A slice's entries may be summed
in another order than the whole product's (the BLAS kernel chooses), so a
split product equals one thread's within float32 rounding, not bit for bit.
The engine then holds NumPy's
BLAS to one thread, since OpenBLAS's idle threads spin after each product
and take the core from the engine's elementwise threads.

The default is one engine thread per thread NumPy's BLAS had when minipeft
first looked (so ``OPENBLAS_NUM_THREADS=1`` means one here too);
``set_num_threads(n)`` or ``MINIPEFT_NUM_THREADS=n`` says otherwise. With
one thread the engine leaves BLAS alone and it uses its own threads as
usual.

Each thread walks its rows in pieces of ``_PIECE`` elements, so that a chain
of passes over one piece stays in the core's cache instead of streaming the
whole array through memory once per pass.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import glob
import math
import os

import numpy as np

# elements in one piece (256 KB of float32); GELU's backward on a (2048, 1536)
# array took 8.3 ms in such pieces against 13.9 ms whole, on one thread
_PIECE = 1 << 16
_threads = {"n": None, "pool": None}

# OpenBLAS's thread count, through its own C functions in the library NumPy
# loaded (names differ between NumPy's bundled copy and a system one)
_BLAS_THREAD_FUNCS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                      ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                      ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                      ("openblas_get_num_threads", "openblas_set_num_threads"))
_blas = {"looked": False, "get": None, "set": None, "initial": None, "held_from": None}


def _find_openblas() -> None:
    """Find OpenBLAS's get/set thread-count functions (once); none where NumPy uses another BLAS."""
    _blas["looked"] = True
    # the process's global symbols first, then the copy NumPy's wheel bundles
    libs = [None, *sorted(glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs",
                                                 "*openblas*")))]
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for get_name, set_name in _BLAS_THREAD_FUNCS:
            get, set_ = getattr(handle, get_name, None), getattr(handle, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                _blas["get"], _blas["set"] = get, set_
                _blas["initial"] = int(get())
                return


def blas_threads() -> int | None:
    """Threads NumPy's OpenBLAS uses now (None when there is no OpenBLAS to ask)."""
    if not _blas["looked"]:
        _find_openblas()
    return None if _blas["get"] is None else int(_blas["get"]())


@contextlib.contextmanager
def blas_own_threads(n: int | None = None):
    """Inside, NumPy's BLAS runs on ``n`` threads of its own (default: as many as
    it had when minipeft first looked); after, what it had before. For
    measuring BLAS alone (``minipeft bench``'s matmul floor)."""
    if blas_threads() is None:
        yield
        return
    before = blas_threads()
    _blas["set"](int(n or _blas["initial"]))
    try:
        yield
    finally:
        _blas["set"](before)


@contextlib.contextmanager
def using_threads(n: int):
    """Inside, the CPU work of a step uses ``n`` threads in all: the engine's ``n``
    (each product's parts on one BLAS thread), or with ``n = 1`` one thread and
    BLAS held to one too. After, the thread counts from before."""
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"using_threads: need a whole number of threads, at least 1, got {n!r}")
    previous = _threads["n"]
    set_num_threads(int(n))
    try:
        with blas_own_threads(1) if int(n) == 1 else contextlib.nullcontext():
            yield
    finally:
        set_num_threads(previous)


def _default_threads() -> int:
    value = os.environ.get("MINIPEFT_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    blas_threads()
    return _blas["initial"] or 1


def get_num_threads() -> int:
    """Threads the engine splits large products and elementwise work across on the CPU."""
    if _threads["n"] is None:
        _threads["n"] = _default_threads()
    return _threads["n"]


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads for large products and elementwise work on the CPU (None:
    the default, ``MINIPEFT_NUM_THREADS`` or as many as NumPy's BLAS had).

    With more than one, the engine holds NumPy's BLAS to one thread while it
    runs; with one, BLAS gets back the thread count it had before.
    """
    if n is not None and (isinstance(n, bool) or int(n) != n or int(n) < 1):
        raise ValueError(f"set_num_threads: need a whole number of threads, at least 1, got {n!r}")
    _threads["n"] = None if n is None else int(n)
    if _threads["pool"] is not None:
        _threads["pool"].shutdown(wait=True)
        _threads["pool"] = None
    if get_num_threads() == 1 and _blas["held_from"] is not None:
        _blas["set"](_blas["held_from"])
        _blas["held_from"] = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The engine's helper threads, one fewer than :func:`get_num_threads` (the
    calling thread is the last), and BLAS held to one thread while they exist."""
    if blas_threads() not in (None, 1):
        if _blas["held_from"] is None:
            _blas["held_from"] = blas_threads()
        _blas["set"](1)
    pool = _threads["pool"]
    if pool is None:
        pool = _threads["pool"] = concurrent.futures.ThreadPoolExecutor(
            max_workers=get_num_threads() - 1, thread_name_prefix="minipeft")
    return pool


def in_parts(fn, length: int, most: int | None = None) -> None:
    """Run ``fn(lo, hi)`` over ``range(length)`` cut into one part per thread (and
    at most ``most`` parts), the parts at once (``fn`` must touch only what
    belongs to its part)."""
    n = min(get_num_threads(), length, length if most is None else most)
    if n < 2:
        fn(0, length)
        return
    pool = _pool()
    cuts = [length * i // n for i in range(n + 1)]
    futures = [pool.submit(fn, cuts[i], cuts[i + 1]) for i in range(1, n)]
    try:
        fn(cuts[0], cuts[1])            # this thread takes the first part
    finally:
        for f in futures:
            f.result()                  # waits; re-raises an error from a part


#: products below this many FLOPs run whole: a thread hand-off costs tens of
#: microseconds, a product of 2 MFLOP about ten on one core
_SPLIT_FLOPS = 2_000_000


def split_matmul(a, b, out=None):
    """NumPy's ``a @ b`` cut into one part per engine thread (see
    :func:`in_parts`): by batch entry for a stack of products, else by rows of
    the output, else by its columns. Each part is the same BLAS product on a
    slice, so the result equals one call's up to the order BLAS sums in."""
    n = get_num_threads()
    if n < 2 or a.ndim < 2 or b.ndim < 2:
        return np.matmul(a, b, out=out)
    batch = tuple(np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])))
    shape = (*batch, a.shape[-2], b.shape[-1])
    if 2 * math.prod(shape) * a.shape[-1] < _SPLIT_FLOPS:
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty(shape, dtype=np.result_type(a, b))
    if batch and batch[0] >= n:
        # (B, ..., m, k) @ (B, ..., k, n): batch entries lo..hi-1; an operand
        # broadcast along the batch (fewer dimensions, or 1 there) goes whole
        def lead(t, lo, hi):
            return t[lo:hi] if t.ndim == len(shape) and t.shape[0] != 1 else t

        def part(lo, hi):
            np.matmul(lead(a, lo, hi), lead(b, lo, hi), out=out[lo:hi])
        axis = 0
    elif shape[-2] >= 2 * n:
        def part(lo, hi):                                   # rows lo..hi-1 of a and of out
            np.matmul(a[..., lo:hi, :], b, out=out[..., lo:hi, :])
        axis = -2
    else:
        def part(lo, hi):                                   # columns lo..hi-1 of b and of out
            np.matmul(a, b[..., lo:hi], out=out[..., lo:hi])
        axis = -1
    in_parts(part, shape[axis])
    return out


def in_blocks(fn, *arrays, piece: int | None = None) -> None:
    """Run ``fn(*arrays)`` as ``fn(*blocks)`` on blocks of rows (axis 0), one per thread.

    ``fn`` must work row by row and write only into the arrays it is given;
    all arrays share their first axis. Each thread's block is handed to ``fn``
    in pieces of about ``piece`` elements (whole rows). Large NumPy arrays
    only: CuPy (whose kernels use the whole GPU already), the strict stand-in
    and arrays of fewer than two pieces get one call on the whole.
    """
    piece = _PIECE if piece is None else piece
    a0 = arrays[0]
    rows = a0.shape[0] if a0.ndim else 0
    if type(a0) is not np.ndarray or rows < 2 or a0.size < 2 * piece:
        fn(*arrays)
        return
    step = max(1, piece // (a0.size // rows))               # rows in one piece

    def run(lo, hi):
        for i in range(lo, hi, step):
            fn(*(a[i:min(i + step, hi)] for a in arrays))

    in_parts(run, rows, most=-(-rows // step))              # no thread without a piece
