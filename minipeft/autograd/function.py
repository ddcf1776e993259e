r"""Function and Context: one operator's forward and backward, side by side.

An operator is a subclass of :class:`Function` with two static methods::

    class Mul(Function):
        @staticmethod
        def forward(ctx, a, b):            # arrays in, array out
            ctx.save_for_backward(...)     # only what backward will need
            return a * b

        @staticmethod
        def backward(ctx, g):              # dL/dout in, one dL/dinput per input
            ...

``Function.apply(*tensors)`` runs ``forward`` on the tensors' arrays and, when
any input needs a gradient and gradients are enabled, records a graph node.
The node *is* the :class:`Context`: it holds the parents (what to send input
gradients to), the arrays saved for backward, and nothing else. It never holds
the input or output tensors, so an activation stays alive only while a node has
saved it. That makes memory honest and inspectable:

* every saved array goes through :meth:`Context.save_for_backward`, which
  records it in the :data:`LEDGER` (deduplicated by underlying buffer);
* a node's saved arrays are dropped as soon as its backward has run;
* an op whose inputs need no gradient records no node and saves nothing.

``ctx.needs_input_grad`` tells forward which input gradients will really be
computed, so it can skip saving what only an unneeded gradient would use
("frozen means not computed").
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import math
import os
import threading
import time
import weakref

import numpy as np

from .. import backend
from .tensor import Tensor

# ---------------------------------------------------------------------------
# Gradient mode
# ---------------------------------------------------------------------------

_state = threading.local()


def is_grad_enabled() -> bool:
    """Whether ops record graph nodes (False inside :func:`no_grad`)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def set_grad_enabled(mode: bool):
    """Context manager that turns graph recording on or off."""
    prev = is_grad_enabled()
    _state.enabled = bool(mode)
    try:
        yield
    finally:
        _state.enabled = prev


def no_grad():
    """Context manager (``with no_grad():``) under which no graph is recorded.

    Evaluation, generation and optimizer updates run under it: nothing is saved
    for backward, so activations are freed as soon as they are used.
    """
    return set_grad_enabled(False)


# ---------------------------------------------------------------------------
# Work on every core: elementwise blocks and split products
# ---------------------------------------------------------------------------
#
# NumPy's BLAS runs a matrix product on every core, but a ufunc (exp, +=, ...)
# runs on one. NumPy releases the GIL while a ufunc loops over a large array,
# so a chain of in-place ufuncs applied to separate blocks of rows, one block
# per thread, does run on all cores at once. Ops whose work goes row by row
# (elementwise maps, reductions within a row) hand such chains to
# :func:`in_blocks`; each element is computed exactly as in one call, so the
# result does not depend on the number of threads.
#
# Matrix products are split the same way (:func:`split_matmul`, which
# ``ops._matmul`` calls on NumPy arrays): by rows of the output, or by
# batch entries for a stack of products, one part per thread (each part is
# BLAS's product on a slice; the tests find the model's outputs and
# gradients bit-identical to one thread's). The engine then holds NumPy's BLAS to
# one thread. Left alone, OpenBLAS's own threads spin for a while after each
# product waiting for the next one, and a spinning thread takes the core
# from the engine's elementwise threads: on the 2-core machine this was
# tuned on, two engine threads ran tanh 0.64x as fast as one while BLAS's
# threads were spinning; with BLAS held to one thread, the medium training
# step ran 0.90x the time of BLAS's threads for products and one thread for
# the rest (interleaved runs, idle machine). A row-split product on two
# threads ran at the same rate as OpenBLAS's two-thread product (277 against
# 280 GFLOP/s on a (2048, 384) x (384, 1536) product).
#
# The default is one engine thread per thread NumPy's BLAS had when minipeft
# first looked (so ``OPENBLAS_NUM_THREADS=1`` means one here too);
# ``set_num_threads(n)`` or ``MINIPEFT_NUM_THREADS=n`` says otherwise. With
# one thread the engine leaves BLAS alone and it uses its own threads as
# usual.
#
# Each thread also walks its rows in small pieces: a chain of eight passes
# over a 12 MB array streams it through memory eight times, while eight
# passes over a 256 KB piece stay in the core's cache (GELU's backward on
# the medium model's (2048, 1536) hidden layer: 13.9 ms whole, 8.3 ms in
# pieces of 64 rows, one thread).

_PIECE = 1 << 16              # elements in one piece (256 KB of float32)
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
    import ctypes  # noqa: PLC0415 - only here
    import glob  # noqa: PLC0415

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


