r"""What the forward pass saves: the engine's saving rules, applied to shapes.

The estimator does not copy the model. It builds the model's own module tree
shape-only (:func:`minipeft.nn.layers.shapes_only`: every parameter a
zero-stride array, so 65B parameters take no memory), lets the PEFT method
plan itself into it (``Method.plan``), and calls the tree's ``trace``
methods: each layer's ``trace`` sits beside its ``forward`` and makes the
same calls over a :class:`Walk` instead of the operators.

The :class:`Walk` below holds one rule per operator of
:mod:`minipeft.autograd.ops`: an op records a node only if an input requires
a gradient, and saves only what a gradient that will be computed needs
(``MatMul`` keeps its left input only if the right one trains, ``LayerNorm``
keeps :math:`\hat x` and :math:`1/\sigma`, ``Softmax`` its output...).
Tensors here are shapes with a flag; buffers are objects, so a view (a
reshape, k and v sliced from the fused qkv) points at the buffer it views
and a buffer saved twice counts once, exactly as the ledger deduplicates.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np


class Buf:
    """An abstract buffer: its bytes and what it holds ('act', 'param' or 'batch')."""

    __slots__ = ("nbytes", "kind")

    def __init__(self, nbytes, kind="act"):
        self.nbytes, self.kind = nbytes, kind


class Sym:
    """An abstract tensor: a view of a buffer, with a shape, that may require grad."""

    __slots__ = ("buf", "req", "shape")

    def __init__(self, buf, req, shape):
        self.buf, self.req, self.shape = buf, bool(req), tuple(shape)

    @property
    def n(self) -> int:
        return math.prod(self.shape)


class Walk:
    """The saved set of one forward pass (or of one recomputed block), built op by op.

    ``names`` gives each module of the traced model its dotted name (the
    labels of the saved buffers); ``training`` is the model's mode (dropout
    draws and keeps masks only in training).
    """

    def __init__(self, act_bytes: int, training: bool = True, names=None):
        self.s = act_bytes          # bytes of a floating activation entry
        self.training = training
        self.names = names or {}
        self.recording = True       # False inside a checkpointed block's first forward
        self.saved: dict[int, tuple[Buf, str]] = {}
        self.owner = "backbone"     # "method" while a method's own modules run
        self.owners: dict[int, str] = {}   # buffer -> the owner it was first saved under
        self.recompute_split = None  # owner -> bytes at the recomputation's peak
        self.throwaway = 0          # the largest working set of an op run without a graph
        self.tape = None            # dropout masks: a list (recording) or an iterator (replaying)
        self.params: dict[int, Sym] = {}
        self.recompute_peak = 0     # the largest saved set while a checkpointed block recomputes
        self.temporaries: dict[str, int] = {}   # label -> bytes of a layer's temporary

    # -- buffers ------------------------------------------------------------------
    def new(self, shape, req=False, itemsize=None, kind="act") -> Sym:
        n = math.prod(shape)
        return Sym(Buf(n * (self.s if itemsize is None else itemsize), kind), req, shape)

    def param(self, p) -> Sym | None:
        """A Parameter of the traced model (None stays None): one buffer, its requires_grad."""
        if p is None:
            return None
        if id(p) not in self.params:
            self.params[id(p)] = Sym(Buf(p.size * self.s, "param"), p.requires_grad, p.shape)
        return self.params[id(p)]

    def scalar(self) -> Sym:
        """A Python number an op turned into a 0-d array (kept by Mul when the other side trains)."""
        return self.new(())

    @staticmethod
    def detach(x) -> Sym:
        """``Tensor.detach``: the same buffer, needing no gradient."""
        return Sym(x.buf, False, x.shape)

    @staticmethod
    def view(x, shape=None) -> Sym:
        return Sym(x.buf, x.req, x.shape if shape is None else shape)

    def label(self, module, what="") -> str:
        return self.names.get(id(module), type(module).__name__) + what

    @contextlib.contextmanager
    def owned_by(self, owner: str):
        """As :meth:`ActivationLedger.owned_by <minipeft.autograd.function.ActivationLedger.owned_by>`:
        inside, a buffer saved for the first time is the ``owner``'s."""
        before, self.owner = self.owner, owner
        try:
            yield
        finally:
            self.owner = before

    def save(self, label, *items) -> None:
        for x in items:
            if x is not None and self.recording and id(x.buf) not in self.saved:
                self.saved[id(x.buf)] = (x.buf, label)
                self.owners[id(x.buf)] = self.owner

    def rec(self, *xs) -> bool:
        """Would ``Function.apply`` record a node for these inputs?"""
        return self.recording and any(x is not None and x.req for x in xs)

    def bytes(self, kind="act") -> int:
        return sum(b.nbytes for b, _ in self.saved.values() if b.kind == kind)

    # -- operators (autograd/ops.py) -------------------------------------------------
    def add(self, a, b) -> Sym:                 # Add: saves nothing
        return self.new(np.broadcast_shapes(a.shape, b.shape), self.rec(a, b))

    def mul(self, a, b, label) -> Sym:          # Mul: b if a needs grad, a if b does
        r = self.rec(a, b)
        if r:
            self.save(label, b if a.req else None, a if b.req else None)
        return self.new(np.broadcast_shapes(a.shape, b.shape), r)

    def div(self, a, b, label) -> Sym:          # Div: b always, y = a/b if b needs grad
        r = self.rec(a, b)
        y = self.new(np.broadcast_shapes(a.shape, b.shape), r)
        if r:
            self.save(label, b, y if b.req else None)
        return y

    def matmul(self, a, b, label) -> Sym:       # MatMul: b if a needs grad, a if b does
        r = self.rec(a, b)
        if r:
            self.save(label, b if a.req else None, a if b.req else None)
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return self.new(batch + (a.shape[-2], b.shape[-1]), r)

    @staticmethod
    def transpose(x) -> Sym:                    # the last two axes swapped: a view
        return Sym(x.buf, x.req, x.shape[:-2] + (x.shape[-1], x.shape[-2]))

    def linear(self, x, W, b, label) -> Sym:    # Linear (fused x W + b): as MatMul
        r = self.rec(x, W, b)
        if r:
            self.save(label, W if x.req else None, x if W.req else None)
        return self.new(x.shape[:-1] + W.shape[-1:], r)

    def quant_linear(self, x, b, out_features) -> Sym:   # QuantLinear: saves nothing
        return self.new(x.shape[:-1] + (out_features,), self.rec(x, b))

    def temporary(self, n, label) -> None:
        """An array of n entries (compute dtype) that lives only while one layer runs
        (a quantized weight dequantized for its product): not saved, not kept."""
        self.temporaries[label] = n * self.s

    def temporary_peak(self) -> int:
        """The largest temporary: one layer's runs at a time."""
        return max(self.temporaries.values(), default=0)

    def sum(self, x, axis: int) -> Sym:         # Sum over one axis: saves nothing
        axis %= len(x.shape)
        return self.new(x.shape[:axis] + x.shape[axis + 1:], self.rec(x))

    def concatenate(self, xs, axis) -> Sym:     # Concatenate: saves nothing (only the sizes)
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        return self.new(shape, self.rec(*xs))

    def causal_attention(self, qkv, n_head, keep, label) -> Sym:
        """CausalAttention: keeps one contiguous copy of q, k, v (qkv's size), the
        exponentiated scores E (B, nh, T, T) and the rows' 1/z (B, nh, T), plus the
        dropout keep-mask; the output is (B, T, C)."""
        B, T, C3 = qkv.shape
        if self.rec(qkv):
            self.save(label, self.new(qkv.shape), self.new((B, n_head, T, T)),
                      self.new((B, n_head, T)), keep)
        else:   # under no_grad the same three arrays are made and dropped when the op returns
            self.throwaway = max(self.throwaway, (B * T * C3 + B * n_head * T * (T + 1)) * self.s)
        return self.new((B, T, C3 // 3), self.rec(qkv))

    def layer_norm(self, x, w, b, label) -> Sym:
        r = self.rec(x, w, b)             # saves xhat if x or w needs grad, 1/sigma and w if x does
        if r:
            xhat = self.new(x.shape) if (x.req or w.req) else None
            rstd = self.new(x.shape[:-1]) if x.req else None
            self.save(label, xhat, rstd, w if x.req else None)
        return self.new(x.shape, r)

    def gelu(self, x, label) -> Sym:            # GELU: saves x (tanh u is recomputed)
        if self.rec(x):
            self.save(label, x)
        return self.new(x.shape, self.rec(x))

    def relu(self, x, label) -> Sym:            # ReLU: a one-byte mask
        if self.rec(x):
            self.save(label, self.new(x.shape, itemsize=1))
        return self.new(x.shape, self.rec(x))

    def saves_output(self, x, label) -> Sym:    # Tanh, Sqrt, Softmax, Exp: save y
        y = self.new(x.shape, self.rec(x))
        if y.req:
            self.save(label, y)
        return y

    tanh = sqrt = softmax = sigmoid = saves_output

    def sub(self, a, b) -> Sym:                 # Sub: saves nothing
        return self.add(a, b)

    def masked_fill(self, x, mask, label) -> Sym:  # MaskedFill: saves the boolean mask
        if self.rec(x):
            self.save(label, mask)
        return self.new(x.shape, self.rec(x))

    def keep_mask(self, shape, p) -> Sym | None:
        """nn.Dropout's boolean keep-mask (None when inactive); recorded or replayed by a checkpoint."""
        if not self.training or p == 0.0:
            return None
        if self.tape is not None and not isinstance(self.tape, list):
            return next(self.tape)                  # replayed: the buffer recorded before
        mask = self.new(shape, itemsize=1)
        if isinstance(self.tape, list):
            self.tape.append(mask)
        return mask

    def dropout(self, x, p, label) -> Sym:
        """ops.dropout: saves its keep-mask."""
        mask = self.keep_mask(x.shape, p)
        if mask is None:
            return x
        if self.rec(x):
            self.save(label, mask)
        return self.new(x.shape, self.rec(x))

    def cross_entropy(self, z, label) -> Sym:   # softmax p, safe int64 targets, valid mask
        if self.rec(z):
            rows = z.shape[:-1]
            self.save(label, self.new(z.shape), self.new(rows, itemsize=8),
                      self.new(rows, itemsize=1))
        return self.new((), self.rec(z))

    def embedding(self, w, idx, label) -> Sym:  # Embedding: saves the ids if W trains
        if self.rec(w):
            self.save(label, idx)
        return self.new(idx.shape + w.shape[-1:], self.rec(w))

    # -- nn/checkpoint.py ---------------------------------------------------------------
    def checkpoint(self, fn, *inputs, params=(), label="checkpoint") -> Sym:
        """Checkpoint: ``fn(walk, *inputs)`` runs once without keeping anything but its
        dropout masks; if the node is recorded it keeps its inputs and those masks,
        and backward recomputes ``fn`` with its own saved set on top of what the
        ledger holds then (:attr:`recompute_peak`)."""
        x = inputs[0]
        recorded = self.rec(*inputs) or any(p.requires_grad for p in params)
        self.recording, self.tape = False, []
        fn(self, self.view(x), *inputs[1:])           # under no_grad: drops masks only
        masks, self.recording, self.tape = self.tape, True, None
        if recorded:
            for t in list(inputs) + masks:
                self.save(label, t)
            inner = Walk(self.s, self.training, self.names)
            inner.saved = dict(self.saved)     # what the outer ledger holds at this point
            inner.owners, inner.owner = dict(self.owners), self.owner
            inner.tape = iter(masks)
            fn(inner, Sym(x.buf, x.req, x.shape), *inputs[1:])
            if inner.bytes() > self.recompute_peak:
                self.recompute_peak, self.recompute_split = inner.bytes(), inner.split(now=True)
        return self.new(x.shape, recorded)

    def split(self, now: bool = False) -> dict:
        """Activation bytes by owner (``backbone``, ``method``) at the peak (:meth:`peak`), or now."""
        if not now and self.recompute_peak > self.bytes():
            return dict(self.recompute_split)
        out = {"backbone": 0, "method": 0}
        for key, (b, _) in self.saved.items():
            if b.kind == "act":
                out[self.owners[key]] += b.nbytes
        return out

    def peak(self) -> int:
        """Without checkpointing nothing is released before backward starts: the end
        of forward is the peak. With it, the top block's recomputation may top it
        (the head is released by then)."""
        return max(self.bytes(), self.recompute_peak)
