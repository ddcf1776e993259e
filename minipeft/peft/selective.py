r"""Selective methods: train a chosen subset of the base's own weights.

Nothing is added to the model. What changes is *which* existing parameters
train, and that is only ``requires_grad`` (and, for element masks, a
``grad_mask``):

* :class:`FullMethod`: everything (the baseline, through the same entry point);
* :class:`BitFitMethod`: only bias terms;
* :class:`LayerSelectMethod`: chosen blocks, components, parameter types;
* :class:`MaskMethod`: a fraction of the *entries* of chosen weights.

Freezing against masking (the contrast the lessons draw):

* a **frozen** parameter (``requires_grad=False``) has no gradient buffer and
  its gradient product is never formed: "frozen means not computed";
* a **masked** parameter's gradient is computed in full and multiplied by a
  boolean mask, and the optimizer keeps state only for the k selected
  entries: "masked means computed, then masked". The full-size gradient is
  still paid for.

Several selective adapters can share one base: the one that is active holds
its trained values in the base's arrays; switching away stores them and puts
the base's original values back (a copy of the selected entries is kept for
that), so switching back and forth is exact.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..nn.module import base_name
from ..nn.quant import QuantLinear
from .model import _base_params as base_parameters
from .model import register_method
from .tuner import Method, MethodPlan, _check_names_shapes, find_targets, move_array

# ---------------------------------------------------------------------------
# The cost of a mask
# ---------------------------------------------------------------------------


def mask_state_bytes(n: int, k: int, index_bytes: int = 8) -> dict:
    r"""Bytes that training k of n entries of one weight costs, beside full training.

    With fp32 AdamW, full training of the weight costs a gradient (4n) and two
    moments (8n). The masked version still computes the full gradient (4n),
    keeps the moments only for the k selected entries (8k), and must know
    *which* entries: a boolean mask (1 byte an entry, n) during training and
    k indices (``index_bytes`` each: 8 for int64, as much as both moments) in
    the optimizer and the adapter file.
    """
    return {
        "full_gradient": 4 * n,
        "full_adam_state": 8 * n,
        "masked_gradient": 4 * n,
        "masked_adam_state": 8 * k,
        "bool_mask": n,
        "indices": index_bytes * k,
    }


def break_even_density(index_bytes: int = 8, bool_mask: bool = True) -> float:
    r"""Density below which a mask's optimizer state plus its bookkeeping beats full Adam.

    Full Adam state is :math:`8n`. Masked: :math:`8k + b\,k` (moments and
    indices) plus :math:`n` if a boolean mask is kept too. Setting
    :math:`d = k/n`, masking saves only while

    .. math:: d < \frac{8 - [\text{mask}]}{8 + b},

    i.e. below 7/16 = 0.4375 with int64 indices and a boolean mask, 1/2
    with int64 indices alone, 7/12 with int32 indices and a mask.
    """
    return (8 - (1 if bool_mask else 0)) / (8 + index_bytes)


# ---------------------------------------------------------------------------
# The shared mechanism
# ---------------------------------------------------------------------------


class SelectiveMethod(Method):
    """Train chosen base parameters; keep their original values to switch away exactly."""

    #: FullMethod keeps no copy (a second full model); it cannot be switched off
    keep_originals = True

    def select(self, base) -> list[str]:  # pragma: no cover - abstract
        """Names of the parameters of the base model ``base`` this method trains, in its order."""
        raise NotImplementedError

    def _base_params(self, base) -> dict:
        # the base's own parameters only: the A and B of a LoRA adapter in
        # h.1.attn are not "attention weights of block 1" to select
        return {base_name(n): p for n, p in base_parameters(base)}

    def _selected(self, base) -> list[str]:
        names = self.select(base)
        if not names:
            raise ValueError(f"{type(self.config).__name__} selected no parameter of this model")
        return names

    def plan(self, base) -> MethodPlan:
        """The same selection in a shape-only base: the chosen parameters train, and the
        copy of each that :meth:`inject` keeps (float entries) is the method's bookkeeping."""
        params = self._base_params(base)
        names = self._selected(base)
        for n in names:
            params[n].requires_grad = True
        return MethodPlan(copies=[(params[n].size, "float") for n in names]
                          if self.keep_originals else [])

    def _refuse_quantized(self, base) -> None:
        """A quantized weight is codes, not a parameter: selecting one to train is an error."""
        quantized = [base_name(n) + ".weight" for n, m in base.named_modules()
                     if isinstance(m, QuantLinear)]
        if not quantized:
            return
        # select once more with the quantized weights in view, as if they were float
        own = self._base_params
        self._base_params = lambda base_: {**own(base_), **dict.fromkeys(quantized)}
        try:
            chosen = [n for n in self.select(base) if n in set(quantized)]
        finally:
            del self._base_params
        if chosen:
            raise ValueError(
                f"{type(self.config).__name__} would train quantized weights "
                f"({chosen[:3]}{' ...' if len(chosen) > 3 else ''}), which are codes, not "
                "parameters. Full fine-tuning and masks need a float base; for layer "
                "selection, call get_peft_model first and quantize_model after: it quantizes "
                "only the frozen blocks.")

    def inject(self, pm) -> None:
        """Choose the parameters (:meth:`select`) and copy their values as the base has them.

        Nothing is added to the model and nothing trains yet: which parameters
        train is set when the adapter is activated. The copies let
        :meth:`deactivate` put the base's own values back.
        """
        self._refuse_quantized(pm.base_model)
        self.names = self._selected(pm.base_model)
        params = self._base_params(pm.base_model)
        self.params = {n: params[n] for n in self.names}
        self.original = ({n: p.data.copy() for n, p in self.params.items()}
                         if self.keep_originals else None)
        self.stored = None
        self.is_active = False

    def named_parameters(self, pm):
        return dict(self.params)

    def activate(self, pm) -> None:
        if self.stored is not None:
            self._write(self.stored)
            self.stored = None
        super().activate(pm)
        self.is_active = True

    def deactivate(self, pm) -> None:
        super().deactivate(pm)
        if self.is_active and self.original is not None:
            self.stored = self._read()
            self._write(self.original)
        self.is_active = False

    def _read(self) -> dict:
        return {n: p.data.copy() for n, p in self.params.items()}

    def _write(self, values: dict) -> None:
        with no_grad():
            for n, p in self.params.items():
                p.data[...] = values[n]
                p._bump()

    def state_dict(self, pm) -> dict:
        return self._read() if self.stored is None else dict(self.stored)

    def load_state_dict(self, pm, state) -> None:
        own = self.named_parameters(pm)
        _check_names_shapes(type(self.config).__name__, own, state)
        values = {n: backend.to_device(backend.asnumpy(state[n]).astype(p.dtype), p.device)
                  for n, p in own.items()}
        if self.is_active or self.original is None:
            self._write(values)
        else:
            # an inactive adapter keeps its values aside; the base's arrays may
            # be holding the active adapter's trained values and stay untouched
            self.stored = values

    def remove(self, pm) -> None:
        self.stored = None

    def to(self, pm, device, dtype) -> None:
        # the original and the set-aside values move with the parameters,
        # or switching would write host arrays into device arrays
        for kept in (self.original, self.stored):
            if kept is not None:
                for n in kept:
                    kept[n] = move_array(kept[n], device, dtype)

    def extra_flops_per_token(self, pm) -> int:
        """Nothing at inference: the trained values sit in the base's own weights."""
        return 0

    def detach_keep(self, pm) -> None:
        # the trained values already live in the base's arrays
        self.original = None
        self.stored = None


