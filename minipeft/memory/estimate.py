r"""Estimated: one training step's memory in closed form, from the config, the method and the batch.

No weight is allocated, so it answers for the reference model and for 7B or
65B alike. The GPT's own module tree is built shape-only and the method plans
itself into it (``Method.plan``, by its ``inject``'s selection): weights,
gradients, optimizer state and bookkeeping follow from which parameters
train and what the method adds and copies; activations from the planned
model's ``trace`` over the engine's saving rules (:mod:`.trace`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from ..nn.gpt import GPT, GPTConfig
from ..nn.layers import shapes_only
from ..nn.module import base_name
from ..nn.quant import FORMATS, QuantLinear, quantize_model
from ..peft.config import PeftConfig, config_class, method_config
from ..peft.model import METHOD_CLASSES
from ..peft.tuner import MethodPlan
from .presets import CATEGORIES, LABELS, OPTIMIZERS, GiB, MiB, Precision, _as_config, _fmt_bytes, _precision
from .trace import Walk

# ---------------------------------------------------------------------------
# The model's own structure, shape-only, with the method planned into it
# ---------------------------------------------------------------------------


def _shape_only_gpt(cfg: GPTConfig) -> GPT:
    """The GPT's module tree at ``cfg``'s sizes, every parameter a zero-stride array (no memory)."""
    with shapes_only():
        return GPT(cfg)


def base_parameters(cfg: GPTConfig) -> dict[str, int]:
    r"""Every parameter of a GPT with its number of entries, in the model's order.

    Read from the model itself, built shape-only. In closed form:

    .. math:: N = VC + n_{pos}C + L\,(12C^2 + 13C) + 2C

    (per block: :math:`C\cdot 3C + C^2 + C\cdot 4C + 4C\cdot C = 12C^2` weights,
    :math:`3C + C + 4C + C = 9C` biases and four LayerNorm vectors of C).
    """
    return {n: p.size for n, p in _shape_only_gpt(_as_config(cfg)).named_parameters()}


def _method_config(method, knobs):
    if isinstance(method, PeftConfig):
        if knobs:
            raise TypeError("give method knobs in the config object, not as keywords as well")
        return method
    cls = config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no knobs {unknown}; it has {sorted(names)}")
    return method_config(method, **knobs)


def _planned(cfg: GPTConfig, pc, training: bool, quantize=None):
    """(shape-only GPT with the method planned into it, its base parameters, the MethodPlan).

    Every base parameter starts frozen; the method's own :meth:`~minipeft.peft.tuner.Method.plan`
    says which train, stands its wrappers at its targets and names what it adds,
    by the selection its ``inject`` uses. With ``quantize`` (format, blocksize,
    double quantization), :func:`~minipeft.nn.quant.quantize_model` then
    replaces the Linears that stayed frozen, shape-only as well.
    """
    if pc.peft_type not in METHOD_CLASSES:
        raise ValueError(f"no method registered for {pc.peft_type}")
    model = _shape_only_gpt(cfg).train(training)
    base = dict(model.named_parameters())
    model.freeze()
    plan = METHOD_CLASSES[pc.peft_type](pc, "default").plan(model)
    if quantize is not None:
        with shapes_only():
            quantize_model(model, *quantize)
    return model, base, plan


def _activations(model, plan: MethodPlan, B: int, T: int, act_bytes: int) -> Walk:
    """The walk of one training forward of the planned model: its ``trace`` methods over shapes."""
    names = {id(m): base_name(n) for n, m in model.named_modules()}
    names |= {id(m.wrapped): names[id(m)] for m in model.modules() if hasattr(m, "wrapped")}
    walk = Walk(act_bytes, model.training, names)
    idx = walk.new((B, T), itemsize=8, kind="batch")                     # the batch's ids
    with walk.owned_by("method"):            # as PeftModel.forward books forward_inputs
        inputs = plan.inputs(walk, idx) if plan.inputs is not None else {}
    model.trace(walk, idx, **inputs)
    return walk


# ---------------------------------------------------------------------------
# Estimated: the closed form
# ---------------------------------------------------------------------------


@dataclass
class Estimate:
    r"""What one training step holds, from the closed form (see :func:`estimate`).

    ``bytes`` maps each of :data:`CATEGORIES` to bytes; ``peak`` is the
    estimated largest total at one moment. ``activation_items`` breaks the
    saved activations down by what saved them (summed over blocks).
    """

    config: GPTConfig
    method: str
    peft_config: object
    optimizer: str
    precision: Precision
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    n_params: int                 # every parameter, base and added
    n_trainable: int              # entries with requires_grad (a masked weight counts whole)
    n_trained: int                # entries the optimizer updates (a mask's k)
    bytes: dict
    peak: float
    activation_items: dict
    first_step: bool = False
    #: the activations at their peak by owner: ``backbone`` (what the frozen model
    #: keeps for the gradient to pass through it) and ``method`` (its own modules')
    activation_split: dict = dataclasses.field(default_factory=dict)
    #: bytes of the largest throw-away working set of an op run without a graph (a
    #: no_grad backbone's attention: its q/k/v copy, E and 1/z): temporaries, not
    #: activations (nothing keeps them past the op), so in no category
    no_grad_temporaries: int = 0
    quantize: str | None = None   # the frozen Linears' storage format (None: float)

    @property
    def training_bytes_per_param(self) -> float:
        """Weights, gradients and optimizer state per parameter of the model (no activations)."""
        b = self.bytes
        return (b["weights_frozen"] + b["weights_trainable"] + b["gradients"] + b["optimizer"]) \
            / self.n_params

    def fits(self, card_gib: float) -> bool:
        """Does the estimated peak fit a card of ``card_gib`` GiB?"""
        return self.peak <= card_gib * GiB

    def breakdown(self, unit: int = MiB) -> str:
        """The saved activations by what keeps them, summed over blocks, largest first."""
        items = sorted(self.activation_items.items(), key=lambda kv: -kv[1])
        name = "GiB" if unit == GiB else "MiB"
        return f"activations by what keeps them ({name}, summed over blocks): " + ", ".join(
            f"{k} {v / unit:,.2f}" for k, v in items)

    def table(self, unit: int | None = None, detail: bool = False) -> str:
        unit = unit or (GiB if self.peak >= GiB else MiB)
        ck = ", gradient checkpointing" if self.gradient_checkpointing else ""
        ck += f", frozen Linears in {self.quantize}" if self.quantize else ""
        lines = [
            f"estimate: {self.method} on a {self.config.n_layer}-layer, {self.config.n_embd}-wide GPT "
            f"({self.n_params:,d} parameters, {self.n_trained:,d} trained), batch "
            f"{self.batch_size} x {self.seq_len}, {self.precision.name}, {self.optimizer}{ck}",
        ]
        for cat in CATEGORIES:
            lines.append(f"  {LABELS[cat]:<30} {_fmt_bytes(self.bytes[cat], unit):>14}")
        lines.append(f"  {'peak (estimated)':<30} {_fmt_bytes(self.peak, unit):>14}")
        split = self.activation_split
        lines.append(f"  activations kept by the backbone {_fmt_bytes(split['backbone'], unit)}, "
                     f"by the method {_fmt_bytes(split['method'], unit)}")
        if self.no_grad_temporaries:
            lines.append(f"  (throw-away, in no category: a no_grad op's working set up to "
                         f"{_fmt_bytes(self.no_grad_temporaries, unit)})")
        if detail:
            lines.append("  " + self.breakdown(unit))
        return "\n".join(lines)

    __str__ = table


def _other_live(cfg: GPTConfig, plan: MethodPlan, B: int, T: int, s: int, scratch: float = 0) -> float:
    r"""Estimated peak of the other live arrays: outputs held and activation gradients in flight.

    The caller holds the logits (:math:`N'V` entries, with :math:`N' = B(T + P_{prompt})`
    the positions the model runs over) and the loss through backward. The
    largest set of activation gradients alive together is in the top block's
    MLP: the residual stream's gradient (:math:`N'C`) waits while GELU turns
    its incoming gradient (:math:`4N'C`) into a new one (:math:`4N'C`):
    :math:`9N'C`. With a prefix the attention runs step by step, and its
    softmax holds two gradients of the scores' size instead
    (:math:`N'C + 2 B n_h T (P+T)`) when that is larger. After backward, the
    optimizer's scratch array (``scratch`` bytes) joins the logits instead.
    """
    Tq, P = T + plan.prompt_tokens, plan.prefix_tokens
    N = B * Tq
    inflight = 9 * N * cfg.n_embd
    if P:
        inflight = max(inflight, N * cfg.n_embd + 2 * B * cfg.n_head * Tq * (P + Tq))
    return (N * cfg.vocab_size + 1) * s + max(inflight * s, scratch)


def full_finetuning_activations(config, batch_size: int, seq_len: int, act_bytes: int = 4) -> dict:
    r"""Saved activations of full fine-tuning in closed form (no dropout, no cache), by part.

    With N = BT positions, C the width, :math:`n_h` heads and V the vocabulary,
    each block keeps

    .. math:: \underbrace{2(NC + N)}_{\text{2 LayerNorms: } \hat x,\ 1/\sigma}
        + \underbrace{(1 + 1 + 1 + 4)\,NC}_{\text{the 4 Linears' inputs}}
        + \underbrace{3NC + n_h B T^2 + n_h B T}_{\text{attention: } q,k,v;\ E;\ 1/z}
        + \underbrace{4NC}_{\text{GELU's input}}
        = 16NC + 2N + n_h B T^2 + n_h B T

    entries, and the head keeps ln_f's :math:`NC + N`, the LM head's input
    NC, and cross-entropy's softmax NV with its int64 targets and boolean
    mask (9 bytes a position); the position ids are T int64. The
    :math:`T^2` term overtakes the rest of a block once :math:`n_h T > 16C`.
    Returns ``{"block": ..., "blocks": ..., "head": ..., "total": ...}`` in bytes.
    """
    cfg = _as_config(config)
    B, T, s = int(batch_size), int(seq_len), act_bytes
    N, C, nh, V = B * T, cfg.n_embd, cfg.n_head, cfg.vocab_size
    block = (16 * N * C + 2 * N + nh * B * T * T + nh * B * T) * s
    head = (N * C + N + N * C + N * V) * s + 9 * N + 8 * T
    return {"block": block, "blocks": cfg.n_layer * block, "head": head,
            "total": cfg.n_layer * block + head}


def estimate(config="reference", method="full", optimizer: str = "adamw", batch_size: int = 16,
             seq_len: int | None = None, dtype="fp32", *, gradient_checkpointing: bool | None = None,
             index_dtype: str = "int64", first_step: bool = False, training: bool = True,
             quantize: str | None = None, blocksize: int = 64, double_quant: bool = True,
             **knobs) -> Estimate:
    r"""The memory of one training step, per category, in closed form (no arrays are built).

    Args:
        config: a :class:`GPTConfig` or a preset name (:data:`PRESETS`:
            ``reference``, ``gpt2`` ... ``gpt2-xl``, ``1b``, ``7b``, ``65b``).
        method: a method name (``full``, ``lora``, ``bitfit``, ...; its knobs as
            keywords, e.g. ``r=8``) or a PEFT config object.
        optimizer: ``adamw`` (two moments), ``sgd_momentum`` (one) or ``sgd``.
        batch_size, seq_len: the batch, B sequences of T tokens (T: 128 or, if
            shorter, the model's ``n_positions``, unless given).
        dtype: ``fp32``, ``mixed``, or the rules of thumb ``mixed-int8`` and
            ``mixed-int4`` (see :data:`DTYPES`).
        gradient_checkpointing: overrides the config's flag.
        index_dtype: the optimizer's index of a mask's entries (``int64`` or ``int32``).
        first_step: the optimizer has no state yet during backward (its first step).
        training: the model is in training mode (dropout draws and saves masks).
        quantize: store the frozen Linears in ``nf4``, ``fp4``, ``int4`` or ``int8``
            (:func:`~minipeft.nn.quant.quantize_model`, with ``blocksize`` and
            ``double_quant``): their weights count as the codes, constants and
            second-level constants that format stores, byte for byte, and the
            largest one dequantized is the ``temporaries`` row (alive one layer
            at a time, in the activations' dtype).

    Per trained parameter, with w, g, m the bytes of a weight, a gradient and
    a moment, and M the fp32 master copy that 16-bit training keeps:

    .. math:: w + g + (k_{moments}\, m + M)
              \qquad \text{fp32 AdamW: } 4 + 4 + 8 = 16,
              \quad \text{mixed: } 2 + 2 + 12 = 16

    A masked weight of n entries with k selected pays a full gradient (gn),
    state for k entries and their index (8 or 4 bytes each), plus its boolean
    mask (n bytes) and the method's copies. What trains, what is added and
    what is copied is the method's own :meth:`~minipeft.peft.tuner.Method.plan`
    of a shape-only build of the model; activations are that model's
    ``trace`` over the engine's saving rules (:mod:`minipeft.memory.trace`);
    for full fine-tuning they come to the closed form of
    :func:`full_finetuning_activations`.
    The estimated peak is everything resident plus the larger of (activations
    + other live arrays) and the gradients (at the end of backward), plus one
    layer's temporary.
    """
    cfg = _as_config(config)
    prec = _precision(dtype)
    seq_len = min(128, cfg.n_positions) if seq_len is None else seq_len
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
    if index_dtype not in ("int32", "int64"):
        raise ValueError(f"index_dtype must be 'int32' or 'int64', got {index_dtype!r}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    B, T = int(batch_size), int(seq_len)
    pc = _method_config(method, knobs)
    ckpt = cfg.gradient_checkpointing if gradient_checkpointing is None else bool(gradient_checkpointing)
    ckpt = ckpt and training            # the model checkpoints only while training
    if quantize is not None and quantize not in FORMATS:
        raise ValueError(f"unknown quantization format {quantize!r}: choose from "
                         f"{', '.join(FORMATS)}")
    if quantize is not None and pc.method in ("full", "mask"):
        raise ValueError(f"quantize={quantize!r} with {pc.method}: it trains the Linear weights, "
                         "and a quantized weight cannot train")
    qspec = None if quantize is None else (quantize, blocksize, double_quant)
    model, base, plan = _planned(dataclasses.replace(cfg, gradient_checkpointing=ckpt), pc,
                                 training, qspec)
    extra = plan.prompt_tokens + plan.prefix_tokens
    if T + extra > cfg.n_positions:
        virtual = f" + {extra} virtual tokens = {T + extra}" if extra else ""
        raise ValueError(
            f"the batch does not fit the model: seq_len {T}{virtual} exceeds n_positions="
            f"{cfg.n_positions}, the longest context it has position embeddings for"
        )

    # Weights, gradients, optimizer state, bookkeeping, batch: from the planned
    # model's parameters (which have requires_grad) and what the method adds.
    trainable = {n: p.size for n, p in base.items() if p.requires_grad}
    trainable |= {n: p.size for n, p in plan.added.items() if p.requires_grad}
    # A quantized Linear's weight is no parameter now: its codes and constants count
    # as stored (their bytes, whatever the dtype), the other frozen ones at prec.frozen.
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    stored = {id(p) for p in model.parameters()}
    frozen = (sum(p.size for p in base.values() if not p.requires_grad and id(p) in stored)
              + sum(p.size for p in plan.added.values() if not p.requires_grad))
    moments = OPTIMIZERS[optimizer]
    index_bytes = 8 if index_dtype == "int64" else 4
    b = dict.fromkeys(CATEGORIES, 0.0)
    b["weights_frozen"] = frozen * prec.frozen + sum(m.weight_nbytes for m in quantized)
    b["weights_trainable"] = sum(trainable.values()) * prec.weight
    b["gradients"] = sum(trainable.values()) * prec.grad        # a masked weight's is full size
    for name, n in trainable.items():
        k = plan.masked.get(name)
        entries = n if k is None else k
        b["optimizer"] += entries * (moments * prec.moment + prec.master)
        if k is not None:
            b["optimizer"] += k * index_bytes                    # the flat index of the k entries
            b["bookkeeping"] += n                                # the boolean grad_mask
    b["bookkeeping"] += sum(n * (prec.weight if kind == "float" else 4) for n, kind in plan.copies)
    b["batch"] = 2 * B * T * 8                                   # int64 ids and targets

    # Activations: the planned model's forward, traced over what the engine saves.
    walk = _activations(model, plan, B, T, prec.act)
    b["activations"] = walk.peak()
    b["temporaries"] = walk.temporary_peak()
    # AdamW's scratch: one array of its largest parameter's trained entries.
    scratch = 0.0
    if optimizer == "adamw" and trainable:
        scratch = max(plan.masked.get(n, v) for n, v in trainable.items()) * prec.moment
    b["other"] = _other_live(cfg, plan, B, T, prec.act, scratch)
    items: dict[str, int] = {}
    for buf, label in walk.saved.values():
        if buf.kind == "act":
            key = re.sub(r"^h\.\d+[ .]|(?<=\.layers)\.\d+(?=[ .])", "", label)   # summed over blocks
            items[key] = items.get(key, 0) + buf.nbytes

    resident = sum(b[c] for c in ("weights_frozen", "weights_trainable", "bookkeeping", "batch"))
    resident += 0 if first_step else b["optimizer"]
    peak = resident + max(b["activations"] + b["other"], b["gradients"]) + b["temporaries"]
    n_trained = sum(plan.masked.get(n, v) for n, v in trainable.items())
    return Estimate(
        config=cfg, method=pc.method, peft_config=pc, optimizer=optimizer, precision=prec,
        batch_size=B, seq_len=T, gradient_checkpointing=ckpt,
        n_params=sum(p.size for p in base.values()) + sum(p.size for p in plan.added.values()),
        n_trainable=sum(trainable.values()), n_trained=n_trained,
        bytes=b, peak=peak, activation_items=items, first_step=first_step, quantize=quantize,
        activation_split=walk.split(), no_grad_temporaries=walk.throwaway,
    )


