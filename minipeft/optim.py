r"""Optimizers: SGD and AdamW, gradient clipping, and the warmup + cosine schedule.

An optimizer turns each trainable parameter's gradient into an in-place
change of its ``.data``. This is also where a large share of training memory
lives: AdamW keeps two moments per trained entry (8 bytes a parameter in
float32, twice the weights themselves). So this module does its bookkeeping
in the open:

* **State only for what trains.** State is allocated lazily, at the first
  step a parameter has a gradient, and only for parameters with
  ``requires_grad``. A frozen parameter gets no moments, no buffer, nothing;
  it is never touched, so it stays bit-identical. That is half of PEFT's
  memory saving; the other half (no gradient buffers) is the engine's.
* **Masked parameters keep compact state.** A parameter with a ``grad_mask``
  (element-level selective methods) trains only the k entries its mask
  selects. The optimizer stores their flat indices once and keeps moments of
  length k, not of the parameter's size, and writes only those k entries.
  Entries outside the mask never change, weight decay included.
* **State bytes are reported.** :meth:`Optimizer.state_bytes` is the exact
  number of bytes of arrays the optimizer holds; the memory accountant and the
  lessons read it.

Updates run under :func:`~minipeft.autograd.no_grad`, in place on ``.data``,
on whatever device the data lives on (the array module comes from the data:
``backend.xp(p.data)``), and keep the parameter's dtype: every scalar that
meets an array is a Python float, which NumPy 2 (NEP 50) treats as "weak", so
float32 stays float32.

Also here: :func:`clip_grad_norm_` (global L2 norm), :func:`cosine_with_warmup`
and its object form :class:`LRSchedule`, and :func:`param_groups`, which puts
biases and LayerNorm weights in a group without weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from . import backend
from .autograd.function import no_grad
from .autograd.parallel import in_blocks
from .autograd.tensor import Tensor
from .nn.module import Module
from .validate import Choice, Float, Int, KnobTypeError

# The rules of the knobs (see minipeft.validate: finite, honest types, a range).
_RATE = Float(low=0.0)                                   # lr, weight_decay, min_lr
_FRACTION = Float(low=0.0, high=1.0, high_open=True)     # momentum, betas
_POSITIVE = Float(low=0.0, low_open=True)                # eps, max_norm

__all__ = [
    "SGD", "AdamW", "LRSchedule", "Optimizer", "clip_grad_norm_", "cosine_with_warmup",
    "param_groups",
]

# Keys a parameter group may carry (besides its parameters).
_GROUP_KEYS = {"params", "weight_decay", "name"}


# ---------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------


def param_groups(model: Module, weight_decay: float) -> list[dict]:
    """Split a model's trainable parameters into a decayed and a no-decay group.

    The rule is nanoGPT's: every parameter with two or more dimensions (the
    matrices of ``Linear`` layers, and the embeddings ``wte`` and ``wpe``) is
    decayed; every 1-D parameter (biases, LayerNorm weights and biases) is not.
    Decaying a LayerNorm gain towards zero, or a bias, regularises nothing
    useful, while the embeddings, being 2-D, are decayed as in nanoGPT (and
    GPT-2's tied head with them).

    Only parameters with ``requires_grad`` are listed, so build the optimizer
    after freezing (or after a PEFT method has wrapped the model). Each group
    holds ``(name, parameter)`` pairs, so the optimizer can name them.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [
        {"name": "decay", "params": decay, "weight_decay": float(weight_decay)},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def _build_groups(params, default_weight_decay: float) -> list[dict]:
    """Normalise what the user passed into groups of ``params`` and ``names``.

    Accepted: a Module (its named parameters), an iterable of tensors, an
    iterable of ``(name, tensor)`` pairs, or an iterable of group dicts
    ``{"params": ..., "weight_decay": ..., "name": ...}`` whose ``params`` are
    tensors or pairs. Every parameter may appear once.
    """
    if isinstance(params, Module):
        params = params.named_parameters()
    if isinstance(params, Tensor):
        raise TypeError("pass an iterable of parameters (e.g. [p] or model.parameters())")
    items = list(params)
    if items and all(isinstance(it, dict) for it in items):
        raw_groups = items
    elif any(isinstance(it, dict) for it in items):
        raise TypeError("mix of parameter groups (dicts) and plain parameters; use one form")
    else:
        raw_groups = [{"params": items}]

    groups, seen, n_unnamed = [], {}, 0
    for gi, raw in enumerate(raw_groups):
        unknown = set(raw) - _GROUP_KEYS
        if unknown or "params" not in raw:
            raise ValueError(
                f"parameter group {gi}: expected keys {sorted(_GROUP_KEYS)} with 'params' "
                f"required, got {sorted(raw)}"
            )
        group = {
            "name": str(raw.get("name", f"group{gi}")),
            "weight_decay": _RATE.check(f"parameter group {gi}: weight_decay",
                                        raw.get("weight_decay", default_weight_decay)),
            "params": [],
            "names": [],
        }
        for entry in raw["params"]:
            # An entry is a tensor or a (name, tensor) pair.
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Tensor):
                name, p = str(entry[0]), entry[1]
            elif isinstance(entry, Tensor):
                p = entry
                name = entry.name or f"param{n_unnamed}"
                n_unnamed += 1
            else:
                raise TypeError(
                    f"parameter group {gi}: expected Parameters or (name, Parameter) pairs, "
                    f"got {type(entry).__name__}"
                )
            if id(p) in seen:
                raise ValueError(f"parameter {name!r} appears twice (also as {seen[id(p)]!r})")
            seen[id(p)] = name
            group["params"].append(p)
            group["names"].append(name)
        groups.append(group)
    if not seen:
        raise ValueError("the optimizer got no parameters")
    return groups


# ---------------------------------------------------------------------------
# The optimizer base: groups, lazy state, masked entries, bookkeeping
# ---------------------------------------------------------------------------


class Optimizer:
    """What SGD and AdamW share: groups, lazy per-parameter state, the update walk.

    ``self.state`` maps ``id(parameter)`` to that parameter's state dict
    (use :meth:`state_of`): a Python int ``"step"`` plus arrays. For a masked
    parameter the arrays include ``"index"``, the flat positions of the k
    selected entries, and every other array has length k.

    ``index_dtype`` is the integer type of that index: ``"int64"`` (the
    default, 8 bytes an entry, NumPy's native index type, so indexing with it
    needs no conversion) or ``"int32"`` (4 bytes an entry; NumPy converts it to
    int64 on every gather, a transient copy, but the state is smaller).

    Subclasses define :meth:`_new_state` (allocate the arrays for values of a
    given shape) and :meth:`_update` (change the values ``w`` given gradient
    ``g``, both arrays of that shape, in place).
    """

    def __init__(self, params, lr: float, weight_decay: float, index_dtype: str = "int64"):
        self.lr = _RATE.check("lr", lr)
        _RATE.check("weight_decay", weight_decay)
        self.index_dtype = Choice(choices=("int32", "int64")).check("index_dtype", index_dtype)
        self.param_groups = _build_groups(params, weight_decay)
        self.state: dict[int, dict] = {}

    # -- what it trains ------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        for group in self.param_groups:
            yield from zip(group["names"], group["params"])

    def parameters(self) -> Iterator[Tensor]:
        for _, p in self.named_parameters():
            yield p

    def state_of(self, p: Tensor) -> dict | None:
        """The state kept for ``p`` (None when it has none: frozen, or not yet stepped)."""
        return self.state.get(id(p))

    # -- the update ------------------------------------------------------------
    def zero_grad(self) -> None:
        """Drop every gradient (``grad = None``): the buffers are freed, not zero-filled."""
        for p in self.parameters():
            p.grad = None

    def step(self) -> None:
        """Update every trainable parameter that has a gradient, in place."""
        with no_grad():
            for group in self.param_groups:
                wd = group["weight_decay"]
                for name, p in zip(group["names"], group["params"]):
                    # Frozen: no state, no update, not one bit changes.
                    # No gradient (unused this step): skipped, as in PyTorch.
                    if not p.requires_grad or p.grad is None:
                        continue
                    state = self.state.get(id(p))
                    if state is None:
                        state = self.state[id(p)] = self._init_state(p)
                    else:
                        self._check_device(name, p, state)
                    state["step"] += 1
                    if "index" in state:
                        # Masked: gather the k selected entries into compact
                        # arrays, update them, scatter them back. The flat view
                        # shares memory with p.data, so the write is in place.
                        idx = state["index"]
                        if not p.data.flags.c_contiguous:
                            # reshape(-1) must be a view for the write to land in p.data
                            p.data = backend.xp(p.data).ascontiguousarray(p.data)
                        flat = p.data.reshape(-1)                   # (n,) view
                        w = flat[idx]                               # (k,) copy
                        self._update(w, p.grad.reshape(-1)[idx], state, wd)
                        flat[idx] = w
                    else:
                        self._update(p.data, p.grad, state, wd)
                    p._bump()  # a graph that saved p would now be stale: say so

    def _init_state(self, p: Tensor) -> dict:
        """First step of ``p``: the step counter, the mask's index, the moments."""
        xp = backend.xp(p.data)
        state = {"step": 0}
        shape = p.shape  # dense: moments of the parameter's shape
        if p.grad_mask is not None:
            mask = backend.to_device(p.grad_mask, p.device)
            if tuple(mask.shape) != p.shape:
                raise ValueError(
                    f"grad_mask of shape {tuple(mask.shape)} for a parameter of shape {p.shape}"
                )
            # Flat positions of the selected entries, in index_dtype.
            if self.index_dtype == "int32" and p.size >= 2**31:
                raise ValueError(f"a parameter of {p.size} entries needs index_dtype='int64'")
            index_dtype = getattr(xp, self.index_dtype)
            state["index"] = xp.flatnonzero(mask.reshape(-1)).astype(index_dtype)   # (k,)
            shape = (int(state["index"].size),)  # masked: moments of length k
        state.update(self._new_state(xp, shape, p.dtype))
        return state

    def _check_device(self, name: str, p: Tensor, state: dict) -> None:
        for key, a in state.items():
            if key != "step" and a is not None and backend.device_of(a) != p.device:
                raise RuntimeError(
                    f"optimizer state {key!r} of {name!r} is on {backend.device_of(a)!r} "
                    f"but the parameter is on {p.device!r}: call optimizer.to({p.device!r}) "
                    "after moving the model"
                )

    def _new_state(self, xp, shape: tuple, dtype) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, w, g, state: dict, weight_decay: float) -> None:  # pragma: no cover
        raise NotImplementedError

    # -- bookkeeping --------------------------------------------------------------
    def to(self, device: str) -> Optimizer:
        """Move the state to ``device`` (after ``model.to(device)``); returns self."""
        for state in self.state.values():
            for key, a in state.items():
                if key != "step" and a is not None:
                    state[key] = backend.to_device(a, device)
        return self

    def named_state_bytes(self) -> dict[str, int]:
        """Bytes of state arrays per parameter name (only parameters that have state)."""
        out = {}
        for name, p in self.named_parameters():
            state = self.state.get(id(p))
            if state is not None:
                out[name] = _state_nbytes(state)
        return out

    def state_bytes(self) -> int:
        r"""Bytes of every array the optimizer holds.

        Counted: the moments (AdamW: two arrays; SGD with momentum: one) and,
        for a masked parameter, the index of its k selected entries. For AdamW
        in float32 that is 8 bytes per trained entry, plus, for a masked
        parameter, 8 bytes per selected entry for its int64 index (4 with
        ``index_dtype="int32"``):

        .. math::  \text{dense: } 8n \qquad \text{masked: } (8 + 8)\,k
                   \ \text{or}\ (8 + 4)\,k

        With int64 indices the index costs as much as both moments, so a mask
        saves state only below half density.

        Not counted: the per-parameter step counter, a Python int, which is
        not array memory.
        """
        return sum(_state_nbytes(s) for s in self.state.values())

    def __repr__(self):
        groups = ", ".join(
            f"{g['name']}: {len(g['params'])} params, weight_decay={g['weight_decay']}"
            for g in self.param_groups
        )
        return f"{type(self).__name__}(lr={self.lr}, {self._extra_repr()}groups=[{groups}])"

    def _extra_repr(self) -> str:
        return ""


