r"""The course's rule of thumb at scale, and what fits on a card: tables from the estimate."""

from __future__ import annotations

from .estimate import estimate
from .presets import GiB, _as_config, _fmt_bytes

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
              dtypes=("fp32", "mixed", "mixed-int4"), batch_size: int = 1, seq_len: int = 512,
              cards=(24, 48, 80), gradient_checkpointing: bool = False) -> list[dict]:
    """Estimated peak of each (preset, method, dtype), and whether it fits each card (GiB).

    LoRA is r = 8 on ``c_attn``, prompt tuning 20 virtual tokens, BitFit every
    bias (the configs' defaults). With ``mixed-int4`` the frozen weights are
    half a byte (the rule of thumb for QLoRA; ``estimate(..., quantize="nf4")``
    counts NF4's exact bytes); full fine-tuning freezes nothing, so there it
    equals ``mixed``.
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
    lines = [head, f"{'model':<6} {'method':<8} {'dtype':<10} {'trained':>14} {'weights':>10} "
             f"{'train state':>11} {'activ.':>9} {'peak':>10}  " + "  ".join(f"{c}GB" for c in cards)]
    for r in rows:
        e = r["estimate"]
        b = e.bytes
        wts = b["weights_frozen"] + b["weights_trainable"]
        st = b["gradients"] + b["optimizer"] + b["bookkeeping"]
        act = b["activations"] + b["other"]
        fits = "  ".join(f"{'yes' if r['fits'][c] else 'no':>4}" for c in cards)
        lines.append(f"{r['preset']:<6} {r['method']:<8} {r['dtype']:<10} {e.n_trained:>14,d} "
                     f"{wts / GiB:>9.1f}G {st / GiB:>10.2f}G {act / GiB:>8.2f}G "
                     f"{e.peak / GiB:>9.1f}G  {fits}")
    return "\n".join(lines)


