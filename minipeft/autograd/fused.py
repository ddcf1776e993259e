r"""The fast path: in-place and blocked kernels beside the reference ops, and the walk they need.

Each class here is the reference operator of :mod:`.ops` with the same
maths, the same gradients up to float rounding and the same saved arrays
(but for attention's 1/z, (B, nh, T, 1), which the reference does not keep),
computed with less memory traffic:

* elementwise chains (GELU, LayerNorm, attention's masked softmax, the
  residual add, a bias) work in place in as few arrays as the formula allows,
  on blocks of rows on every core (:func:`.parallel.in_blocks`), in
  cache-sized pieces;
* matrix products are split across the engine's threads
  (:func:`.parallel.split_matmul`), and a layer's product runs as one 2-D
  product over the flattened leading positions (NumPy would otherwise loop
  over the leading axes with one small product each);
* a backward may overwrite the gradient it receives when the walk says no one
  else refers to it (``ctx.grad_owned``), instead of allocating an array of
  its size. Only the fast walk, :func:`run_backward` below, records that
  ownership; the reference walk leaves ``grad_owned`` False, which is always
  safe.

:func:`use_fast_path` installs all of it (the default) or takes it out again:
``Function.apply`` runs ``cls.kernel``, which is the reference op itself or
its kernel here, and ``Tensor.backward`` runs ``tensor.backward_walk``.
:func:`minipeft.autograd.reference_ops` is the context manager for a block
of code, ``MINIPEFT_REFERENCE=1`` the switch for a whole process. The tests
run the op, model and PEFT suites on both paths and hold them equal.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np

from .. import backend
from . import ops, profile, tensor
from .function import Function
from .ops import _GELU_K, _broadcast_shape, counters, unbroadcast
from .parallel import in_blocks, split_matmul
from .tensor import BACKWARD_HOOKS, Tensor


def _matmul(xp, a, b, out=None):
    """``a @ b`` (into ``out`` when given): split across the engine's threads on NumPy,
    noted in :data:`.profile.matmul_log` and timed for the op profiler when they are on."""
    if profile.matmul_log is not None:
        batch = 1
        for n in np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])):
            batch *= n
        profile.matmul_log.append((batch, a.shape[-2], a.shape[-1], b.shape[-1]))
    watch = Function.observer
    if watch is not None:
        t0 = time.perf_counter()
    y = split_matmul(a, b, out) if xp is np else (
        xp.matmul(a, b) if out is None else xp.matmul(a, b, out=out))
    if watch is not None:
        backend.synchronize(y)
        watch.matmul_time(time.perf_counter() - t0)
    return y


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


class Add(ops.Add):
    r"""Same shapes (the residual stream): the sum in blocks of rows, on every core."""

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_shape("add", a, b)
        ctx.shapes = (a.shape, b.shape)
        if a.shape != b.shape or a.ndim == 0:
            return a + b
        y = backend.xp(a).empty_like(a)
        in_blocks(lambda a_, b_, y_: backend.xp(y_).add(a_, b_, out=y_), a, b, y)
        return y


class Mul(ops.Mul):
    r"""When only one input needs its gradient, has g's shape, and g is backward's to
    overwrite, the product is formed in place in g.
    """

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


class PowScalar(ops.PowScalar):
    r"""Small integer powers spelled as products: on float32 ``x**3`` ran 2 to 100
    times slower than ``x*x*x``.
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