def _state_nbytes(state: dict) -> int:
    return sum(int(a.nbytes) for k, a in state.items() if k != "step" and a is not None)


# ---------------------------------------------------------------------------
# SGD with momentum
# ---------------------------------------------------------------------------


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, as in PyTorch.

    With learning rate :math:`\eta`, momentum :math:`\mu` and weight decay
    :math:`\lambda` (an L2 penalty added to the gradient, PyTorch's SGD
    convention):

    .. math::
        g_t &= \nabla_w L(w_{t-1}) + \lambda\, w_{t-1} \\
        b_1 &= g_1, \qquad b_t = \mu\, b_{t-1} + g_t \quad (t > 1) \\
        w_t &= w_{t-1} - \eta\, b_t

    Without momentum :math:`b_t = g_t` and no state array is kept. With it,
    one buffer per trained entry (4 bytes in float32).
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, index_dtype: str = "int64"):
        momentum = _FRACTION.check("momentum", momentum)
        super().__init__(params, lr, weight_decay, index_dtype)
        self.momentum = momentum

    def _new_state(self, xp, shape, dtype):
        return {}  # the momentum buffer is created at the first step, as a copy of g

    def _update(self, w, g, state, weight_decay):
        # L2 penalty: g <- g + lambda * w (a new array; p.grad itself is left as it was)
        if weight_decay:
            g = g + weight_decay * w
        # Momentum: b <- mu * b + g  (b_1 = g_1)
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += g
            g = buf
        # w <- w - eta * b
        w -= self.lr * g

    def _extra_repr(self):
        return f"momentum={self.momentum}, "