def _blocks_of(name: str):
    m = re.match(r"h\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _component(name: str) -> str:
    if name.startswith(("wte.", "wpe.")):
        return "embeddings"
    if name.startswith("ln_f."):
        return "ln_f"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    if ".ln_1." in name or ".ln_2." in name:
        return "ln"
    return "other"


@register_method("FULL")
class FullMethod(SelectiveMethod):
    """Full fine-tuning: every parameter of the base trains."""

    keep_originals = False

    def select(self, base):
        return list(self._base_params(base))


@register_method("BITFIT")
class BitFitMethod(SelectiveMethod):
    r"""BitFit: train the bias terms only (:math:`y = xW + b`, only b moves)."""

    def select(self, base):
        names = [n for n in self._base_params(base) if n.endswith(".bias")]
        if self.config.target_modules is not None:
            mods = find_targets(base, self.config.target_modules)
            mods = {base_name(m) for m in mods}
            names = [n for n in names if n.rsplit(".", 1)[0] in mods]
        return names


@register_method("SELECTIVE")
class LayerSelectMethod(SelectiveMethod):
    """Train the parameters that pass every filter of a LayerSelectConfig."""

    def select(self, base):
        """The base parameters that pass every filter the config sets (an unset one passes all).

        * ``layers``: the parameter lies in one of these blocks (``h.<i>.``;
          negative indices count from the end). Embeddings and ``ln_f`` lie
          in no block: they pass only when ``components`` names them, so
          ``layers=[-1], components=["attn", "ln_f"]`` trains the last
          block's attention and the final LayerNorm.
        * ``components``: its part of the model, read from its name
          (``attn``, ``mlp``, ``ln``, ``embeddings``, ``ln_f``).
        * ``param_types``: the last part of its name (``weight``, ``bias``).
        * ``patterns``: a regular expression found anywhere in its name.

        An index outside the model's blocks is an error, not an empty choice.
        """
        cfg = self.config
        n_layer = base.config.n_layer
        layers = None
        if cfg.layers is not None:
            bad = [i for i in cfg.layers if not -n_layer <= i < n_layer]
            if bad:
                raise ValueError(f"layers {bad} out of range for a model with {n_layer} blocks")
            layers = {i % n_layer for i in cfg.layers}
        out = []
        for n in self._base_params(base):
            block, comp = _blocks_of(n), _component(n)
            if layers is not None and (block is None or block not in layers) and not (
                cfg.components and comp in ("embeddings", "ln_f") and comp in cfg.components
            ):
                continue
            if cfg.components is not None and comp not in cfg.components:
                continue
            if cfg.param_types is not None and n.rsplit(".", 1)[-1] not in cfg.param_types:
                continue
            if cfg.patterns is not None and not any(re.search(p, n) for p in cfg.patterns):
                continue
            out.append(n)
        return out


@register_method("MASK")
class MaskMethod(SelectiveMethod):
    r"""Element masks: train k = round(density * n) entries of each chosen weight.

    The selected entries of each weight are stored as flat indices (int32:
    every weight here has fewer than :math:`2^{31}` entries). While active,
    each weight carries a boolean ``grad_mask``; the engine multiplies its
    (fully computed) gradient by it and the optimizer keeps state for the
    selected entries only.
    """

    def __init__(self, config, name, calibration_batch=None, indices=None):
        super().__init__(config, name)
        self.calibration_batch = calibration_batch
        #: weight name -> flat indices to train, given instead of chosen (loading)
        self.given_indices = indices

    @classmethod
    def loading_kwargs(cls, state: dict) -> dict:
        # a saved mask carries its entries: loading takes them as they are,
        # without scoring (a gradient mask would otherwise need its calibration batch)
        suffix = ".indices"
        return {"indices": {k[:-len(suffix)]: v for k, v in state.items() if k.endswith(suffix)}}

    def select(self, base):
        mods = find_targets(base, self.config.target_modules)
        return [base_name(m) + ".weight" for m in mods]

    def entries(self, n: int) -> int:
        r"""How many of a weight's n entries train: :math:`k = \max(1, \operatorname{round}(d\,n))`."""
        return max(1, int(round(self.config.density * n)))

    def plan(self, base) -> MethodPlan:
        """Each target weight has requires_grad and k entries the optimizer updates; the
        method keeps the k original values and their int32 flat indices."""
        plan = MethodPlan()
        params = self._base_params(base)
        for n in self.select(base):
            k = plan.masked[n] = self.entries(params[n].size)
            params[n].requires_grad = True
            plan.copies += [(k, "float"), (k, "int32")]
        return plan

    def inject(self, pm) -> None:
        r"""Choose the entries to train in each target weight and keep their base values.

        Each weight of n entries trains :math:`k = \max(1, \operatorname{round}(d\,n))`
        of them, d the ``density``: those with the largest scores (random,
        :math:`|w|`, or :math:`|\partial L/\partial w|` on the calibration
        batch; ties go to the earlier position). They are kept as sorted int32
        flat indices into the weight, ``self.indices[name]`` (k,). Loading an
        adapter file gives the indices instead (``indices=``): they are checked
        and taken as they are, without scoring.

        Only the k base values at those entries are copied (not the whole
        weight), which is all :meth:`deactivate` needs to put the base back.
        The boolean ``grad_mask`` that confines training to them is set by
        :meth:`activate`.
        """
        self._refuse_quantized(pm.base_model)
        self.names = self.select(pm.base_model)
        params = self._base_params(pm.base_model)
        self.params = {n: params[n] for n in self.names}
        self.indices = {}
        if self.given_indices is not None:
            unknown = sorted(set(self.given_indices) - set(self.params))
            missing = sorted(set(self.params) - set(self.given_indices))
            if unknown or missing:
                raise ValueError(
                    f"mask adapter weights do not fit this model: indices for {unknown} "
                    f"that the config does not target, none for {missing}"
                )
            for n, p in self.params.items():
                self.indices[n] = self._checked_indices(n, p, self.given_indices[n])
            self.original = {n: self._take(p.data, n) for n, p in self.params.items()}
            self.stored = None
            self.is_active = False
            return
        scores = self._scores(pm)                       # name -> (n,) host scores, flat order
        for n, p in self.params.items():
            k = self.entries(p.size)
            s = scores[n]
            # the k largest scores (ties broken by position: argsort is stable)
            idx = np.argsort(-s, kind="stable")[:k]
            self.indices[n] = np.sort(idx).astype(np.int32)
        self.original = {n: self._take(p.data, n) for n, p in self.params.items()}
        self.stored = None
        self.is_active = False

    def _scores(self, pm) -> dict:
        """A host score per entry: random, |w|, or |dL/dw| on a calibration batch."""
        sel = self.config.selection
        if sel == "random":
            rng = np.random.default_rng(self.config.seed)
            return {n: rng.random(p.size) for n, p in self.params.items()}
        if sel == "magnitude":
            # each (n,): flat, in the order the indices count entries
            return {n: np.abs(backend.asnumpy(p.data)).reshape(-1) for n, p in self.params.items()}
        if self.calibration_batch is None:
            raise ValueError(
                "selection='gradient' needs a calibration batch: "
                "get_peft_model(model, config, calibration_batch=(idx, targets))"
            )
        idx, targets = self.calibration_batch
        flags = {n: p.requires_grad for n, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad = True
            p.grad = None
        # in eval mode: the selection should not depend on (or advance) the
        # model's dropout draws
        was_training = pm.base_model.training
        pm.base_model.eval()
        try:
            _, loss = pm.base_model(idx, targets)
            loss.backward()
        finally:
            pm.base_model.train(was_training)
        scores = {n: np.abs(backend.asnumpy(p.grad)).reshape(-1)        # (n,) each
                  for n, p in self.params.items()}
        for n, p in self.params.items():
            p.requires_grad = flags[n]
            p.grad = None
        # gradients of other trainable parameters from this pass are not wanted
        for p in pm.base_model.parameters():
            p.grad = None
        return scores

    @staticmethod
    def _checked_indices(n, p, idx):
        """Flat indices from a file as sorted, distinct int32 entries of ``p``."""
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(f"{n}.indices: expected a 1-D integer array, got {idx.dtype} "
                             f"{idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= p.size):
            raise ValueError(f"{n}.indices: entries must lie in [0, {p.size})")
        if idx.size and not (np.diff(idx) > 0).all():
            raise ValueError(f"{n}.indices: entries must be sorted and distinct")
        return idx.astype(np.int32)

    def _take(self, data, n):
        """A copy of weight ``n``'s selected entries, (k,)."""
        flat = data.reshape(-1)                                     # (in, out) -> (in*out,), a view
        return flat[backend.to_device(self.indices[n], backend.device_of(data))].copy()

    def _put(self, data, n, values):
        """Write (k,) ``values`` into weight ``n``'s selected entries, in place."""
        flat = data.reshape(-1)                                     # a view: writes reach data
        flat[backend.to_device(self.indices[n], backend.device_of(data))] = values

    def _read(self):
        return {n: self._take(p.data, n) for n, p in self.params.items()}

    def _write(self, values):
        with no_grad():
            for n, p in self.params.items():
                self._put(p.data, n, values[n])
                p._bump()

    def activate(self, pm) -> None:
        super().activate(pm)
        if not self.trainable:
            return
        # a boolean mask over each weight, True at its k entries: the engine
        # multiplies the weight's full gradient by it
        for n, p in self.params.items():
            xp = backend.xp(p.data)
            mask = xp.zeros(p.size, dtype=bool)                     # (n,) flat, like the indices
            mask[backend.to_device(self.indices[n], p.device)] = True
            p.grad_mask = mask.reshape(p.shape)                     # (n,) -> the weight's shape

    def deactivate(self, pm) -> None:
        super().deactivate(pm)
        for p in self.params.values():
            p.grad_mask = None

    def deactivate_training(self, pm) -> None:
        super().deactivate_training(pm)
        for p in self.params.values():
            p.grad_mask = None

    def trainable_count(self, pm) -> int:
        return int(sum(len(i) for i in self.indices.values()))

    def state_dict(self, pm) -> dict:
        values = self._read() if self.stored is None else self.stored
        out = {}
        for n in self.names:
            out[f"{n}.indices"] = self.indices[n]
            out[f"{n}.values"] = backend.asnumpy(values[n])
        return out

    def load_state_dict(self, pm, state) -> None:
        expected = {f"{n}.{k}" for n in self.names for k in ("indices", "values")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"mask adapter weights do not fit this model: missing {missing}, "
                f"unexpected {unexpected}"
            )
        # check every entry before changing anything
        indices = {n: self._checked_indices(n, p, state[f"{n}.indices"])
                   for n, p in self.params.items()}
        for n, idx in indices.items():
            shape = tuple(np.shape(state[f"{n}.values"]))
            if shape != idx.shape:
                raise ValueError(
                    f"mask adapter weights do not fit this model: {n}.values has shape "
                    f"{shape}, its indices {idx.shape}"
                )
        was_active = self.is_active
        if was_active:
            self.deactivate(pm)
        self.indices = indices
        # the base's own values at the (possibly new) entries: with this adapter
        # switched off the base holds them, unless another adapter is active
        with contextlib.nullcontext() if was_active else pm._bare_base():
            self.original = {n: self._take(p.data, n) for n, p in self.params.items()}
        self.stored = {n: backend.to_device(np.asarray(state[f"{n}.values"]).astype(p.dtype),
                                            p.device)
                       for n, p in self.params.items()}
        if was_active:
            self.activate(pm)
