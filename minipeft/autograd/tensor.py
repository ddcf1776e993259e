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

import time

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
        if not _is_array(data):
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
        from . import ops
        return ops.cast(self, dtype)

    # -- in-place ops (bump the version counter) ---------------------------
    def _check_inplace(self, what):
        from .function import is_grad_enabled
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
            _accumulate_leaf(self, grad, owned=False)
            return
        run_backward(self._node, grad)


# Observers of backward, for the memory accountant (:mod:`minipeft.memory`).
# Each is called as ``hook(event, node, in_grads, grads)``: with event
# "computed" right after a node's backward returned its input gradients
# (the node's saved arrays are still held), and "passed" once those were
# handed on (``grads`` maps pending nodes to the gradients waiting for them).
# The list is empty unless someone is measuring: then the loop pays nothing.
BACKWARD_HOOKS: list = []


def run_backward(root, grad) -> None:
    """Chain rule over the graph below ``root`` (a Context), seeded with ``grad``.

    A tensor used twice (the residual stream: a block's input feeds both the
    LayerNorm and the residual add) receives two gradients, which are summed.
    The sum is formed in place whenever one of the two arrays is *fresh*: a
    new buffer (not a view) that a backward made and handed to this receiver
    alone. An array that is also held elsewhere (``Add`` hands the same g to
    both its inputs; the seed is the caller's) is only ever read.

    The same bookkeeping tells a node whether the gradient it receives is
    its own to overwrite (``ctx.grad_owned``): GELU, LayerNorm, attention and
    the products with a constant then work in place in g instead of
    allocating an array of its size, and what they hand on (g itself) stays
    owned by its one receiver.
    """
    from .function import _profile as prof  # the op profiler (bench --profile), or None
    order = _topological_order(root)
    grads = {id(root): grad}
    # ids of arrays already passed to some receiver. The seed counts: it may
    # be the caller's array, which must never become (and be added into as)
    # a leaf's .grad buffer.
    handed = {id(grad)}
    leaf_owned = set()  # ids of arrays that became a leaf's .grad buffer
    owned = set()       # keys of entries of `grads` whose array no one else refers to
    for node in order:
        g = grads.pop(id(node), None)
        node.grad_owned = id(node) in owned
        owned.discard(id(node))
        if g is None:  # no gradient reached this node (all its uses were cut)
            node.release()
            continue
        if prof is None:
            in_grads = node.fn.backward(node, g)
        else:
            t0, prof.current = time.perf_counter(), node.fn.__name__
            in_grads = node.fn.backward(node, g)
            prof.add(node.fn.__name__, "backward", time.perf_counter() - t0)
            t0 = time.perf_counter()
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        if BACKWARD_HOOKS:
            for hook in BACKWARD_HOOKS:
                hook("computed", node, in_grads, grads)
        node.release()  # its saved activations are no longer needed
        for i, (parent, ig) in enumerate(zip(node.parents, in_grads)):
            if parent is None or ig is None:
                continue
            single = not any(o is ig for j, o in enumerate(in_grads) if j != i)
            fresh = single and (
                (id(ig) not in handed and getattr(ig, "base", None) is None)
                or (ig is g and node.grad_owned))      # g, owned here, handed on once
            if isinstance(parent, Tensor):
                if _accumulate_leaf(parent, ig, owned=fresh):
                    leaf_owned.add(id(parent.grad))
            else:
                key = id(parent)
                cur = grads.get(key)
                if cur is None:                    # the first gradient to arrive
                    if id(ig) in leaf_owned:
                        ig, fresh = ig.copy(), True
                    grads[key] = ig
                    if fresh:
                        owned.add(key)
                elif key in owned:                 # add into the buffer held here alone
                    cur += ig
                    grads[key] = cur  # (a NumPy scalar is rebound, not changed in place)
                elif fresh:                        # add into the new one instead
                    ig += cur
                    grads[key] = ig
                    owned.add(key)
                else:                              # neither is ours alone: a new array
                    grads[key] = cur + ig
                    owned.add(key)
            handed.add(id(ig))
        if prof is not None:
            prof.add("(gradient accumulation)", "backward", time.perf_counter() - t0)
        if BACKWARD_HOOKS:
            for hook in BACKWARD_HOOKS:
                hook("passed", node, in_grads, grads)


def _accumulate_leaf(leaf: Tensor, g, owned: bool) -> bool:
    """Add ``g`` into ``leaf.grad``; returns True when a new buffer was adopted.

    The first gradient is adopted without a copy when nothing else refers to
    it (``owned``); later ones are added in place into that buffer.
    A ``grad_mask`` (masked means computed, then masked) zeroes the entries
    the method does not train.
    """
    if tuple(g.shape) != leaf.shape:
        raise RuntimeError(
            f"internal error: gradient of shape {tuple(g.shape)} for a leaf of shape {leaf.shape}"
        )
    if isinstance(g, np.generic):  # NumPy's 0-d ufunc results are scalars: keep arrays
        g = np.asarray(g)
        owned = True
    if leaf.grad_mask is not None:
        g = g * leaf.grad_mask
        owned = True
    if leaf.grad is None:
        leaf.grad = g if owned else g.copy()
        return True
    leaf.grad += g
    return False


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


def _is_array(x) -> bool:
    try:
        backend.xp(x)
    except TypeError:
        return False
    return not np.isscalar(x)


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