# ---------------------------------------------------------------------------
# The activation ledger
# ---------------------------------------------------------------------------


class ActivationLedger:
    """Books of every array saved for backward and still alive.

    Saved arrays are recorded per node and keyed by their underlying buffer
    (:func:`backend.buffer_id`), so a reshape of a saved array, or one array
    saved by two nodes, counts once. A node's entries leave the ledger when
    its backward has run or when the node is garbage-collected (a graph that
    was built and dropped without backward).

    ``nbytes()`` is the live total; ``peak`` the largest total since
    :meth:`reset_peak`. The memory accountant reads these; nothing has to
    guess what the graph keeps alive.

    Each buffer also carries the *owner* it was first saved under:
    ``"backbone"``, or ``"method"`` while a PEFT method's own modules run
    (:meth:`owned_by`; a wrapper's forward, LST's side network, a soft
    prompt's encoder). That splits the activations into what the frozen
    model keeps for the gradient to pass through it and what the method
    keeps for its own parameters.
    """

    def __init__(self):
        self._by_node: dict[int, list[tuple[tuple[int, int], int]]] = {}
        self._refcount: dict[tuple[int, int], int] = {}
        self._owner: dict[tuple[int, int], str] = {}
        self._bytes = 0
        self.peak = 0
        self.owner = "backbone"

    @contextlib.contextmanager
    def owned_by(self, owner: str):
        """Inside, buffers saved for the first time are booked under ``owner`` ("method")."""
        before, self.owner = self.owner, owner
        try:
            yield
        finally:
            self.owner = before

    def owner_of(self, bid) -> str:
        """The owner a live buffer (a :func:`backend.buffer_id`) was first saved under."""
        return self._owner[bid]

    def record(self, node: Context, arrays) -> None:
        """Enter the arrays ``node`` saves for backward (called by :meth:`Context.save_for_backward`).

        Each array is booked under the buffer it views (:func:`backend.buffer_id`:
        the base's address and size). A buffer already booked (a view of it,
        or the same array saved by another node) only gains a reference; a
        new one adds its bytes to the total, and the peak follows. The node's
        entries are kept under ``id(node)`` so that :meth:`release` can take
        exactly them out again.
        """
        key = id(node)
        entries = []
        for a in arrays:
            bid = backend.buffer_id(a)                      # (base address, base nbytes)
            entries.append((bid, bid[1]))
            n = self._refcount.get(bid, 0)
            if n == 0:                                      # first holder: its bytes count now
                self._bytes += bid[1]
                self._owner[bid] = self.owner
            self._refcount[bid] = n + 1
        self._by_node.setdefault(key, []).extend(entries)
        self.peak = max(self.peak, self._bytes)

    def release(self, node_id: int) -> None:
        """Take node ``node_id``'s entries out: right after its backward, or when it is collected.

        Each entry drops one reference to its buffer; a buffer's bytes leave
        the total with its last reference, since until then another node
        still keeps it alive. Releasing a node twice, or one that saved
        nothing, does nothing.
        """
        for bid, nbytes in self._by_node.pop(node_id, ()):
            n = self._refcount[bid] - 1
            if n == 0:
                del self._refcount[bid]
                del self._owner[bid]
                self._bytes -= nbytes
            else:
                self._refcount[bid] = n

    def nbytes(self) -> int:
        """Bytes of distinct buffers currently saved for backward."""
        return self._bytes

    def num_buffers(self) -> int:
        """How many distinct buffers are currently saved for backward."""
        return len(self._refcount)

    def buffer_ids(self) -> list[tuple[int, int]]:
        """The distinct buffers saved now, as :func:`backend.buffer_id` names them.

        The memory accountant takes out those that are parameters' data
        (weights a MatMul or LayerNorm keeps for an input's gradient).
        """
        return list(self._refcount)

    def num_nodes(self) -> int:
        """How many graph nodes currently hold saved arrays."""
        return len(self._by_node)

    def reset_peak(self) -> None:
        """Start a new peak from what is saved now (before the step to be measured)."""
        self.peak = self._bytes


LEDGER = ActivationLedger()


# ---------------------------------------------------------------------------
# The op profiler (``minipeft bench --profile``)
# ---------------------------------------------------------------------------