# ---------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------


class AdamW(Optimizer):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), with bias correction.

    For each trained entry, with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`,
    learning rate :math:`\eta`, decay :math:`\lambda`:

    .. math::
        w &\leftarrow w - \eta\lambda\, w
            && \text{decoupled decay: not part of the gradient} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad m_0 = 0 \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2, \qquad v_0 = 0 \\
        \hat m_t &= \frac{m_t}{1-\beta_1^t}, \qquad \hat v_t = \frac{v_t}{1-\beta_2^t} \\
        w &\leftarrow w - \eta\, \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    The bias correction undoes the pull towards :math:`m_0 = v_0 = 0`: at
    :math:`t=1`, :math:`\hat m_1 = g_1` and :math:`\hat v_1 = g_1^2`, so the
    first step moves every entry by about :math:`\eta` in the direction of
    :math:`-\operatorname{sign}(g_1)`.

    Decoupled decay shrinks the weights directly, by the same factor for every
    entry; adding :math:`\lambda w` to the gradient instead (plain Adam + L2)
    would have the decay divided by :math:`\sqrt{\hat v}`, weakest exactly
    where the gradients are large. State: :math:`m` and :math:`v`, one of each
    per trained entry (8 bytes in float32).

    The update runs in place: the moments are allocated once, at a
    parameter's first step, and every intermediate goes into one scratch
    array the size of the largest parameter, shared by all of them (it holds
    nothing between updates, so it is not state and is not counted by
    :meth:`state_bytes`). A step allocates no parameter-sized arrays.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *,
                 index_dtype: str = "int64"):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise KnobTypeError(f"betas must be a pair (beta1, beta2) of numbers in [0, 1), "
                                f"e.g. (0.9, 0.999), got {betas!r}")
        b1, b2 = (_FRACTION.check(f"betas[{i}]", b) for i, b in enumerate(betas))
        eps = _POSITIVE.check("eps", eps)
        super().__init__(params, lr, weight_decay, index_dtype)
        self.betas = (b1, b2)
        self.eps = eps
        self._scratch = {}  # (device, dtype) -> a flat work array, grown as needed

    def _work(self, w):
        """A scratch array of w's shape and dtype on w's device (a view of a shared one)."""
        key = (backend.device_of(w), w.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.size < w.size:
            buf = self._scratch[key] = backend.xp(w).empty(w.size, dtype=w.dtype)
        return buf[:w.size].reshape(w.shape)

    def _new_state(self, xp, shape, dtype):
        return {"m": xp.zeros(shape, dtype=dtype), "v": xp.zeros(shape, dtype=dtype)}

    def _update(self, w, g, state, weight_decay):
        lr, eps = self.lr, self.eps
        b1, b2 = self.betas
        t = state["step"]
        m, v = state["m"], state["v"]
        tmp = self._work(w)
        # Bias corrections (Python floats: float32 stays float32)
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        # w <- w - eta * m_hat / (sqrt(v_hat) + eps), with m_hat = m / bc1 and
        # sqrt(v_hat) = sqrt(v) / sqrt(bc2); multiplying through by sqrt(bc2),
        #   = w - (eta sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2))
        k = (1.0 - lr * weight_decay, b1, b2, eps * math.sqrt(bc2), lr * math.sqrt(bc2) / bc1)
        if w.flags.c_contiguous:
            # entry by entry: flat blocks, one per thread (see autograd.in_blocks)
            in_blocks(lambda *a: _adamw_into(*a, *k), w.reshape(-1), g.reshape(-1),
                      m.reshape(-1), v.reshape(-1), tmp.reshape(-1))
        else:
            _adamw_into(w, g, m, v, tmp, *k)

    def _extra_repr(self):
        return f"betas={self.betas}, eps={self.eps}, "


def _adamw_into(w, g, m, v, tmp, decay, b1, b2, eps_c, step_c):
    """AdamW on (a block of) w, in place, with ``tmp`` as the only scratch."""
    xp = backend.xp(w)
    # Decoupled weight decay: w <- w - eta * lambda * w = (1 - eta lambda) w
    if decay != 1.0:
        w *= decay
    # Moments, in place: m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    m *= b1
    xp.multiply(g, 1.0 - b1, out=tmp)
    m += tmp
    v *= b2
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v += tmp
    # w <- w - step_c * m / (sqrt(v) + eps_c)   (the corrections folded in, see _update)
    xp.sqrt(v, out=tmp)
    tmp += eps_c
    xp.divide(m, tmp, out=tmp)
    tmp *= step_c
    w -= tmp


# ---------------------------------------------------------------------------
# Gradient clipping by global norm
# ---------------------------------------------------------------------------


def clip_grad_norm_(params, max_norm: float, eps: float = 1e-6) -> float:
    r"""Scale all gradients together so their global L2 norm is at most ``max_norm``.

    .. math::
        \|g\| = \sqrt{\textstyle\sum_{p} \sum_i g_{p,i}^2}, \qquad
        g \leftarrow g \cdot \min\!\left(1, \frac{\text{max\_norm}}{\|g\| + \epsilon}\right)

    One factor for every parameter keeps the update's direction and only
    shortens it. ``params``: tensors or ``(name, tensor)`` pairs (e.g.
    ``optimizer.parameters()``); those without a gradient are ignored.
    Returns the norm *before* clipping (a Python float). A non-finite norm is
    returned as it is and the gradients are left unscaled, for the caller to
    report.
    """
    max_norm = _POSITIVE.check("max_norm", max_norm)
    grads = []
    for p in params:
        p = p[1] if isinstance(p, tuple) else p
        if p.grad is not None:
            grads.append(p.grad)
    # Sum of squares per device, accumulated in float64 on that device; one
    # transfer of a scalar per device at the end.
    partial: dict = {}
    for g in grads:
        xp = backend.xp(g)
        s = xp.sum(g * g, dtype=xp.float64)
        partial[xp] = s if xp not in partial else partial[xp] + s
    total = math.sqrt(sum(float(s) for s in partial.values()))
    # Scale in place by a Python float (float32 stays float32).
    coef = max_norm / (total + eps)
    if math.isfinite(total) and coef < 1.0:
        for g in grads:
            g *= coef
    return total


# ---------------------------------------------------------------------------
# Learning-rate schedule: linear warmup, then cosine decay
# ---------------------------------------------------------------------------


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                       min_lr: float = 0.0) -> float:
    r"""The learning rate for (0-based) ``step``: linear warmup, then cosine decay.

    .. math::
        \eta(s) = \begin{cases}
          \eta_{\max}\, \dfrac{s+1}{W} & s < W \\[4pt]
          \eta_{\min} + \tfrac12 (\eta_{\max}-\eta_{\min})
              \left(1 + \cos \pi\, \dfrac{s-W}{T-W}\right) & W \le s < T \\[4pt]
          \eta_{\min} & s \ge T
        \end{cases}

    with :math:`W` = ``warmup_steps`` and :math:`T` = ``total_steps``. Key
    points: step 0 gets :math:`\eta_{\max}/W`; steps :math:`W-1` and :math:`W`
    get :math:`\eta_{\max}`; the midpoint of the decay gets the mean of
    :math:`\eta_{\max}` and :math:`\eta_{\min}`; step :math:`T` gets
    :math:`\eta_{\min}`. Warmup keeps Adam's first, poorly estimated steps
    small; the cosine spends most steps at a high rate and lands softly.
    """
    total_steps = Int(low=1).check("total_steps", total_steps)
    Int(low=0, high=total_steps, expect=f"an integer in [0, total_steps={total_steps}]") \
        .check("warmup_steps", warmup_steps)
    step = Int(low=0).check("step", step)
    base_lr = _RATE.check("base_lr", base_lr)
    min_lr = _RATE.check("min_lr", min_lr)
    # Warmup: a straight line up to base_lr
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    # Cosine: half a period from base_lr down to min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """Warmup + cosine as an object: ``schedule(step) -> lr``.

    The training loop calls it before every update and sets ``optimizer.lr``;
    a hand-written loop can call :meth:`apply`. Any callable ``step -> lr``
    can stand in for it.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        cosine_with_warmup(0, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)

    def __call__(self, step: int) -> float:
        return cosine_with_warmup(step, self.total_steps, self.warmup_steps, self.base_lr,
                                  self.min_lr)

    def apply(self, optimizer: Optimizer, step: int) -> float:
        """Set ``optimizer.lr`` for ``step`` and return it."""
        optimizer.lr = self(step)
        return optimizer.lr
