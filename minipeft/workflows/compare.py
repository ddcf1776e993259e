r"""Every method side by side on the five axes of the PEFT trade-off: ``minipeft compare``.

One table, a row per method, all fine-tuned from the shipped base on one task:

* **parameter efficiency**: trainable parameters, count and percent, exactly
  ``print_trainable_parameters()``'s numbers;
* **memory efficiency**: a steady-state training step (the second, so AdamW's
  moments exist) on the first training batch, under
  :func:`minipeft.memory.profile_step`: the accounted peak (the engine's
  books), the measured peak beside it (the allocator), and gradients +
  optimizer state (accounted);
* **training speed**: median milliseconds per step, and the steps and
  training seconds until the validation score first reaches a stated target
  (checked every ``eval_every`` steps);
* **model quality**: the task metric on the test split, mean ± standard
  deviation over seeds, beside the majority baseline and the base model
  zero-shot;
* **inference cost**: milliseconds per generated token (greedy, key/value
  cache, batch 1) and the extra FLOPs per token against the base, before and
  after merging (LoRA, (IA)^3);
* **storage**: the adapter file against a full checkpoint;
* **forgetting**: the change in the pretraining corpus's validation loss,
  with the model as it would be used (adapter on; full fine-tuning's new
  weights) and with the adapter detached (``disable_adapter()``).

Fairness is the point, so the rules are fixed and printed with the table:

* **one budget**: every method gets the same number of optimizer steps
  (not the same wall time) of the same batch size, on the same batches in
  the same order for a given seed (``Task.batches(seed=...)``), with the
  same schedule (linear warmup, cosine decay to a tenth), clipping and AdamW;
* **each method's own learning rate**, chosen on the validation split from a
  small grid (:data:`~minipeft.peft.config.LR_GRID`, about ten-fold around the rate known to work
  on this base) with the first seed; the chosen run is kept as that seed's
  run, and the other seeds train at the chosen rate;
* **the test split is touched once per seed**, at the end of its run.

Time goes mostly into training (every method x (grid + seeds - 1) runs of
the same budget) and into greedy decoding for the validation checks and the
test scores. The default (150 steps, a grid of 3, seeds 0,1,2) takes
:data:`DEFAULT_TIME` on one CPU thread (the default ``threads``); the
``quick`` settings (:meth:`CompareSettings.quick_settings`: one rate, one
seed, 8 steps) take :data:`QUICK_TIME`, for smoke tests: their numbers are
not worth reading. ``compare --help`` and the README quote these two.

Nothing is written until everything is computed: the CSV, JSON and PNG are
rendered in memory first and then each written atomically
(:func:`minipeft.io.atomic_write_bytes`), so an interrupted run leaves no
half-written result file.

Timings (ms per step, seconds to target, ms per token) depend on the
machine and on whatever else runs on it; read them as ratios between rows
of one run, never across runs.

Use::

    from minipeft.workflows.compare import CompareSettings, compare
    result = compare(CompareSettings(task="sentiment", seeds=(0, 1, 2)))
    print(result.table())
    result.write("runs/compare")      # results.csv, results.json, results.png

or ``minipeft compare`` (``--quick``, ``--methods lora,prompt``, ``--seeds 0,1,2``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io as _stdio
import json
import math
import os
import statistics
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .. import backend, io
from ..autograd.parallel import get_num_threads, using_threads
from ..data.corpus import pretraining_text
from ..data.tasks import get_task
from ..data.tokenizer import CharTokenizer
from ..memory import CATEGORIES, COLORS, LABELS, MiB, profile_step
from ..nn.quant import DequantizationWarning
from ..optim import AdamW, LRSchedule
from ..peft import LayerSelectConfig, get_peft_model
from ..peft.config import LR_GRID, METHODS, best_known_lr, method_config
from ..peft.model import ADAPTER_WEIGHTS
from ..peft.qlora import RECIPES, quantize_base
from .base import load_base, validation_loss
from .evaluation import evaluate
from .train import train

#: the rows of the table: every method, then the recipes that put one on a quantized base
#: (``qlora``: LoRA on an NF4 base, see :mod:`minipeft.peft.qlora`)
COMPARE_METHODS = METHODS + tuple(RECIPES)

#: the output files, in the order they are written
RESULT_FILES = ("results.csv", "results.json", "results.png")

# How long a run takes on one CPU thread (the default), as ``compare --help``
# and the README say it: the default settings on a 2-core machine (about 18
# minutes for the nine methods of the README's table, timed before the qlora,
# lora_fa and lst rows joined; the twelve rows together are untimed), and
# ``minipeft compare --quick``.
#: the default settings' run time, in words
DEFAULT_TIME = "about 18 minutes for the nine course methods (the three newer rows untimed)"
#: the ``quick`` settings' run time, in words
QUICK_TIME = "about 20 seconds"

#: columns of a terminal the default table fits in (``wide`` lifts the limit)
TABLE_WIDTH = 120


def default_configs() -> dict:
    """method -> its PEFT config with the defaults ``minipeft finetune`` uses."""
    out = {}
    for m in METHODS:
        out[m] = LayerSelectConfig(layers=[-1]) if m == "layers" else method_config(m)
    for name, (m, _) in RECIPES.items():
        out[name] = method_config(m)           # qlora: LoRA's defaults, on a quantized base
    return out


def with_seed(config, seed: int):
    """``config`` with its initialisation seed (``init_seed``, a mask's ``seed``) set to ``seed``."""
    names = {f.name for f in dataclasses.fields(config)}
    for key in ("init_seed", "seed"):
        if key in names:
            return dataclasses.replace(config, **{key: int(seed)})
    return config


def memory_batch(task, batch_size: int, seed: int):
    """The batch every method's memory is profiled on: the first training batch of ``seed``."""
    return next(iter(task.batches("train", batch_size, seed=seed, epochs=None)))


def warm_step(model, optimizer, batch) -> None:
    """One plain training step, so that a profiled step after it finds the optimizer's state.

    On its first step AdamW allocates its moments only in ``step()``, after
    backward, so a first step's peak leaves them out. Every later step holds
    them from start to end: that steady state is what training costs.
    """
    idx, targets = (backend.to_device(np.asarray(a), model.device) for a in batch)
    optimizer.zero_grad()
    _, loss = model(idx, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def profile_memory(model, optimizer, batch):
    """:func:`~minipeft.memory.profile_step` of a steady-state step: a warm step (see
    :func:`warm_step`), then the profiled one, on the same batch."""
    warm_step(model, optimizer, batch)
    return profile_step(model, optimizer, batch)


def build_method(config, seed: int, device: str = "cpu", batch=None, quantize: str | None = None):
    """A fresh shipped base wrapped with ``config`` (its init seeded by ``seed``); with
    ``quantize``, its frozen Linears then stored in that format (blocks of 64, double
    quantization: :func:`minipeft.peft.qlora.quantize_base`)."""
    cfg = with_seed(config, seed)
    extra = {}
    if getattr(cfg, "selection", None) == "gradient":
        extra["calibration_batch"] = batch       # element masks chosen by gradient
    pm = get_peft_model(load_base(device=device), cfg, **extra)
    if quantize is not None:
        quantize_base(pm, quantize)
    return pm


def quantized_format(method: str) -> str | None:
    """The storage format of a row's frozen base: ``nf4`` for qlora, None for a method."""
    return RECIPES[method][1] if method in RECIPES else None


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass
class CompareSettings:
    """What ``minipeft compare`` runs: the task, the methods, the budget and the measurements."""

    task: str = "sentiment"
    methods: tuple = COMPARE_METHODS
    seeds: tuple = (0, 1, 2)
    # the one budget: optimizer steps of batch_size examples, for every method
    steps: int = 150
    batch_size: int = 16
    warmup: int = 20
    clip: float = 1.0
    lr_grid: dict = field(default_factory=lambda: dict(LR_GRID))
    # validation checks: the first val_limit validation examples every eval_every steps
    eval_every: int = 25
    val_limit: int | None = 64
    # choosing the rate: the first select_limit validation examples (None: all of them)
    select_limit: int | None = None
    # the score to reach; None: halfway from the majority baseline to a perfect score
    target: float | None = None
    test_limit: int | None = None           # None: the whole test split
    # forgetting: pretraining validation loss over forget_batches windows of 16 x forget_seq_len
    forget_batches: int = 8
    forget_seq_len: int = 96
    # inference: gen_tokens greedy tokens from each of gen_prompts validation prompts
    gen_prompts: int = 4
    gen_tokens: int = 32
    device: str = "cpu"
    # CPU threads while it runs (None: the engine's default); see cpu_threads
    threads: int | None = 1
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides) -> CompareSettings:
        """Smoke-test settings: one rate (the best known), one seed, a few steps, small subsets."""
        st = cls(seeds=(0,), steps=8, warmup=2, eval_every=8, val_limit=16, test_limit=32,
                 lr_grid={m: (best_known_lr(m),) for m in LR_GRID}, forget_batches=1,
                 gen_prompts=1, gen_tokens=8, quick=True)
        return dataclasses.replace(st, **overrides)

    def validate(self) -> None:
        """Refuse settings that cannot run, each with a one-line reason, before any work starts.

        ``compare`` calls it first, and the CLI before it makes the output
        folder: a typo must not cost a quarter of an hour of training.
        """
        get_task(self.task)                               # an unknown task names the known ones
        if not self.methods:
            raise ValueError("no methods to compare: name at least one (e.g. --methods lora)")
        bad = [m for m in self.methods if m not in COMPARE_METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(COMPARE_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"a method is named twice in {list(self.methods)}")
        if not self.seeds:
            raise ValueError("the seed list is empty: give at least one seed (e.g. --seeds 0,1,2)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"a seed is named twice in {list(self.seeds)}")
        for name in ("steps", "batch_size", "eval_every", "forget_batches", "forget_seq_len",
                     "gen_prompts", "gen_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_limit", "select_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None: the whole split), got {v}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for m in self.methods:
            grid = self.lr_grid.get(m)
            if not grid:
                raise ValueError(f"no learning rates to try for {m!r}")
            if any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
                raise ValueError(f"learning rates must be positive, got {list(grid)} for {m!r}")
        if self.target is not None and not 0.0 < self.target <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None: the engine's default), "
                             f"got {self.threads}")
        if self.device not in ("cpu", "gpu", "strict"):
            raise ValueError(f"device must be cpu, gpu or strict, got {self.device!r}")


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block on ``n`` CPU threads in all (the engine's, each product's
    parts on one BLAS thread; see :func:`~minipeft.autograd.parallel.using_threads`);
    yields what was used, in words.

    One thread is the default because this model is tiny: its matrix
    products are too small for threads to pay much, and when the cores are
    shared (a laptop doing other work, a CI runner) threads that wait for
    each other make every product several times slower. One thread also
    makes the timing columns steadier.
    """
    if n is None:
        yield f"{get_num_threads()} (the engine's default)"
        return
    with using_threads(int(n)):
        yield f"{int(n)}"


def threads_line(threads: str, cores: int | None) -> str:
    """What the header says of the CPU: the threads the run used, of how many cores."""
    return f"CPU threads: {threads}" + ("" if not cores else f" (of {cores} cores)")


def default_target(task, val_limit: int | None = None) -> float:
    """Halfway from the majority baseline (on the validation examples used) to a perfect score."""
    answers = task.answers("val")[:val_limit]
    majority = sum(a == task.majority_answer for a in answers) / len(answers)
    return round((majority + 1.0) / 2, 2)


# ---------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """One method trained with one learning rate and one seed."""

    lr: float
    seed: int
    val_curve: list          # [(steps done, validation score)], the last at the end
    step_ms: list            # each step's duration (validation checks left out)
    train_seconds: list      # training seconds after each step (validation checks left out)
    final_loss: float
    model: object = None

    @property
    def final_val(self) -> float:
        return self.val_curve[-1][1]

    def reached(self, target: float) -> tuple[int | None, float | None]:
        """(steps, training seconds) at the first check that scored >= target, or (None, None)."""
        for steps, score in self.val_curve:
            if score >= target:
                return steps, self.train_seconds[steps - 1]
        return None, None


def _train_run(config, task, st: CompareSettings, lr: float, seed: int, on_step=None,
               quantize: str | None = None) -> Run:
    """Fine-tune a fresh base with ``config`` at ``lr`` on the batches of ``seed``."""
    calibration = (memory_batch(task, st.batch_size, seed)
                   if getattr(config, "selection", None) == "gradient" else None)
    pm = build_method(config, seed, st.device, batch=calibration, quantize=quantize)
    opt = AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.0)
    schedule = LRSchedule(lr, st.steps, min(st.warmup, st.steps - 1), min_lr=lr * 0.1)
    batches = task.batches("train", st.batch_size, seed=seed, epochs=None)
    # The validation checks are timed so that they can be taken out of the
    # training time: "seconds to reach the target" is seconds of training.
    eval_seconds = []

    def eval_fn(model):
        t0 = time.perf_counter()
        score = evaluate(model, task, "val", limit=st.val_limit)
        eval_seconds.append(time.perf_counter() - t0)
        return {"val": score}

    history = train(pm, opt, batches, st.steps, schedule=schedule, clip=st.clip,
                    eval_every=st.eval_every, eval_fn=eval_fn, progress=False,
                    on_step=(lambda step, h: on_step()) if on_step else None)
    # history.times[i] is wall time after step i, checks before it included:
    # subtract each check's duration from every later time.
    evals_after = {e["step"]: s for e, s in zip(history.evals, eval_seconds)}
    train_seconds, spent = [], 0.0
    for i, t in enumerate(history.times):
        train_seconds.append(t - spent)
        spent += evals_after.get(i, 0.0)
    step_ms = [1000 * (b - a) for a, b in zip([0.0] + train_seconds[:-1], train_seconds)]
    curve = [(e["step"] + 1, e["val"]) for e in history.evals]
    return Run(lr=lr, seed=seed, val_curve=curve, step_ms=step_ms, train_seconds=train_seconds,
               final_loss=history.last_loss, model=pm)


# ---------------------------------------------------------------------------
# Measurements on a trained model
# ---------------------------------------------------------------------------


def base_flops_per_token(model) -> int:
    r"""Forward FLOPs per token of the plain base: 2 per multiply-add of every weight matrix.

    :math:`2\,(12\,L\,C^2 + C\,V)`: the four Linears of each block and the tied
    head. The attention scores (growing with the context) are left out, as
    are LayerNorms, GELU and softmax.
    """
    base = getattr(model, "base_model", model)
    n = sum(p.size for name, p in base.named_parameters()
            if p.ndim == 2 and name.startswith("h.") and "wpe" not in name)
    cfg = base.config
    return 2 * (n + cfg.n_embd * cfg.vocab_size)


def extra_flops_per_token(pm) -> int:
    r"""FLOPs a token's forward pass costs beyond the base's, with the adapter as it stands.

    Every method says so itself (``extra_flops_per_token``): LoRA's branches,
    the adapters' bottlenecks and (IA)^3's scalings (LoRA and (IA)^3 cost
    nothing once merged), the soft prompts' P more keys and values in every
    layer; selective methods and full fine-tuning change the weights in
    place: nothing extra.
    """
    return int(pm.active_method.extra_flops_per_token(pm))


def ms_per_token(model, prompts, n_tokens: int) -> float:
    """Milliseconds per greedily generated token (key/value cache on), one prompt at a time."""
    model.generate(prompts[0][None, :], 2, temperature=0.0)          # warm-up
    backend.synchronize()
    t0 = time.perf_counter()
    for p in prompts:
        model.generate(p[None, :], n_tokens, temperature=0.0)       # (1, T): batch 1
    backend.synchronize()
    return 1000 * (time.perf_counter() - t0) / (len(prompts) * n_tokens)


def adapter_file_bytes(pm) -> int:
    """Bytes of the ``adapter_model.safetensors`` that ``save_pretrained`` writes (in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="minipeft-compare-") as d:
        pm.save_pretrained(d)
        return os.path.getsize(os.path.join(d, ADAPTER_WEIGHTS))


def checkpoint_bytes(model) -> int:
    """Bytes of a full checkpoint of ``model`` (``io.save_checkpoint``, in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="minipeft-compare-") as d:
        path = os.path.join(d, "model.safetensors")
        io.save_checkpoint(model, path)
        return os.path.getsize(path)


def forgetting_loss(model, val_ids, st: CompareSettings) -> float:
    """Pretraining validation loss (nats/char) over the fixed windows of ``st``."""
    return validation_loss(model, val_ids, batches=st.forget_batches, batch_size=16,
                           seq_len=st.forget_seq_len)


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(statistics.fmean(xs)), (float(statistics.stdev(xs)) if len(xs) > 1 else None)


def separations(rows, key="test") -> list[dict]:
    r"""Every pair of methods whose mean scores differ by more than two standard deviations.

    The standard deviation of a difference of two methods' single-seed
    scores is :math:`\sqrt{s_a^2 + s_b^2}` (each :math:`s` over seeds); a
    pair counts as separated when :math:`|\bar a - \bar b|` exceeds twice
    that. Needs at least two seeds per method (otherwise nothing is said).
    """
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            sa, sb = a[f"{key}_std"], b[f"{key}_std"]
            if sa is None or sb is None:
                continue
            d = a[f"{key}_mean"] - b[f"{key}_mean"]
            sd = math.hypot(sa, sb)
            hi, lo = (a, b) if d >= 0 else (b, a)
            out.append({"better": hi["method"], "worse": lo["method"], "difference": abs(d),
                        "sd": sd, "separated": abs(d) > 2 * sd})
    return out


@dataclass
class CompareResult:
    """The rows of the comparison and everything needed to read them."""

    settings: dict
    context: dict            # task, metric, sizes, baselines, target, base numbers
    rows: list               # one dict per method (see ``CSV_COLUMNS``)
    details: dict            # per method: grid scores, per-seed values, validation curves
    peaks: dict              # per method: the accounted breakdown at the peak (for the figure)

    # -- the table -------------------------------------------------------------
    def table(self, wide: bool = False) -> str:
        """The header (the rules), a row per method under grouped columns, the differences.

        The default layout fits a terminal of :data:`TABLE_WIDTH` columns: an axis
        each, mostly in one column. ``wide`` (``compare --wide``) adds the measured
        peak, the seconds to the target, ms per token, the adapter's file size and
        the loss with the adapter detached, and the percentage to four places.
        """
        c = self.context
        t = c["target"]
        pct = ".4f" if wide else ".2f"
        # (group, column title, width, cell of a row, in the default layout too)
        cols = [
            ("", "method", 8, lambda r: r["method"], True),
            ("", "lr", 5, lambda r: _lr(r["lr"]) + ("*" if r.get("lr_at_grid_edge") else ""),
             True),
            ("parameters", "trainable", 9, lambda r: f"{r['trainable']:,d}", True),
            ("parameters", "%", 8 if wide else 6, lambda r: f"{r['trainable_pct']:{pct}}", True),
            ("memory, MiB", "peak", 6, lambda r: f"{r['mem_accounted_peak_mib']:.1f}", True),
            ("memory, MiB", "(meas.)", 7, lambda r: f"({r['mem_measured_peak_mib']:.1f})", False),
            ("memory, MiB", "grad+opt", 8, lambda r: f"{r['mem_grad_opt_mib']:.3f}", True),
            ("training speed", "ms/step", 7, lambda r: f"{r['ms_per_step']:.0f}", True),
            ("training speed", f"steps>={t:g}", 11, _steps_cell, True),
            ("training speed", "s", 5, _secs_cell, False),
            # the default layout's group titles are short: a longer one widens its column
            (f"quality ({c['n_test']} ex.)" if wide else "quality", f"test {c['metric'][:8]}",
             13, lambda r: _pm(r["test_mean"], r["test_std"], 3), True),
            ("inference (merged)" if wide else "inference", "ms/token", 11,
             lambda r: _merged(r["ms_per_token"], r["ms_per_token_merged"], ".2f"), False),
            ("inference (merged)" if wide else "inference", "+FLOPs/tok", 13 if wide else 10,
             lambda r: _merged(r["extra_flops"], r["extra_flops_merged"], "flops"), True),
            ("storage", "KB (% full)", 15,
             lambda r: f"{r['adapter_bytes'] / 1000:,.1f} ({100 * r['adapter_fraction']:.1f}%)",
             False),
            ("forgetting", "dloss on", 14,
             lambda r: _pm(r["dloss_active_mean"], r["dloss_active_std"], 3, signed=True), True),
            ("forgetting", "detached", 8,
             lambda r: "n/a" if r["dloss_detached_mean"] is None
             else f"{r['dloss_detached_mean']:+.3f}", False),
        ]
        cols = [col[:4] for col in cols if wide or col[4]]
        cells = [[f(r) for *_, f in cols] for r in self.rows]
        widths = [max([w, len(title)] + [len(row[i]) for row in cells])
                  for i, (_, title, w, _) in enumerate(cols)]
        # A group's title sits over its columns; widen its last column if the title is longer.
        for g in {g for g, *_ in cols if g}:
            idx = [i for i, col in enumerate(cols) if col[0] == g]
            span = sum(widths[i] for i in idx) + 2 * (len(idx) - 1)
            widths[idx[-1]] += max(0, len(g) + 1 - span)
        groups, x = "", 0
        for i, (g, *_rest) in enumerate(cols):
            if g and (i == 0 or cols[i - 1][0] != g):
                groups = groups.ljust(x) + g
            x += widths[i] + 2
        left = {0}
        lines = [self.header(), "", groups.rstrip(),
                 "  ".join(f"{title:{'<' if i in left else '>'}{widths[i]}}"
                           for i, (_, title, _w, _f) in enumerate(cols))]
        lines.append("-" * len(lines[-1]))
        for row in cells:
            lines.append("  ".join(f"{v:{'<' if i in left else '>'}{widths[i]}}"
                                   for i, v in enumerate(row)))
        if not wide:
            lines.append("(--wide adds: measured peak, seconds to target, ms/token, storage, "
                         "loss with the adapter detached)")
        lines += ["", self.footer()]
        return "\n".join(lines)

    def header(self) -> str:
        """The rules the table was made under, a line each: what a reader needs to trust a row.

        The task and its baselines, the one budget, how each learning rate
        was chosen, and how every axis was measured, with this run's numbers
        filled in; lines are wrapped at 110 characters.
        """
        c, s = self.context, self.settings
        seeds = ",".join(str(x) for x in s["seeds"])
        zs = "n/a" if c["zero_shot"] is None else f"{c['zero_shot']:.3f}"
        val = "all" if s["val_limit"] is None else f"the first {s['val_limit']}"
        sel = "all" if s.get("select_limit") is None else f"the first {s['select_limit']}"
        grids = "; ".join(f"{m} {' '.join(_lr(x) for x in s['lr_grid'][m])}" for m in s["methods"])
        # When every grid has several rates, every method's rate was chosen on the
        # validation split; otherwise (--quick, a one-rate --lr) some were given
        # as they are, and the rule says so.
        if all(len(g) > 1 for g in s["lr_grid"].values()):
            lr_rule = (f"each method's learning rate (lr) chosen from its grid ({grids}) by the score "
                       f"on {sel} of the {c['n_val_split']} validation examples after the last step "
                       f"(seed {s['seeds'][0]}); * marks a rate at the edge of its grid")
        else:
            lr_rule = (f"learning rates (lr) from each method's grid ({grids}): a single rate is "
                       f"used as given, several are ranked by the score on {sel} of the "
                       f"{c['n_val_split']} validation examples after the last step (seed "
                       f"{s['seeds'][0]}); * marks a rate at the edge of its grid")
        lines = [
            f"minipeft compare: {c['task']} ({c['description']})"
            + ("  [--quick: a smoke test; do not read its numbers]" if s["quick"] else ""),
            f"test {c['metric']} on {c['n_test']} test examples: majority baseline {c['majority']:.3f}, "
            f"base zero-shot {zs}",
            f"one budget for every method: {s['steps']} optimizer steps of {s['batch_size']} examples "
            f"(the same number of steps, not the same wall time); the same batches in the same order "
            f"for each seed (seeds {seeds}); AdamW, warmup {min(s['warmup'], s['steps'] - 1)} then "
            f"cosine to lr/10, gradient clipping {s['clip']:g}",
            f"{lr_rule}; the test split is scored once per seed, at the end",
            f"speed: training steps and seconds (validation checks left out) until the score on "
            f"{val} validation examples first reached {c['target']:g} ({c['target_rule']}), "
            f"checked every {s['eval_every']} steps; mean over the seeds that reached it",
            f"memory: memory.profile_step of a steady-state step (the second, AdamW's moments "
            f"allocated) on the first training batch of seed {s['seeds'][0]} ({s['batch_size']} x "
            f"{c['memory_seq_len']}): accounted peak (the engine's books) and measured peak (the "
            f"allocator, Python objects included); gradients + optimizer state as accounted",
            f"inference: greedy decoding with the key/value cache, batch 1, {c['gen_tokens']} tokens "
            f"from each of {c['gen_prompts']} validation prompts, prefill included (the base: "
            f"{c['base_ms_per_token']:.2f} ms/token); extra FLOPs per token against the base's "
            f"{c['base_flops']:,d} (weight products; attention scores left out); in parentheses: "
            f"after merging, for a method that can merge",
            f"storage: adapter_model.safetensors against a full checkpoint of "
            f"{c['full_bytes'] / 1000:,.1f} KB",
            f"forgetting: change in pretraining validation loss over {s['forget_batches']} x 16 "
            f"windows of {s['forget_seq_len']} characters (base {c['base_val_loss']:.4f} nats/char), "
            f"adapter on (full fine-tuning: its new weights) and detached (disable_adapter)",
            f"device {c['device']}, {threads_line(c['blas_threads'], c.get('cpu_cores'))}; "
            f"timings are for comparing rows of one run, not runs",
        ]
        return "\n".join(textwrap.fill(line, 110, subsequent_indent="  ") for line in lines)

    def footer(self) -> str:
        """Which differences in test score are real: the pairs beyond two standard deviations.

        One line per method that beats others clearly (``lora > bitfit,
        prompt``), then the pairs too close to call, then the methods within
        two standard deviations of a baseline. With one seed there is no
        standard deviation, and the footer says to run more seeds instead.
        """
        return "\n".join(textwrap.fill(line, 110, subsequent_indent="    ")
                         for line in self._footer_lines())

    def _footer_lines(self) -> list[str]:
        c = self.context
        seps = separations(self.rows)
        if not seps:
            return ["differences: one seed per method, so no standard deviation: "
                    "run with --seeds 0,1,2 to tell real differences from noise"]
        clear = [p for p in seps if p["separated"]]
        lines = [f"test {c['metric']} differences beyond two standard deviations "
                 f"(|mean_a - mean_b| > 2 sqrt(sd_a^2 + sd_b^2)), {len(clear)} of {len(seps)} pairs:"]
        for r in sorted(self.rows, key=lambda r: -r["test_mean"]):
            below = [p["worse"] for p in clear if p["better"] == r["method"]]
            if below:
                lines.append(f"  {r['method']:<8} > {', '.join(below)}")
        close = [f"{p['better']}~{p['worse']}" for p in seps if not p["separated"]]
        if close:
            lines.append("  within two standard deviations: " + ", ".join(close))
        for name, key in (("majority baseline", "majority"), ("base zero-shot", "zero_shot")):
            if c[key] is None:
                continue
            near = [r["method"] for r in self.rows
                    if r["test_std"] is not None and abs(r["test_mean"] - c[key]) <= 2 * r["test_std"]]
            if near:
                lines.append(f"  within two standard deviations of the {name} ({c[key]:.3f}): "
                             + ", ".join(near))
        return lines

    # -- files -------------------------------------------------------------------
    def to_json(self) -> dict:
        """Everything, for results.json: the table's rows and what stands behind them."""
        return {"settings": self.settings, "context": self.context, "rows": self.rows,
                "separations": separations(self.rows), "details": self.details,
                "memory_at_peak": self.peaks}

    @classmethod
    def from_json(cls, data: dict) -> CompareResult:
        """The result again from ``to_json()``'s output (to reprint the table or redraw the figure)."""
        return cls(settings=data["settings"], context=data["context"], rows=data["rows"],
                   details=data["details"], peaks=data["memory_at_peak"])

    def to_csv(self) -> str:
        buf = _stdio.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS})
        return buf.getvalue()

    def figure_png(self) -> bytes:
        return _render_png(self)

    def write(self, out: str) -> list[str]:
        """Write results.csv, results.json and results.png into ``out``, each atomically.

        All three are rendered before the first is written, so a failure (or
        an interrupt) while rendering writes nothing.
        """
        io.ensure_writable_dir(out)
        payload = {
            "results.csv": self.to_csv().encode("utf-8"),
            "results.json": (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode(),
            "results.png": self.figure_png(),
        }
        paths = []
        for name in RESULT_FILES:
            paths.append(str(io.atomic_write_bytes(os.path.join(out, name), payload[name])))
        return paths


#: the CSV's columns (one row per method); every key of a row
CSV_COLUMNS = [
    "method", "family", "lr", "lr_at_grid_edge", "lr_grid", "trainable", "total", "trainable_pct",
    "mem_accounted_peak_bytes", "mem_measured_peak_bytes", "mem_grad_opt_bytes",
    "mem_accounted_peak_mib", "mem_measured_peak_mib", "mem_grad_opt_mib",
    "ms_per_step", "target", "steps_to_target", "seconds_to_target", "seeds_reached",
    "test_mean", "test_std", "n_test", "n_seeds", "majority", "zero_shot",
    "ms_per_token", "ms_per_token_merged", "extra_flops", "extra_flops_merged", "base_flops",
    "adapter_bytes", "full_bytes", "adapter_fraction",
    "dloss_active_mean", "dloss_active_std", "dloss_detached_mean", "dloss_detached_std",
]


def _lr(x: float) -> str:
    """A learning rate as the grids write it: 3e-4, 1e-2, 1."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+00", "")


def _pm(mean, std, digits, signed=False):
    """A cell ``mean ± sd`` (the mean alone with one seed; ``n/a`` with none)."""
    if mean is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _steps_cell(r):
    if r["steps_to_target"] is None:
        return "not reached"
    s = f"{r['steps_to_target']:.0f}"
    return s if r["seeds_reached"] == r["n_seeds"] else f"{s} ({r['seeds_reached']}/{r['n_seeds']})"


def _secs_cell(r):
    return "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"


def _flops(n):
    return "0" if n == 0 else f"+{n / 1000:,.1f}k"


def _merged(before, after, fmt):
    """A cell ``before (after merging)``; ``before`` alone for a method that cannot merge."""
    f = _flops if fmt == "flops" else (lambda v: f"{v:{fmt}}")
    return f(before) if after is None else f"{f(before)} ({f(after)})"


def score_axis_label(context: dict, seeds) -> str:
    """The figure's score axis: a mean and its spread only when there were seeds to spread."""
    what = f"test {context['metric']} ({context['n_test']} examples)"
    if len(seeds) > 1:
        return f"{what}, mean ± sd over {len(seeds)} seeds"
    return f"{what}, one seed ({seeds[0]})"


def _render_png(result: CompareResult) -> bytes:
    """The figure as PNG bytes (written by :meth:`CompareResult.write` with the rest).

    Two panels: on the left, each method's accounted memory at the peak of a
    training step, stacked by category in :mod:`minipeft.memory`'s colours,
    with the measured peak as a black tick; on the right, the test score
    (mean, with a bar of one standard deviation when there were several
    seeds) against the trainable fraction on a log axis, with the majority and zero-shot
    baselines as lines. matplotlib is imported here only, and drawn on its
    Agg canvas: no display is needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, c = result.rows, result.context
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    # Memory: one bar per method, its categories stacked from the bottom in
    # CATEGORIES' order (a category a method does not have adds nothing).
    xs = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for cat in CATEGORIES:
        h = np.array([result.peaks[r["method"]].get(cat, 0) / MiB for r in rows])
        if h.any():
            ax.bar(xs, h, 0.6, bottom=bottom, color=COLORS[cat], label=LABELS[cat])
            bottom += h
    ax.scatter(xs, [r["mem_measured_peak_mib"] for r in rows], marker="_", s=400, color="black",
               label="measured peak", zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([r["method"] for r in rows], fontsize=8)
    ax.set_ylabel("MiB at the accounted peak of one training step")
    ax.set_title(f"memory: batch {result.settings['batch_size']} x {c['memory_seq_len']}, AdamW",
                 fontsize=9)
    # headroom above the tallest bar for the legend
    ax.set_ylim(0, 1.45 * max(max(bottom), max(r["mem_measured_peak_mib"] for r in rows)))
    ax.legend(fontsize=6, loc="upper left", ncol=3, frameon=False)

    # Quality against parameter efficiency: one point per method, named.
    for r in rows:
        x = r["trainable"] / r["total"]
        bx.errorbar([x], [r["test_mean"]], yerr=None if r["test_std"] is None else [r["test_std"]],
                    fmt="o", capsize=3)
        bx.annotate(r["method"], (x, r["test_mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    bx.axhline(c["majority"], ls="--", color="grey", lw=1, label=f"majority {c['majority']:.2f}")
    if c["zero_shot"] is not None:
        bx.axhline(c["zero_shot"], ls=":", color="black", lw=1,
                   label=f"base zero-shot {c['zero_shot']:.2f}")
    bx.set_xscale("log")
    bx.set_xlabel("trainable fraction of all parameters (log scale)")
    bx.set_ylabel(score_axis_label(c, result.settings["seeds"]))
    bx.set_title(f"quality against parameter efficiency: {c['task']}, {result.settings['steps']} steps",
                 fontsize=9)
    bx.legend(fontsize=7, loc="lower right", frameon=False)
    fig.tight_layout()
    buf = _stdio.BytesIO()                  # rendered in memory: nothing is written yet
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------


def compare(settings: CompareSettings | None = None, configs: dict | None = None, *,
            progress: bool = True) -> CompareResult:
    """Fine-tune and measure every method of ``settings`` (see the module docstring).

    ``configs`` maps a method name to its PEFT config (default:
    :func:`default_configs`, ``minipeft finetune``'s defaults); each run's
    initialisation seed is set to the run's seed.
    """
    st = settings or CompareSettings()
    st.validate()
    if st.device == "gpu":
        backend.require_gpu()                 # a clear error before any work
    configs = {**default_configs(), **(configs or {})}
    task = get_task(st.task)
    seed0 = st.seeds[0]
    target = st.target if st.target is not None else default_target(task, st.val_limit)
    rule = ("given" if st.target is not None else
            "halfway from the majority answer's validation score to a perfect score")

    # -- what every method is read against: the baselines and the base --------------
    base = load_base(device=st.device)
    n_test = len(task.examples("test")) if st.test_limit is None else min(
        st.test_limit, len(task.examples("test")))
    answers = task.answers("test")[:n_test]
    majority = sum(a == task.majority_answer for a in answers) / n_test
    val_ids = CharTokenizer().encode(pretraining_text("val"))
    need = (st.forget_batches * 16) * st.forget_seq_len + 1
    if need > len(val_ids):
        raise ValueError(f"forgetting windows need {need:,d} characters; the corpus's validation "
                         f"text has {len(val_ids):,d}")

    # Prompts for timing generation: validation prompts (the test split is
    # only for scores), each with room for the tokens and any virtual tokens.
    virtual = max(int(getattr(configs[m], "num_virtual_tokens", 0) or 0) for m in st.methods)
    prompts = [p for p in task.prompt_ids("val")][:st.gen_prompts]
    room = base.config.n_positions - virtual - max(len(p) for p in prompts)
    gen_tokens = min(st.gen_tokens, room)
    if gen_tokens < 1:
        raise ValueError("the validation prompts leave no room to generate within n_positions")
    mem_batch = memory_batch(task, st.batch_size, seed0)
    if st.forget_seq_len + virtual > base.config.n_positions:
        raise ValueError(f"forget_seq_len {st.forget_seq_len} + {virtual} virtual tokens exceed "
                         f"n_positions={base.config.n_positions}")

    total_steps = sum(st.steps * (len(st.lr_grid[m]) + len(st.seeds) - 1) for m in st.methods)
    bar = tqdm(total=total_steps, disable=not progress, dynamic_ncols=True, unit="step",
               desc="compare")
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        threads = stack.enter_context(cpu_threads(st.threads if st.device != "gpu" else None))
        bar.set_description_str("baselines")
        zero_shot = evaluate(base, task, "test", limit=n_test)
        base_loss = forgetting_loss(base, val_ids, st)
        base_speed = ms_per_token(base, prompts, gen_tokens)
        context = {
            "task": task.name, "description": task.description, "metric": task.metric,
            "n_test": n_test, "n_val_split": len(task.examples("val")),
            "majority": majority, "zero_shot": zero_shot, "target": target,
            "target_rule": rule, "base_val_loss": base_loss, "base_ms_per_token": base_speed,
            "base_flops": base_flops_per_token(base), "gen_tokens": gen_tokens,
            "gen_prompts": len(prompts), "memory_seq_len": int(np.shape(mem_batch[0])[1]),
            "full_bytes": checkpoint_bytes(base), "device": st.device, "blas_threads": threads,
            "cpu_cores": os.cpu_count(),
        }
        del base
        rows, details, peaks = [], {}, {}
        for method in st.methods:
            row, detail, peak = _compare_one(method, configs[method], task, st, context,
                                             target, n_test, val_ids, prompts, gen_tokens,
                                             mem_batch, bar)
            rows.append(row)
            details[method] = detail
            peaks[method] = peak
    settings_dict = dataclasses.asdict(st)
    settings_dict["methods"] = list(st.methods)
    settings_dict["seeds"] = list(st.seeds)
    settings_dict["lr_grid"] = {m: list(st.lr_grid[m]) for m in st.methods}
    return CompareResult(settings=settings_dict, context=context, rows=rows, details=details,
                         peaks=peaks)


def _compare_one(method, config, task, st, context, target, n_test, val_ids, prompts,
                 gen_tokens, mem_batch, bar):
    """One row: memory, the grid, the seeds, and the measurements on the trained models."""
    seed0 = st.seeds[0]
    quantize = quantized_format(method)

    # -- memory and parameter counts: a fresh model, one profiled step --------------
    bar.set_description_str(f"{method}: memory")
    pm = build_method(config, seed0, st.device, batch=mem_batch, quantize=quantize)
    trainable, total = pm.get_nb_trainable_parameters()
    opt = AdamW(pm.trainable_parameters(), lr=st.lr_grid[method][0])
    rep = profile_memory(pm, opt, mem_batch)
    grad_opt = rep.accounted["gradients"] + rep.accounted["optimizer"]
    acc_peak, meas_peak = int(rep.accounted_peak), int(rep.measured_peak)
    peak = {k: int(v) for k, v in rep.peak_breakdown.items()}
    del pm, opt, rep

    def tick():
        bar.update(1)

    # -- the learning rate: the grid on the validation split, first seed ------------
    # Each rate's run is scored on the whole validation split after its last
    # step (the checks' subset is too small to rank close rates); ties go to
    # the run that was better along the way, then to the smaller rate. With
    # one rate there is nothing to choose and nothing extra to score.
    grid = st.lr_grid[method]
    grid_scores, best = [], None
    for lr in grid:
        bar.set_description_str(f"{method} lr {lr:.0e} seed {seed0}")
        run = _train_run(config, task, st, lr, seed0, on_step=tick, quantize=quantize)
        mean_val = statistics.fmean(s for _, s in run.val_curve)
        select = (evaluate(run.model, task, "val", limit=st.select_limit) if len(grid) > 1
                  else run.final_val)
        grid_scores.append({"lr": lr, "val_selection": select, "val_last_check": run.final_val,
                            "val_mean_over_checks": mean_val, "final_loss": run.final_loss})
        key = (select, mean_val)
        if best is None or key > best[0]:
            if best is not None:
                best[1].model = None
            best = (key, run)
        else:
            run.model = None
    runs = [best[1]]
    lr = runs[0].lr
    at_edge = len(grid) > 1 and lr in (min(grid), max(grid))

    # -- the other seeds at the chosen rate --------------------------------------------
    for seed in st.seeds[1:]:
        bar.set_description_str(f"{method} lr {lr:.0e} seed {seed}")
        runs.append(_train_run(config, task, st, lr, seed, on_step=tick, quantize=quantize))

    # -- scores and forgetting of every seed's model; the test split once each -----
    per_seed = []
    for run in runs:
        bar.set_description_str(f"{method} seed {run.seed}: test")
        pm = run.model
        test = evaluate(pm, task, "test", limit=n_test)
        on = forgetting_loss(pm, val_ids, st) - context["base_val_loss"]
        off = None
        if method != "full":
            with pm.disable_adapter():
                off = forgetting_loss(pm, val_ids, st) - context["base_val_loss"]
        steps, secs = run.reached(target)
        per_seed.append({"seed": run.seed, "test": test, "dloss_active": on, "dloss_detached": off,
                         "steps_to_target": steps, "seconds_to_target": secs,
                         "val_curve": run.val_curve, "final_loss": run.final_loss})

    # -- inference cost and storage, on the first seed's model -------------------------
    bar.set_description_str(f"{method}: inference")
    pm = runs[0].model
    speed = ms_per_token(pm, prompts, gen_tokens)
    flops = extra_flops_per_token(pm)
    speed_merged = flops_merged = None
    if pm.active_method.mergeable:
        # merging into a quantized base dequantizes it (and warns): the merged model
        # is float, as it would be served; this model is not used after
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DequantizationWarning)
            pm.merge_adapter()
        speed_merged = ms_per_token(pm, prompts, gen_tokens)
        flops_merged = extra_flops_per_token(pm)
        pm.unmerge_adapter()
    adapter_bytes, full_bytes = adapter_file_bytes(pm), context["full_bytes"]
    for run in runs:
        run.model = None

    # -- the row ---------------------------------------------------------------------------
    test_mean, test_std = _mean_std(s["test"] for s in per_seed)
    on_mean, on_std = _mean_std(s["dloss_active"] for s in per_seed)
    off_mean, off_std = _mean_std(s["dloss_detached"] for s in per_seed)
    reached = [s for s in per_seed if s["steps_to_target"] is not None]
    step_ms = [ms for run in runs for ms in run.step_ms]
    row = {
        "method": method, "family": config.family, "lr": lr, "lr_at_grid_edge": at_edge,
        "lr_grid": " ".join(f"{x:g}" for x in st.lr_grid[method]),
        "trainable": int(trainable), "total": int(total),
        "trainable_pct": 100 * trainable / total,
        "mem_accounted_peak_bytes": acc_peak,
        "mem_measured_peak_bytes": meas_peak, "mem_grad_opt_bytes": int(grad_opt),
        "mem_accounted_peak_mib": acc_peak / MiB, "mem_measured_peak_mib": meas_peak / MiB,
        "mem_grad_opt_mib": grad_opt / MiB,
        "ms_per_step": float(np.median(step_ms)), "target": target,
        "steps_to_target": (statistics.fmean(s["steps_to_target"] for s in reached)
                            if reached else None),
        "seconds_to_target": (statistics.fmean(s["seconds_to_target"] for s in reached)
                              if reached else None),
        "seeds_reached": len(reached), "test_mean": test_mean, "test_std": test_std,
        "n_test": n_test, "n_seeds": len(per_seed), "majority": context["majority"],
        "zero_shot": context["zero_shot"],
        "ms_per_token": speed, "ms_per_token_merged": speed_merged,
        "extra_flops": flops, "extra_flops_merged": flops_merged,
        "base_flops": context["base_flops"],
        "adapter_bytes": int(adapter_bytes), "full_bytes": int(full_bytes),
        "adapter_fraction": adapter_bytes / full_bytes,
        "dloss_active_mean": on_mean, "dloss_active_std": on_std,
        "dloss_detached_mean": off_mean, "dloss_detached_std": off_std,
    }
    detail = {"lr_grid": grid_scores, "seeds": per_seed}
    return row, detail, peak
