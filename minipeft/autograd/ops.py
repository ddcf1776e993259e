r"""The operators: each a Function with its forward, its backward and its derivative.

Notation: ``g`` is the gradient arriving from above, :math:`g = \partial L/\partial y`
for the op's output ``y``; backward returns :math:`\partial L/\partial x` for each
input ``x`` (``None`` where ``ctx.needs_input_grad`` says it will not be used).

Three rules hold for every op here:

* **Broadcasting** is undone by one helper, :func:`unbroadcast`: an input that
  was broadcast to a bigger shape receives the sum of the gradient over the
  broadcast axes.
* **Save only what a needed gradient uses.** ``ctx.needs_input_grad`` is read
  in forward; e.g. :class:`MatMul` keeps its left input only if the right one
  (a weight) needs a gradient. A frozen weight costs no activation memory and
  no weight-gradient product.
* **float32 stays float32.** Constants are Python floats (NEP 50 treats them as
  "weak" and keeps the array's dtype); nothing here multiplies by a NumPy
  float64 scalar.

Every array is handled through its own module (``xp = backend.xp(a)``), so the
same code runs on NumPy, CuPy and the strict stand-in.

This is the reference engine: each op in its plainest correct form. On the
fast path (the default; see :mod:`.fused`) some of them run as in-place,
blocked and threaded kernels of the same maths, held equal to these by the tests.
"""

from __future__ import annotations

import builtins
import collections
import math

import numpy as np

from .. import backend
from .function import Function
from .tensor import Tensor

# How many matrix products each backward formed, by kind. Tests read it to
# prove that a frozen weight's gradient product is never computed.
counters: collections.Counter = collections.Counter()


def unbroadcast(grad, shape):
    r"""Sum ``grad`` down to ``shape``, undoing NumPy broadcasting.

    If :math:`y = f(\mathrm{broadcast}(x))`, every copy of an element of x
    contributed to L, so :math:`\partial L/\partial x` sums the copies: over the
    leading axes that broadcasting added, and over axes where x had size 1.
    """
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    xp = backend.xp(grad)
    lead = grad.ndim - len(shape)
    if lead:
        grad = grad.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return xp.reshape(grad, shape) if tuple(grad.shape) != shape else grad


def _broadcast_shape(name, a, b):
    try:
        return np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    except ValueError:
        raise ValueError(
            f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast "
            "together (trailing axes must be equal or 1)"
        ) from None


# ---------------------------------------------------------------------------
# Elementwise arithmetic
# ---------------------------------------------------------------------------


class Add(Function):
    r"""y = a + b;  dy/da = 1, dy/db = 1 (then unbroadcast)."""

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_shape("add", a, b)
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, g):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g, sa) if na else None, unbroadcast(g, sb) if nb else None)


class Sub(Function):
    r"""y = a - b;  dy/da = 1, dy/db = -1."""

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_shape("sub", a, b)
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, g):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g, sa) if na else None, unbroadcast(-g, sb) if nb else None)


class Mul(Function):
    r"""y = a * b;  dy/da = b, dy/db = a.

    Saves b only if a needs a gradient, and a only if b does.
    """

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_shape("mul", a, b)
        na, nb = ctx.needs_input_grad
        ctx.shapes = (a.shape, b.shape)
        ctx.save_for_backward(b if na else None, a if nb else None)
        return a * b

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g * b, sa) if na else None, unbroadcast(g * a, sb) if nb else None)


class Div(Function):
    r"""y = a / b;  dy/da = 1/b, dy/db = -a/b^2 = -y/b."""

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_shape("div", a, b)
        na, nb = ctx.needs_input_grad
        y = a / b
        ctx.shapes = (a.shape, b.shape)
        ctx.save_for_backward(b, y if nb else None)
        return y

    @staticmethod
    def backward(ctx, g):
        b, y = ctx.saved
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        ga = g / b
        return (unbroadcast(ga, sa) if na else None, unbroadcast(-ga * y, sb) if nb else None)


class Neg(Function):
    r"""y = -x;  dy/dx = -1."""

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, g):
        return -g


class PowScalar(Function):
    r""":math:`y = x^p` for a constant p; :math:`dy/dx = p\,x^{p-1}`.

    :math:`x^1` and :math:`x^0` have derivatives 1 and 0, which need no x.
    """

    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        ctx.save_for_backward(x if p not in (0, 1) else None)
        return x ** p

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        p = ctx.p
        if p == 1:
            return g
        if p == 0:
            # d/dx x^0 = 0 everywhere; p * x^{-1} would give 0 * inf = nan at x = 0
            return backend.xp(g).zeros_like(g)
        return g * (p * x ** (p - 1))


