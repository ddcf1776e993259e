r"""Accounted: the engine's own books during a real step.

Parameter arrays, gradient buffers, optimizer state arrays, the activation
ledger (``save_for_backward``, deduplicated by buffer) and the arrays
backward creates, followed from the moment they appear to the moment they
are freed (``weakref.finalize``).
"""

from __future__ import annotations

import weakref

import numpy as np

from .. import backend
from ..autograd.function import LEDGER
from ..nn.quant import QuantLinear
from .presets import CATEGORIES

# ---------------------------------------------------------------------------
# Accounted: the engine's books during a real step
# ---------------------------------------------------------------------------


def _owner(a):
    """The array object that owns ``a``'s memory: the end of its chain of views.

    It lives exactly as long as the memory does, so a ``weakref.finalize`` on
    it fires when the buffer is freed. (A strict array's memory is the NumPy
    array inside it.)
    """
    if isinstance(a, backend.StrictArray):
        a = a._a
    if isinstance(a, np.ndarray):
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a
    while getattr(a, "base", None) is not None:
        a = a.base
    return a


def _method_arrays(model):
    """Arrays a PEFT method keeps beside the model: ``(holder, key, array)``.

    Found generically, one level deep, in each adapter's Method object
    (a selective method's original values, a mask's indices) and in the
    wrappers' copies kept at merge; ``holder[key]`` is the array when the
    holder is a dict (None when it sits in a tuple and cannot be replaced).
    """
    out = []
    for method in getattr(model, "adapters", {}).values():
        for key, value in vars(method).items():
            if backend.is_array(value):
                out.append((method, key, value))
            elif isinstance(value, dict):
                out += [(value, k, a) for k, a in value.items() if backend.is_array(a)]
    for mod in model.modules():
        for value in getattr(mod, "_copies", {}).values():
            items = value if isinstance(value, tuple) else (value,)
            out += [(None, None, a) for a in items if backend.is_array(a)]
    return out


def _quantized_arrays(model):
    """The arrays a quantized Linear stores (codes, constants, second-level constants)."""
    return [a for m in model.modules() if isinstance(m, QuantLinear)
            for a in m._buffers.values() if a is not None]


def _optimizer_arrays(optimizer):
    """Working arrays an optimizer keeps besides its state: ``(holder, key, array)``.

    AdamW keeps one scratch array the size of its largest parameter for the
    intermediates of its in-place update: it holds nothing between updates, so
    it is not state, but it is memory the step allocates and keeps.
    """
    out = []
    for key, value in vars(optimizer).items():
        if key in ("state", "param_groups"):
            continue
        if backend.is_array(value):
            out.append((optimizer, key, value))
        elif isinstance(value, dict):
            out += [(value, k, a) for k, a in value.items() if backend.is_array(a)]
    return out


