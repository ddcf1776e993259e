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
"""

from __future__ import annotations

import builtins
import collections
import math
import time

import numpy as np

from .. import backend
from . import function as _function
from .function import Function, in_blocks, split_matmul
from .tensor import Tensor

# How many matrix products each backward formed, by kind. Tests read it to
# prove that a frozen weight's gradient product is never computed.
counters: collections.Counter = collections.Counter()

#: When set to a list, every matrix product an op forms appends its shape
#: ``(batch, m, k, n)`` here: ``minipeft bench`` reads it to count a step's
#: matmul FLOPs (2 batch m k n each). ``None`` (the default) costs one test.
matmul_log: list | None = None


def _matmul(xp, a, b, out=None):
    """``a @ b`` (into ``out`` when given), noted in :data:`matmul_log` when it is on,
    and timed for the op profiler when that is on."""
    if matmul_log is not None:
        batch = 1
        for n in np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])):
            batch *= n
        matmul_log.append((batch, a.shape[-2], a.shape[-1], b.shape[-1]))
    prof = _function._profile
    if prof is not None:
        t0 = time.perf_counter()
    y = split_matmul(a, b, out) if xp is np else (
        xp.matmul(a, b) if out is None else xp.matmul(a, b, out=out))
    if prof is not None:
        backend.synchronize(y)
        prof.matmul[prof.current] += time.perf_counter() - t0
    return y


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


def _owned(ctx, g, shape, dtype):
    """g itself when backward may overwrite it (see ``Context.grad_owned``) and it has
    the given shape and dtype; otherwise None (then backward allocates)."""
    if (ctx.grad_owned and tuple(g.shape) == tuple(shape) and g.dtype == dtype
            and getattr(g, "ndim", 0) > 0 and getattr(g.flags, "writeable", True)):
        return g
    return None


# ---------------------------------------------------------------------------
# Elementwise arithmetic
# ---------------------------------------------------------------------------


class Add(Function):
    r"""y = a + b;  dy/da = 1, dy/db = 1 (then unbroadcast)."""

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_shape("add", a, b)
        ctx.shapes = (a.shape, b.shape)
        if a.shape != b.shape or a.ndim == 0:
            return a + b
        # same shapes (the residual stream): in blocks of rows, on every core
        y = backend.xp(a).empty_like(a)
        in_blocks(lambda a_, b_, y_: backend.xp(y_).add(a_, b_, out=y_), a, b, y)
        return y

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

    Saves b only if a needs a gradient, and a only if b does. When only one
    input needs its gradient, has g's shape, and g is backward's to
    overwrite, the product is formed in place in g.
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
        if na != nb:
            mine = _owned(ctx, g, sa if na else sb, g.dtype)
            if mine is not None:
                mine *= b if na else a
                return (mine, None) if na else (None, mine)
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

    Small integer powers are spelled as products: on float32 ``x**3`` has run
    from 2 to 100 times slower than ``x*x*x`` on the machines this was tuned on.
    """

    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        # x^1 and x^0 have derivatives 1 and 0, which need no x
        ctx.save_for_backward(x if p not in (0, 1) else None)
        return _ipow(x, p)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        p = ctx.p
        if p == 1:
            return g
        if p == 0:
            # d/dx x^0 = 0 everywhere; p * x^{-1} would give 0 * inf = nan at x = 0
            return backend.xp(g).zeros_like(g)
        return g * (p * _ipow(x, p - 1))


