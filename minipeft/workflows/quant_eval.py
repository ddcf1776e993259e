r"""How much the shipped base loses when its Linear weights are stored in 4 or 8 bits.

For each format (:mod:`minipeft.nn.quant`) the base's Linear weights (the
16 matrices of the 4 blocks; embeddings, LayerNorms and the tied head stay
float, as in QLoRA) are quantized, and two things are measured:

* the weight error: the mean squared error over every quantized entry, and
  the worst block's mean squared error (a block: the entries that share one
  constant, 64 for the 4-bit formats, a column for int8);
* the pretraining-corpus loss of the quantized base: the validation
  cross-entropy (nats per character) the base records, on the same windows
  and averaged the same way (:func:`minipeft.workflows.base.validation_loss`: the mean
  of per-batch means), against the float32 base's. The change is given with
  its standard error over the batches (paired: the same batch under both
  models), so a difference between two formats can be told from the spread
  of the text.

``python -m minipeft.workflows.quant_eval`` prints the table.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..data.corpus import lm_windows, pretraining_text
from ..data.tokenizer import CharTokenizer
from ..nn import quant as Q
from .base import load_base

#: (format, double quantization) rows of the table: QLoRA's NF4 with and without
#: its second level, then the comparison formats
DEFAULT_ROWS = (("nf4", True), ("nf4", False), ("fp4", True), ("int4", True), ("int8", False))


def weight_errors(model, fmt: str, blocksize: int = 64, double_quant: bool = True) -> dict:
    r"""Quantization error of ``model``'s Linear weights in ``fmt`` (the model is not changed).

    Returns ``mse`` (over every entry of every Linear weight), ``worst_block_mse``
    (the largest per-block mean squared error in any of them), ``rel_mse``
    (mse over the weights' mean square) and ``bits`` (stored bits a weight).
    """
    sq = n = ms = nbytes = 0.0
    worst = 0.0
    for _, m in Q._linears(model):
        w = m.weight.data
        q = Q.quantize(w, fmt, blocksize, double_quant and fmt in Q.FOUR_BIT)
        mse, block = Q.block_errors(w, q)
        sq += mse * w.size
        n += w.size
        ms += float((w.astype(backend.xp(w).float64) ** 2).sum().item())
        nbytes += q.nbytes
        worst = max(worst, block)
    return {"mse": sq / n, "worst_block_mse": worst, "rel_mse": sq / ms, "bits": 8 * nbytes / n}


def batch_losses(model, val_ids, batches: int | None = None, batch_size: int = 16,
                 seq_len: int = 128) -> np.ndarray:
    """The mean cross-entropy of each validation batch (their mean is ``validation_loss``)."""
    model.eval()
    out = []
    with no_grad():
        for idx, targets in itertools.islice(lm_windows(val_ids, batch_size, seq_len), batches):
            _, loss = model(idx, targets)
            out.append(loss.item())
    return np.array(out)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b over the batches and its standard error."""
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def quantization_table(rows=DEFAULT_ROWS, blocksize: int = 64, val_batches: int | None = None,
                       device: str = "cpu") -> list[dict]:
    """One dict per row of ``rows`` (and a first one for float32): format, bits a weight,
    weight errors, the corpus loss and its change from float32."""
    val_ids = CharTokenizer().encode(pretraining_text("val"))
    base = load_base(device=device).freeze()
    ref = batch_losses(base, val_ids, val_batches)
    table = [{"format": "float32", "double_quant": False, "bits": 32.0, "mse": 0.0,
              "worst_block_mse": 0.0, "rel_mse": 0.0, "loss": float(ref.mean()), "delta": 0.0,
              "delta_se": 0.0, "batch_losses": ref}]
    for fmt, dq in rows:
        errors = weight_errors(base, fmt, blocksize, dq)
        model = Q.quantize_model(load_base(device=device).freeze(), fmt, blocksize, dq)
        losses = batch_losses(model, val_ids, val_batches)
        delta, se = paired(losses, ref)
        table.append({"format": fmt, "double_quant": dq and fmt in Q.FOUR_BIT, **errors,
                      "loss": float(losses.mean()), "delta": delta, "delta_se": se,
                      "batch_losses": losses})
    return table


def row_name(r: dict) -> str:
    return r["format"] + ("+dq" if r["double_quant"] else "")


def format_table(table: list[dict]) -> str:
    """The table as aligned text."""
    lines = [f"{'format':<10} {'bits/w':>7} {'weight MSE':>11} {'rel MSE':>8} "
             f"{'worst block':>11} {'corpus loss':>11} {'vs fp32 (se)':>18}"]
    for r in table:
        lines.append(f"{row_name(r):<10} {r['bits']:>7.3f} {r['mse']:>11.3e} "
                     f"{r['rel_mse']:>8.4f} {r['worst_block_mse']:>11.3e} {r['loss']:>11.4f} "
                     f"{r['delta']:>+9.5f} ({r['delta_se']:.5f})")
    # NF4 against the other 4-bit formats, batch by batch
    by = {row_name(r): r for r in table}
    for other in ("fp4+dq", "int4+dq"):
        if "nf4+dq" in by and other in by:
            d, se = paired(by["nf4+dq"]["batch_losses"], by[other]["batch_losses"])
            lines.append(f"nf4+dq - {other}: corpus loss {d:+.5f} (se {se:.5f}), "
                         f"weight MSE {by['nf4+dq']['mse'] / by[other]['mse']:.3f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minipeft.workflows.quant_eval", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--val-batches", type=int, default=None,
                    help="validation batches of 16 x 128 characters (default: the whole text)")
    args = ap.parse_args(argv)
    print(format_table(quantization_table(blocksize=args.blocksize,
                                          val_batches=args.val_batches)))


if __name__ == "__main__":
    main()
