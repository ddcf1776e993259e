r"""Estimated: one training step's memory in closed form, from the config, the method and the batch.

No array is built, so it answers for the reference model and for 7B or 65B
alike. Weights, gradients, optimizer state and bookkeeping follow from what
the method trains; activations from a walk over what the engine saves.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np

from ..nn.gpt import GPTConfig
from .presets import CATEGORIES, LABELS, OPTIMIZERS, GiB, MiB, Precision, _as_config, _fmt_bytes, _precision

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
    from ..peft.tuner import matches

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
    from ..peft.config import PeftConfig, config_class

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
    from ..peft import config as C
    from ..peft.selective import _blocks_of, _component

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
        from ..peft.tuner import matches

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


