r"""Training memory, per category: estimated, accounted and measured, side by side.

Training holds far more than the weights. For every parameter that trains,
fp32 AdamW keeps the weight (4 bytes), its gradient (4) and two moments (8):
16 bytes a parameter before a single activation is stored. On top come the
activations the forward pass saves for backward, which grow with the batch
and the sequence (the attention scores with its square), and the gradients of
those activations while backward runs. PEFT shrinks the first group with the
trainable count; the second only where the engine need not keep an input.

This module looks at one training step three ways and puts them side by side:

1. **Estimated** (:func:`estimate`): a closed form from the model config, the
   method and its knobs, the optimizer, the batch, the sequence length and
   the dtype. It builds no arrays, so it answers for the reference model and
   for 7B or 65B alike. The activation part is derived from what *this*
   engine saves: a walk over the GPT's operators that applies each operator's
   saving rule (``MatMul`` keeps its left input only if the weight trains,
   ``LayerNorm`` keeps :math:`\hat x` and :math:`1/\sigma`, ``Softmax`` its
   output...) to abstract buffers that know only their size.
2. **Accounted** (:func:`profile_step`): the engine's own books during a real
   step: parameter arrays, gradient buffers, optimizer state arrays, the
   activation ledger (``save_for_backward``, deduplicated by buffer), and the
   arrays backward creates, followed from the moment they appear to the
   moment they are freed (``weakref.finalize``). The accounted peak is the
   largest total of these live arrays at any point of the step.
3. **Measured**: the allocator itself. On the CPU, ``tracemalloc`` (NumPy
   reports every data buffer to it, in its own domain); on the GPU, a
   ``cupy.cuda.MemoryHook`` that sees every allocation and free of CuPy's pool.

Categories (the rows of every table):

* ``weights_frozen``, ``weights_trainable``: the parameters' arrays;
* ``gradients``: the ``.grad`` buffers (a masked weight's is full size);
* ``optimizer``: moments, and the flat indices of masked parameters;
* ``bookkeeping``: boolean gradient masks, and copies a PEFT method keeps to
  switch adapters exactly (a selective method's original values, a mask's
  indices);
* ``batch``: the token ids and targets;
* ``activations``: arrays saved for backward (the ledger) at their peak.
  The ledger also holds parameter arrays (a MatMul keeps a frozen weight to
  compute its input's gradient; LayerNorm keeps its gain): those are weights,
  already counted above, so they are left out of this row;
* ``other``: other arrays the engine owns during the step: the outputs the
  caller holds (logits, loss), activation gradients in flight in backward,
  and the optimizer's scratch array (AdamW's in-place update works in one
  array the size of its largest parameter; it holds nothing between steps,
  so it is not state).

Why the views differ, and by how much, is part of the lesson:
estimated and accounted agree *exactly* on the first six rows (they count the
same arrays two ways); activations agree to the byte where the walk mirrors
the engine. Between operators (at the end of forward, of backward, of the
optimizer step) the allocator's NumPy bytes equal the books' total, byte for
byte. The measured peak is higher than the accounted one because operators
work in temporaries that no book holds while they run (GELU's backward in
two scratch arrays of its input's size, attention's backward in one of the
scores' size), and because Python objects (graph nodes, tensor wrappers)
take memory too; on the GPU the pool rounds every allocation up to 512 bytes.

Use::

    from minipeft import memory
    print(memory.estimate("7b", "lora", dtype="mixed", batch_size=1, seq_len=512))
    report = memory.profile_step(model, optimizer, (idx, targets))   # one real step
    print(report)                      # the three views and the gaps, with reasons
    memory.plot([report], "step.png")  # stacked bars (matplotlib)

or ``minipeft memory --method lora --r 8`` (``--method all``, ``--config 7b``,
``--fit``, ``--checkpointing``, ``--png PATH``).

All sizes are bytes; tables print MiB or GiB (binary: 1 GiB = 2**30 bytes,
which is also how GPU memory is sold: a "24 GB" card holds 24 GiB).
"""

from __future__ import annotations

import dataclasses
import gc
import re
import time
import tracemalloc
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .autograd.function import LEDGER
from .autograd.tensor import BACKWARD_HOOKS
from .nn.gpt import GPTConfig

MiB = 2**20
GiB = 2**30

#: the rows of every table, in order
CATEGORIES = (
    "weights_frozen", "weights_trainable", "gradients", "optimizer", "bookkeeping", "batch",
    "activations", "other",
)

LABELS = {
    "weights_frozen": "weights, frozen",
    "weights_trainable": "weights, trainable",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "bookkeeping": "masks and method copies",
    "batch": "batch (ids, targets)",
    "activations": "activations (saved, peak)",
    "other": "other live arrays (peak)",
}

# ---------------------------------------------------------------------------
# Model presets
# ---------------------------------------------------------------------------
#
# GPT-style configurations (GPT-2's architecture: learned positions, a 4x
# GELU MLP, a tied head) at the sizes people quote. 1b, 7b and 65b use
# LLaMA's widths, depths and heads and its 32,000-token vocabulary; with
# GPT-2's 4x MLP (LLaMA's SwiGLU is 8/3 x 3 matrices) the counts come out at
# 1.08e9, 6.58e9 and 64.7e9 parameters.

PRESETS: dict[str, dict] = {
    "reference": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=96, n_positions=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, n_positions=1024),
    "1b": dict(n_layer=20, n_head=16, n_embd=2048, vocab_size=32000, n_positions=2048),
    "7b": dict(n_layer=32, n_head=32, n_embd=4096, vocab_size=32000, n_positions=2048),
    "65b": dict(n_layer=80, n_head=64, n_embd=8192, vocab_size=32000, n_positions=2048),
}


def preset(name: str) -> GPTConfig:
    """The GPTConfig of a named size (``reference``, ``gpt2``... ``1b``, ``7b``, ``65b``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    return GPTConfig(**PRESETS[name])


def _as_config(config) -> GPTConfig:
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, GPTConfig):
        return config
    raise TypeError(f"expected a GPTConfig or a preset name, got {type(config).__name__}")


# ---------------------------------------------------------------------------
# Precision: bytes per entry of each kind of array
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    r"""Bytes per entry for one training recipe.

    ``weight`` and ``grad`` are the copies of a *trained* parameter that the
    forward and backward passes use; ``master`` is an fp32 copy the
    optimizer keeps when those are 16-bit; ``moment`` is the size of one
    optimizer moment; ``frozen`` the bytes of a frozen weight; ``act`` the
    bytes of a floating activation. ZeRO's accounting of mixed-precision Adam
    (Rajbhandari et al., 2020) is :math:`2 + 2 + (4 + 4 + 4) = 16` bytes a
    parameter: fp16 weight and gradient, fp32 master, momentum and variance.
    """

    name: str
    weight: float
    grad: float
    master: float
    moment: float
    frozen: float
    act: int
    note: str


DTYPES: dict[str, Precision] = {
    "fp32": Precision("fp32", 4, 4, 0, 4, 4, 4,
                      "everything float32 (what this engine runs): 4 + 4 + 8 = 16 bytes a trained "
                      "parameter"),
    "mixed": Precision("mixed", 2, 2, 4, 4, 2, 2,
                       "ZeRO's mixed precision: fp16 weights and gradients, fp32 master and moments: "
                       "2 + 2 + 12 = 16 bytes a trained parameter; fp16 activations"),
    "int8": Precision("int8", 2, 2, 4, 4, 1, 2,
                      "frozen weights stored in 8 bits (LLM.int8-style), trained ones as in 'mixed'"),
    "int4": Precision("int4", 2, 2, 4, 4, 0.5, 2,
                      "frozen weights stored in 4 bits (QLoRA's NF4, its quantisation constants "
                      "left out: about 3% more), trained ones as in 'mixed'"),
    "fp64": Precision("fp64", 8, 8, 0, 8, 8, 8,
                      "everything float64 (the gradient checks' dtype): 8 + 8 + 16 = 32 bytes"),
}

#: optimizer -> number of moments it keeps per trained entry
OPTIMIZERS = {"adamw": 2, "sgd_momentum": 1, "sgd": 0}


def _precision(dtype) -> Precision:
    if isinstance(dtype, Precision):
        return dtype
    key = {"float32": "fp32", "fp16": "mixed", "bf16": "mixed", "nf4": "int4"}.get(str(dtype), str(dtype))
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[key]


# ---------------------------------------------------------------------------
# The parameters of a GPT, by name, in closed form
# ---------------------------------------------------------------------------


def _linears(cfg: GPTConfig) -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of every Linear, in model order."""
    C = cfg.n_embd
    out = []
    for i in range(cfg.n_layer):
        out += [(f"h.{i}.attn.c_attn", C, 3 * C), (f"h.{i}.attn.c_proj", C, C),
                (f"h.{i}.mlp.c_fc", C, 4 * C), (f"h.{i}.mlp.c_proj", 4 * C, C)]
    return out


