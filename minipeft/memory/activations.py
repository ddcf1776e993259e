r"""Where the activations go: the levers that cut them, side by side, three views each.

At this size a training step's memory is activations: gradients and AdamW's
moments are a few MiB for full fine-tuning and well under one for PEFT, while
the saved activations are tens of MiB and grow with the sequence (the
attention's with its square). Six variants, each one step, estimated,
accounted and measured, with the activations split by owner (the ledger's
``backbone`` and ``method``, see :meth:`ActivationLedger.owned_by
<minipeft.autograd.function.ActivationLedger.owned_by>`):

* ``full``: every block keeps what its backward needs (LayerNorm's
  :math:`\hat x`, the Linears' inputs, attention's q/k/v and E, GELU's input);
* ``lora``: the frozen Linears keep nothing, but the gradient still passes
  through every block above the lowest adapter, so LayerNorm, GELU and
  attention keep theirs; each branch keeps x for :math:`\partial A` and xA for
  :math:`\partial B`: :math:`N(in + r)` floats;
* ``lora_fa``: A frozen, the branch keeps xA only (:math:`N r`);
* ``lst``: the backbone runs under no_grad and keeps nothing; the side
  network keeps the L + 1 hidden states its ladders read (N D each) and its
  own narrow blocks' activations, its attention's (B, heads, T, T) included;
* ``prompt``: the soft prompt's P positions run through every block: more
  activations than LoRA, and all of them the backbone's;
* ``full+ckpt``: full fine-tuning with gradient checkpointing, each block
  keeping only its input and recomputing the rest in backward.

Use ``minipeft memory --activations [--seq-len 512]`` or
:func:`activation_rows` and :func:`format_activation_rows`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..nn.gpt import GPT
from ..optim import AdamW
from ..peft import get_peft_model
from ..peft.config import method_config
from .estimate import estimate
from .presets import MiB, _as_config
from .report import profile_step

#: (row name, method, gradient checkpointing)
VARIANTS = (("full", "full", False), ("lora", "lora", False), ("lora_fa", "lora_fa", False),
            ("lst", "lst", False), ("prompt", "prompt", False), ("full+ckpt", "full", True))


def long_config(config="reference", seq_len: int = 512):
    """``config`` with position embeddings for ``seq_len`` tokens (n_positions raised to match)."""
    cfg = _as_config(config)
    return dataclasses.replace(cfg, n_positions=max(cfg.n_positions, int(seq_len)))


def _sequence(cfg, pc, seq_len):
    """The tokens a row runs: ``seq_len``, less a soft prompt's virtual tokens where they
    would not fit the model's positions (they take positions too)."""
    virtual = getattr(pc, "num_virtual_tokens", 0) if pc.peft_type == "PROMPT_TUNING" else 0
    return min(seq_len, cfg.n_positions - virtual), virtual


def activation_rows(config="reference", batch_size: int = 16, seq_len: int = 128, *,
                    profile: bool = True, seed: int = 0, variants=VARIANTS) -> list[dict]:
    """One dict per variant: the estimate and (``profile``) one real step's books and allocator.

    Keys: ``variant``, ``method``, ``seq_len`` (a soft prompt's rows run
    fewer tokens where P + T would exceed n_positions), ``virtual``;
    ``act_est``, ``act_acc`` (bytes), ``backbone_est``, ``method_est``,
    ``backbone_acc``, ``method_acc``; ``peak_est``, ``peak_acc``,
    ``peak_meas``, and ``no_grad_temporaries`` (estimated; see
    :class:`~minipeft.memory.estimate.Estimate`). Profiled steps use a
    fresh GPT of ``config``'s size and random token ids: memory depends on
    shapes, not on the text. Accounted and measured are None without ``profile``.
    """
    cfg0 = _as_config(config)
    rows = []
    for name, method, ckpt in variants:
        cfg = dataclasses.replace(cfg0, gradient_checkpointing=ckpt)
        pc = method_config(method)
        T, virtual = _sequence(cfg, pc, seq_len)
        est = estimate(cfg, pc, batch_size=batch_size, seq_len=T)
        row = {"variant": name, "method": method, "seq_len": T, "virtual": virtual,
               "act_est": int(est.bytes["activations"]),
               "backbone_est": est.activation_split["backbone"],
               "method_est": est.activation_split["method"], "peak_est": int(est.peak),
               "no_grad_temporaries": est.no_grad_temporaries,
               "act_acc": None, "backbone_acc": None, "method_acc": None, "peak_acc": None,
               "peak_meas": None}
        if profile:
            rng = np.random.default_rng(seed)
            batch = (rng.integers(0, cfg.vocab_size, (batch_size, T)),
                     rng.integers(0, cfg.vocab_size, (batch_size, T)))
            model = get_peft_model(GPT(cfg, seed=seed), pc).train()
            opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            rep = profile_step(model, opt, batch)
            row.update(act_acc=rep.accounted["activations"],
                       backbone_acc=rep.activation_split["backbone"],
                       method_acc=rep.activation_split["method"], peak_acc=rep.accounted_peak,
                       peak_meas=rep.measured_peak)
            del model, opt, rep
        rows.append(row)
    return rows