class Pow(Function):
    r""":math:`y = a^b` elementwise; :math:`\partial y/\partial a = b\,a^{b-1}`,
    :math:`\partial y/\partial b = a^b \ln a` (a > 0)."""

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_shape("pow", a, b)
        xp = backend.xp(a)
        y = xp.power(a, b)
        ctx.shapes = (a.shape, b.shape)
        ctx.save_for_backward(a, b, y)
        return y

    @staticmethod
    def backward(ctx, g):
        a, b, y = ctx.saved
        xp = backend.xp(a)
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        ga = unbroadcast(g * b * xp.power(a, b - 1), sa) if na else None
        gb = unbroadcast(g * y * xp.log(a), sb) if nb else None
        return ga, gb


# ---------------------------------------------------------------------------
# Unary elementwise functions
# ---------------------------------------------------------------------------


class Exp(Function):
    r""":math:`y = e^x`; :math:`dy/dx = e^x = y` (saves the output)."""

    @staticmethod
    def forward(ctx, x):
        y = backend.xp(x).exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return g * y


class Log(Function):
    r""":math:`y = \ln x`; :math:`dy/dx = 1/x`."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return backend.xp(x).log(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        return g / x


class Sqrt(Function):
    r""":math:`y = \sqrt{x}`; :math:`dy/dx = 1 / (2 \sqrt{x}) = 0.5 / y`."""

    @staticmethod
    def forward(ctx, x):
        y = backend.xp(x).sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return g * 0.5 / y


class Tanh(Function):
    r""":math:`y = \tanh x`; :math:`dy/dx = 1 - y^2`."""

    @staticmethod
    def forward(ctx, x):
        y = backend.xp(x).tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return g * (1.0 - y * y)


class Sigmoid(Function):
    r""":math:`y = 1 / (1 + e^{-x})`; :math:`dy/dx = y (1 - y)`."""

    @staticmethod
    def forward(ctx, x):
        xp = backend.xp(x)
        # tanh form: stable for large |x| in either sign
        y = 0.5 * (xp.tanh(0.5 * x) + 1.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return g * y * (1.0 - y)


class ReLU(Function):
    r""":math:`y = \max(x, 0)`; :math:`dy/dx = [x > 0]` (saves a one-byte-per-element mask)."""

    @staticmethod
    def forward(ctx, x):
        mask = x > 0
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved
        return g * mask


_GELU_K = math.sqrt(2.0 / math.pi)


class GELU(Function):
    r"""GELU, tanh approximation (GPT-2's):

    .. math::
        y = \tfrac12 x \,(1 + \tanh u), \qquad u = k\,(x + 0.044715\,x^3),
        \quad k=\sqrt{2/\pi}

        \frac{dy}{dx} = \tfrac12 (1 + \tanh u)
            + \tfrac12 x\,(1 - \tanh^2 u)\,k\,(1 + 3\cdot 0.044715\,x^2)

    Saves only x; tanh u is recomputed in backward (one tanh is cheaper
    than keeping a second activation-sized array alive).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        t = backend.xp(x).tanh(_GELU_K * (x + 0.044715 * x * x * x))       # tanh u
        return 0.5 * x * (1.0 + t)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        t = backend.xp(x).tanh(_GELU_K * (x + 0.044715 * x * x * x))       # tanh u
        du = _GELU_K * (1.0 + 3 * 0.044715 * x * x)                          # du/dx
        return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


class Cast(Function):
    r"""y = x in another float dtype;  dy/dx = 1 (cast back)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, g):
        return g.astype(ctx.dtype)


# ---------------------------------------------------------------------------
# Matrix product
# ---------------------------------------------------------------------------


def _check_matmul(a, b) -> None:
    """Both operands at least 2-D, inner axes equal, batch axes broadcastable."""
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"matmul: both operands need at least 2 dimensions, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)} (reshape a vector to (1, n) or (n, 1))"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not align: "
            f"a's last axis ({a.shape[-1]}) must equal b's second-to-last ({b.shape[-2]})"
        )
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(
            f"matmul: batch axes {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} "
            "cannot be broadcast together"
        ) from None


class MatMul(Function):
    r"""Y = A @ B over the last two axes, leading axes broadcast (batched).

    .. math:: \frac{\partial L}{\partial A} = G B^\top, \qquad
              \frac{\partial L}{\partial B} = A^\top G

    (summed over broadcast batch axes). Each product is formed only when its
    input needs a gradient, and each input is saved only for the *other*
    input's gradient: with a frozen weight B, A is not kept and
    :math:`A^\top G` is never computed. This is "frozen means not computed".
    """

    @staticmethod
    def forward(ctx, a, b):
        _check_matmul(a, b)
        na, nb = ctx.needs_input_grad
        ctx.shapes = (a.shape, b.shape)
        ctx.save_for_backward(b if na else None, a if nb else None)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        xp = backend.xp(g)
        ga = gb = None
        if na:
            counters["matmul.dA"] += 1
            ga = unbroadcast(g @ xp.swapaxes(b, -1, -2), sa)
        if nb:
            counters["matmul.dB"] += 1
            gb = unbroadcast(xp.swapaxes(a, -1, -2) @ g, sb)
        return ga, gb


def _check_linear(x, w, bias) -> None:
    """x (..., in), the weight (in, out), the bias (out,) or absent."""
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"linear: x of shape {tuple(x.shape)} and weight of shape {tuple(w.shape)} do "
            f"not align: the weight must be (in, out) with in = x's last axis"
        )
    if bias and tuple(bias[0].shape) != (w.shape[1],):
        raise ValueError(
            f"linear: bias must have shape ({w.shape[1]},), got {tuple(bias[0].shape)}"
        )


class Linear(Function):
    r"""y = x W + b: a layer's matrix product and bias in one op.

    x is (..., in), W (in, out), b (out,) or absent. With the N rows of x (its
    leading axes flattened) and :math:`G = \partial L/\partial y` seen as (N, out):

    .. math::
        \frac{\partial L}{\partial x} = G W^\top, \qquad
        \frac{\partial L}{\partial W} = x^\top G, \qquad
        \frac{\partial L}{\partial b} = \textstyle\sum_n G_n

    As in MatMul, x is kept only if W needs a gradient and W only if x does:
    a frozen weight's :math:`x^\top G` is never formed.
    """

    @staticmethod
    def forward(ctx, x, w, *bias):
        _check_linear(x, w, bias)
        nx, nw = ctx.needs_input_grad[:2]
        ctx.shapes = (x.shape, w.shape)
        ctx.save_for_backward(w if nx else None, x if nw else None)
        y = x @ w                                                  # (..., out)
        return y + bias[0] if bias else y

    @staticmethod
    def backward(ctx, g):
        w, x = ctx.saved
        sx, sw = ctx.shapes
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, sw[1])                                  # (N, out)
        gx = gw = gb = None
        if needs[0]:
            counters["linear.dx"] += 1
            gx = g @ w.T                                           # (..., out) @ (out, in)
        if needs[1]:
            counters["linear.dW"] += 1
            gw = x.reshape(-1, sw[0]).T @ g2                       # (in, N) @ (N, out)
        if len(needs) == 3 and needs[2]:
            gb = g2.sum(axis=0)                                    # (out,)
        return (gx, gw) if len(needs) == 2 else (gx, gw, gb)


# ---------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = []
    for ax in axis:
        if not -ndim <= ax < ndim:
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
        out.append(ax % ndim)
    return tuple(sorted(out))


def _expand_like(g, shape, axes, keepdims):
    """Reshape a reduced gradient so it broadcasts back over the reduced axes."""
    if keepdims:
        return g
    kept = [1 if i in axes else n for i, n in enumerate(shape)]
    return g.reshape(kept)


class Sum(Function):
    r""":math:`y = \sum_{\text{axes}} x`; :math:`dy/dx_i = 1`: the gradient is broadcast back.

    The gradient is returned as a read-only broadcast *view* of g, not a
    copy: whoever adds it somewhere reads it once, and the engine copies it
    only if it must become a leaf's own ``.grad`` buffer.
    """

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        axes = _norm_axes(axis, x.ndim)
        ctx.meta = (x.shape, axes, keepdims)
        return x.sum(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        shape, axes, keepdims = ctx.meta
        xp = backend.xp(g)
        return xp.broadcast_to(_expand_like(g, shape, axes, keepdims), shape)


class Mean(Function):
    r""":math:`y = \frac1n \sum_{\text{axes}} x`; :math:`dy/dx_i = 1/n` (a broadcast view of
    g/n, as in Sum)."""

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        axes = _norm_axes(axis, x.ndim)
        n = 1
        for ax in axes:
            n *= x.shape[ax]
        ctx.meta = (x.shape, axes, keepdims, n)
        return x.mean(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        shape, axes, keepdims, n = ctx.meta
        xp = backend.xp(g)
        ge = _expand_like(g, shape, axes, keepdims) * (1.0 / n)
        return xp.broadcast_to(ge, shape)


class Max(Function):
    r""":math:`y = \max_{\text{axes}} x`; :math:`dy/dx_i = [x_i = y]` / (number of maxima).

    Ties share the gradient equally (a subgradient); a one-byte mask of the
    arg-max positions is saved, not x.
    """

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        axes = _norm_axes(axis, x.ndim)
        y = x.max(axis=axes, keepdims=True)
        mask = x == y
        ctx.meta = (x.shape, axes, keepdims)
        ctx.save_for_backward(mask)
        return y if keepdims else y.reshape([n for i, n in enumerate(x.shape) if i not in axes])

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved
        shape, axes, keepdims = ctx.meta
        count = mask.sum(axis=axes, keepdims=True).astype(g.dtype)
        return mask * (_expand_like(g, shape, axes, keepdims) / count)


# ---------------------------------------------------------------------------
# Shape ops (views: nothing saved)
# ---------------------------------------------------------------------------


class Reshape(Function):
    r"""y = x viewed with a new shape;  the gradient is reshaped back."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(
                f"reshape: cannot view {int(np.prod(x.shape))} elements of shape "
                f"{tuple(x.shape)} as shape {tuple(shape)}"
            ) from None

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape)


