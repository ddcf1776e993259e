r"""Function and Context: one operator's forward and backward, side by side.

``Function.apply(*tensors)`` runs ``forward`` on the tensors' arrays and, when
any input needs a gradient and gradients are enabled, records a graph node,
the :class:`Context`. Below Function come the grad mode (:func:`no_grad`),
the Context and the activation ledger (:data:`LEDGER`) that books every array
a node saves for backward.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

from .. import backend
from .tensor import Tensor


class Function:
    """Base class of every differentiable operator: forward and backward, side by side::

        class Mul(Function):
            @staticmethod
            def forward(ctx, a, b):            # arrays in, array out
                ctx.save_for_backward(...)     # only what backward will need
                return a * b

            @staticmethod
            def backward(ctx, g):              # dL/dout in, one dL/dinput per input
                ...

    The node ``apply`` records *is* the ``ctx``: it holds the parents (what to
    send input gradients to), the arrays saved for backward, and nothing
    else. It never holds the input or output tensors, so an activation stays
    alive only while a node has saved it, and ``ctx.needs_input_grad`` tells
    forward which input gradients will really be computed, so that it saves
    nothing only an unneeded gradient would use ("frozen means not computed").
    """

    #: The class whose forward and backward run: the op itself, or on the fast
    #: path its fast kernel (see :mod:`.fused`).
    kernel: type
    #: Told when each op's forward and backward start and end (the op profiler,
    #: :mod:`.profile`, while it runs); None otherwise.
    observer = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.kernel = cls

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
        cls = cls.kernel             # on the fast path, the op's fast kernel
        watch = cls.observer
        if watch is not None:
            watch.enter(cls.__name__)
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
        if watch is not None:
            watch.leave("forward")
        return result


# ---------------------------------------------------------------------------
# Gradient mode
# ---------------------------------------------------------------------------

# per thread, as in PyTorch: no_grad in one thread leaves recording on in another
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

    # "__dict__": an op keeps its own non-array facts on ctx (ctx.shapes, ctx.axis)
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
        # Set by the fast walk (fused.py) right before backward: True when the
        # gradient g handed to backward is referenced nowhere else, so a fast
        # kernel may overwrite it instead of allocating a new array.
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
