r"""The layers a GPT is built from: Linear, Embedding, LayerNorm, Dropout.

Each layer owns its :class:`~minipeft.nn.module.Parameter` tensors and calls
one or two operators from :mod:`minipeft.autograd.ops`; the derivatives live
there, next to each operator. Parameters are initialised on the host with a
NumPy generator (so a seed gives the same model on every machine) and then
moved to the requested device. ``forward`` methods never import NumPy for
maths: they use the operators, which ask the data for its array module.

Dropout draws its keep-masks on the input's device and can *record* and
*replay* them, which gradient checkpointing needs (see
:func:`record_dropout_masks` and :mod:`minipeft.nn.checkpoint`).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Tensor
from .module import Module, Parameter


def _host_dtype(dtype) -> np.dtype:
    """The float dtype parameters are created in (float32 unless told otherwise)."""
    dt = np.dtype(backend.DEFAULT_DTYPE if dtype is None else dtype)
    if dt not in backend.FLOAT_DTYPES:
        raise TypeError(f"parameters must be float32 or float64, got {dt}")
    return dt


def _rng(rng) -> np.random.Generator:
    """The host generator used for initialisation; pass one for reproducible weights."""
    return np.random.default_rng() if rng is None else rng


# ---------------------------------------------------------------------------
# Shape-only builds
# ---------------------------------------------------------------------------
#
# The memory estimator asks a model for its structure (names, shapes, which
# layer calls which) at sizes no machine holds (65B parameters). Inside
# ``shapes_only()`` every layer is built with zero-stride parameters: a
# read-only view of one zero with the full shape, which takes no memory.
# Each layer's ``trace`` (beside its ``forward``) then states what that
# forward saves for backward, over shapes (see :mod:`minipeft.memory.trace`).

_build = threading.local()


@contextlib.contextmanager
def shapes_only():
    """``with shapes_only(): GPT(config)`` builds the module tree without allocating weights."""
    before = getattr(_build, "shapes_only", False)
    _build.shapes_only = True
    try:
        yield
    finally:
        _build.shapes_only = before


def shaped(shape, dtype=None) -> np.ndarray:
    """A read-only array of ``shape`` whose entries are all one shared zero (no memory)."""
    return np.broadcast_to(np.zeros((), _host_dtype(dtype)), tuple(shape))


def _initial(shape, dtype, draw) -> np.ndarray:
    """``draw(shape)`` in ``dtype``: a parameter's initial values (shape-only inside shapes_only())."""
    if getattr(_build, "shapes_only", False):
        return shaped(shape, dtype)
    return draw(shape).astype(dtype)


# ---------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------


class Linear(Module):
    r"""An affine map :math:`y = x W + b`, with W stored (in, out) as in GPT-2.

    GPT-2's ``Conv1D`` stores its weight (in_features, out_features), the
    transpose of PyTorch's ``nn.Linear``; keeping GPT-2's layout means a GPT-2
    checkpoint loads without transposes and ``x @ W`` needs none either.

    Initialisation is GPT-2's: :math:`W \sim \mathcal N(0, \mathrm{std}^2)`
    (std 0.02 unless told otherwise), b = 0.

    Args:
        in_features, out_features: sizes of the last axis of x and of y.
        bias: whether to add a bias b of shape (out_features,).
        dtype, device: of the parameters (float32 and 'cpu' by default).
        rng: a ``numpy.random.Generator`` for the initial weights (a fresh,
            unseeded one when omitted).
        std: standard deviation of the initial weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None,
                 device=None, rng=None, std: float = 0.02):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        dt = _host_dtype(dtype)
        w = _initial((self.in_features, self.out_features), dt,
                     lambda shape: _rng(rng).normal(0.0, std, size=shape))
        self.weight = Parameter(w, device=device)                           # (in, out)
        self.bias = Parameter(_initial((self.out_features,), dt, np.zeros), device=device) \
            if bias else None

    def forward(self, x: Tensor) -> Tensor:
        # (..., in) @ (in, out) + (out,) -> (..., out): one fused op (ops.Linear)
        return ops.linear(x, self.weight, self.bias)

    def trace(self, walk, x):
        """:meth:`forward` over shapes: what ``ops.linear`` saves (see :mod:`minipeft.memory.trace`)."""
        return walk.linear(x, walk.param(self.weight), walk.param(self.bias), walk.label(self))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


# ---------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------


class Embedding(Module):
    r"""A lookup table: row ``i`` of ``weight`` (num_embeddings, embedding_dim) is token i's vector.

    Its gradient is a scatter-add of the incoming gradients into the rows that
    were looked up (repeated ids add up; see :class:`ops.Embedding`).
    Initialised :math:`\mathcal N(0, 0.02^2)` like GPT-2's ``wte`` and ``wpe``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, device=None,
                 rng=None, std: float = 0.02):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        w = _initial((self.num_embeddings, self.embedding_dim), _host_dtype(dtype),
                     lambda shape: _rng(rng).normal(0.0, std, size=shape))
        self.weight = Parameter(w, device=device)                           # (V, C)

    def forward(self, idx) -> Tensor:
        """Integer ids of any shape (an array on any device, or a Tensor) -> idx.shape + (C,)."""
        if isinstance(idx, Tensor):
            idx = idx.data
        # the ids go where the table is (an explicit move, as CuPy requires)
        idx = backend.to_device(idx, self.weight.device)
        return ops.embedding(self.weight, idx)

    def trace(self, walk, idx):
        """:meth:`forward` over shapes: the ids are kept if the table trains."""
        return walk.embedding(walk.param(self.weight), idx, walk.label(self))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ---------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------