class Permute(Function):
    r"""y = x with its axes permuted;  the gradient is permuted by the inverse."""

    @staticmethod
    def forward(ctx, x, axes):
        axes = tuple(a % x.ndim for a in axes)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"permute: {axes} is not a permutation of {x.ndim} axes")
        ctx.inv = tuple(np.argsort(axes))
        return backend.xp(x).transpose(x, axes)

    @staticmethod
    def backward(ctx, g):
        return backend.xp(g).transpose(g, ctx.inv)


class BroadcastTo(Function):
    r"""y = x broadcast to a larger shape (a view);  the gradient is unbroadcast."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        try:
            return backend.xp(x).broadcast_to(x, shape)
        except ValueError:
            raise ValueError(
                f"broadcast_to: cannot broadcast shape {tuple(x.shape)} to {tuple(shape)}"
            ) from None

    @staticmethod
    def backward(ctx, g):
        return unbroadcast(g, ctx.shape)


class GetItem(Function):
    r"""y = x[index] (slicing or gathering).

    :math:`\partial L/\partial x` is zero except at the selected positions,
    which receive g. An integer-array index can repeat an element; its
    gradient must then be the *sum* of every occurrence, so the scatter uses
    :func:`backend.scatter_add`, never ``grad[idx] += g`` (which keeps one).

    The index arrays of a gather live until backward, so they are saved
    through the ledger like any other array (slices and integers are kept
    as plain attributes: they own no array memory).
    """

    @staticmethod
    def forward(ctx, x, index):
        parts = index if isinstance(index, tuple) else (index,)
        arrays = [p for p in parts if _is_index_array(p)]
        ctx.meta = (x.shape, x.dtype, isinstance(index, tuple), bool(arrays))
        # the index with its arrays taken out (None marks where they go back)
        ctx.index = tuple(None if _is_index_array(p) else p for p in parts)
        ctx.save_for_backward(*arrays)
        return x[index]

    @staticmethod
    def backward(ctx, g):
        shape, dtype, was_tuple, advanced = ctx.meta
        arrays = iter(ctx.saved)
        parts = tuple(next(arrays) if p is None else p for p in ctx.index)
        index = parts if was_tuple else parts[0]
        gx = backend.xp(g).zeros(shape, dtype=dtype)
        if advanced:
            backend.scatter_add(gx, index, g)
        else:
            gx[index] = g
        return gx


def _is_index_array(p) -> bool:
    return not isinstance(p, (int, slice, type(None), type(Ellipsis)))


class Concatenate(Function):
    r"""y = [x_1, x_2, ...] along an axis;  each input gets its slice of g."""

    @staticmethod
    def forward(ctx, *xs, axis=0):
        ax = axis % xs[0].ndim
        ctx.meta = (ax, [x.shape[ax] for x in xs])
        return backend.xp(xs[0]).concatenate(xs, axis=ax)

    @staticmethod
    def backward(ctx, g):
        ax, sizes = ctx.meta
        out, start = [], 0
        for n, need in zip(sizes, ctx.needs_input_grad):
            if need:
                sl = [slice(None)] * g.ndim
                sl[ax] = slice(start, start + n)
                out.append(g[tuple(sl)])
            else:
                out.append(None)
            start += n
        return tuple(out)


# ---------------------------------------------------------------------------
# Neural-network ops
# ---------------------------------------------------------------------------


class Softmax(Function):
    r"""y = softmax(x) along an axis: :math:`y_i = e^{x_i - m} / \sum_j e^{x_j - m}`,
    :math:`m = \max_j x_j`.

    Jacobian-vector product: :math:`\partial L/\partial x = y \odot (g - \sum_j g_j y_j)`.
    """

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = backend.xp(x)
        y = x - x.max(axis=axis, keepdims=True)
        xp.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)
        ctx.axis = axis
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        gx = g * y
        gx -= y * gx.sum(axis=ctx.axis, keepdims=True)
        return gx


class LogSoftmax(Function):
    r"""y = x - logsumexp(x) along an axis.

    :math:`\partial L/\partial x = g - \mathrm{softmax}(x) \sum_j g_j`, with
    softmax recovered from the saved output as :math:`e^{y}`.
    """

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = backend.xp(x)
        m = x.max(axis=axis, keepdims=True)
        y = x - m
        y -= xp.log(xp.exp(y).sum(axis=axis, keepdims=True))
        ctx.axis = axis
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        xp = backend.xp(y)
        return g - xp.exp(y) * g.sum(axis=ctx.axis, keepdims=True)


def _check_layer_norm(x, w, b) -> None:
    C = x.shape[-1]
    if w.shape != (C,) or b.shape != (C,):
        raise ValueError(
            f"layer_norm: weight and bias must have shape ({C},), "
            f"got {tuple(w.shape)} and {tuple(b.shape)}"
        )


class LayerNorm(Function):
    r"""Layer normalisation over the last axis, with an analytic backward.

    .. math::
        \mu = \tfrac1C\sum_i x_i,\quad \sigma^2 = \tfrac1C\sum_i (x_i-\mu)^2,\quad
        \hat x = (x-\mu)\,r,\ r = (\sigma^2+\epsilon)^{-1/2},\quad y = \hat x\, w + b

    Backward, with :math:`\hat g = g\, w`:

    .. math::
        \frac{\partial L}{\partial x} = r\Big(\hat g - \overline{\hat g}
            - \hat x\,\overline{\hat g\,\hat x}\Big),\qquad
        \frac{\partial L}{\partial w} = \sum \hat x\, g,\qquad
        \frac{\partial L}{\partial b} = \sum g

    (bars are means over the last axis; the sums run over all leading axes).
    Saves :math:`\hat x` and r only when x or w needs a gradient, w only when x does.
    """

    @staticmethod
    def forward(ctx, x, w, b, eps=1e-5):
        _check_layer_norm(x, w, b)
        d = x - x.mean(axis=-1, keepdims=True)                               # x - mu
        r = 1.0 / backend.xp(x).sqrt((d * d).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
        xhat = d * r
        nx, nw, nb = ctx.needs_input_grad
        ctx.save_for_backward(xhat if (nx or nw) else None, r if nx else None, w if nx else None)
        return xhat * w + b

    @staticmethod
    def backward(ctx, g):
        xhat, r, w = ctx.saved
        nx, nw, nb = ctx.needs_input_grad
        rows = tuple(range(g.ndim - 1))                                      # every axis but the last
        gx = gw = gb = None
        if nx:
            gh = g * w                                                       # g-hat
            gx = r * (gh - gh.mean(axis=-1, keepdims=True)
                      - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        if nw:
            gw = (xhat * g).sum(axis=rows)
        if nb:
            gb = g.sum(axis=rows)
        return gx, gw, gb


def _check_attention(qkv, n_head) -> None:
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head) != 0:
        raise ValueError(
            f"causal_attention: expected qkv shaped (B, T, 3C) with C divisible by "
            f"n_head={n_head}, got {tuple(qkv.shape)}"
        )


class CausalAttention(Function):
    r"""Multi-head causal self-attention from the fused projection, with a hand-written backward.

    The input is the ``c_attn`` output, qkv of shape (B, T, 3C): q, k and v
    side by side, each C = nh heads of hs channels. Per batch entry and head,
    with :math:`s = 1/\sqrt{hs}` and M the causal mask (:math:`-\infty` where
    key j lies after query i):

    .. math::
        S = s\, q k^\top + M, \qquad P = \mathrm{softmax}_{\text{rows}}(S), \qquad
        Y = (P \odot D)\, v

    where D is attention dropout's keep mask scaled by 1/(1-p) (all ones
    without dropout). The heads of Y are laid side by side again: the output
    is (B, T, C), ready for ``c_proj``.

    Backward, with :math:`G = \partial L/\partial Y` per head (T, hs):

    .. math::
        \partial v = (P \odot D)^\top G, \qquad
        \partial P = (G v^\top) \odot D, \qquad
        \partial S = P \odot \big(\partial P - \textstyle\sum_j P_{\cdot j}\,
            \partial P_{\cdot j}\big),

        \partial q = s\, \partial S\, k, \qquad \partial k = s\, \partial S^\top q

    (the middle line is softmax's Jacobian applied row by row; a masked entry
    has P = 0, so its :math:`\partial S` is 0 and nothing flows to the future).
    It is the composition of reshape, transpose, matmul, masked_fill, softmax
    and dropout that ``gpt.py`` runs with a KV cache, as one op. Saves qkv, P
    and the dropout mask.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, keep=None, p=0.0):
        _check_attention(qkv, n_head)
        xp = backend.xp(qkv)
        B, T, C3 = qkv.shape
        nh, hs = n_head, C3 // (3 * n_head)
        s = 1.0 / math.sqrt(hs)
        scale = 1.0 if keep is None else 1.0 / (1.0 - p)                     # dropout's 1/(1-p)
        h = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)             # (3, B, nh, T, hs)
        q, k, v = h[0], h[1], h[2]                                           # each (B, nh, T, hs)
        S = (q @ xp.swapaxes(k, -1, -2)) * s                                 # (B, nh, T, T)
        S = xp.where(causal_mask(T, S), -math.inf, S)                        # no looking ahead
        P = xp.exp(S - S.max(axis=-1, keepdims=True))
        P /= P.sum(axis=-1, keepdims=True)                                   # softmax by rows
        PD = P if keep is None else P * keep * scale                          # P D
        y = PD @ v                                                           # (B, nh, T, hs)
        ctx.meta = (s, scale)
        ctx.save_for_backward(qkv, P, keep)
        return y.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)                # (B, T, C)

    @staticmethod
    def backward(ctx, g):
        qkv, P, keep = ctx.saved
        s, scale = ctx.meta
        xp = backend.xp(g)
        B, T, C3 = qkv.shape
        nh = P.shape[1]
        hs = C3 // (3 * nh)
        h = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)             # (3, B, nh, T, hs)
        q, k, v = h[0], h[1], h[2]
        G = g.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                    # (B, nh, T, hs)
        PD = P if keep is None else P * keep * scale                          # P D
        dv = xp.swapaxes(PD, -1, -2) @ G                                      # (P D)^T G
        dP = G @ xp.swapaxes(v, -1, -2)                                      # G v^T
        dP = dP if keep is None else dP * keep * scale                        # (G v^T) D
        dS = P * (dP - (P * dP).sum(axis=-1, keepdims=True))                  # softmax's Jacobian
        dq = (dS @ k) * s
        dk = (xp.swapaxes(dS, -1, -2) @ q) * s
        d = xp.stack([dq, dk, dv])                                           # (3, B, nh, T, hs)
        return d.transpose(1, 3, 0, 2, 4).reshape(B, T, C3)                  # (B, T, 3C)