def base_parameters(cfg: GPTConfig) -> dict[str, int]:
    r"""Every parameter of a GPT with its number of entries, in the model's order.

    .. math:: N = VC + n_{pos}C + L\,(12C^2 + 13C) + 2C

    (per block: :math:`C\cdot 3C + C^2 + C\cdot 4C + 4C\cdot C = 12C^2` weights,
    :math:`3C + C + 4C + C = 9C` biases and four LayerNorm vectors of C).
    """
    C = cfg.n_embd
    out = {"wte.weight": cfg.vocab_size * C, "wpe.weight": cfg.n_positions * C}
    lin = {n: (i, o) for n, i, o in _linears(cfg)}
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        out[h + "ln_1.weight"] = out[h + "ln_1.bias"] = C
        for name in ("attn.c_attn", "attn.c_proj"):
            fi, fo = lin[h + name]
            out[f"{h}{name}.weight"], out[f"{h}{name}.bias"] = fi * fo, fo
        out[h + "ln_2.weight"] = out[h + "ln_2.bias"] = C
        for name in ("mlp.c_fc", "mlp.c_proj"):
            fi, fo = lin[h + name]
            out[f"{h}{name}.weight"], out[f"{h}{name}.bias"] = fi * fo, fo
    out["ln_f.weight"] = out["ln_f.bias"] = C
    return out


def _targets(cfg: GPTConfig, entries, what="target_modules") -> list[str]:
    """The Linear modules that ``entries`` select, by peft's rule (as the injector does)."""
    from .peft.tuner import matches

    names = [n for n, _, _ in _linears(cfg)]
    unmatched = [e for e in entries if not any(matches(n, e) for n in names)]
    if unmatched:
        raise ValueError(
            f"{what} {unmatched} matched no Linear module; within each block they are "
            "attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj"
        )
    return [n for n in names if any(matches(n, e) for e in entries)]


@dataclass
class _Plan:
    """What a method trains and adds, by name: the input of every formula below."""

    trainable: set = field(default_factory=set)      # base parameters with requires_grad
    masked: dict = field(default_factory=dict)       # base weight -> k selected entries
    added: dict = field(default_factory=dict)        # new trainable parameter -> entries
    lora: dict = field(default_factory=dict)         # Linear name -> LoraConfig
    adapter: dict = field(default_factory=dict)      # Linear name -> AdapterConfig
    ia3: dict = field(default_factory=dict)          # Linear name -> ("in" | "out", fixed ones)
    prompt_tokens: int = 0                           # prompt tuning: P virtual input tokens
    prefix_tokens: int = 0                           # prefix tuning: P cached positions
    prefix_hidden: int | None = None                 # prefix projection MLP width
    copies: list = field(default_factory=list)       # (entries, "float" | "int32") kept by the method


def _method_config(method, knobs):
    from .peft.config import PeftConfig, config_class

    if isinstance(method, PeftConfig):
        if knobs:
            raise TypeError("give method knobs in the config object, not as keywords as well")
        return method
    cls = config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no knobs {unknown}; it has {sorted(names)}")
    return cls(**knobs)


def _plan(cfg: GPTConfig, pc) -> _Plan:
    """Which parameters train and which are added, for the method config ``pc``.

    The rules are the PEFT methods' own (:mod:`minipeft.peft`), applied to
    names instead of modules; :func:`profile_step` checks them against a real
    wrapped model, to the byte.
    """
    from .peft import config as C
    from .peft.selective import _blocks_of, _component

    params = base_parameters(cfg)
    plan = _Plan()
    Cw, L = cfg.n_embd, cfg.n_layer
    if isinstance(pc, C.FullFinetuneConfig):                 # every base parameter
        plan.trainable = set(params)
    elif isinstance(pc, C.BitFitConfig):                     # the biases (of target_modules, if set)
        names = [n for n in params if n.endswith(".bias")]
        if pc.target_modules is not None:
            mods = set(_targets(cfg, pc.target_modules))
            names = [n for n in names if n.rsplit(".", 1)[0] in mods]
        plan.trainable = set(names)
    elif isinstance(pc, C.LayerSelectConfig):                # LayerSelectMethod.select's filters
        layers = None
        if pc.layers is not None:
            bad = [i for i in pc.layers if not -L <= i < L]
            if bad:
                raise ValueError(f"layers {bad} out of range for a model with {L} blocks")
            layers = {i % L for i in pc.layers}
        for n in params:
            block, comp = _blocks_of(n), _component(n)
            if layers is not None and (block is None or block not in layers) and not (
                pc.components and comp in ("embeddings", "ln_f") and comp in pc.components
            ):
                continue
            if pc.components is not None and comp not in pc.components:
                continue
            if pc.param_types is not None and n.rsplit(".", 1)[-1] not in pc.param_types:
                continue
            if pc.patterns is not None and not any(re.search(p, n) for p in pc.patterns):
                continue
            plan.trainable.add(n)
        if not plan.trainable:
            raise ValueError("LayerSelectConfig selected no parameter of this model")
    elif isinstance(pc, C.MaskConfig):                       # whole weights, k entries updated
        for m in _targets(cfg, pc.target_modules):
            n = params[m + ".weight"]
            plan.trainable.add(m + ".weight")
            plan.masked[m + ".weight"] = max(1, int(round(pc.density * n)))
    elif isinstance(pc, C.LoraConfig):                       # A (in, r), B (r, out); DoRA's m (out,)
        lin = {n: (i, o) for n, i, o in _linears(cfg)}
        for m in _targets(cfg, pc.target_modules):
            fi, fo = lin[m]
            plan.lora[m] = pc
            plan.added[m + ".lora_A"] = fi * pc.r
            plan.added[m + ".lora_B"] = pc.r * fo
            if pc.use_dora:
                plan.added[m + ".lora_magnitude"] = fo
    elif isinstance(pc, C.AdapterConfig):                    # down (C, m) + (m,), up (m, C) + (C,)
        for m in _targets(cfg, pc.target_modules):
            plan.adapter[m] = pc
            plan.added[m + ".adapter_down"] = Cw * pc.bottleneck
            plan.added[m + ".adapter_down_bias"] = pc.bottleneck
            plan.added[m + ".adapter_up"] = pc.bottleneck * Cw
            plan.added[m + ".adapter_up_bias"] = Cw
    elif isinstance(pc, C.IA3Config):                        # one vector per target (see ia3.py)
        from .peft.tuner import matches

        lin = {n: (i, o) for n, i, o in _linears(cfg)}
        names = _targets(cfg, pc.target_modules)
        ff = set(_targets(cfg, pc.feedforward_modules, "feedforward_modules"))
        if ff - set(names):
            raise ValueError(f"feedforward_modules must be among target_modules; "
                             f"{sorted(ff - set(names))} are not")
        for m in names:
            fi, fo = lin[m]
            if any(matches(m, f) for f in pc.feedforward_modules):
                plan.ia3[m], size = ("in", 0), fi                    # scales the input: (in,)
            else:                                                    # the output, less q's third
                fixed = fo // 3 if m.endswith("c_attn") and fo % 3 == 0 and not pc.scale_queries else 0
                plan.ia3[m], size = ("out", fixed), fo - fixed
            plan.added[m + ".ia3_l"] = size
    elif isinstance(pc, C.PromptTuningConfig):               # E (P, C)
        plan.prompt_tokens = pc.num_virtual_tokens
        if pc.num_virtual_tokens:
            plan.added["prompt_embeddings"] = pc.num_virtual_tokens * Cw
    elif isinstance(pc, C.PrefixTuningConfig):               # (P, L*2*C), or E and the MLP making it
        P, width = pc.num_virtual_tokens, L * 2 * Cw
        plan.prefix_tokens = P
        if pc.prefix_projection:
            H = plan.prefix_hidden = pc.encoder_hidden_size
            plan.added.update({"prompt_encoder.embedding": P * Cw, "prompt_encoder.mlp_w1": Cw * H,
                               "prompt_encoder.mlp_b1": H, "prompt_encoder.mlp_w2": H * width,
                               "prompt_encoder.mlp_b2": width})
        else:
            plan.added["prompt_encoder.embedding"] = P * width
    else:  # pragma: no cover - every registered config is handled above
        raise ValueError(f"no memory rule for {type(pc).__name__}")

    # Copies a method keeps so that switching adapters is exact (see
    # SelectiveMethod): the selected parameters' original values; a mask
    # keeps the original values of its k entries and their int32 indices.
    if isinstance(pc, (C.BitFitConfig, C.LayerSelectConfig)):
        plan.copies = [(params[n], "float") for n in sorted(plan.trainable)]
    elif isinstance(pc, C.MaskConfig):
        for k in plan.masked.values():
            plan.copies += [(k, "float"), (k, "int32")]
    return plan