class GELU(ops.GELU):
    r"""Both directions in place in as few arrays of x's size as the formula allows
    (one forward, three backward), in blocks of rows on every core: on the
    MLP's (N, 4C) hidden layer every extra temporary is a pass over memory.
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


# ---------------------------------------------------------------------------
# Matrix products
# ---------------------------------------------------------------------------


class MatMul(ops.MatMul):
    r"""The layer case, A of shape (..., in) and a 2-D weight B of shape
    (in, out), as one 2-D product over the N flattened leading positions:
    forward (N, in) @ (in, out), :math:`G B^\top` as (N, out) @ (out, in),
    :math:`A^\top G` as (in, N) @ (N, out). Every product is split across the
    engine's threads (:func:`_matmul`).
    """

    @staticmethod
    def forward(ctx, a, b):
        ops._check_matmul(a, b)
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


class Linear(ops.Linear):
    r"""The bias is added in place into the product (no second array of y's size,
    no broadcast to undo), on every core; its gradient is the product
    :math:`1^\top G`, which BLAS runs on every core too.
    """

    @staticmethod
    def forward(ctx, x, w, *bias):
        ops._check_linear(x, w, bias)
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
# Neural-network ops
# ---------------------------------------------------------------------------


class LayerNorm(ops.LayerNorm):
    r"""Forward and backward each allocate two arrays of x's size (the output and
    :math:`\hat x`; :math:`\hat g` and one product) and work in place in them,
    in blocks of rows on every core; row dot products go through einsum.
    """

    @staticmethod
    def forward(ctx, x, w, b, eps=1e-5):
        xp = backend.xp(x)
        C = x.shape[-1]
        ops._check_layer_norm(x, w, b)
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


class CausalAttention(ops.CausalAttention):
    r"""The maths of :class:`.ops.CausalAttention`, without its copies, and with
    little above the diagonal computed.

    q, k and v are gathered into one (B, 3, nh, T, hs) array (q pre-scaled by
    s), the scores are masked and exponentiated in place, and Y is written
    straight into the (B, T, C) layout. Its gradient comes back as one
    (B, T, 3C) array, not three zero-padded slices to be summed.

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
    skip more, but BLAS runs 64-row products less efficiently (at T = 256 four
    blocks were slower than two), so blocks have at least ``_ATTN_BLOCK`` rows
    and there are at most ``_ATTN_MAX_BLOCKS``. Saves the q/k/v array, E and 1/z
    (plus the dropout mask), nothing else.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, keep=None, p=0.0):
        xp = backend.xp(qkv)
        ops._check_attention(qkv, n_head)
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
    n = max(1, min(T // _ATTN_BLOCK, _ATTN_MAX_BLOCKS))
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


class Embedding(ops.Embedding):
    r"""On the host, the ids sorted so that repeats sit together and each run of
    equal ids summed with one ``reduceat``: several times faster than
    ``add.at``'s entry-by-entry loop, with the same sums.
    """

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


class CrossEntropy(ops.CrossEntropy):
    r"""The softmax formed in place, and its saved buffer reused as the gradient."""

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
        ctx.meta = (max(n_valid, 1),)
        ctx.save_for_backward(p, safe_t, valid)
        return (nll.sum() / max(n_valid, 1)).astype(z.dtype)

    @staticmethod
    def backward(ctx, g):
        p, t, valid = ctx.saved
        (n,) = ctx.meta
        xp = backend.xp(p)
        gz = p  # reuse the saved buffer: it is released right after this backward
        gz[xp.arange(gz.shape[0]), t] -= 1.0
        gz *= (valid[:, None] * (g / n)).astype(gz.dtype)
        return gz


class Dropout(ops.Dropout):
    r"""The mask applied in place in g when g is backward's to overwrite."""

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved
        mine = _owned(ctx, g, mask.shape, g.dtype)
        if mine is not None:
            mine *= mask
            mine *= ctx.scale
            return mine
        return g * mask * ctx.scale


# ---------------------------------------------------------------------------
# The fast walk: gradient-buffer ownership
# ---------------------------------------------------------------------------


def run_backward(root, grad) -> None:
    """:func:`.tensor.run_backward`, summing in place and telling each node what it owns.

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
    watch = Function.observer            # the op profiler, when it runs
    order = tensor._topological_order(root)
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
        if watch is not None:
            watch.enter(node.fn.__name__)
        in_grads = node.fn.backward(node, g)
        if watch is not None:
            watch.leave("backward")
            watch.enter("(gradient accumulation)")
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
        if watch is not None:
            watch.leave("backward")
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


# ---------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------

#: each reference op and the fast kernel that replaces it
KERNELS = {ops.Add: Add, ops.Mul: Mul, ops.PowScalar: PowScalar, ops.GELU: GELU,
           ops.MatMul: MatMul, ops.Linear: Linear, ops.LayerNorm: LayerNorm,
           ops.CausalAttention: CausalAttention, ops.Embedding: Embedding,
           ops.CrossEntropy: CrossEntropy, ops.Dropout: Dropout}


def use_fast_path(on: bool) -> None:
    """Run the fast kernels and walk (``True``, the default) or the reference ops and walk.

    For the whole process; :func:`reference_ops` switches for a block of code.
    """
    for reference, fast in KERNELS.items():
        reference.kernel = fast if on else reference
    tensor.backward_walk = run_backward if on else tensor.run_backward


def fast_path_on() -> bool:
    """Whether ops run their fast kernels now."""
    return tensor.backward_walk is run_backward


@contextlib.contextmanager
def reference_ops(on: bool = True):
    """``with reference_ops():`` runs the reference ops and walk inside (``on=False``:
    the fast path), and whatever ran before after. One switch for the process,
    not per thread."""
    before = fast_path_on()
    use_fast_path(not on)
    try:
        yield
    finally:
        use_fast_path(before)


def _from_environment() -> bool:
    """False when ``MINIPEFT_REFERENCE=1`` asks for the reference path."""
    value = os.environ.get("MINIPEFT_REFERENCE", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"MINIPEFT_REFERENCE must be 1 (the reference path) or 0 (the fast "
                         f"path, the default), got {value!r}")
    return value != "1"


use_fast_path(_from_environment())