class _Books:
    """Live engine-owned arrays, by category, at every event of a step.

    Categories are assigned in the order of :data:`CATEGORIES`, and a buffer
    counts once, in the first category it belongs to (a gradient that
    backward adopted as a leaf's ``.grad`` is a gradient; the softmax that
    cross-entropy reuses as its gradient stays an activation until its node
    is released).
    """

    def __init__(self, model, optimizer, batch_arrays):
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters())
        self.param_ids = {}
        for p in self.params:
            bid = backend.buffer_id(p.data)
            kind = "weights_trainable" if p.requires_grad else "weights_frozen"
            self.param_ids.setdefault(bid, kind)
        # A quantized Linear's weight is buffers, not a parameter: its codes,
        # constants and second-level constants are frozen weights.
        for a in _quantized_arrays(model):
            self.param_ids.setdefault(backend.buffer_id(a), "weights_frozen")
        self.temporaries: dict[tuple, int] = {}   # dequantized weights, alive now
        self.keep = {backend.buffer_id(p.grad_mask) for p in self.params if p.grad_mask is not None}
        self.keep |= {backend.buffer_id(a) for _, _, a in _method_arrays(model)}
        # arrays in the books that are not where the model is (a mask's host indices
        # beside a model on the GPU): memory, but not the device's
        device = model.device
        self.elsewhere = sum(a.nbytes for _, _, a in _method_arrays(model)
                             if backend.device_of(a) != device)
        self.batch_ids = {backend.buffer_id(a) for a in batch_arrays}
        self.inflight: dict[tuple, int] = {}      # buffers followed from backward, still alive
        self.finalizers = []
        self.outputs = []                          # logits and loss, held by the caller
        self.events = []                           # (phase, {category: bytes}) at phase boundaries
        self.peak, self.peak_event = 0, None
        self.max = dict.fromkeys(CATEGORIES, 0)
        self.ledger_params = 0                     # most parameter bytes the ledger held at once
        self._held_ids = None                      # optimizer arrays, re-read outside backward
        self._grad_ids = {}
        # the activations by owner (the ledger's: backbone, method), now and at their peak
        self.split = {"backbone": 0, "method": 0}
        self.split_at_peak = dict(self.split)

    # -- following arrays made in backward --------------------------------------------
    def _freed(self, bid):
        self.inflight.pop(bid, None)

    def track(self, a) -> None:
        """Follow an array made in backward until its memory is freed.

        A ``weakref.finalize`` on the buffer's owner (:func:`_owner`) takes it
        out of ``inflight`` the moment the buffer goes, so a snapshot counts
        exactly the gradients alive then.
        """
        if not backend.is_array(a):
            return
        owner = _owner(a)
        bid = backend.buffer_id(owner)
        if bid in self.inflight:
            return
        self.inflight[bid] = bid[1]
        self.finalizers.append(weakref.finalize(owner, self._freed, bid))

    def hook(self, event, node, in_grads, grads) -> None:
        """Called by run_backward (``tensor.BACKWARD_HOOKS``) after each node's backward.

        Follows the input gradients the node's backward computed and, once
        they were handed on (``"passed"``), the sums waiting for pending
        nodes and the leaves' ``.grad`` they went into; then takes a
        snapshot, so the peak inside backward is seen node by node.
        """
        for g in in_grads:
            self.track(g)
        if event == "passed":
            for g in grads.values():
                self.track(g)
            for parent in node.parents:
                if getattr(parent, "grad", None) is not None:
                    self.track(parent.grad)
        self.snapshot(("backward", event, node.fn.__name__), in_backward=True)

    def temporary(self, a, layer=None) -> None:
        """Called by a QuantLinear (``nn.quant.DEQUANTIZE_HOOKS``) with each weight it
        dequantizes: followed until freed, and a snapshot taken while it lives, so
        the temporaries row and the peak see it."""
        owner = _owner(a)
        bid = backend.buffer_id(owner)
        if bid not in self.temporaries:
            self.temporaries[bid] = bid[1]
            self.finalizers.append(weakref.finalize(owner, self.temporaries.pop, bid, None))
        self.snapshot(("temporary", "dequantized", type(layer).__name__), in_backward=True)

    def close(self) -> None:
        for f in self.finalizers:
            f.detach()
        self.finalizers.clear()

    # -- the total at one moment ---------------------------------------------------------
    def _held(self) -> list[tuple[str, tuple]]:
        """(category, buffer) of the arrays that change only outside backward: optimizer
        state and scratch (re-read at the events outside backward)."""
        out = []
        for state in self.optimizer.state.values():
            for key, a in state.items():
                if key != "step" and backend.is_array(a):
                    out.append(("optimizer", backend.buffer_id(a)))
        out += [("other", backend.buffer_id(a)) for _, _, a in _optimizer_arrays(self.optimizer)]
        return out

    def _grad_id(self, p):
        """buffer_id of p.grad, cached while p.grad is the same array (it is asked often)."""
        cached = self._grad_ids.get(id(p))
        if cached is None or cached[0] is not p.grad:
            cached = self._grad_ids[id(p)] = (p.grad, backend.buffer_id(p.grad))
        return cached[1]

    def categories(self, in_backward=False) -> dict:
        """Bytes of every live engine-owned buffer now, by category; each buffer once.

        The buffers are added in the order of :data:`CATEGORIES`, and a
        buffer already added is skipped: a parameter the ledger holds (a
        frozen weight a MatMul keeps) stays a weight, a gradient adopted as
        a leaf's ``.grad`` stays a gradient.
        """
        seen, cats = set(), dict.fromkeys(CATEGORIES, 0)

        def add(cat, bid):
            if bid not in seen:
                seen.add(bid)
                cats[cat] += bid[1]

        # The optimizer's arrays change only in step(): inside backward the
        # list read at the last event outside it is still right (and cheaper).
        if not in_backward or self._held_ids is None:
            self._held_ids = self._held()
        for bid, kind in self.param_ids.items():
            add(kind, bid)
        for bid in self.keep:
            add("bookkeeping", bid)
        for cat, bid in self._held_ids:
            if cat == "optimizer":
                add(cat, bid)
        for p in self.params:
            if p.grad is not None:
                add("gradients", self._grad_id(p))
        for bid in self.batch_ids:
            add("batch", bid)
        # The ledger's parameter arrays are noted (the report says how much it
        # held) but were counted as weights above; the rest are activations.
        ledger = LEDGER.buffer_ids()
        self.ledger_params = max(self.ledger_params,
                                 sum(b[1] for b in ledger if b in self.param_ids))
        split = {"backbone": 0, "method": 0}
        for bid in ledger:
            if bid not in seen:
                split[LEDGER.owner_of(bid)] += bid[1]
            add("activations", bid)
        self.split = split
        for bid in list(self.temporaries):
            add("temporaries", bid)
        for a in self.outputs:
            add("other", backend.buffer_id(a))
        for bid in list(self.inflight):
            add("other", bid)
        for cat, bid in self._held_ids:
            if cat == "other":
                add(cat, bid)
        return cats

    def snapshot(self, label, in_backward=False) -> dict:
        """Take the books at one event: fold it into the peak and each category's maximum."""
        cats = self.categories(in_backward)
        if not in_backward:      # the phase boundaries are kept; backward's events only fold in
            self.events.append((label, cats))
        total = sum(cats.values())
        if total > self.peak:
            self.peak, self.peak_event = total, (label, cats)
        if cats["activations"] > self.max["activations"]:
            self.split_at_peak = dict(self.split)
        for k, v in cats.items():
            self.max[k] = max(self.max[k], v)
        return cats

    def event(self, label) -> dict:
        """The categories at the phase boundary ``label`` (one of :data:`PHASES`)."""
        return next(c for lab, c in self.events if lab == label)