class Embedding(Function):
    r"""y = W[idx]: rows of a table gathered by integer ids.

    :math:`\partial L/\partial W_v = \sum_{n:\,idx_n=v} g_n`, a scatter-add that
    counts repeated ids. Saves the (small, integer) ids only if W needs a gradient.
    """

    @staticmethod
    def forward(ctx, w, idx):
        ctx.meta = (w.shape, w.dtype)
        ctx.save_for_backward(idx)
        return w[idx]

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved
        shape, dtype = ctx.meta
        gw = backend.xp(g).zeros(shape, dtype=dtype)
        backend.scatter_add(gw, idx.reshape(-1), g.reshape(-1, shape[1]))   # (N,), (N, C)
        return gw


class CrossEntropy(Function):
    r"""Mean cross-entropy of logits against integer targets, fused with log-softmax.

    For logits z of shape (N, V), targets t and valid rows
    :math:`\mathcal V = \{n : t_n \ne \text{ignore\_index}\}`:

    .. math::
        L = -\frac{1}{|\mathcal V|}\sum_{n\in\mathcal V} \log \mathrm{softmax}(z_n)_{t_n},
        \qquad
        \frac{\partial L}{\partial z_n} = \frac{\mathrm{softmax}(z_n) - e_{t_n}}{|\mathcal V|}
        \ (n\in\mathcal V),\ 0\ \text{otherwise}.

    Computed as :math:`\log\sum e^{z-m} + m - z_t` with m the row maximum, so
    logits of :math:`\pm 10^4` stay finite. Saves the softmax (one array of
    the logits' size) and the targets.
    """

    @staticmethod
    def forward(ctx, z, targets, ignore_index=-100):
        xp = backend.xp(z)
        if z.ndim != 2 or targets.shape != (z.shape[0],):
            raise ValueError(
                f"cross_entropy: expected logits (N, V) and targets (N,), got "
                f"{tuple(z.shape)} and {tuple(targets.shape)}"
            )
        valid = targets != ignore_index
        n = builtins.max(int(valid.sum()), 1)
        safe_t = xp.where(valid, targets, 0)
        m = z.max(axis=1, keepdims=True)
        e = xp.exp(z - m)
        s = e.sum(axis=1, keepdims=True)
        # loss_n = log(sum e^{z-m}) + m - z_t
        nll = (xp.log(s[:, 0]) + m[:, 0] - z[xp.arange(z.shape[0]), safe_t]) * valid
        ctx.meta = (n,)
        ctx.save_for_backward(e / s, safe_t, valid)                      # the softmax
        return (nll.sum() / n).astype(z.dtype)

    @staticmethod
    def backward(ctx, g):
        p, t, valid = ctx.saved
        (n,) = ctx.meta
        xp = backend.xp(p)
        gz = p.copy()                                                     # softmax - onehot(t)
        gz[xp.arange(gz.shape[0]), t] -= 1.0
        return gz * (valid[:, None] * (g / n)).astype(gz.dtype)