class OpProfile:
    """Seconds spent in each op, by op name, forward and backward.

    Forward time is all of :meth:`Function.apply` (checks and bookkeeping
    included); backward time is the op's ``backward``. A :class:`Checkpoint`'s
    time includes the ops of the block it runs, which are also counted on
    their own. ``(gradient accumulation)`` is the engine's summing of
    gradients and releasing of saved arrays between backwards. ``matmul``
    holds, per op, the part of its time spent in matrix products (the ops
    note them through ``ops._matmul``); the rest is elementwise work and
    bookkeeping.
    """

    def __init__(self):
        self.seconds = collections.defaultdict(float)   # (name, "forward"|"backward") -> s
        self.calls = collections.Counter()              # (name, "forward"|"backward") -> n
        self.matmul = collections.defaultdict(float)    # name -> s in matrix products
        self.current = None                             # the op running now

    def add(self, name: str, phase: str, seconds: float) -> None:
        """Book one call of op ``name``'s ``phase`` ("forward" or "backward")."""
        self.seconds[name, phase] += seconds
        self.calls[name, phase] += 1

    def rows(self) -> list[tuple[str, float, float, int, float]]:
        """(name, forward s, backward s, calls, matmul s), the most expensive first."""
        names = {name for name, _ in self.seconds}
        out = [(n, self.seconds.get((n, "forward"), 0.0), self.seconds.get((n, "backward"), 0.0),
                self.calls.get((n, "forward"), 0) or self.calls.get((n, "backward"), 0),
                self.matmul.get(n, 0.0))
               for n in names]
        return sorted(out, key=lambda r: -(r[1] + r[2]))


_profile: OpProfile | None = None  # read by Function.apply and run_backward


@contextlib.contextmanager
def profile_ops():
    """``with profile_ops() as prof:`` times every op's forward and backward inside.

    Off (the default), the engine pays one ``is None`` test per op.
    """
    global _profile
    prev, _profile = _profile, OpProfile()
    try:
        yield _profile
    finally:
        _profile = prev


# ---------------------------------------------------------------------------
# Context: the graph node
# ---------------------------------------------------------------------------


class Context:
    """One recorded application of a Function: a node of the graph.

    Attributes:
        fn: the Function subclass that made this node.
        needs_input_grad: one bool per input: will its gradient be computed?
        parents: one entry per input: ``None`` (no gradient wanted), a leaf
            :class:`Tensor` (its ``.grad`` receives the gradient) or the
            :class:`Context` that produced a non-leaf input.
    """

    __slots__ = (
        "fn", "needs_input_grad", "parents", "recording", "_saved", "_versions",
        "_finalizer", "_inputs", "_released", "grad_owned", "__weakref__", "__dict__",
    )

    def __init__(self, fn, needs_input_grad, recording):
        self.fn = fn
        self.needs_input_grad = needs_input_grad
        self.recording = recording
        self.parents = ()
        self._saved = ()
        self._versions = ()
        self._finalizer = None
        # The input tensors, set only while forward runs: save_for_backward
        # uses them to recognise an input's array and note its version.
        self._inputs = ()
        self._released = False  # True once saved arrays were dropped by backward
        # Set by the engine right before backward: True when the gradient g
        # handed to backward is referenced nowhere else, so backward may
        # overwrite it (and return it) instead of allocating a new array.
        self.grad_owned = False

    @property
    def name(self) -> str:
        return self.fn.__name__

    def save_for_backward(self, *items) -> None:
        """Keep arrays (or tensors' arrays) for backward, recording them in the ledger.

        Forward receives arrays, not tensors; an array that is an input
        tensor's ``.data`` is recognised, and that tensor's version counter is
        noted now and checked when the saved values are read, so an in-place
        change between forward and backward raises instead of giving a wrong
        gradient. (The output's counter is noted by :meth:`Function.apply`.)
        Called when nothing is recorded (no input needs a gradient), it keeps
        nothing; ``None`` entries (a gradient that will not be computed) cost
        nothing.
        """
        if not self.recording:
            return
        if self._finalizer is not None:  # saving again replaces what was saved
            self.release()
            self._released = False
        arrays, versions = [], []
        for it in items:
            if isinstance(it, Tensor):
                versions.append(("a saved tensor", it._version, it._version[0]))
                arrays.append(it.data)
                continue
            if it is not None:
                for k, t in enumerate(self._inputs):
                    if it is t.data:
                        versions.append((f"input {k}", t._version, t._version[0]))
                        break
            arrays.append(it)
        self._saved = tuple(arrays)
        self._versions = tuple(versions)
        kept = [a for a in arrays if a is not None]
        if not kept:  # nothing kept alive: no ledger entry, the node holds no arrays
            return
        LEDGER.record(self, kept)
        # If the graph is dropped without backward, the books follow it.
        self._finalizer = weakref.finalize(self, LEDGER.release, id(self))

    def _note_output(self, out, result: Tensor) -> None:
        """Check the output too, if forward saved it (exp, tanh, softmax save y)."""
        if any(a is out for a in self._saved):
            self._versions += (("its output", result._version, result._version[0]),)

    @property
    def saved(self) -> tuple:
        """The saved arrays, after checking that no saved tensor changed in place."""
        if self._released:
            raise RuntimeError(
                f"{self.name}.backward: the arrays it saved for backward were released "
                "by an earlier backward pass; a graph can be walked backward once. "
                "Run the forward pass again."
            )
        for what, counter, seen in self._versions:
            if counter[0] != seen:
                raise RuntimeError(
                    f"{self.name}.backward: {what}, saved for backward, was modified in "
                    f"place by `{counter[1]}` after the forward pass (version {seen} -> "
                    f"{counter[0]}); its gradient would be silently wrong. Use an "
                    "out-of-place op, or make the change before the forward pass."
                )
        return self._saved

    def release(self) -> None:
        """Drop the saved arrays (called right after this node's backward)."""
        # a node that kept arrays cannot run backward again; one that kept none can
        self._released = self._released or any(a is not None for a in self._saved)
        self._saved = ()
        self._versions = ()
        if self._finalizer is not None:
            self._finalizer()  # removes this node's entries from the ledger
            self._finalizer = None