class LayerNorm(Module):
    r"""Normalise the last axis to zero mean and unit variance, then scale and shift.

    .. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\, w + b

    with w = 1 and b = 0 at initialisation (GPT-2: eps = 1e-5).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, dtype=None, device=None):
        super().__init__()
        self.normalized_shape = int(normalized_shape)
        self.eps = float(eps)
        dt = _host_dtype(dtype)
        C = (self.normalized_shape,)
        self.weight = Parameter(_initial(C, dt, np.ones), device=device)      # (C,)
        self.bias = Parameter(_initial(C, dt, np.zeros), device=device)       # (C,)

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def trace(self, walk, x):
        """:meth:`forward` over shapes: what ``ops.layer_norm`` saves."""
        return walk.layer_norm(x, walk.param(self.weight), walk.param(self.bias), walk.label(self))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps:g}"


# ---------------------------------------------------------------------------
# Dropout, with masks that can be recorded and replayed
# ---------------------------------------------------------------------------
#
# Gradient checkpointing runs a block's forward twice: once without keeping
# activations, and again inside backward to rebuild them. The second run must
# drop exactly the units the first one dropped, or the gradients belong to a
# different network. So while a checkpointed forward runs, every Dropout
# appends the mask it drew to a *tape*; during the recomputation each Dropout
# takes its mask from the tape, in the same order, instead of drawing a new one.
# (PyTorch saves and restores the random generator's state instead; keeping the
# boolean masks costs one byte an element and works the same on every backend.)

_tapes = threading.local()


class DropoutMaskTape:
    """The keep-masks of one forward pass, in the order the Dropout layers used them."""

    def __init__(self, masks=None):
        self.replaying = masks is not None
        self.masks = list(masks) if masks is not None else []
        self._next = 0

    def take(self, shape):
        """The next recorded mask (replay), checked against the shape asked for."""
        if self._next >= len(self.masks):
            raise RuntimeError(
                f"dropout replay: the recomputed forward asked for mask {self._next + 1} but only "
                f"{len(self.masks)} were recorded; the recomputation must run the same layers "
                "in the same order (was the model changed between forward and backward?)"
            )
        mask = self.masks[self._next]
        if tuple(mask.shape) != tuple(shape):
            raise RuntimeError(
                f"dropout replay: recorded mask {self._next + 1} has shape {tuple(mask.shape)}, "
                f"the recomputed forward needs {tuple(shape)}"
            )
        self._next += 1
        return mask

    @property
    def exhausted(self) -> bool:
        return self._next == len(self.masks)


def _current_tape() -> DropoutMaskTape | None:
    stack = getattr(_tapes, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def _using(tape: DropoutMaskTape):
    stack = _tapes.__dict__.setdefault("stack", [])
    stack.append(tape)
    try:
        yield tape
    finally:
        stack.pop()


def record_dropout_masks():
    """``with record_dropout_masks() as tape:`` every mask drawn inside lands in ``tape.masks``."""
    return _using(DropoutMaskTape())


@contextlib.contextmanager
def replay_dropout_masks(masks):
    """``with replay_dropout_masks(masks):`` Dropout layers reuse ``masks`` in order, drawing none.

    Raises if the recomputation used fewer masks than were recorded.
    """
    with _using(DropoutMaskTape(masks)) as tape:
        yield tape
    if not tape.exhausted:
        raise RuntimeError(
            f"dropout replay: {len(tape.masks)} masks were recorded but the recomputed "
            f"forward used {tape._next}; it must run the same layers as the original"
        )


class Dropout(Module):
    r"""Zero each element with probability p in training; scale the rest by 1/(1-p).

    .. math:: y = x \odot m / (1 - p), \qquad m_i \sim \mathrm{Bernoulli}(1 - p)

    so that :math:`\mathbb E[y] = x`. In eval mode, or with p = 0, it is the
    identity (no mask is drawn and no graph node is recorded).

    The mask is drawn by a :class:`backend.Generator` on the input's device
    (one generator per device, seeded with ``seed``), or taken from a replay
    tape during gradient checkpointing's recomputation.
    """

    def __init__(self, p: float = 0.0, seed: int | None = None):
        super().__init__()
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.seed = seed
        self._generators: dict[str, backend.Generator] = {}

    def _generator(self, device: str) -> backend.Generator:
        if device not in self._generators:
            self._generators[device] = backend.Generator(device, seed=self.seed)
        return self._generators[device]

    def keep_mask(self, shape, like: Tensor):
        """The boolean keep-mask for an input of ``shape`` on ``like``'s device, or
        None when the layer is inactive (eval mode, or p = 0).

        Drawn (or, under a replay tape, taken) exactly as :meth:`forward` does;
        for ops that apply dropout inside themselves (fused attention).
        """
        if not self.training or self.p == 0.0:
            return None
        tape = _current_tape()
        if tape is not None and tape.replaying:
            return tape.take(shape)
        # keep an element when a uniform [0, 1) draw is >= p: probability 1 - p
        mask = self._generator(like.device).random(tuple(shape), dtype=like.dtype) >= self.p
        if tape is not None:
            tape.masks.append(mask)
        return mask

    def forward(self, x: Tensor) -> Tensor:
        mask = self.keep_mask(x.shape, x)
        if mask is None:
            return x
        return ops.dropout(x, self.p, mask)

    def trace(self, walk, x):
        """:meth:`forward` over shapes: the keep-mask, drawn (or replayed) and kept."""
        return walk.dropout(x, self.p if self.training else 0.0, walk.label(self))

    def extra_repr(self) -> str:
        return f"p={self.p}"