class Dropout(Function):
    r""":math:`y = x \odot m / (1-p)` with a given random keep-mask m; :math:`dy/dx = m/(1-p)`.

    The mask is an argument, not drawn here, so a caller can keep it and
    replay the same mask (gradient checkpointing recomputes a block's
    forward in backward and must drop the same units). Saves the boolean mask
    (one byte an element).
    """

    @staticmethod
    def forward(ctx, x, mask, p):
        scale = 1.0 / (1.0 - p)
        ctx.scale = scale
        ctx.save_for_backward(mask)
        return x * mask * scale

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved
        return g * mask * ctx.scale


class MaskedFill(Function):
    r"""y = where(mask, value, x): fill masked positions with a constant.

    dy/dx = [not mask]. Causal attention uses it with value = -inf above the
    diagonal (positions may not look at later ones).
    """

    @staticmethod
    def forward(ctx, x, mask, value):
        xp = backend.xp(x)
        ctx.save_for_backward(mask)
        return xp.where(mask, xp.asarray(value, dtype=x.dtype), x)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved
        return backend.xp(g).where(mask, 0.0, g).astype(g.dtype)


# ---------------------------------------------------------------------------
# Functional API (what models and users call)
# ---------------------------------------------------------------------------


def _t(x, like: Tensor | None = None) -> Tensor:
    """Wrap a constant (Python number or array) as a Tensor matching ``like``.

    A scalar constant, a NumPy scalar included, takes ``like``'s dtype and
    device: under NEP 50 ``x32 * np.float64(2)`` would be float64, and CuPy
    accepts host scalars, so the strict stand-in must too.
    """
    if isinstance(x, Tensor):
        return x
    if like is not None:
        if isinstance(x, (int, float, bool, np.generic)):
            return Tensor(like.xp.asarray(x, dtype=like.dtype), _copy=False)
        return Tensor(x, _copy=False)
    return Tensor(x)