# ---------------------------------------------------------------------------
# What the forward pass saves: the engine's rules, applied to sizes
# ---------------------------------------------------------------------------
#
# Each method below mirrors one operator of autograd/ops.py (or a layer of
# nn/ and peft/ built from them) and applies the same rule for what it keeps:
# an op records a node only if an input requires a gradient, and saves only
# what a gradient that will be computed needs. Tensors here are sizes with a
# flag; buffers are objects, so a view (a reshape, k and v sliced from the
# fused qkv) points at the buffer it views and a buffer saved twice counts
# once, exactly as the ledger deduplicates.


class _Buf:
    """An abstract buffer: its bytes and what it holds ('act', 'param' or 'batch')."""

    __slots__ = ("nbytes", "kind")

    def __init__(self, nbytes, kind="act"):
        self.nbytes, self.kind = nbytes, kind


class _Sym:
    """An abstract tensor: a view of a buffer with n entries that may require grad."""

    __slots__ = ("buf", "req", "n")

    def __init__(self, buf, req, n):
        self.buf, self.req, self.n = buf, bool(req), n


class _Walk:
    """The saved set of one forward pass (or of one recomputed block), built op by op."""

    def __init__(self, act_bytes: int, training: bool = True):
        self.s = act_bytes          # bytes of a floating activation entry
        self.training = training
        self.recording = True       # False inside a checkpointed block's first forward
        self.saved: dict[int, tuple[_Buf, str]] = {}
        self.tape = None            # dropout masks: a list (recording) or an iterator (replaying)

    # -- buffers ------------------------------------------------------------------
    def new(self, n, req=False, itemsize=None, kind="act") -> _Sym:
        return _Sym(_Buf(n * (self.s if itemsize is None else itemsize), kind), req, n)

    def param(self, n, trainable) -> _Sym:
        return _Sym(_Buf(n * self.s, "param"), trainable, n)

    def save(self, label, *items) -> None:
        for x in items:
            if x is not None and self.recording and id(x.buf) not in self.saved:
                self.saved[id(x.buf)] = (x.buf, label)

    def rec(self, *xs) -> bool:
        """Would ``Function.apply`` record a node for these inputs?"""
        return self.recording and any(x.req for x in xs)

    def bytes(self, kind="act") -> int:
        return sum(b.nbytes for b, _ in self.saved.values() if b.kind == kind)

    # -- operators (autograd/ops.py) -------------------------------------------------
    def add(self, a, b) -> _Sym:                 # Add: saves nothing
        return self.new(max(a.n, b.n), self.rec(a, b))

    def mul(self, a, b, label) -> _Sym:          # Mul: b if a needs grad, a if b does
        r = self.rec(a, b)
        if r:
            self.save(label, b if a.req else None, a if b.req else None)
        return self.new(max(a.n, b.n), r)

    def div(self, a, b, label) -> _Sym:          # Div: b always, y = a/b if b needs grad
        r = self.rec(a, b)
        y = self.new(max(a.n, b.n), r)
        if r:
            self.save(label, b, y if b.req else None)
        return y

    def matmul(self, a, b, n_out, label) -> _Sym:  # MatMul: b if a needs grad, a if b does
        r = self.rec(a, b)
        if r:
            self.save(label, b if a.req else None, a if b.req else None)
        return self.new(n_out, r)

    def linear(self, x, W, b, n_out, label) -> _Sym:  # Linear (fused x W + b): as MatMul
        r = self.rec(x, W, b)
        if r:
            self.save(label, W if x.req else None, x if W.req else None)
        return self.new(n_out, r)

    def causal_attention(self, qkv, n_rows, T, p, label) -> _Sym:
        """CausalAttention: keeps one contiguous copy of q, k, v (qkv's size), the
        exponentiated scores E and the rows' 1/z (n_rows = B n_h T of each), plus the
        dropout keep-mask; the output is (B, T, C)."""
        keep = self.keep_mask(n_rows * T, p)
        if self.rec(qkv):
            self.save(label, self.new(qkv.n), self.new(n_rows * T), self.new(n_rows), keep)
        return self.new(qkv.n // 3, self.rec(qkv))

    def layer_norm(self, x, w, b, C, label) -> _Sym:
        r = self.rec(x, w, b)             # saves xhat if x or w needs grad, 1/sigma and w if x does
        if r:
            xhat = self.new(x.n) if (x.req or w.req) else None
            rstd = self.new(x.n // C) if x.req else None
            self.save(label, xhat, rstd, w if x.req else None)
        return self.new(x.n, r)

    def gelu(self, x, label) -> _Sym:            # GELU: saves x (tanh u is recomputed)
        if self.rec(x):
            self.save(label, x)
        return self.new(x.n, self.rec(x))

    def relu(self, x, label) -> _Sym:            # ReLU: a one-byte mask
        if self.rec(x):
            self.save(label, self.new(x.n, itemsize=1))
        return self.new(x.n, self.rec(x))

    def saves_output(self, x, label) -> _Sym:    # Tanh, Sqrt, Softmax, Exp: save y
        y = self.new(x.n, self.rec(x))
        if y.req:
            self.save(label, y)
        return y

    def masked_fill(self, x, mask, label) -> _Sym:  # MaskedFill: saves the boolean mask
        if self.rec(x):
            self.save(label, mask)
        return self.new(x.n, self.rec(x))

    def keep_mask(self, n, p) -> _Sym | None:
        """nn.Dropout's boolean keep-mask (None when inactive); recorded or replayed by a checkpoint."""
        if not self.training or p == 0.0:
            return None
        if self.tape is not None and not isinstance(self.tape, list):
            return next(self.tape)                  # replayed: the buffer recorded before
        mask = self.new(n, itemsize=1)
        if isinstance(self.tape, list):
            self.tape.append(mask)
        return mask

    def dropout(self, x, p, label) -> _Sym:
        """nn.Dropout: saves its keep-mask."""
        mask = self.keep_mask(x.n, p)
        if mask is None:
            return x
        if self.rec(x):
            self.save(label, mask)
        return self.new(x.n, self.rec(x))

    def cross_entropy(self, z, rows, label) -> _Sym:  # softmax p, safe targets, valid mask
        if self.rec(z):
            self.save(label, self.new(z.n), self.new(rows, itemsize=8), self.new(rows, itemsize=1))
        return self.new(1, self.rec(z))

    def embedding(self, w, idx, n_out, label) -> _Sym:  # Embedding: saves the ids if W trains
        if self.rec(w):
            self.save(label, idx)
        return self.new(n_out, self.rec(w))

    @staticmethod
    def view(x, n=None) -> _Sym:
        return _Sym(x.buf, x.req, x.n if n is None else n)


class _GPTWalk:
    """The forward pass of a (wrapped) GPT over abstract tensors: gpt.py, step by step."""

    def __init__(self, cfg: GPTConfig, plan: _Plan, B: int, T: int, prec: Precision,
                 training=True, checkpointing=False):
        self.cfg, self.plan, self.B, self.T = cfg, plan, B, T
        self.s, self.training = prec.act, training
        self.checkpointing = checkpointing
        self.P = plan.prefix_tokens                  # cached positions before the sequence
        self.Tq = T + plan.prompt_tokens             # positions the model runs over

    def tr(self, name) -> bool:
        return name in self.plan.trainable

    # -- layers ------------------------------------------------------------------------
    def linear(self, w: _Walk, name, x, fi, fo, rows):
        """A Linear, or the wrapper a method put in its place (lora.py, adapters.py, ia3.py)."""
        W = w.param(fi * fo, self.tr(name + ".weight"))
        b = w.param(fo, self.tr(name + ".bias"))

        def base(inp):
            return w.linear(inp, W, b, rows * fo, name)

        if name in self.plan.lora:
            cfg = self.plan.lora[name]
            h = w.dropout(x, cfg.lora_dropout, name + " lora dropout")
            A, Bm = w.param(fi * cfg.r, True), w.param(cfg.r * fo, True)
            xa = w.matmul(h, A, rows * cfg.r, name + " lora x@A")
            delta = w.mul(w.matmul(xa, Bm, rows * fo, name + " lora (xA)@B"), w.new(1),
                          name + " lora scale")
            if not cfg.use_dora:
                return w.add(base(x), delta)
            # DoRA: y = (xW + delta) * m / ||W + s AB||_c + b
            ab = w.mul(w.matmul(A, Bm, fi * fo, name + " dora AB"), w.new(1), name + " dora scale")
            Wp = w.add(W, ab)
            sq = w.mul(Wp, Wp, name + " dora W'*W'")
            norm = w.saves_output(w.new(fo, sq.req), name + " dora norm")   # sqrt of the column sums
            scale = w.div(w.param(fo, True), norm, name + " dora m/n")
            y = w.mul(w.add(w.matmul(x, W, rows * fo, name), delta), scale, name + " dora y")
            return w.add(y, b)
        if name in self.plan.adapter:
            cfg = self.plan.adapter[name]
            m, C = cfg.bottleneck, self.cfg.n_embd
            y = base(x)
            hd = w.add(w.matmul(y, w.param(C * m, True), rows * m, name + " adapter down"),
                       w.param(m, True))
            act = {"relu": w.relu, "gelu": w.gelu,
                   "tanh": w.saves_output}[cfg.nonlinearity](hd, name + " adapter act")
            up = w.matmul(act, w.param(m * C, True), rows * C, name + " adapter up")
            return w.add(w.add(y, up), w.param(C, True))
        if name in self.plan.ia3:
            mode, fixed = self.plan.ia3[name]
            if mode == "in":
                return base(w.mul(x, w.param(fi, True), name + " ia3 scale"))
            l = w.param(fo - fixed, True)
            if fixed:   # constant ones for q, then the learned part: a concatenated (3C,) vector
                l = w.new(fo, True)
            return w.mul(base(x), l, name + " ia3 scale")
        return base(x)

    def attention(self, w: _Walk, i, x, past):
        """Block i's CausalSelfAttention: the fused op, or with a prefix cache the ops gpt.py runs."""
        cfg, B, T, P = self.cfg, self.B, self.Tq, self.P
        C, nh = cfg.n_embd, cfg.n_head
        N = B * T
        qkv = self.linear(w, f"h.{i}.attn.c_attn", x, C, 3 * C, N)          # (B, T, 3C)
        if past is None:    # one fused op (ops.CausalAttention)
            y = w.causal_attention(qkv, B * nh * T, T, cfg.dropout, f"h.{i} attention")
        else:               # with a cache (prefix tuning): step by step, as gpt.py does
            q, k, v = (_Walk.view(qkv, N * C) for _ in range(3))            # views of qkv
            k = w.new(B * (P + T) * C, k.req or past[0].req)                # concatenated:
            v = w.new(B * (P + T) * C, v.req or past[1].req)                # (B, nh, P+T, hs)
            q = w.mul(q, w.new(1), f"h.{i} q scale")                         # q / sqrt(hs)
            att = w.matmul(q, k, B * nh * T * (P + T), f"h.{i} q@k")         # (B, nh, T, P+T)
            if T > 1:
                att = w.masked_fill(att, w.new(T * (P + T), itemsize=1), f"h.{i} causal mask")
            att = w.saves_output(att, f"h.{i} softmax")
            att = w.dropout(att, cfg.dropout, f"h.{i} attn dropout")
            y = w.matmul(att, v, N * C, f"h.{i} att@v")                     # (B, nh, T, hs)
            y = w.new(N * C, y.req)  # transpose(1, 2).reshape(B, T, C): a copy, kept by nobody
        y = self.linear(w, f"h.{i}.attn.c_proj", y, C, C, N)
        return w.dropout(y, cfg.dropout, f"h.{i} resid dropout")

    def block(self, w: _Walk, i, x, past):
        """Block i, as gpt.py's Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
        C, N = self.cfg.n_embd, self.B * self.Tq
        ln = f"h.{i}.ln_1"
        h = w.layer_norm(x, w.param(C, self.tr(ln + ".weight")), w.param(C, self.tr(ln + ".bias")),
                         C, ln)
        x = w.add(x, self.attention(w, i, h, past))
        ln = f"h.{i}.ln_2"
        h = w.layer_norm(x, w.param(C, self.tr(ln + ".weight")), w.param(C, self.tr(ln + ".bias")),
                         C, ln)
        h = self.linear(w, f"h.{i}.mlp.c_fc", h, C, 4 * C, N)
        h = w.gelu(h, f"h.{i}.mlp gelu")
        h = self.linear(w, f"h.{i}.mlp.c_proj", h, 4 * C, C, N)
        h = w.dropout(h, self.cfg.dropout, f"h.{i} mlp dropout")
        return w.add(x, h)

    def _block_trains(self, i) -> bool:
        h = f"h.{i}."
        return any(n.startswith(h) for n in self.plan.trainable) or any(
            n.startswith(h) for n in self.plan.added)

    # -- the model ---------------------------------------------------------------------
    def run(self):
        """(peak bytes of saved activations, the walk holding the saved set at the end of forward)."""
        cfg, plan, B, T, Tq, P = self.cfg, self.plan, self.B, self.T, self.Tq, self.P
        C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
        w = _Walk(self.s, self.training)
        idx = _Sym(_Buf(B * T * 8, "batch"), False, B * T)                  # the batch's ids

        # Soft prompts' trainable inputs.
        past = None
        if plan.prefix_tokens:
            width = L * 2 * C
            if plan.prefix_hidden:   # prefixes = tanh(E W1 + b1) W2 + b2
                H = plan.prefix_hidden
                E = w.param(P * C, True)
                hid = w.add(w.matmul(E, w.param(C * H, True), P * H, "prefix mlp"),
                            w.param(H, True))
                hid = w.saves_output(hid, "prefix mlp tanh")
                pre = w.add(w.matmul(hid, w.param(H * width, True), P * width, "prefix mlp"),
                            w.param(width, True))
            else:
                pre = w.param(P * width, True)
            past = (_Walk.view(pre), _Walk.view(pre))                        # views per layer
        tok = w.embedding(w.param(V * C, self.tr("wte.weight")), idx, B * T * C, "wte")
        if plan.prompt_tokens:                                               # [prompt; wte(ids)]
            tok = w.new(B * Tq * C, True)
        pos = w.new(Tq, itemsize=8)                                          # arange: int64
        x = w.add(tok, w.embedding(w.param(cfg.n_positions * C, self.tr("wpe.weight")), pos,
                                   Tq * C, "wpe"))
        x = w.dropout(x, cfg.dropout, "embedding dropout")

        # The blocks, plain or checkpointed. A checkpointed block keeps its
        # inputs and dropout masks; backward recomputes it, and while it does
        # the ledger holds the block's own saved set on top.
        recompute_peak = 0
        for i in range(L):
            if not self.checkpointing:
                x = self.block(w, i, x, past)
                continue
            ins = [x] + (list(past) if past is not None else [])
            recorded = w.rec(*ins) or self._block_trains(i)
            w.recording, w.tape = False, []
            self.block(w, i, _Walk.view(x, x.n), past)           # under no_grad: drops masks only
            masks, w.recording, w.tape = w.tape, True, None
            if recorded:
                for t in ins + masks:
                    w.save(f"h.{i} checkpoint", t)
                inner = _Walk(self.s, self.training)
                inner.saved = dict(w.saved)     # what the outer ledger holds at this point
                inner.tape = iter(masks)
                leaf = _Sym(x.buf, x.req, x.n)
                self.block(inner, i, leaf, past)
                recompute_peak = max(recompute_peak, inner.bytes())
            x = w.new(x.n, recorded)

        # Final norm, tied head, loss.
        x = w.layer_norm(x, w.param(C, self.tr("ln_f.weight")), w.param(C, self.tr("ln_f.bias")),
                         C, "ln_f")
        logits = w.matmul(x, w.param(V * C, self.tr("wte.weight")), B * Tq * V, "lm head")
        w.cross_entropy(logits, B * Tq, "cross entropy")
        # Without checkpointing nothing is released before backward starts:
        # the end of forward is the peak. With it, the top block's
        # recomputation may top the end of forward (the head is released by then).
        return max(w.bytes(), recompute_peak), w


# ---------------------------------------------------------------------------
# Estimated: the closed form
# ---------------------------------------------------------------------------


def _fmt_bytes(n: float, unit: int | None = None) -> str:
    unit = unit or (GiB if n >= GiB else MiB)
    return f"{n / unit:,.2f} {'GiB' if unit == GiB else 'MiB'}"


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
        lines = [
            f"estimate: {self.method} on a {self.config.n_layer}-layer, {self.config.n_embd}-wide GPT "
            f"({self.n_params:,d} parameters, {self.n_trained:,d} trained), batch "
            f"{self.batch_size} x {self.seq_len}, {self.precision.name}, {self.optimizer}{ck}",
        ]
        for cat in CATEGORIES:
            lines.append(f"  {LABELS[cat]:<30} {_fmt_bytes(self.bytes[cat], unit):>14}")
        lines.append(f"  {'peak (estimated)':<30} {_fmt_bytes(self.peak, unit):>14}")
        if detail:
            lines.append("  " + self.breakdown(unit))
        return "\n".join(lines)

    __str__ = table


def _other_live(cfg: GPTConfig, plan: _Plan, B: int, T: int, s: int, scratch: float = 0) -> float:
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
        dtype: ``fp32``, ``mixed``, ``int8`` or ``int4`` (see :data:`DTYPES`).
        gradient_checkpointing: overrides the config's flag.
        index_dtype: the optimizer's index of a mask's entries (``int64`` or ``int32``).
        first_step: the optimizer has no state yet during backward (its first step).
        training: the model is in training mode (dropout draws and saves masks).

    Per trained parameter, with w, g, m the bytes of a weight, a gradient and
    a moment, and M the fp32 master copy that 16-bit training keeps:

    .. math:: w + g + (k_{moments}\, m + M)
              \qquad \text{fp32 AdamW: } 4 + 4 + 8 = 16,
              \quad \text{mixed: } 2 + 2 + 12 = 16

    A masked weight of n entries with k selected pays a full gradient (gn),
    state for k entries and their index (8 or 4 bytes each), plus its boolean
    mask (n bytes) and the method's copies. Activations are the walk over the
    engine's saving rules (:class:`_GPTWalk`); for full fine-tuning they come
    to the closed form of :func:`full_finetuning_activations`.
    The estimated peak is everything resident plus the larger of (activations
    + other live arrays) and the gradients (at the end of backward).
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
    plan = _plan(cfg, pc)
    extra = plan.prompt_tokens + plan.prefix_tokens
    if T + extra > cfg.n_positions:
        virtual = f" + {extra} virtual tokens = {T + extra}" if extra else ""
        raise ValueError(
            f"the batch does not fit the model: seq_len {T}{virtual} exceeds n_positions="
            f"{cfg.n_positions}, the longest context it has position embeddings for"
        )
    ckpt = cfg.gradient_checkpointing if gradient_checkpointing is None else bool(gradient_checkpointing)

    # Weights, gradients, optimizer state, bookkeeping, batch.
    base = base_parameters(cfg)
    trainable = {n: base[n] for n in plan.trainable} | plan.added
    frozen = sum(n for name, n in base.items() if name not in plan.trainable)
    moments = OPTIMIZERS[optimizer]
    index_bytes = 8 if index_dtype == "int64" else 4
    b = dict.fromkeys(CATEGORIES, 0.0)
    b["weights_frozen"] = frozen * prec.frozen
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

    # Activations: the walk over what the engine saves.
    ckpt = ckpt and training            # the model checkpoints only while training
    peak_act, walk = _GPTWalk(cfg, plan, B, T, prec, training=training, checkpointing=ckpt).run()
    b["activations"] = peak_act
    # AdamW's scratch: one array of its largest parameter's trained entries.
    scratch = 0.0
    if optimizer == "adamw" and trainable:
        scratch = max(plan.masked.get(n, v) for n, v in trainable.items()) * prec.moment
    b["other"] = _other_live(cfg, plan, B, T, prec.act, scratch)
    items: dict[str, int] = {}
    for buf, label in walk.saved.values():
        if buf.kind == "act":
            key = re.sub(r"^h\.\d+[ .]", "", label)      # summed over blocks
            items[key] = items.get(key, 0) + buf.nbytes

    resident = sum(b[c] for c in ("weights_frozen", "weights_trainable", "bookkeeping", "batch"))
    resident += 0 if first_step else b["optimizer"]
    peak = resident + max(b["activations"] + b["other"], b["gradients"])
    n_trained = sum(plan.masked.get(n, v) for n, v in trainable.items())
    return Estimate(
        config=cfg, method=pc.method, peft_config=pc, optimizer=optimizer, precision=prec,
        batch_size=B, seq_len=T, gradient_checkpointing=ckpt,
        n_params=sum(base.values()) + sum(plan.added.values()),
        n_trainable=sum(trainable.values()), n_trained=n_trained,
        bytes=b, peak=peak, activation_items=items, first_step=first_step,
    )


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


def _is_array(a) -> bool:
    if a is None or isinstance(a, np.generic):
        return False
    try:
        backend.xp(a)
    except TypeError:
        return False
    return not np.isscalar(a)


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
            if _is_array(value):
                out.append((method, key, value))
            elif isinstance(value, dict):
                out += [(value, k, a) for k, a in value.items() if _is_array(a)]
    for mod in model.modules():
        for value in getattr(mod, "_copies", {}).values():
            items = value if isinstance(value, tuple) else (value,)
            out += [(None, None, a) for a in items if _is_array(a)]
    return out


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
        if _is_array(value):
            out.append((optimizer, key, value))
        elif isinstance(value, dict):
            out += [(value, k, a) for k, a in value.items() if _is_array(a)]
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

    # -- following arrays made in backward --------------------------------------------
    def _freed(self, bid):
        self.inflight.pop(bid, None)

    def track(self, a) -> None:
        """Follow an array made in backward until its memory is freed.

        A ``weakref.finalize`` on the buffer's owner (:func:`_owner`) takes it
        out of ``inflight`` the moment the buffer goes, so a snapshot counts
        exactly the gradients alive then.
        """
        if not _is_array(a):
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
                if key != "step" and _is_array(a):
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
        for bid in ledger:
            add("activations", bid)
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
        for k, v in cats.items():
            self.max[k] = max(self.max[k], v)
        return cats

    def event(self, label) -> dict:
        """The categories at the phase boundary ``label`` (one of :data:`PHASES`)."""
        return next(c for lab, c in self.events if lab == label)


# ---------------------------------------------------------------------------
# Measured: the allocator
# ---------------------------------------------------------------------------


def _numpy_traced_bytes() -> int:
    """Bytes of NumPy data buffers alive now, as tracemalloc saw them allocated."""
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(t.size for t in snap.traces)


class _TraceMalloc:
    """CPU (NumPy and strict): tracemalloc, restarted so it sees only this step's arrays.

    tracemalloc only knows memory allocated while it traces, and the model
    was built before. So it is (re)started here and the arrays the step will
    find already alive (parameters, gradient masks, optimizer state, a
    method's copies, the batch) are replaced by copies with the same values,
    made under tracing. From then on the traced total is exactly this step's
    memory plus the Python objects made meanwhile. Its peak counts every
    domain; the NumPy domain alone is read from snapshots at the phase
    boundaries.
    """

    source = "tracemalloc"

    def __init__(self):
        self.was_tracing = tracemalloc.is_tracing()
        self.peak = 0
        self.rounding = None

    def start(self, model, optimizer):
        if self.was_tracing:
            tracemalloc.stop()
        tracemalloc.start()
        for p in model.parameters():
            if p.data.base is None:
                p.data = p.data.copy()
            if p.grad_mask is not None:
                p.grad_mask = p.grad_mask.copy()
        for state in optimizer.state.values():
            for key, a in list(state.items()):
                if key != "step" and _is_array(a):
                    state[key] = a.copy()
        for holder, key, a in _method_arrays(model) + _optimizer_arrays(optimizer):
            if isinstance(holder, dict):
                holder[key] = a.copy()
            elif holder is not None:
                setattr(holder, key, a.copy())

    def phase(self) -> tuple[int, int]:
        """(NumPy-domain bytes now, all traced bytes now); the peak so far is kept."""
        total, peak = tracemalloc.get_traced_memory()
        self.peak = max(self.peak, peak)
        arrays = _numpy_traced_bytes()
        gc.collect()
        tracemalloc.reset_peak()
        return arrays, total

    def stop(self):
        if not self.was_tracing:
            tracemalloc.stop()


class _CupyHook:
    """GPU: a ``cupy.cuda.MemoryHook`` that sees every malloc and free of CuPy's pool.

    The pool keeps no peak of its own, so the hook keeps one: the bytes in
    use when it starts (``used_bytes()``: every array already on the device)
    plus the running sum of what was handed out (``mem_size``: the request
    rounded up to a multiple of 512 bytes) minus what was given back.
    """

    source = "cupy MemoryHook"

    def __init__(self):
        cupy = backend.require_gpu()
        from cupy.cuda import memory_hook

        books = self

        class Hook(memory_hook.MemoryHook):
            name = "minipeft.memory"

            def malloc_postprocess(self, **kw):
                books.now += kw["mem_size"]
                books.requested += kw["size"]
                books.rounded += kw["mem_size"]
                books.peak = max(books.peak, books.now)

            def free_postprocess(self, **kw):
                books.now -= kw["mem_size"]

        self.pool = cupy.get_default_memory_pool()
        self.hook = Hook()
        self.now = self.peak = self.requested = self.rounded = 0
        self.started = False

    def start(self, model, optimizer):
        backend.synchronize()
        self.now = self.peak = self.pool.used_bytes()
        self.hook.__enter__()
        self.started = True

    def phase(self) -> tuple[int, int]:
        backend.synchronize()
        return self.pool.used_bytes(), self.pool.used_bytes()

    def stop(self):
        if self.started:
            self.hook.__exit__(None, None, None)
            self.started = False

    @property
    def rounding(self) -> int:
        """Bytes the pool added by rounding each allocation up to 512 bytes."""
        return self.rounded - self.requested


def _run_step(model, optimizer, batch, meter=None):
    """One training step under the books (and the meter): returns the books, the phases, seconds."""
    # The batch as the model will read it (int64, contiguous, on its device),
    # so the books count the arrays the step really uses; a step starts
    # without gradients.
    idx, targets = batch
    device = model.device
    idx = backend.to_device(np.ascontiguousarray(backend.asnumpy(idx), dtype=np.int64), device)
    targets = backend.to_device(np.ascontiguousarray(backend.asnumpy(targets), dtype=np.int64),
                                device)
    optimizer.zero_grad()
    for p in model.parameters():
        p.grad = None
    # The meter starts first (tracemalloc must see the arrays the books will
    # name), then the books open on what is alive. Each phase boundary below
    # is a snapshot of both.
    if meter is not None:
        meter.start(model, optimizer)
        # the batch, made under tracing too (copies are new allocations)
        idx, targets = idx.copy(), targets.copy()
    gc.collect()
    books = _Books(model, optimizer, (idx, targets))
    phases = {}
    books.snapshot("start")
    if meter is not None:
        phases["start"] = meter.phase()
    backend.synchronize()
    t0 = time.perf_counter()
    logits, loss = model(idx, targets)
    books.outputs = [logits.data, loss.data]        # held by the caller until the step ends
    books.snapshot("end of forward")
    if meter is not None:
        phases["end of forward"] = meter.phase()
    # Inside backward the books are called after every node (Books.hook):
    # the gradients in flight are seen as they appear and go.
    BACKWARD_HOOKS.append(books.hook)
    try:
        loss.backward()
    finally:
        BACKWARD_HOOKS.remove(books.hook)
    books.snapshot("end of backward")
    if meter is not None:
        phases["end of backward"] = meter.phase()
    optimizer.step()
    books.snapshot("after optimizer.step")
    backend.synchronize()
    seconds = time.perf_counter() - t0
    if meter is not None:
        phases["after optimizer.step"] = meter.phase()
    del logits, loss
    books.outputs = []
    books.close()
    return books, phases, seconds


# ---------------------------------------------------------------------------
# One step, three views
# ---------------------------------------------------------------------------

PHASES = ("start", "end of forward", "end of backward", "after optimizer.step")


@dataclass
class StepReport:
    r"""The three views of one training step (see :func:`profile_step`).

    * ``estimated``: an :class:`Estimate` (None when the model is not a GPT
      or a PeftModel of one, or the optimizer is not SGD or AdamW);
    * ``accounted``: the largest bytes of each category over the step;
      ``accounted_peak`` the largest total, reached at ``peak_event`` with
      the breakdown ``peak_breakdown``; ``phases_accounted`` the totals at
      the phase boundaries;
    * ``measured``: ``phases_measured`` (bytes of arrays alive at each phase
      boundary, as the allocator saw them, and all traced bytes),
      ``measured_peak`` (the allocator's peak over the step, Python objects
      included on the CPU), ``python_objects`` at the start.
    """

    method: str
    device: str
    config: GPTConfig
    batch_size: int
    seq_len: int
    optimizer: str
    estimated: Estimate | None
    accounted: dict
    accounted_peak: int
    peak_event: str
    peak_breakdown: dict
    phases_accounted: dict
    ledger_parameter_bytes: int
    measured_source: str
    phases_measured: dict
    measured_peak: int
    python_objects: int
    rounding: int | None
    seconds: float                # of the profiled step, books and tracing on (slower than plain)
    elsewhere: int = 0
    notes: list = field(default_factory=list)

    # -- gaps ---------------------------------------------------------------------
    def gaps(self) -> list[tuple[str, int, str]]:
        """(what, bytes, why) for every difference between two views."""
        out = []
        e = self.estimated
        # Estimated against accounted: the first six categories are the same
        # arrays counted two ways and must agree to the byte.
        if e is not None:
            for cat in CATEGORIES[:6]:
                d = int(round(e.bytes[cat])) - self.accounted[cat]
                why = ("the same arrays, counted by formula and by the books" if d == 0 else
                       "MISMATCH: the closed form and the model disagree about these arrays")
                out.append((f"{LABELS[cat]}: estimated - accounted", d, why))
            d = int(round(e.bytes["activations"])) - self.accounted["activations"]
            why = ("the walk applies each operator's saving rule, as the engine does" if d == 0 else
                   "an operator saves something the walk does not know (or the reverse)")
            out.append(("activations: estimated - accounted", d, why))
            d = int(round(e.bytes["other"])) - self.accounted["other"]
            out.append(("other live arrays: estimated - accounted", d,
                        "the estimate is the logits plus the top MLP's in-flight gradients (9N'C); "
                        "the books follow the gradients actually alive at each moment"))
            d = int(round(e.peak)) - self.accounted_peak
            out.append(("peak: estimated - accounted", d,
                        "the estimate adds the in-flight peak to every activation; when backward's "
                        "gradients peak, the head's and the top block's activations are already freed"))
        # Measured against accounted between operators, where no temporary is alive.
        for phase in PHASES:
            acc = self.phases_accounted[phase]
            meas = self.phases_measured[phase][0]
            out.append((f"arrays alive, {phase}: measured - accounted", meas - acc,
                        "every array alive between operators is in a book" if meas == acc else
                        ("the pool rounds each allocation up to 512 bytes" if self.device == "gpu"
                         else "arrays no book holds (e.g. a cache kept by a module)")))
        # The peaks: the allocator also sees what lives only inside an operator,
        # and Python's own objects (or, on the GPU, the pool's rounding).
        d = self.measured_peak - self.accounted_peak
        temps = ("temporaries inside operators that no book holds (LayerNorm's and attention's "
                 "scratch arrays, the optimizer's update")
        if self.config is not None:
            pc = self.estimated.peft_config if self.estimated is not None else None
            n = self.batch_size * (self.seq_len + (getattr(pc, "num_virtual_tokens", 0)
                                                   if getattr(pc, "peft_type", "") == "PROMPT_TUNING"
                                                   else 0))
            gelu = 2 * 4 * n * self.config.n_embd * 4
            temps += (f"; GELU's backward alone works in two scratch arrays of its input's size, "
                      f"2 x 4N'C floats = {_fmt_bytes(gelu, MiB)} here, on top of the books' peak")
        reasons = [temps + ")"]
        if self.device == "gpu":
            reasons.append(f"the pool's rounding to 512 bytes ({_fmt_bytes(self.rounding or 0)} "
                           "over the step)")
        else:
            reasons.append(f"Python objects: graph nodes, tensors, the books' own records "
                           f"({_fmt_bytes(self.python_objects)} at the start)")
        out.append(("peak: measured - accounted", d, "; ".join(reasons)))
        return out

    @property
    def accounted_over_measured(self) -> float:
        return self.accounted_peak / self.measured_peak

    # -- printing -------------------------------------------------------------------
    def table(self) -> str:
        cfg, e = self.config, self.estimated
        unit = MiB

        def f(v):
            return "-" if v is None else f"{v / unit:,.3f}"

        n = sum(self.accounted[c] for c in ("weights_frozen", "weights_trainable"))
        head = (f"{self.method} | GPT {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, "
                f"vocab {cfg.vocab_size} | batch {self.batch_size} x {self.seq_len} | "
                f"{self.optimizer} | {self.device}")
        if e is not None:
            head += (f"\n{e.n_params:,d} parameters ({_fmt_bytes(n)}), {e.n_trainable:,d} with "
                     f"requires_grad, {e.n_trained:,d} updated by the optimizer")
        lines = [head, "", f"{'category (MiB)':<34}{'estimated':>12}{'accounted':>12}{'gap':>10}"]
        for cat in CATEGORIES:
            est = None if e is None else e.bytes[cat]
            gap = "" if est is None else f"{(est - self.accounted[cat]) / unit:,.3f}"
            lines.append(f"{LABELS[cat]:<34}{f(est):>12}{f(self.accounted[cat]):>12}{gap:>10}")
        peak_e = None if e is None else e.peak
        lines.append(f"{'peak (all at one moment)':<34}{f(peak_e):>12}{f(self.accounted_peak):>12}"
                     f"{'' if e is None else f'{(e.peak - self.accounted_peak) / unit:,.3f}':>10}")
        lines += ["", f"{'arrays alive (MiB)':<34}{'accounted':>12}{'measured':>12}{'gap':>10}"]
        for phase in PHASES:
            acc, meas = self.phases_accounted[phase], self.phases_measured[phase][0]
            lines.append(f"{phase:<34}{f(acc):>12}{f(meas):>12}{(meas - acc) / unit:>10,.3f}")
        d = self.measured_peak - self.accounted_peak
        lines.append(f"{'peak over the step':<34}{f(self.accounted_peak):>12}{f(self.measured_peak):>12}"
                     f"{d / unit:>10,.3f}")
        lines.append(f"(measured by {self.measured_source}; accounted peak = "
                     f"{100 * self.accounted_over_measured:.1f}% of measured, reached at "
                     f"'{self.peak_event}'; the ledger also held "
                     f"{f(self.ledger_parameter_bytes)} MiB of parameter arrays, counted as weights)")
        lines += ["", "gaps:"]
        for what, nbytes, why in self.gaps():
            if nbytes != 0 or "MISMATCH" in why:
                lines.append(f"  {what}: {nbytes / unit:+,.3f} MiB: {why}")
        exact = [w.split(":")[0] for w, nb, _ in self.gaps() if nb == 0]
        if exact:
            lines.append("  exact (0 bytes): " + "; ".join(exact))
        if e is not None:
            lines += ["", e.breakdown()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table


def _optimizer_kind(optimizer) -> str | None:
    from .optim import SGD, AdamW

    if isinstance(optimizer, AdamW):
        return "adamw"
    if isinstance(optimizer, SGD):
        return "sgd_momentum" if optimizer.momentum else "sgd"
    return None


def _model_method(model):
    """(GPTConfig, PEFT config) of a GPT or a PeftModel; (None, None) for other models."""
    from .nn.gpt import GPT
    from .peft import FullFinetuneConfig, PeftModel

    if isinstance(model, PeftModel) and isinstance(model.base_model, GPT):
        if model.active_adapter is None:
            return model.base_model.config, None
        return model.base_model.config, model.peft_config[model.active_adapter]
    if isinstance(model, GPT) and all(p.requires_grad for p in model.parameters()):
        return model.config, FullFinetuneConfig()
    return getattr(model, "config", None), None


def profile_step(model, optimizer, batch, *, measure: bool = True) -> StepReport:
    r"""Run one training step (forward with the loss, backward, ``optimizer.step()``) and
    report it three ways: estimated, accounted and measured, per category.

    Args:
        model: a GPT, or a PeftModel around one (any module ``model(idx, targets)
            -> (logits, loss)`` is accounted and measured; only a GPT gets an estimate).
        optimizer: the optimizer over its trainable parameters (SGD or AdamW).
        batch: ``(idx, targets)``, integer arrays (B, T) on any device.
        measure: also measure with the allocator (tracemalloc or CuPy's pool).

    The gradients are dropped first (a step starts without them) and are
    left in ``.grad`` afterwards. On the CPU the model's, the optimizer's and
    the method's arrays are replaced by equal copies once (so that
    tracemalloc, restarted here, sees them; see :class:`_TraceMalloc`); a
    tracemalloc session that was running is restarted.
    """
    idx, targets = batch
    B, T = tuple(int(n) for n in np.shape(backend.asnumpy(idx)))
    device = model.device
    meter = None
    if measure:
        meter = _CupyHook() if device == "gpu" else _TraceMalloc()
    try:
        books, phases, seconds = _run_step(model, optimizer, batch, meter)
    finally:
        if meter is not None:
            meter.stop()
    # The estimate for the same model, method, optimizer, batch and mode,
    # where the model is one the closed form knows.
    cfg, pc = _model_method(model)
    kind = _optimizer_kind(optimizer)
    est, notes = None, []
    first_step = books.event("start")["optimizer"] == 0     # AdamW's moments do not exist yet
    if cfg is not None and pc is not None and kind is not None:
        dtype = {np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}[np.dtype(model.dtype)]
        est = estimate(cfg, pc, optimizer=kind, batch_size=B, seq_len=T, dtype=dtype,
                       index_dtype=optimizer.index_dtype, first_step=first_step,
                       training=model.training)
    else:
        notes.append("no estimate: the model is not a GPT (or PeftModel of one) with one active "
                     "adapter, or the optimizer is neither SGD nor AdamW")
    if first_step:
        notes.append("the optimizer's first step: its state is allocated in step(), after backward")
    if books.elsewhere:
        notes.append(f"{books.elsewhere:,d} bytes of the books are host arrays beside a model on "
                     f"{device} (a method's indices): the device's allocator does not see them")
    # The report: the books' peak and where it happened, each phase's totals,
    # and the meter's readings.
    pe_label, pe = books.peak_event
    if isinstance(pe_label, tuple):          # ("backward", "computed", "GELU")
        pe_label = f"backward: {pe_label[1]} {pe_label[2]}"
    ev = {p: sum(books.event(p).values()) for p in PHASES}
    measured = phases if meter is not None else {p: (0, 0) for p in PHASES}
    start_arrays, start_total = measured["start"]
    return StepReport(
        method=pc.method if pc is not None else type(model).__name__,
        device=device, config=cfg, batch_size=B, seq_len=T, optimizer=kind or type(optimizer).__name__,
        estimated=est, accounted=dict(books.max), accounted_peak=books.peak, peak_event=pe_label,
        peak_breakdown=pe, phases_accounted=ev,
        ledger_parameter_bytes=books.ledger_params,
        measured_source=meter.source if meter is not None else "not measured",
        phases_measured=measured, measured_peak=(meter.peak if meter is not None else 0),
        python_objects=start_total - start_arrays, rounding=getattr(meter, "rounding", None),
        seconds=seconds, elsewhere=books.elsewhere, notes=notes,
    )


# ---------------------------------------------------------------------------
# The course's rule of thumb, and what fits on a card
# ---------------------------------------------------------------------------


def rule_of_thumb(config="1b", seq_lens=(256, 512, 1024, 2048), dtype="fp32",
                  bytes_per_param: float = 8.0) -> list[dict]:
    r"""Where "1B parameters: ~4 GB to store, ~24 GB to train" holds, for full fine-tuning.

    Weights, gradients and AdamW's moments are 16 bytes a parameter in
    fp32; the rule's remaining ~8 bytes a parameter are activations and
    temporaries, which grow linearly with the batch at a fixed sequence
    length. For each T this finds the batch B at which activations plus the
    other live arrays reach ``bytes_per_param`` bytes a parameter:

    .. math:: B^* = \frac{8N - X(0)}{X(1) - X(0)}

    with X(B) the estimated activations and other live arrays at batch B
    (an affine function: X(0) holds the few per-position constants).
    Returns one row per T: the batch (fractional and the nearest integer) and
    the estimate at that integer batch.
    """
    cfg = _as_config(config)
    rows = []
    for T in seq_lens:
        if T > cfg.n_positions:
            continue
        x1, x2 = (estimate(cfg, "full", batch_size=b, seq_len=T, dtype=dtype) for b in (1, 2))
        act1 = x1.bytes["activations"] + x1.bytes["other"]
        act2 = x2.bytes["activations"] + x2.bytes["other"]
        slope, icpt = act2 - act1, 2 * act1 - act2          # X(B) = icpt + slope B: X(0) = 2X(1) - X(2)
        b_star = (bytes_per_param * x1.n_params - icpt) / slope
        b_int = max(1, round(b_star))
        e = estimate(cfg, "full", batch_size=b_int, seq_len=T, dtype=dtype)
        rows.append({"seq_len": T, "batch": b_star, "batch_int": b_int, "estimate": e,
                     "act_per_param": (e.bytes["activations"] + e.bytes["other"]) / e.n_params})
    return rows


def format_rule_of_thumb(rows, config="1b") -> str:
    cfg = _as_config(config)
    e0 = rows[0]["estimate"]
    n = e0.n_params
    w = e0.bytes["weights_trainable"]
    state = e0.bytes["weights_trainable"] + e0.bytes["gradients"] + e0.bytes["optimizer"]
    lines = [
        f"rule of thumb, {config} preset (GPT-style: {cfg.n_layer} layers x {cfg.n_embd} wide, "
        f"{cfg.n_head} heads, vocab {cfg.vocab_size}): {n:,d} parameters",
        f"  to store (fp32): {_fmt_bytes(w, GiB)} ({w / n:.0f} bytes a parameter)",
        f"  weights + gradients + AdamW moments: {_fmt_bytes(state, GiB)} ({state / n:.0f} bytes a "
        "parameter, exactly)",
        "  activations and temporaries reach 8 bytes a parameter (full fine-tuning, fp32) at:",
        f"  {'seq_len':>9} {'batch':>8} {'at batch':>9} {'act/param':>10} {'all added':>12} "
        f"{'peak':>12}",
    ]
    for r in rows:
        e = r["estimate"]
        total = state + e.bytes["activations"] + e.bytes["other"]
        lines.append(f"  {r['seq_len']:>9} {r['batch']:>8.2f} {r['batch_int']:>9d} "
                     f"{r['act_per_param']:>10.2f} {_fmt_bytes(total, GiB):>12} "
                     f"{_fmt_bytes(e.peak, GiB):>12}")
    lines.append("  'all added' is the rule's sum (16 + 8 bytes a parameter: ~24 GB). The step's peak "
                 "is lower: backward frees each activation as the gradients appear, so gradients "
                 "and activations are never all alive at once.")
    return "\n".join(lines)


def fit_table(presets=("7b", "65b"), methods=("full", "lora", "prompt", "bitfit"),
              dtypes=("fp32", "mixed", "int4"), batch_size: int = 1, seq_len: int = 512,
              cards=(24, 48, 80), gradient_checkpointing: bool = False) -> list[dict]:
    """Estimated peak of each (preset, method, dtype), and whether it fits each card (GiB).

    LoRA is r = 8 on ``c_attn``, prompt tuning 20 virtual tokens, BitFit every
    bias (the configs' defaults). With ``int4`` the frozen weights are 4-bit
    (QLoRA); full fine-tuning freezes nothing, so there it equals ``mixed``.
    """
    rows = []
    for name in presets:
        for method in methods:
            for dt in dtypes:
                e = estimate(name, method, batch_size=batch_size, seq_len=seq_len, dtype=dt,
                             gradient_checkpointing=gradient_checkpointing)
                rows.append({"preset": name, "method": method, "dtype": dt, "estimate": e,
                             "peak": e.peak, "fits": {c: e.fits(c) for c in cards}})
    return rows


def format_fit_table(rows) -> str:
    cards = list(rows[0]["fits"]) if rows else []
    e0 = rows[0]["estimate"] if rows else None
    head = (f"does it fit? estimated peak of one training step, batch {e0.batch_size} x "
            f"{e0.seq_len}, AdamW" + (", gradient checkpointing" if e0.gradient_checkpointing else ""))
    lines = [head, f"{'model':<6} {'method':<8} {'dtype':<6} {'trained':>14} {'weights':>10} "
             f"{'train state':>11} {'activ.':>9} {'peak':>10}  " + "  ".join(f"{c}GB" for c in cards)]
    for r in rows:
        e = r["estimate"]
        b = e.bytes
        wts = b["weights_frozen"] + b["weights_trainable"]
        st = b["gradients"] + b["optimizer"] + b["bookkeeping"]
        act = b["activations"] + b["other"]
        fits = "  ".join(f"{'yes' if r['fits'][c] else 'no':>4}" for c in cards)
        lines.append(f"{r['preset']:<6} {r['method']:<8} {r['dtype']:<6} {e.n_trained:>14,d} "
                     f"{wts / GiB:>9.1f}G {st / GiB:>10.2f}G {act / GiB:>8.2f}G "
                     f"{e.peak / GiB:>9.1f}G  {fits}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# A picture: stacked bars, one group per method
# ---------------------------------------------------------------------------

COLORS = {
    "weights_frozen": "#9db4c0", "weights_trainable": "#2b6f97", "gradients": "#e07a5f",
    "optimizer": "#f2cc8f", "bookkeeping": "#8d6a9f", "batch": "#cccccc",
    "activations": "#3d9970", "other": "#81b29a",
}


def plot(reports, path: str) -> str:
    """Stacked bars of each report's three views at their peaks, saved as a PNG at ``path``.

    The estimated and accounted bars are split by category (the estimate at
    the moment it assumes for its peak, the books at the moment of theirs);
    the measured bar into the arrays alive at the start and what the step
    added up to its peak (arrays and Python objects). Needs matplotlib
    (imported only here).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    reports = list(reports)
    fig = Figure(figsize=(3.0 + 1.6 * len(reports), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    short = {**LABELS, "activations": "activations (saved)", "other": "other live arrays"}
    width, step, x, ticks, labels = 0.22, 0.26, 0.0, [], []
    used = set()
    for r in reports:
        e = r.estimated
        bars = []
        # The estimate's bar shows the moment its peak assumes: activations and
        # other live arrays (forward's end) or the gradients (backward's end),
        # whichever is larger; no optimizer state on a first step.
        if e is not None:
            at_peak = dict(e.bytes)
            if e.bytes["activations"] + e.bytes["other"] >= e.bytes["gradients"]:
                at_peak["gradients"] = 0
            else:
                at_peak["activations"] = at_peak["other"] = 0
            if e.first_step:
                at_peak["optimizer"] = 0
            bars.append(("est.", at_peak))
        bars.append(("acc.", r.peak_breakdown))
        for k, (name, cats) in enumerate(bars):
            bottom = 0.0
            for cat in CATEGORIES:
                h = cats.get(cat, 0) / MiB
                if h:
                    ax.bar(x + k * step, h, width, bottom=bottom, color=COLORS[cat],
                           label=None if cat in used else short[cat])
                    used.add(cat)
                    bottom += h
            ticks.append(x + k * step)
            labels.append(f"{r.method}\n{name}")
        # The measured bar has no categories, only what the allocator knows:
        # arrays and Python objects at the start, and what the step added.
        k = len(bars)
        start_arrays, start_total = r.phases_measured["start"]
        parts = [("measured: arrays at the start", start_arrays, "#555555"),
                 ("measured: Python objects at the start", start_total - start_arrays, "#999999"),
                 ("measured: added up to the peak", r.measured_peak - start_total, "#bbbbbb")]
        bottom = 0.0
        for name, h, color in parts:
            ax.bar(x + k * step, h / MiB, width, bottom=bottom, color=color, hatch="//",
                   label=None if name in used else name)
            used.add(name)
            bottom += h / MiB
        ticks.append(x + k * step)
        labels.append(f"{r.method}\nmeas.")
        x += (k + 1) * step + 0.3
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("MiB at the peak of one training step")
    r0 = reports[0]
    ax.set_title(f"GPT {r0.config.n_layer}x{r0.config.n_embd}, batch {r0.batch_size} x {r0.seq_len}: "
                 "estimated, accounted, measured", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    order = [short[c] for c in CATEGORIES] + [p[0] for p in parts]
    pairs = sorted(zip(handles, names), key=lambda hn: order.index(hn[1]))
    ax.legend([h for h, _ in pairs], [n for _, n in pairs], fontsize=6, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------
# Gradient checkpointing: the lever that does cut activations
# ---------------------------------------------------------------------------


def checkpointing_tradeoff(config=None, method="full", batch_size=16, seq_len=128, device="cpu",
                           seed=0, **knobs) -> dict:
    """Profile one step with and without gradient checkpointing, from the same weights and batch.

    Returns both :class:`StepReport` objects, the median seconds of three
    more steps of each, timed without any books or tracing (the learning
    rate is 0, so the weights stay those the gradients were compared at; a
    measurement of this machine, not a benchmark), and the largest absolute
    difference between their gradients (0.0: checkpointing replays the same
    computation, dropout masks included).
    """
    from .nn.gpt import GPT
    from .optim import AdamW
    from .peft import get_peft_model

    cfg = _as_config(config or "reference")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (batch_size, seq_len))
    targets = rng.integers(0, cfg.vocab_size, (batch_size, seq_len))
    # Both runs build the model from the same seed and take the same batch, so
    # their gradients must agree exactly.
    out = {}
    for ckpt in (False, True):
        c = dataclasses.replace(cfg, gradient_checkpointing=ckpt)
        model = get_peft_model(GPT(c, seed=seed).to(device), _method_config(method, dict(knobs)))
        model.train()
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        rep = profile_step(model, opt, (idx, targets))
        grads = {n: backend.asnumpy(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        # Timed apart from the profiled step (books and tracing slow it down).
        seconds = []
        for _ in range(3):
            opt.zero_grad()
            backend.synchronize()
            t0 = time.perf_counter()
            _, loss = model(backend.to_device(idx, device), backend.to_device(targets, device))
            loss.backward()
            opt.step()
            backend.synchronize()
            seconds.append(time.perf_counter() - t0)
        rep.seconds = float(np.median(seconds))
        out["checkpointed" if ckpt else "plain"] = (rep, grads)
    (plain, g0), (ckpt, g1) = out["plain"], out["checkpointed"]
    if g0.keys() != g1.keys():
        raise RuntimeError("checkpointing changed which parameters received gradients")
    diff = max((float(np.max(np.abs(g0[n] - g1[n]))) for n in g0), default=0.0)
    return {"plain": plain, "checkpointed": ckpt, "max_grad_diff": diff}


def format_checkpointing(result) -> str:
    p, c = result["plain"], result["checkpointed"]
    lines = [f"gradient checkpointing, {p.method}, batch {p.batch_size} x {p.seq_len} "
             "(step time: median of 3 untraced steps, a measurement, not a benchmark):",
             f"  {'':<28}{'plain':>12}{'checkpointed':>14}"]
    rows = [("activations, accounted", p.accounted["activations"], c.accounted["activations"]),
            ("activations, estimated", p.estimated.bytes["activations"] if p.estimated else 0,
             c.estimated.bytes["activations"] if c.estimated else 0),
            ("peak, accounted", p.accounted_peak, c.accounted_peak),
            ("peak, measured", p.measured_peak, c.measured_peak)]
    for name, a, b in rows:
        lines.append(f"  {name:<28}{a / MiB:>9.2f} MiB{b / MiB:>11.2f} MiB")
    lines.append(f"  {'step time':<28}{p.seconds * 1e3:>10.0f} ms{c.seconds * 1e3:>12.0f} ms")
    lines.append(f"  largest gradient difference: {result['max_grad_diff']:.3g}")
    return "\n".join(lines)
