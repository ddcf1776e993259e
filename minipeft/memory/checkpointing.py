r"""Gradient checkpointing against a plain step: same weights and batch, both profiled."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .. import backend
from ..nn.gpt import GPT
from ..optim import AdamW
from ..peft import get_peft_model
from .estimate import _method_config
from .presets import MiB, _as_config
from .report import profile_step

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

