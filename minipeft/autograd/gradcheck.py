r"""Gradient checks in float64: the proof behind every backward pass.

Two checks, both against central finite differences

.. math:: \frac{\partial f}{\partial x_i} \approx \frac{f(x + h e_i) - f(x - h e_i)}{2h},

whose error is :math:`O(h^2)` plus rounding of order :math:`\epsilon_{mach}/h`.
In float64 (:math:`\epsilon \approx 10^{-16}`) with :math:`h = 10^{-6}` both
terms are far below 1e-6; in float32 (:math:`\epsilon \approx 10^{-7}`) the
rounding term alone is about 0.1, so float32 finite differences "lie" and
every check here refuses anything but float64.

* :func:`gradcheck`: element by element, every input entry (small shapes).
* :func:`vjp_check`: random projections (the HIPS autograd idea). For random
  u (shaped like the inputs) and v (like the output), the directional
  derivative :math:`\langle v, J u\rangle` by finite differences along u must
  equal :math:`\langle J^\top v, u\rangle` from one backward pass. One scalar
  per trial, whatever the size: it scales to a whole GPT.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .function import no_grad


def _require_f64(tensors):
    """Refuse any input that is not float64 (see the module docstring for why)."""
    for t in tensors:
        if t.dtype != np.float64:
            raise TypeError(
                f"gradient checks need float64 inputs (got {t.dtype}): float32 finite "
                "differences have errors near 1e-1 and would hide or invent bugs"
            )


def _f(fn, inputs):
    """fn(*inputs) evaluated without recording a graph, as a float64 host array."""
    with no_grad():
        out = fn(*inputs)
    return backend.asnumpy(out.data).astype(np.float64)


def _analytic(fn, inputs, v_host):
    r"""Backward of :math:`\langle v, f(x)\rangle`: the gradients :math:`J^\top v`, one per
    input, as host arrays (zeros for an input that received none)."""
    for t in inputs:
        t.grad = None           # backward accumulates: start from nothing
    out = fn(*inputs)
    # `backward(v)` starts from $v$ as the output's gradient: one pass gives
    # $J^\top v$ for every input at once.
    v = backend.to_device(v_host.astype(out.dtype), out.device)
    out.backward(v)
    return [
        np.zeros(t.shape) if t.grad is None else backend.asnumpy(t.grad).astype(np.float64)
        for t in inputs
    ]


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0) -> bool:
    r"""Element-wise check of every input entry's gradient against central differences.

    ``fn`` maps the float64 ``inputs`` (Tensors with ``requires_grad``) to a
    Tensor. A random output weighting v turns it into a scalar
    :math:`\langle v, f\rangle` so that non-scalar outputs are checked in full.
    Raises AssertionError naming the first wrong entry; returns True otherwise.
    """
    _require_f64(inputs)
    rng = np.random.default_rng(seed)
    # One random weighting $v$ of the output (shaped like it) and one backward
    # pass: `analytic[k]` is the gradient of $\langle v, f\rangle$ with respect
    # to input $k$.
    out0 = _f(fn, inputs)
    v = rng.standard_normal(out0.shape)
    analytic = _analytic(fn, inputs, v)
    for k, t in enumerate(inputs):
        if not t.requires_grad:
            continue
        # Nudge one entry at a time on a host copy, two forward passes per entry.
        # The input gets a copy each time: on the CPU to_device returns the host
        # array itself, and the next nudge would write into the input in place.
        host = backend.asnumpy(t.data).astype(np.float64)
        num = np.zeros_like(host)
        flat = host.reshape(-1)                 # (n,): a view, so flat[i] = ... writes host
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + eps
            t.data = backend.to_device(host.copy(), t.device)
            fp = float((_f(fn, inputs) * v).sum())              # <v, f(x + h e_i)>
            flat[i] = orig - eps
            t.data = backend.to_device(host.copy(), t.device)
            fm = float((_f(fn, inputs) * v).sum())              # <v, f(x - h e_i)>
            flat[i] = orig
            num.reshape(-1)[i] = (fp - fm) / (2 * eps)             # num: the input's shape
        t.data = backend.to_device(host.copy(), t.device)       # the input as it was
        # Every entry compared; the first wrong one is reported by its index.
        bad = ~np.isclose(analytic[k], num, atol=atol, rtol=rtol)
        if bad.any():
            i = tuple(int(j) for j in np.argwhere(bad)[0])
            raise AssertionError(
                f"gradient of input {k} (shape {t.shape}) is wrong at index {i}: "
                f"backward gives {analytic[k][i]:.10g}, finite differences {num[i]:.10g} "
                f"({int(bad.sum())} of {bad.size} entries differ)"
            )
    return True


def vjp_check(fn, inputs, trials=3, eps=1e-6, rtol=1e-5, atol=1e-9, seed=0) -> bool:
    r"""Random-projection check: :math:`\langle v, J u\rangle = \langle J^\top v, u\rangle`.

    For each trial draws u for every input that requires a gradient and v
    for the output; compares the central difference
    :math:`\langle v, f(x+hu) - f(x-hu)\rangle / 2h` with the backward pass's
    :math:`\sum_k \langle \nabla_{x_k}, u_k\rangle`. Works on whole models:
    ``inputs`` may be a model's parameters (``fn`` then ignores its arguments
    and reads the parameters directly).
    """
    _require_f64(inputs)
    rng = np.random.default_rng(seed)
    hosts = [backend.asnumpy(t.data).astype(np.float64) for t in inputs]   # the point x
    for trial in range(trials):
        # $v$ weights the output; $u$ is one direction in the space of all
        # inputs together (a piece $u_k$ per input that requires a gradient).
        out0 = _f(fn, inputs)
        v = rng.standard_normal(out0.shape)
        us = [rng.standard_normal(h.shape) if t.requires_grad else None
              for t, h in zip(inputs, hosts)]
        # Backward: $\langle J^\top v, u\rangle = \sum_k \langle \nabla_{x_k}, u_k\rangle$.
        grads = _analytic(fn, inputs, v)
        lhs = sum(float((g * u).sum()) for g, u in zip(grads, us) if u is not None)

        # Finite differences: every input moved at once, along its piece of $u$.
        def at(sign, us=us, v=v):
            for t, h, u in zip(inputs, hosts, us):
                if u is not None:
                    t.data = backend.to_device(h + sign * eps * u, t.device)
            return float((_f(fn, inputs) * v).sum())                       # <v, f(x +- h u)>

        rhs = (at(+1) - at(-1)) / (2 * eps)
        for t, h in zip(inputs, hosts):
            t.data = backend.to_device(h.copy(), t.device)                 # back to x
        if not abs(lhs - rhs) <= atol + rtol * max(abs(lhs), abs(rhs)):
            raise AssertionError(
                f"random-projection check failed on trial {trial}: backward gives "
                f"<J^T v, u> = {lhs:.12g}, finite differences <v, J u> = {rhs:.12g} "
                f"(relative error {abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1e-300):.3g})"
            )
    return True