# ---------------------------------------------------------------------------
# Function
# ---------------------------------------------------------------------------


class Function:
    """Base class of every differentiable operator (see the module docstring)."""

    @staticmethod
    def forward(ctx: Context, *arrays, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **kwargs) -> Tensor:
        """Run forward on tensors; record a node when a gradient will be needed.

        ``inputs`` are Tensors (constants must be wrapped by the caller);
        keyword arguments are non-differentiable settings (axes, indices, masks).
        """
        prof = _profile
        if prof is not None:
            t0, outer, prof.current = time.perf_counter(), prof.current, cls.__name__
        tensors = inputs
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{cls.__name__}: expected Tensor inputs, got {type(t).__name__}; "
                    "wrap arrays with minipeft.Tensor(...)"
                )
        _check_same_backend_and_dtype(cls.__name__, tensors)
        needs = tuple(t.requires_grad for t in tensors)
        recording = is_grad_enabled() and any(needs)
        ctx = Context(cls, needs if recording else (False,) * len(needs), recording)
        ctx._inputs = tensors if recording else ()
        try:
            out = cls.forward(ctx, *[t.data for t in tensors], **kwargs)
        finally:
            ctx._inputs = ()  # the node must not keep its inputs alive
        result = Tensor(out, requires_grad=recording, _copy=False)
        # A view (reshape, transpose, basic slice) shares its input's memory, so
        # it shares the version counter too: writing through either is seen by
        # every node that saved the other.
        if getattr(out, "base", None) is not None:
            bid = backend.buffer_id(out)
            for t in tensors:
                if backend.buffer_id(t.data) == bid:
                    result._version = t._version
                    break
        if recording:
            ctx._note_output(out, result)
            # A parent is the leaf tensor itself (its .grad receives the
            # gradient) or, for a non-leaf, the node that produced it.
            ctx.parents = tuple(
                (t._node if t._node is not None else t) if t.requires_grad else None
                for t in tensors
            )
            result._node = ctx
        if prof is not None:
            prof.add(cls.__name__, "forward", time.perf_counter() - t0)
            prof.current = outer
        return result


def _check_same_backend_and_dtype(name, tensors):
    """All float inputs of one op share one array module and one dtype."""
    if len(tensors) < 2:
        return
    mod0, dt0 = backend.xp(tensors[0].data), tensors[0].data.dtype
    for t in tensors[1:]:
        if backend.xp(t.data) is not mod0:
            raise TypeError(
                f"{name}: inputs live on different devices "
                f"({backend.device_of(tensors[0].data)!r} and {backend.device_of(t.data)!r}); "
                "move them with .to(device) first"
            )
        if t.data.dtype != dt0:
            raise TypeError(
                f"{name}: inputs have different dtypes ({dt0} and {t.data.dtype}); "
                "minipeft never promotes silently: convert one with .astype(...)"
            )
