r"""The shipped base model: how it is made (``minipeft pretrain``) and how it is loaded.

Everything after pretraining starts from one small GPT that ships inside the
package (``minipeft/assets/base.safetensors``, the reference configuration:
4 layers, 128 wide, 4 heads, 128 positions, 96 symbols; 822,016 parameters,
3.3 MB in float32), so nothing is ever downloaded.

It is made by :func:`pretrain` with a fixed seed: next-character prediction
on the synthetic corpus (:mod:`minipeft.data.corpus`), AdamW with warmup and
cosine decay. To be worth fine-tuning it must have learned the corpus: its
validation cross-entropy must sit at least 30% below a character bigram
model's on the same text. The file's metadata records both numbers, the
recipe and the corpus fingerprint it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .. import io
from ..data.corpus import (
    bigram_cross_entropy,
    fingerprint,
    lm_batches,
    lm_windows,
    pretraining_text,
)
from ..data.tokenizer import CharTokenizer
from ..nn.gpt import GPT, GPTConfig
from ..optim import AdamW, LRSchedule, param_groups
from .train import evaluate_loss, train

BASE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "base.safetensors")

#: the required margin over the bigram model's validation cross-entropy
REQUIRED_MARGIN = 0.30


#: the longest warmup a recipe gets by default (a shorter run warms up for a tenth of its steps)
DEFAULT_WARMUP = 100


@dataclass
class PretrainRecipe:
    """Every knob of the base's pretraining (stored in the checkpoint's metadata).

    ``warmup=None`` (the default) means :data:`DEFAULT_WARMUP` (100) steps, or a
    tenth of the run when that is shorter, so that ``minipeft pretrain --steps
    50`` warms up for 5 steps instead of asking for more warmup than there are
    steps. Runs of 1,000 steps or more, the shipped base's 3,000 among them,
    warm up for exactly 100. :meth:`resolved` fills it in; :func:`pretrain`
    trains with, and records, the resolved recipe. A warmup given explicitly is
    used as it is.
    """

    steps: int = 3000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int | None = None       # None: min(100, steps // 10)
    weight_decay: float = 0.1
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    #: validation batches for the final loss (None: the whole validation text)
    val_batches: int | None = None

    def resolved(self) -> PretrainRecipe:
        """This recipe with ``warmup`` filled in (see the class docstring); checks it fits the run."""
        if self.warmup is None:
            return dataclasses.replace(self, warmup=min(DEFAULT_WARMUP, self.steps // 10))
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}: "
                             "give a shorter warmup, or warmup=None for a tenth of the run "
                             f"(at most {DEFAULT_WARMUP} steps)")
        return self


def validation_loss(model: GPT, val_ids, batches: int | None = None, batch_size: int = 16,
                    seq_len: int = 128) -> float:
    """Mean cross-entropy (nats per character) over consecutive validation windows."""
    windows = lm_windows(val_ids, batch_size, seq_len, max_batches=batches)
    n = sum(1 for _ in lm_windows(val_ids, batch_size, seq_len, max_batches=batches))
    return evaluate_loss(model, windows, n)


def pretrain(recipe: PretrainRecipe | None = None, *, device: str = "cpu", progress: bool = True):
    """Train the reference GPT on the corpus; returns (model, report dict).

    The report holds the validation cross-entropy, the bigram model's on the
    same text, the margin between them, the recipe as trained (its warmup
    resolved: :meth:`PretrainRecipe.resolved`) and the training history.
    """
    rc = (recipe or PretrainRecipe()).resolved()
    tok = CharTokenizer()
    train_text, val_text = pretraining_text("train"), pretraining_text("val")
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)

    model = GPT(GPTConfig(), seed=rc.seed).to(device)
    # weight decay on the 2-D parameters (matrices and embeddings); biases and LayerNorm
    # parameters go in a group without it (nanoGPT's rule: see optim.param_groups)
    opt = AdamW(param_groups(model, rc.weight_decay), lr=rc.lr, betas=(0.9, rc.beta2))
    schedule = LRSchedule(rc.lr, rc.steps, rc.warmup, min_lr=rc.min_lr)
    batches = lm_batches(train_ids, rc.batch_size, rc.seq_len, seed=rc.seed)
    history = train(
        model, opt, batches, rc.steps, schedule=schedule, clip=rc.clip,
        eval_every=rc.eval_every,
        eval_fn=lambda m: {"val_loss": validation_loss(m, val_ids, batches=8)},
        progress=progress, desc="pretrain",
    )
    # the bar to clear: a character bigram fitted on the same training text, scored on
    # the same validation text
    val = validation_loss(model, val_ids, batches=rc.val_batches)
    bigram = bigram_cross_entropy(train_text, val_text, tok)
    report = {
        "val_loss": val,
        "bigram_val_loss": bigram,
        "margin": 1.0 - val / bigram,
        "corpus_fingerprint": fingerprint(train_text),
        "recipe": dataclasses.asdict(rc),
        "history": history.to_dict(),
    }
    return model, report


def save_base(model: GPT, report: dict, path: str = BASE_PATH) -> None:
    """Write the base checkpoint (atomically) with its config and report as metadata."""
    meta = {
        "config": json.dumps(dataclasses.asdict(model.config)),
        "recipe": json.dumps(report["recipe"]),
        "val_loss": f"{report['val_loss']:.6f}",
        "bigram_val_loss": f"{report['bigram_val_loss']:.6f}",
        "corpus_fingerprint": report["corpus_fingerprint"],
    }
    io.save_checkpoint(model, path, metadata=meta)


def base_info(path: str = BASE_PATH) -> dict:
    """The shipped base's metadata: config, recipe and both validation losses."""
    _, meta = io.load_checkpoint(path)
    out = dict(meta)
    for key in ("config", "recipe"):
        if key in out:
            out[key] = json.loads(out[key])
    for key in ("val_loss", "bigram_val_loss"):
        if key in out:
            out[key] = float(out[key])
    return out


def load_base(path: str = BASE_PATH, device: str = "cpu", **config_overrides) -> GPT:
    """The shipped pretrained GPT (or another checkpoint made by ``save_base``).

    ``config_overrides`` change run-time options only (``dropout``,
    ``gradient_checkpointing``); the architecture comes from the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no base checkpoint at {path}: the package ships one; "
            "rebuild it with `minipeft pretrain`"
        )
    state, meta = io.load_checkpoint(path)
    cfg = json.loads(meta["config"]) if "config" in meta else {}
    allowed = {"dropout", "gradient_checkpointing"}
    bad = sorted(set(config_overrides) - allowed)
    if bad:
        raise ValueError(f"load_base can only override {sorted(allowed)}, not {bad}")
    cfg.update(config_overrides)
    model = GPT(GPTConfig(**cfg))
    model.load_state_dict(state)
    return model.to(device)