def add(a, b):
    a, b = _pair(a, b)
    return Add.apply(a, b)


def sub(a, b):
    a, b = _pair(a, b)
    return Sub.apply(a, b)


def mul(a, b):
    a, b = _pair(a, b)
    return Mul.apply(a, b)


def div(a, b):
    a, b = _pair(a, b)
    return Div.apply(a, b)


def _pair(a, b):
    if isinstance(a, Tensor):
        return a, _t(b, a)
    if isinstance(b, Tensor):
        return _t(a, b), b
    return _t(a), _t(b)


def neg(x):
    return Neg.apply(x)


def pow(x, p):  # noqa: A001 - the op's name
    """x ** p: a constant exponent uses products; a tensor exponent the general rule."""
    if isinstance(p, np.generic):  # np.float64(2.5) would turn float32 into float64
        p = p.item()
    if isinstance(p, (int, float)):
        return PowScalar.apply(x, p=p)
    x, p = _pair(x, p)
    return Pow.apply(x, p)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def tanh(x):
    return Tanh.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def relu(x):
    return ReLU.apply(x)


def gelu(x):
    return GELU.apply(x)


def cast(x, dtype):
    if np.dtype(dtype) == x.dtype:
        return x
    return Cast.apply(x, dtype=np.dtype(dtype))