def format_activation_rows(rows, config="reference", batch_size: int = 16) -> str:
    """The rows as a table in MiB: activations three ways (split by owner), then the peaks."""
    cfg = _as_config(config)

    def f(v):
        return "-" if v is None else f"{v / MiB:.2f}"

    lines = [f"activations of one training step (MiB): GPT {cfg.n_layer} x {cfg.n_embd}, "
             f"{cfg.n_head} heads, n_positions {cfg.n_positions}, batch {batch_size}, AdamW, fp32",
             f"{'variant':<10}{'T':>5}{'act est.':>10}{'act acc.':>10}{'backbone':>10}"
             f"{'method':>9}{'peak est.':>11}{'peak acc.':>11}{'peak meas.':>12}"]
    for r in rows:
        T = f"{r['seq_len']}" + (f"+{r['virtual']}" if r["virtual"] else "")
        bb = r["backbone_acc"] if r["backbone_acc"] is not None else r["backbone_est"]
        me = r["method_acc"] if r["method_acc"] is not None else r["method_est"]
        lines.append(f"{r['variant']:<10}{T:>5}{f(r['act_est']):>10}{f(r['act_acc']):>10}"
                     f"{f(bb):>10}{f(me):>9}{f(r['peak_est']):>11}{f(r['peak_acc']):>11}"
                     f"{f(r['peak_meas']):>12}")
    exact = [r["variant"] for r in rows if r["act_acc"] is not None and r["act_acc"] == r["act_est"]
             and (r["backbone_acc"], r["method_acc"]) == (r["backbone_est"], r["method_est"])]
    if exact:
        lines.append(f"estimated = accounted to the byte, split included: {', '.join(exact)}")
    throw = [r for r in rows if r["variant"] == "lst" and r["no_grad_temporaries"]]
    for r in throw:
        lines.append(f"lst: the backbone's no_grad attention works in up to "
                     f"{f(r['no_grad_temporaries'])} MiB of throw-away arrays per block "
                     "(temporaries, in no book; the measured peak sees them)")
    return "\n".join(lines)


def activations_against_length(config="reference", batch_size: int = 16,
                               seq_lens=(64, 128, 256, 512, 1024), variants=VARIANTS) -> dict:
    """Estimated activation bytes per variant at each sequence length (positions raised to fit;
    a soft prompt's rows get room for its virtual tokens too): ``{variant: [bytes, ...]}``."""
    out = {name: [] for name, _, _ in variants}
    for T in seq_lens:
        for name, method, ckpt in variants:
            pc = method_config(method)
            virtual = getattr(pc, "num_virtual_tokens", 0) if pc.peft_type == "PROMPT_TUNING" else 0
            cfg = dataclasses.replace(long_config(config, T + virtual), gradient_checkpointing=ckpt)
            out[name].append(int(estimate(cfg, pc, batch_size=batch_size,
                                          seq_len=T).bytes["activations"]))
    return out