def _ipow(x, p):
    """x**p with products for p in {0, 1, 2, 3, 4} and 0.5 as sqrt."""
    if p == 2:
        return x * x
    if p == 3:
        return x * x * x
    if p == 4:
        x2 = x * x
        return x2 * x2
    if p == 1:
        return x.copy()
    if p == 0:
        return backend.xp(x).ones_like(x)
    if p == 0.5:
        return backend.xp(x).sqrt(x)
    return x ** p


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
    than keeping a second activation-sized array alive). Both directions work
    in place in as few arrays of x's size as the formula allows (one forward,
    three backward): on the MLP's (N, 4C) hidden layer every extra temporary
    is a pass over memory; and the work is split into blocks of rows run on
    every core (:func:`~minipeft.autograd.function.in_blocks`). ``x * x * x``,
    never ``x ** 3``: the power is many times slower on float32.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        y = backend.xp(x).empty_like(x)
        in_blocks(_gelu_into, x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        gx = _owned(ctx, g, x.shape, x.dtype)                  # in place in g when it may be
        if gx is None:
            gx = backend.xp(x).empty_like(x)
        in_blocks(_gelu_grad_into, x, g, gx)
        return gx


def _gelu_into(x, y):
    """y = GELU(x), in y's buffer (one block of rows)."""
    xp = backend.xp(x)
    # u = k x (1 + 0.044715 x^2)
    xp.multiply(x, x, out=y)
    y *= 0.044715 * _GELU_K
    y += _GELU_K
    y *= x
    xp.tanh(y, out=y)                                   # tanh u
    # y = 0.5 x (1 + tanh u)
    y += 1.0
    y *= x
    y *= 0.5


def _gelu_grad_into(x, g, out):
    """out = g dGELU/dx (one block of rows; out may be g itself), with three
    temporaries of the block's size."""
    xp = backend.xp(x)
    # a = x^2, then t = tanh u with u = k x (1 + 0.044715 a)
    a = xp.multiply(x, x, out=xp.empty_like(x))
    t = xp.multiply(a, 0.044715 * _GELU_K, out=xp.empty_like(x))
    t += _GELU_K
    t *= x
    xp.tanh(t, out=t)
    # a <- 0.5 k x (1 + 0.134145 x^2)   (0.134145 = 3 * 0.044715: du/dx / k)
    a *= 0.134145 * 0.5 * _GELU_K
    a += 0.5 * _GELU_K
    a *= x
    # s <- (1 - t^2) a  = 0.5 x (1 - tanh^2 u) du/dx
    s = xp.multiply(t, t, out=xp.empty_like(x))
    xp.subtract(1.0, s, out=s)
    s *= a
    # dy/dx = 0.5 (1 + t) + s;  dL/dx = g dy/dx
    t += 1.0
    t *= 0.5
    t += s
    xp.multiply(t, g, out=out)


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


class MatMul(Function):
    r"""Y = A @ B over the last two axes, leading axes broadcast (batched).

    .. math:: \frac{\partial L}{\partial A} = G B^\top, \qquad
              \frac{\partial L}{\partial B} = A^\top G

    (summed over broadcast batch axes). Each product is formed only when its
    input needs a gradient, and each input is saved only for the *other*
    input's gradient: with a frozen weight B, A is not kept and
    :math:`A^\top G` is never computed. This is "frozen means not computed".

    For the common layer case, A of shape (..., in) and a 2-D weight B of
    shape (in, out), every product is one 2-D product over the N flattened
    leading positions: forward (N, in) @ (in, out), :math:`G B^\top` as
    (N, out) @ (out, in), :math:`A^\top G` as (in, N) @ (N, out). NumPy would
    otherwise loop over the leading axes with one small product each.
    """

    @staticmethod
    def forward(ctx, a, b):
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
        na, nb = ctx.needs_input_grad
        ctx.shapes = (a.shape, b.shape)
        ctx.save_for_backward(b if na else None, a if nb else None)
        xp = backend.xp(a)
        if b.ndim == 2 and a.ndim > 2:
            y = _matmul(xp, a.reshape(-1, a.shape[-1]), b)        # (N, in) @ (in, out)
            return y.reshape(a.shape[:-1] + (b.shape[-1],))       # (..., out)
        return _matmul(xp, a, b)

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        xp = backend.xp(g)
        ga = gb = None
        if na:
            counters["matmul.dA"] += 1
            if len(sb) == 2 and len(sa) > 2:
                g2 = g.reshape(-1, sb[1])                          # (N, out)
                ga = _matmul(xp, g2, b.T).reshape(sa)              # (N, in) -> (..., in)
            else:
                ga = unbroadcast(_matmul(xp, g, xp.swapaxes(b, -1, -2)), sa)
        if nb:
            counters["matmul.dB"] += 1
            if len(sb) == 2:
                # (N, in)^T @ (N, out) with N = all leading positions flattened
                a2 = a.reshape(-1, sb[0])                 # (N, in)
                g2 = g.reshape(-1, sb[1])                 # (N, out)
                gb = _matmul(xp, a2.T, g2)                # (in, out)
            else:
                gb = unbroadcast(_matmul(xp, xp.swapaxes(a, -1, -2), g), sb)
        return ga, gb


class Linear(Function):
    r"""y = x W + b: a layer's matrix product and bias in one op.

    x is (..., in), W (in, out), b (out,) or absent. With the N rows of x (its
    leading axes flattened) and :math:`G = \partial L/\partial y` seen as (N, out):

    .. math::
        \frac{\partial L}{\partial x} = G W^\top, \qquad
        \frac{\partial L}{\partial W} = x^\top G, \qquad
        \frac{\partial L}{\partial b} = \textstyle\sum_n G_n

    It is :class:`MatMul` followed by :class:`Add`, fused: the bias is added
    in place into the product (no second array of y's size, no broadcast to
    undo), and every product is one 2-D product over the N rows. As in
    MatMul, x is kept only if W needs a gradient and W only if x does: a
    frozen weight's :math:`x^\top G` is never formed.
    """

    @staticmethod
    def forward(ctx, x, w, *bias):
        if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
            raise ValueError(
                f"linear: x of shape {tuple(x.shape)} and weight of shape {tuple(w.shape)} do "
                f"not align: the weight must be (in, out) with in = x's last axis"
            )
        if bias and tuple(bias[0].shape) != (w.shape[1],):
            raise ValueError(
                f"linear: bias must have shape ({w.shape[1]},), got {tuple(bias[0].shape)}"
            )
        nx, nw = ctx.needs_input_grad[:2]
        ctx.shapes = (x.shape, w.shape)
        ctx.save_for_backward(w if nx else None, x if nw else None)
        y = _matmul(backend.xp(x), x.reshape(-1, w.shape[0]), w)  # (N, in) @ (in, out)
        if bias:
            in_blocks(lambda y_: _add_into(y_, bias[0]), y)        # y += b, on every core
        return y.reshape(x.shape[:-1] + (w.shape[1],))             # (..., out)

    @staticmethod
    def backward(ctx, g):
        w, x = ctx.saved
        sx, sw = ctx.shapes
        needs = ctx.needs_input_grad
        xp = backend.xp(g)
        g2 = g.reshape(-1, sw[1])                                  # (N, out)
        gx = gw = None
        if needs[0]:
            counters["linear.dx"] += 1
            gx = _matmul(xp, g2, w.T).reshape(sx)                  # (N, out) @ (out, in)
        if needs[1]:
            counters["linear.dW"] += 1
            gw = _matmul(xp, x.reshape(-1, sw[0]).T, g2)           # (in, N) @ (N, out)
        if len(needs) == 2:
            return gx, gw
        gb = None
        if needs[2]:
            # sum over the N rows, as the product 1^T G: BLAS runs it on every core
            gb = _matmul(xp, xp.ones((1, g2.shape[0]), dtype=g.dtype), g2)[0]  # (out,)
        return gx, gw, gb


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
    Forward and backward each allocate two arrays of x's size (the output and
    :math:`\hat x`; :math:`\hat g` and one product) and work in place in them.
    """

    @staticmethod
    def forward(ctx, x, w, b, eps=1e-5):
        xp = backend.xp(x)
        C = x.shape[-1]
        if w.shape != (C,) or b.shape != (C,):
            raise ValueError(
                f"layer_norm: weight and bias must have shape ({C},), "
                f"got {tuple(w.shape)} and {tuple(b.shape)}"
            )
        x2 = x.reshape(-1, C)                                         # (N, C)
        xhat, y = xp.empty_like(x2), xp.empty_like(x2)                # (N, C) each
        r = xp.empty((x2.shape[0], 1), dtype=x.dtype)                 # (N, 1)
        in_blocks(lambda *a: _layer_norm_into(*a, w, b, eps), x2, xhat, r, y)
        nx, nw, nb = ctx.needs_input_grad
        ctx.save_for_backward(
            xhat if (nx or nw) else None, r if nx else None, w if nx else None
        )
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, g):
        xhat, r, w = ctx.saved                                        # (N, C), (N, 1), (C,)
        nx, nw, nb = ctx.needs_input_grad
        xp = backend.xp(g)
        C = g.shape[-1]
        g2 = g.reshape(-1, C)                                         # (N, C)
        gb = g2.sum(axis=0) if nb else None
        gw = gx = None
        if nw:
            gw = xp.einsum("nc,nc->c", xhat, g2)                      # sum over rows of xhat g
        if nx:
            gx = _owned(ctx, g2, g2.shape, g.dtype)                 # in place in g when it may be
            if gx is None:
                gx = xp.empty(g2.shape, dtype=g.dtype)
            in_blocks(lambda *a: _layer_norm_grad_into(*a, w), g2, xhat, r, gx)
            gx = g if gx is g2 else gx.reshape(g.shape)
        return gx, gw, gb


def _layer_norm_into(x, xhat, r, y, w, b, eps):
    """One block of rows (N, C): xhat, r = (var + eps)^(-1/2) and y = xhat w + b.

    Row dot products go through einsum, which reads its operands once and
    writes no product array.
    """
    xp = backend.xp(x)
    C = x.shape[-1]
    xp.subtract(x, x.mean(axis=-1, keepdims=True), out=xhat)         # x - mu
    var = xp.einsum("nc,nc->n", xhat, xhat)[:, None]                 # (N, 1) C var
    xp.multiply(var, 1.0 / C, out=r)
    r += eps
    xp.sqrt(r, out=r)
    xp.divide(1.0, r, out=r)                                          # r = (var + eps)^(-1/2)
    xhat *= r
    xp.multiply(xhat, w, out=y)                                       # y = xhat w + b
    y += b


def _layer_norm_grad_into(g, xhat, r, gx, w):
    """One block of rows: gx = r (gh - mean(gh) - xhat mean(gh xhat)), with gh = g w."""
    xp = backend.xp(g)
    C = g.shape[-1]
    xp.multiply(g, w, out=gx)                                         # g-hat
    m2 = xp.einsum("nc,nc->n", gx, xhat)[:, None]                     # (N, 1) C mean(gh xhat)
    m2 *= 1.0 / C
    gx -= gx.mean(axis=-1, keepdims=True)
    prod = xp.multiply(xhat, m2, out=xp.empty_like(gx))
    gx -= prod
    gx *= r


#: Causal attention's query blocks (see :class:`CausalAttention`): at least
#: this many rows each, and at most this many blocks.
_ATTN_BLOCK = 64
_ATTN_MAX_BLOCKS = 2


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

    The same maths as composing reshape, transpose, matmul, masked_fill,
    softmax and dropout, without their copies: q, k and v are gathered into
    one (B, 3, nh, T, hs) array (q pre-scaled by s), the scores are masked and
    exponentiated in place, and Y is written straight into the (B, T, C)
    layout. Its gradient comes back as one (B, T, 3C) array, not three
    zero-padded slices to be summed.

    **The (T, T) matrix is never normalised.** With :math:`E = e^{S - m}` (m the
    row maximum) and row sums z, P = E / z, so :math:`Y = ((E \odot D) v) / z`
    scales the (T, hs) result instead; and in backward, with
    :math:`G' = G / z` (row-wise) and
    :math:`\partial P' = (G' v^\top) \odot D = \partial P / z`,

    .. math::
        \partial v = (E \odot D)^\top G', \qquad
        \partial S = E \odot \big(\partial P' - \tfrac1z \textstyle\sum_j E_{\cdot j}\,
            \partial P'_{\cdot j}\big)

    (substitute P = E/z and :math:`\partial P = z\,\partial P'` above).

    **Little above the diagonal is computed.** The query rows are cut into
    blocks; rows r0..r1-1 can only see keys 0..r1-1, so their scores are the
    product of those rows of q with the first r1 keys, and every later product
    and pass touches that part only. Key block c0..c1-1 is seen only by
    queries c0..T-1, so :math:`\partial v` and :math:`\partial k` for it are
    one product each over those rows. Two halves cover 3/4 of the (T, T)
    matrix (the quarter left out is all masked). More, smaller blocks would
    skip more, but BLAS runs 64-row products less efficiently: on the medium
    model (T = 256) four blocks took 1.05x and two 0.96x the time of one, at
    T = 128 two took 0.86x; so blocks have at least ``_ATTN_BLOCK`` rows and
    there are at most ``_ATTN_MAX_BLOCKS``. Saves the q/k/v array, E and 1/z
    (plus the dropout mask), nothing else.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, keep=None, p=0.0):
        xp = backend.xp(qkv)
        if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head) != 0:
            raise ValueError(
                f"causal_attention: expected qkv shaped (B, T, 3C) with C divisible by "
                f"n_head={n_head}, got {tuple(qkv.shape)}"
            )
        B, T, C3 = qkv.shape
        C = C3 // 3
        nh, hs = n_head, C // n_head
        s = 1.0 / math.sqrt(hs)
        if keep is None:
            p = 0.0  # no mask, no dropout (eval mode): p must not rescale anything
        # (B, T, 3C) -> (B, T, 3, nh, hs) -> (B, 3, nh, T, hs): one copy, every
        # head's (T, hs) matrix contiguous (copied in blocks of the batch)
        h = xp.empty((B, 3, nh, T, hs), dtype=qkv.dtype)
        in_blocks(_copy_into, h, qkv.reshape(B, T, 3, nh, hs).transpose(0, 2, 3, 1, 4))
        q, k, v = h[:, 0], h[:, 1], h[:, 2]                         # each (B, nh, T, hs)
        q *= s  # scaling q is cheaper than scaling the T x T scores
        att = xp.empty((B, nh, T, T), dtype=qkv.dtype)              # E, below the diagonal
        rz = xp.empty((B, nh, T, 1), dtype=qkv.dtype)               # 1/z (and 1/(1-p))
        y = xp.empty((B, T, C), dtype=qkv.dtype)
        yh = y.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)          # (B, nh, T, hs) view
        for r0, r1 in _causal_blocks(T):
            # query rows r0..r1-1 against keys 0..r1-1
            e = att[:, :, r0:r1, :r1]                               # (B, nh, rows, r1) view
            _matmul(xp, q[:, :, r0:r1], k[:, :, :r1].transpose(0, 1, 3, 2), out=e)
            # E = exp(S - m), masked entries 0; rz = 1 / (row sums) / (1 - p)
            mask = xp.triu(xp.ones((r1 - r0, r1), dtype=bool), k=r0 + 1)   # key j > query i
            in_blocks(lambda e_, z_, m_=mask: _masked_exp_into(e_, z_, m_, 1.0 / (1.0 - p)),
                      e, rz[:, :, r0:r1])
            # Y = ((E * D) v) rz, written into the (B, T, nh, hs) layout of the output
            ed = e if keep is None else e * keep[:, :, r0:r1, :r1]
            _matmul(xp, ed, v[:, :, :r1], out=yh[:, :, r0:r1])
        in_blocks(_mul_into, yh, rz)                                # yh *= rz
        ctx.meta = (B, T, C, nh, hs, s, 1.0 - p)
        ctx.save_for_backward(h, att, rz, keep)
        return y                                                    # (B, T, C)

    @staticmethod
    def backward(ctx, g):
        h, att, rz, keep = ctx.saved                                # att holds E
        B, T, C, nh, hs, s, q_keep = ctx.meta
        xp = backend.xp(g)
        q, k, v = h[:, 0], h[:, 1], h[:, 2]                         # q holds s q
        # G' = G rz = G / z (and 1/(1-p)), per row: in place in g when it may be
        # overwritten, else in a new array
        gv = g.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)          # (B, nh, T, hs) view
        if _owned(ctx, g, (B, T, C), g.dtype) is not None:
            gh = gv
            in_blocks(_mul_into, gh, rz)
        else:
            gh = xp.empty((B, nh, T, hs), dtype=g.dtype)
            in_blocks(lambda o, a, z: xp.multiply(a, z, out=o), gh, gv, rz)
        # dq, dk, dv are written straight into the (B, T, 3C) layout of qkv
        gqkv = xp.empty((B, T, 3 * C), dtype=g.dtype)
        d = gqkv.reshape(B, T, 3, nh, hs).transpose(0, 2, 3, 1, 4)  # (B, 3, nh, T, hs) view
        dq, dk, dv = d[:, 0], d[:, 1], d[:, 2]
        dp = xp.empty_like(att)                                     # dP', then dS, below the diagonal
        blocks = _causal_blocks(T)
        for r0, r1 in blocks:
            # dP' = (G' v^T) * D for query rows r0..r1-1, keys 0..r1-1
            dpb = dp[:, :, r0:r1, :r1]
            _matmul(xp, gh[:, :, r0:r1], v[:, :, :r1].transpose(0, 1, 3, 2), out=dpb)
            if keep is not None:
                dpb *= keep[:, :, r0:r1, :r1]
            # dS = E * (dP' - rowsum(E * dP') / z), in place   (1/z = rz (1 - p))
            in_blocks(lambda d_, e_, z_: _softmax_grad_into(d_, e_, z_, q_keep),
                      dpb, att[:, :, r0:r1, :r1], rz[:, :, r0:r1])
            # dq = s dS k
            _matmul(xp, dpb, k[:, :, :r1], out=dq[:, :, r0:r1])
        dq *= s
        for c0, c1 in blocks:
            # keys c0..c1-1 are seen by queries c0..T-1 only
            e = att[:, :, c0:, c0:c1]                               # (B, nh, T - c0, keys)
            ed = e if keep is None else e * keep[:, :, c0:, c0:c1]
            _matmul(xp, ed.transpose(0, 1, 3, 2), gh[:, :, c0:], out=dv[:, :, c0:c1])  # (E*D)^T G'
            _matmul(xp, dp[:, :, c0:, c0:c1].transpose(0, 1, 3, 2), q[:, :, c0:],
                    out=dk[:, :, c0:c1])                                                # dS^T (s q)
        return gqkv


def _causal_blocks(T: int) -> list[tuple[int, int]]:
    """(r0, r1) ranges cutting T query rows into equal blocks of at least _ATTN_BLOCK rows."""
    n = builtins.max(1, builtins.min(T // _ATTN_BLOCK, _ATTN_MAX_BLOCKS))
    cuts = [T * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _add_into(a, b):
    a += b


def _copy_into(dst, src):
    backend.xp(dst).copyto(dst, src)


def _mul_into(a, b):
    a *= b


def _masked_exp_into(att, rz, mask, c):
    """Score rows (..., rows, keys): E = exp(S - rowmax) with the mask's entries set to
    -inf first (so E = 0 there), and rz = c / rowsum(E)."""
    xp = backend.xp(att)
    xp.copyto(att, -math.inf, where=mask)                          # (rows, keys) broadcast
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    xp.sum(att, axis=-1, keepdims=True, out=rz)                     # (..., rows, 1)
    xp.divide(c, rz, out=rz)


def _softmax_grad_into(dp, e, rz, q_keep):
    """Rows (..., rows, keys): dp <- E * (dp - rowsum(E * dp) rz q_keep), i.e. dS."""
    xp = backend.xp(dp)
    rowdot = xp.einsum("...ij,...ij->...i", e, dp)[..., None]       # (..., rows, 1)
    rowdot *= rz
    rowdot *= q_keep
    dp -= rowdot
    dp *= e


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
        xp = backend.xp(g)
        gw = xp.zeros(shape, dtype=dtype)
        ids, g2 = idx.reshape(-1), g.reshape(-1, shape[1])               # (N,), (N, C)
        if ids.size == 0:
            return gw
        if backend.device_of(g) == "gpu":
            backend.scatter_add(gw, ids, g2)    # one atomic add per entry on the GPU
            return gw
        # On the host, sort the ids so repeats sit together, then sum each run
        # of equal ids with one reduceat: several times faster than add.at's
        # entry-by-entry loop, with the same sums (every occurrence counted).
        order = xp.argsort(ids, kind="stable")
        sorted_ids = ids[order]                                             # (N,)
        first = xp.ones(ids.shape, dtype=bool)                              # a run starts here
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        starts = xp.flatnonzero(first)                                      # (runs,)
        gw[sorted_ids[starts]] = xp.add.reduceat(g2[order], starts, axis=0)  # (runs, C)
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
        n_valid = int(valid.sum())
        safe_t = xp.where(valid, targets, 0)
        m = z.max(axis=1, keepdims=True)
        p = z - m
        xp.exp(p, out=p)
        s = p.sum(axis=1, keepdims=True)
        rows = xp.arange(z.shape[0])
        # loss_n = log(sum e^{z-m}) + m - z_t
        nll = (xp.log(s[:, 0]) + m[:, 0] - z[rows, safe_t]) * valid
        p /= s
        ctx.meta = (builtins.max(n_valid, 1),)
        ctx.save_for_backward(p, safe_t, valid)
        return (nll.sum() / builtins.max(n_valid, 1)).astype(z.dtype)

    @staticmethod
    def backward(ctx, g):
        p, t, valid = ctx.saved
        (n,) = ctx.meta
        xp = backend.xp(p)
        gz = p  # reuse the saved buffer: it is released right after this backward
        gz[xp.arange(gz.shape[0]), t] -= 1.0
        gz *= (valid[:, None] * (g / n)).astype(gz.dtype)
        return gz


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
        mine = _owned(ctx, g, mask.shape, g.dtype)
        if mine is not None:
            mine *= mask
            mine *= ctx.scale
            return mine
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
