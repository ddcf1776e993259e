r"""Tensor: an array, its gradient, and the node that made it.

A :class:`Tensor` wraps one whole array (NumPy, CuPy or the strict stand-in;
the array knows its module, see :mod:`minipeft.backend`). Operators on tensors
build a graph of :class:`~minipeft.autograd.function.Context` nodes;
:meth:`Tensor.backward` walks that graph in reverse topological order and
applies the chain rule

.. math::  \frac{\partial L}{\partial x} = \sum_{y \,\text{uses}\, x}
           \left(\frac{\partial y}{\partial x}\right)^{\!\top} \frac{\partial L}{\partial y},

summing the contributions of every use of ``x``. Leaf tensors that require a
gradient receive it in ``.grad``; a leaf that does not (a frozen weight) never
gets a gradient buffer, and the products that would only serve its gradient
are never formed.

In-place ops (``+=``, ``*=``, :meth:`Tensor.copy_`) bump a version counter.
A node that saved the tensor checks it in backward and raises instead of
returning a silently wrong gradient. Writing to ``.data`` directly is
*unchecked*: it is how optimizers update weights, outside any graph.
"""

from __future__ import annotations

import numpy as np

from .. import backend


class Tensor:
    """An n-dimensional array with automatic differentiation.

    Args:
        data: an array (NumPy, CuPy or strict), a scalar or a nested list.
            Python data becomes float32 unless ``dtype`` says otherwise; an
            existing array keeps its dtype and device and is not copied.
        requires_grad: whether backward should compute ``dL/d(this)``.
        dtype: convert to this dtype (``np.float32`` or ``np.float64`` for
            anything that will carry a gradient).
        device: put the data on ``'cpu'``, ``'gpu'`` or ``'strict'``.
    """

    __array_ufunc__ = None  # make ndarray + Tensor defer to Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None, device=None, name=None,
                 _copy=True):
        if isinstance(data, Tensor):
            data = data.data
        if isinstance(data, np.generic):  # a NumPy scalar keeps its dtype
            data = np.asarray(data)
        if not backend.is_array(data):
            data = np.asarray(data, dtype=dtype or _default_dtype(data))
        elif dtype is not None and data.dtype != np.dtype(dtype):
            data = data.astype(dtype)
        if device is not None:
            data = backend.to_device(data, device)
        if requires_grad and np.dtype(data.dtype) not in backend.FLOAT_DTYPES:
            raise TypeError(
                f"only float32 or float64 tensors can require gradients, got {data.dtype}"
            )
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.name = name
        # Masked means computed, then masked: a boolean array of data's shape;
        # the gradient arriving here is multiplied by it (see nn and peft).
        self.grad_mask = None
        self._node = None        # the Context that produced this tensor (None: a leaf)
        # [count, last in-place op]: shared with every node that saved this
        # tensor's data and with views of it; in-place ops bump it.
        self._version = [0, None]

    # -- array facts -----------------------------------------------------
    shape = property(lambda self: tuple(self.data.shape))
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    dtype = property(lambda self: self.data.dtype)
    nbytes = property(lambda self: int(self.data.nbytes))

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def xp(self):
        """The array module of this tensor's data (numpy, cupy or strict)."""
        return backend.xp(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device!r}{grad})"

    def __len__(self):
        return self.shape[0]

    # -- conversion --------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array on the host (a copy when it lives elsewhere)."""
        return backend.asnumpy(self.data)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(
                f"item() needs a tensor of one element, this one has shape {self.shape}"
            )
        return self.data.reshape(()).item()

    def detach(self) -> Tensor:
        """The same data, cut from the graph (no gradient flows through it).

        It shares the version counter: an in-place change through the detached
        tensor is still seen by the nodes that saved this one.
        """
        out = Tensor(self.data, _copy=False)
        out._version = self._version
        return out

    def to(self, device: str) -> Tensor:
        """Move to ``'cpu'``, ``'gpu'`` or ``'strict'``; a leaf stays a leaf.

        In place for leaves (parameters move with their model) and returns
        self; the gradient moves with the data.
        """
        self.data = backend.to_device(self.data, device)
        if self.grad is not None:
            self.grad = backend.to_device(self.grad, device)
        if self.grad_mask is not None:
            self.grad_mask = backend.to_device(self.grad_mask, device)
        return self

    def astype(self, dtype) -> Tensor:
        from . import ops  # ops imports Tensor: a cycle, broken here
        return ops.cast(self, dtype)

    # -- in-place ops (bump the version counter) ---------------------------
    def _check_inplace(self, what):
        from .function import is_grad_enabled  # function imports Tensor: a cycle, broken here
        if self.requires_grad and is_grad_enabled():
            raise RuntimeError(
                f"{what}: in-place change of a tensor that requires grad while gradients "
                "are recorded; use an out-of-place op, or wrap it in `with no_grad():`"
            )

    def _bump(self, what="a direct update"):
        """Count an in-place change; ``what`` names it in backward's error."""
        self._version[0] += 1
        self._version[1] = what

    def copy_(self, other) -> Tensor:
        """Overwrite this tensor's values with ``other``'s (in place)."""
        self._check_inplace("copy_")
        src = other.data if isinstance(other, Tensor) else other
        self.data[...] = src
        self._bump("copy_")
        return self

    def __iadd__(self, other):
        self._check_inplace("+=")
        self.data += _raw(other, self)
        self._bump("+=")
        return self

    def __isub__(self, other):
        self._check_inplace("-=")
        self.data -= _raw(other, self)
        self._bump("-=")
        return self

    def __imul__(self, other):
        self._check_inplace("*=")
        self.data *= _raw(other, self)
        self._bump("*=")
        return self

    def __itruediv__(self, other):
        self._check_inplace("/=")
        self.data /= _raw(other, self)
        self._bump("/=")
        return self

    def zero_grad(self) -> None:
        self.grad = None

    # -- backward ----------------------------------------------------------
    def backward(self, grad=None) -> None:
        r"""Accumulate :math:`\partial L/\partial x` into ``x.grad`` for every leaf ``x``.

        ``self`` is L. A scalar needs no ``grad`` (it is 1); a non-scalar
        needs one of its own shape (a vector-Jacobian product).
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: nothing upstream "
                "requires a gradient (are all parameters frozen, or is this under no_grad?)"
            )
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs a "
                    "gradient of that shape: call .backward(grad) or reduce it with .sum()"
                )
            grad = xp.ones(self.data.shape, dtype=self.dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if tuple(grad.shape) != self.shape:
                raise ValueError(
                    f"backward(grad): grad has shape {tuple(grad.shape)}, "
                    f"expected {self.shape}"
                )
        if self._node is None:  # a leaf: its gradient is the seed itself
            _accumulate_leaf(self, grad)
            return
        backward_walk(self._node, grad)


# Observers of backward, for the memory accountant (:mod:`minipeft.memory`).
# Each is called as ``hook(event, node, in_grads, grads)``: with event
# "computed" right after a node's backward returned its input gradients
# (the node's saved arrays are still held), and "passed" once those were
# handed on (``grads`` maps pending nodes to the gradients waiting for them).
BACKWARD_HOOKS: list = []


def run_backward(root, grad) -> None:
    """Chain rule over the graph below ``root`` (a Context), seeded with ``grad``.

    Nodes are visited consumers first, so a node's gradient is complete
    (every use of its output summed) when its turn comes. Its backward turns
    it into one gradient per input; each goes to a leaf's ``.grad`` or is
    added to what its producer has received so far. Right after its
    backward a node releases what it saved.
    """
    watch = root.fn.observer             # the op profiler, when it runs
    grads = {id(root): grad}             # node id -> dL/d(its output), summed so far
    for node in _topological_order(root):
        g = grads.pop(id(node), None)
        if g is None:                    # no gradient reached this node (all its uses were cut)
            node.release()
            continue
        if watch is not None:
            watch.enter(node.fn.__name__)
        in_grads = node.fn.backward(node, g)
        if watch is not None:
            watch.leave("backward")
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        for hook in BACKWARD_HOOKS:
            hook("computed", node, in_grads, grads)
        node.release()                   # its saved activations are no longer needed
        for parent, ig in zip(node.parents, in_grads):
            if parent is None or ig is None:
                continue
            if isinstance(parent, Tensor):
                _accumulate_leaf(parent, ig)
            elif id(parent) in grads:
                grads[id(parent)] = grads[id(parent)] + ig
            else:
                grads[id(parent)] = ig
        for hook in BACKWARD_HOOKS:
            hook("passed", node, in_grads, grads)


#: The walk :meth:`Tensor.backward` runs: :func:`run_backward`, or on the fast
#: path its own (``fused.run_backward``), which also tells each node whether
#: it may overwrite the gradient it receives.
backward_walk = run_backward


def _accumulate_leaf(leaf: Tensor, g) -> None:
    """Add ``g`` into ``leaf.grad`` (a copy of the first, so the buffer is the leaf's own).

    A ``grad_mask`` (masked means computed, then masked) zeroes the entries
    the method does not train.
    """
    if tuple(g.shape) != leaf.shape:
        raise RuntimeError(
            f"internal error: gradient of shape {tuple(g.shape)} for a leaf of shape {leaf.shape}"
        )
    if leaf.grad_mask is not None:
        g = g * leaf.grad_mask
    if isinstance(g, np.generic):        # NumPy's 0-d ufunc results are scalars: keep arrays
        g = np.asarray(g)
    if leaf.grad is None:
        leaf.grad = g.copy()
    else:
        leaf.grad += g


def _topological_order(root) -> list:
    """Nodes reachable from ``root``, each before every node it depends on.

    Iterative depth-first search (a deep graph would overflow Python's
    recursion limit): a node is emitted after all its parents, and the
    reversed emission order visits consumers before producers.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for p in node.parents:
            if p is not None and not isinstance(p, Tensor) and id(p) not in visited:
                stack.append((p, False))
    order.reverse()
    return order


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _default_dtype(data):
    arr = np.asarray(data)
    if arr.dtype.kind in "iub":
        return arr.dtype
    return backend.DEFAULT_DTYPE


def _raw(other, like: Tensor):
    """The array behind ``other``; Python scalars stay weak (no dtype promotion).

    An in-place op cannot change ``like``'s dtype, and NumPy would cast a
    float64 operand down without a word, so a tensor of another dtype is
    refused here as it is by every out-of-place op.
    """
    if isinstance(other, Tensor):
        if other.dtype != like.dtype:
            raise TypeError(
                f"in-place op: operand dtype {other.dtype} differs from the tensor's "
                f"{like.dtype}; convert it with .astype(...) first"
            )
        return other.data
    return other


def tensor(data, requires_grad=False, dtype=None, device=None) -> Tensor:
    """Create a Tensor (float32 unless told otherwise) on ``device``."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


# The operator methods (a + b, a @ b, a.sum(), ...) are attached by ops.py,
# next to the Functions they call.