def matmul(a, b):
    return MatMul.apply(a, b)


def linear(x, weight, bias=None):
    """``x @ weight + bias`` for a weight stored (in, out); ``bias`` may be None."""
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape.apply(x, shape=shape)


def permute(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Permute.apply(x, axes=axes)


def transpose(x, ax1=-2, ax2=-1):
    """Swap two axes (the last two by default)."""
    axes = list(range(x.ndim))
    axes[ax1], axes[ax2] = axes[ax2], axes[ax1]
    return Permute.apply(x, axes=tuple(axes))


def broadcast_to(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return BroadcastTo.apply(x, shape=tuple(shape))


def getitem(x, index):
    """x[index]: basic slicing, or a gather by integer arrays (Tensors, arrays or lists).

    Lists become arrays on x's device, so every gather index is an array the
    ledger can count.
    """
    def part(i):
        if isinstance(i, Tensor):
            return i.data
        if isinstance(i, list):
            return x.xp.asarray(i)
        return i

    index = tuple(part(i) for i in index) if isinstance(index, tuple) else part(index)
    return GetItem.apply(x, index=index)


def concatenate(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate: needs at least one tensor")
    return Concatenate.apply(*tensors, axis=axis)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


def layer_norm(x, weight, bias, eps=1e-5):
    return LayerNorm.apply(x, weight, bias, eps=float(eps))  # a Python float stays weak


def embedding(weight, idx):
    """Rows of ``weight`` (V, C) gathered by integer ``idx`` (any shape) -> idx.shape + (C,)."""
    idx = idx.data if isinstance(idx, Tensor) else idx
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: token ids must be integers, got {idx.dtype}")
    return Embedding.apply(weight, idx=idx)


def causal_attention(qkv, n_head, keep=None, p=0.0):
    """Causal self-attention of the fused projection ``qkv`` (B, T, 3C) -> (B, T, C).

    ``keep``: attention dropout's boolean keep-mask (B, n_head, T, T) with its
    probability ``p``, or None for no dropout (``p`` is then ignored).
    """
    return CausalAttention.apply(qkv, n_head=int(n_head), keep=keep, p=float(p))


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy of ``logits`` (N, V) against integer ``targets`` (N,)."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)


def dropout(x, p, mask):
    """Apply a given keep-mask (boolean array of x's shape), scaled by 1/(1-p)."""
    return Dropout.apply(x, mask=mask, p=float(p))  # a Python float stays weak


def masked_fill(x, mask, value):
    return MaskedFill.apply(x, mask=mask, value=value)


def causal_mask(T: int, like) -> object:
    """Boolean (T, T) array, True above the diagonal (the future), on like's device."""
    xp = like.xp if isinstance(like, Tensor) else backend.xp(like)
    return xp.triu(xp.ones((T, T), dtype=bool), k=1)


# ---------------------------------------------------------------------------
# Operator methods on Tensor
# ---------------------------------------------------------------------------


def _attach():
    T = Tensor
    T.__add__ = lambda a, b: add(a, b)
    T.__radd__ = lambda a, b: add(b, a)
    T.__sub__ = lambda a, b: sub(a, b)
    T.__rsub__ = lambda a, b: sub(b, a)
    T.__mul__ = lambda a, b: mul(a, b)
    T.__rmul__ = lambda a, b: mul(b, a)
    T.__truediv__ = lambda a, b: div(a, b)
    T.__rtruediv__ = lambda a, b: div(b, a)
    T.__neg__ = lambda a: neg(a)
    T.__pow__ = lambda a, p: pow(a, p)
    T.__matmul__ = lambda a, b: matmul(a, b)
    T.__getitem__ = lambda a, idx: getitem(a, idx)
    T.exp = exp
    T.log = log
    T.sqrt = sqrt
    T.tanh = tanh
    T.sigmoid = sigmoid
    T.relu = relu
    T.gelu = gelu
    T.sum = sum
    T.mean = mean
    T.max = max
    T.reshape = reshape
    T.view = reshape
    T.permute = permute
    T.transpose = transpose
    T.broadcast_to = broadcast_to
    T.softmax = softmax
    T.log_softmax = log_softmax
    T.T = property(lambda a: transpose(a))


_attach()
