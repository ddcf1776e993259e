r"""Learning against forgetting, traced along training: ``minipeft forgetting``.

Does PEFT forget less than full fine-tuning? A single number after training
cannot say: a run that learned the task less has also moved the model less.
So, as Biderman et al. (2024, "LoRA Learns Less and Forgets Less") do, every
run is traced over its training duration, and methods are compared where
they have learned the task *equally well*:

* **learning** is the task's answer loss on held-out (validation) examples:
  :func:`minipeft.tools.lessons.answer_loss`, exactly what fine-tuning minimises
  (cross-entropy on the answer characters only), on the first
  ``answer_examples`` validation examples;
* **forgetting** is the rise of the pretraining corpus's validation loss
  (:func:`minipeft.workflows.base.validation_loss`) with the model *as it is used*:
  the adapter active, or full fine-tuning's new weights. It is measured on a
  fixed subset, the first ``corpus_batches`` windows of 16 x
  ``corpus_seq_len`` characters of the validation text (by default
  4 x 16 x 128 = 8,192 characters): the same text at every checkpoint, so
  the curve moves only because the model does;
* both are measured at step 0 (the wrapped model before any update: every
  method traced here is the identity at initialisation) and after every
  ``every`` updates, through :func:`minipeft.workflows.train.train`'s evaluation hook;
* every method trains at each of its three learning rates
  (:data:`minipeft.peft.config.LR_GRID`, centred on
  :func:`~minipeft.peft.config.best_known_lr`) and each seed, on the same
  batches, schedule, clipping and AdamW as ``minipeft compare``.

:func:`matched_quality` reads every curve at a common answer loss (linear
interpolation between the two checkpoints where the curve first crosses
it) and gives the corpus-loss rise there, mean and spread over seeds.

After the last step each PEFT run is also measured with its adapter
detached (``disable_adapter()``). That is the base again by construction,
so its corpus loss is the base's exactly; its answer loss is the base's too:
a detached adapter does not do the task. That guarantee is a way back, not
a measurement of forgetting.

Use::

    from minipeft.workflows.forgetting import ForgettingSettings, forgetting_sweep
    result = forgetting_sweep(ForgettingSettings())
    print(result.summary())
    result.write("runs/forgetting")     # results.json, results.csv, results.png

or ``minipeft forgetting --out runs/forgetting``. Nothing is written until
everything is computed, and each file is written atomically.
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
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from .. import backend, io
from ..data.corpus import pretraining_text
from ..data.tasks import get_task
from ..data.tokenizer import CharTokenizer
from ..optim import AdamW, LRSchedule
from ..peft.config import LR_GRID
from .base import load_base, validation_loss
from .compare import build_method, cpu_threads, default_configs
from .evaluation import answer_loss as _answer_loss
from .evaluation import evaluate
from .train import train

#: the methods a sweep traces unless told otherwise: the baseline, LoRA, and a selective method
DEFAULT_METHODS = ("full", "lora", "bitfit")

#: the output files, in the order they are written
RESULT_FILES = ("results.json", "results.csv", "results.png")

#: the columns of results.csv: one row per checkpoint of every run
CSV_COLUMNS = ("method", "lr", "seed", "step", "answer_loss", "corpus_loss", "corpus_rise")


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass
class ForgettingSettings:
    """What a sweep runs: the task, methods, rates, seeds, budget and the two measurements."""

    task: str = "reverse"
    methods: tuple = DEFAULT_METHODS
    seeds: tuple = (0, 1, 2)
    #: method -> learning rates; a method left out uses its compare grid (LR_GRID)
    rates: dict = field(default_factory=dict)
    steps: int = 150
    batch_size: int = 16
    warmup: int = 20
    clip: float = 1.0
    #: updates between checkpoints (and always one after the last update)
    every: int = 15
    #: validation examples for the answer loss (a multiple of 50, the batch it is read in)
    answer_examples: int = 100
    #: the corpus subset: the first corpus_batches windows of 16 x corpus_seq_len characters
    corpus_batches: int = 4
    corpus_seq_len: int = 128
    #: test examples scored (greedy answers) after the last step; 0 scores none
    test_limit: int = 100
    device: str = "cpu"
    #: CPU threads while it runs (None: the engine's default); see compare.cpu_threads
    threads: int | None = 1

    @classmethod
    def fast_settings(cls, **overrides) -> ForgettingSettings:
        """A small sweep for a lesson's fast setting and smoke tests: one seed, short runs."""
        st = cls(seeds=(0,), steps=30, warmup=6, every=10, answer_examples=50, corpus_batches=2,
                 test_limit=0)
        return dataclasses.replace(st, **overrides)

    def rates_of(self, method: str) -> tuple[float, ...]:
        """The learning rates ``method`` is traced at."""
        return tuple(self.rates.get(method, LR_GRID[method]))

    def corpus_chars(self) -> int:
        """Characters of validation text the corpus loss reads (its fixed subset)."""
        return self.corpus_batches * 16 * self.corpus_seq_len

    def validate(self) -> None:
        """Refuse settings that cannot run, each with a one-line reason, before any work."""
        get_task(self.task)                                # an unknown task names the known ones
        if not self.methods:
            raise ValueError("no methods to trace: name at least one (e.g. --methods full,lora)")
        bad = [m for m in self.methods if m not in LR_GRID]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(LR_GRID)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"a method is named twice in {list(self.methods)}")
        if not self.seeds:
            raise ValueError("the seed list is empty: give at least one seed (e.g. --seeds 0,1,2)")
        if len(set(self.seeds)) != len(self.seeds) or any(int(s) < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {list(self.seeds)}")
        unknown = sorted(set(self.rates) - set(self.methods))
        if unknown:
            raise ValueError(f"rates are given for {unknown[0]!r}, which is not among the "
                             f"methods {list(self.methods)}")
        for m in self.methods:
            grid = self.rates_of(m)
            if not grid or any(not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)
                               for x in grid):
                raise ValueError(f"learning rates for {m!r} must be positive finite numbers, "
                                 f"got {list(grid)}")
        for name in ("steps", "batch_size", "every", "answer_examples", "corpus_batches",
                     "corpus_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.answer_examples % 50:
            raise ValueError(f"answer_examples must be a multiple of 50 (it is read in batches "
                             f"of 50), got {self.answer_examples}")
        if self.every > self.steps:
            raise ValueError(f"every ({self.every}) is more than steps ({self.steps}): the curve "
                             "would have only its two ends")
        if self.warmup < 0 or self.test_limit < 0:
            raise ValueError("warmup and test_limit must be >= 0, got "
                             f"{self.warmup} and {self.test_limit}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0 (or None), got {self.clip}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None: the engine's default), "
                             f"got {self.threads}")
        if self.device not in ("cpu", "gpu", "strict"):
            raise ValueError(f"device must be cpu, gpu or strict, got {self.device!r}")


# ---------------------------------------------------------------------------
# The two measurements
# ---------------------------------------------------------------------------


def answer_loss(model, task, n_examples: int) -> float:
    """Held-out answer loss: :func:`minipeft.workflows.evaluation.answer_loss` on the validation split."""
    return _answer_loss(model, task, "val", n_examples=n_examples)


def corpus_loss(model, val_ids, st: ForgettingSettings) -> float:
    """Pretraining-corpus validation loss (nats/char) on the fixed subset of ``st``."""
    return validation_loss(model, val_ids, batches=st.corpus_batches, batch_size=16,
                           seq_len=st.corpus_seq_len)


def corpus_ids(st: ForgettingSettings):
    """The encoded validation text, checked to hold the subset ``st`` reads."""
    ids = CharTokenizer().encode(pretraining_text("val"))
    if st.corpus_chars() + 1 > len(ids):
        raise ValueError(f"the corpus subset needs {st.corpus_chars() + 1:,d} characters; the "
                         f"validation text has {len(ids):,d}: give fewer corpus_batches")
    return ids


# ---------------------------------------------------------------------------
# One traced run
# ---------------------------------------------------------------------------


def _tick(fn):
    """``train``'s ``on_step`` calling ``fn()`` after each update and never stopping the run."""
    if fn is None:
        return None

    def on_step(step, history):
        fn()
        return False                  # a truthy return would stop training early

    return on_step


def trace_run(method: str, config, task, st: ForgettingSettings, lr: float, seed: int,
              val_ids, on_step=None) -> dict:
    """Fine-tune a fresh base with ``config`` at ``lr``, seed ``seed``; measure along the way.

    Returns ``{"method", "lr", "seed", "steps", "answer_loss", "corpus_loss", ...}``:
    ``steps[i]`` is the number of updates done at checkpoint ``i`` (0 first),
    and the two losses are measured there. After the last step: the test
    score (``test_limit`` examples, if any) and, for an adapter, both losses
    with the adapter detached.
    """
    pm = build_method(config, seed, st.device)
    opt = AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.0)
    schedule = LRSchedule(lr, st.steps, min(st.warmup, st.steps - 1), min_lr=lr * 0.1)
    batches = task.batches("train", st.batch_size, seed=seed, epochs=None)

    def measure(model) -> dict:
        return {"answer_loss": answer_loss(model, task, st.answer_examples),
                "corpus_loss": corpus_loss(model, val_ids, st)}

    t0 = time.perf_counter()
    start = measure(pm)                   # step 0: the wrapped model before any update
    history = train(pm, opt, batches, st.steps, schedule=schedule, clip=st.clip,
                    eval_every=st.every, eval_fn=measure, progress=False,
                    on_step=_tick(on_step))
    checkpoints = [{"step": 0, **start}] + [{**e, "step": e["step"] + 1} for e in history.evals]
    run = {
        "method": method, "lr": float(lr), "seed": int(seed),
        "steps": [c["step"] for c in checkpoints],
        "answer_loss": [c["answer_loss"] for c in checkpoints],
        "corpus_loss": [c["corpus_loss"] for c in checkpoints],
        "final_train_loss": history.last_loss,
        "test_score": evaluate(pm, task, "test", limit=st.test_limit) if st.test_limit else None,
        "detached_answer_loss": None, "detached_corpus_loss": None,
    }
    if method != "full":
        with pm.disable_adapter():
            run["detached_answer_loss"] = answer_loss(pm, task, st.answer_examples)
            run["detached_corpus_loss"] = corpus_loss(pm, val_ids, st)
    run["seconds"] = time.perf_counter() - t0
    return run


# ---------------------------------------------------------------------------
# Reading curves at matched quality
# ---------------------------------------------------------------------------


def interpolate_at(answer: list, corpus: list, level: float) -> float | None:
    r"""The corpus loss where a curve first reaches answer loss ``level``; None if it never does.

    Walking the checkpoints in order, the first segment whose answer loss
    goes from above ``level`` to at or below it is interpolated linearly:
    :math:`c = c_0 + (c_1 - c_0)\,(a_0 - \ell)/(a_0 - a_1)`. A curve that
    starts at or below ``level`` gives its first corpus loss.
    """
    if len(answer) != len(corpus) or not answer:
        raise ValueError(f"a curve needs as many answer losses as corpus losses (and at least "
                         f"one), got {len(answer)} and {len(corpus)}")
    if answer[0] <= level:
        return float(corpus[0])
    for (a0, c0), (a1, c1) in zip(zip(answer, corpus), zip(answer[1:], corpus[1:])):
        if a0 > level >= a1:
            return float(c0 + (c1 - c0) * (a0 - level) / (a0 - a1))
    return None


def _mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(statistics.fmean(xs)), (float(statistics.stdev(xs)) if len(xs) > 1 else None)


def curves(runs: list) -> dict:
    """``(method, lr) -> [run, ...]`` (one run per seed), in the order first seen."""
    out: dict = {}
    for r in runs:
        out.setdefault((r["method"], r["lr"]), []).append(r)
    return out


def common_level(runs: list) -> float:
    """The lowest answer loss that every method reaches, in every seed, at one of its rates.

    For each (method, rate) the level all its seeds reach is the highest of
    their minimum answer losses; a method reaches the best of its rates'; the
    common level is the highest over methods (the worst learner sets it).
    """
    by_method: dict = {}
    for (method, _), group in curves(runs).items():
        reach = max(min(r["answer_loss"]) for r in group)
        by_method[method] = min(reach, by_method.get(method, math.inf))
    if not by_method:
        raise ValueError("no runs to read")
    return float(max(by_method.values()))


def matched_quality(runs: list, base_corpus_loss: float, level: float | None = None) -> dict:
    """Every curve's corpus-loss rise at one answer loss (default :func:`common_level`).

    Returns ``{"level", "curves": [...], "methods": {...}}``. Each curve entry
    has the mean and sd over seeds of the rise (None where a seed never
    reached the level; ``reached`` counts those that did). ``methods`` holds,
    per method, the rate whose curve reached the level in every seed with the
    smallest mean rise: the least each method forgets for that much learning.
    """
    level = common_level(runs) if level is None else float(level)
    out, best = [], {}
    for (method, lr), group in curves(runs).items():
        rises = [None if (c := interpolate_at(r["answer_loss"], r["corpus_loss"], level)) is None
                 else c - base_corpus_loss for r in group]
        mean, sd = _mean_sd(rises)
        entry = {"method": method, "lr": lr, "rise_mean": mean, "rise_sd": sd,
                 "reached": sum(x is not None for x in rises), "seeds": len(group),
                 "rises": rises}
        out.append(entry)
        if entry["reached"] == entry["seeds"] and (
                method not in best or mean < best[method]["rise_mean"]):
            best[method] = entry
    return {"level": level, "curves": out, "methods": best}


# ---------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------


@dataclass
class ForgettingResult:
    """Every traced run, what they are read against, and the reading at matched quality."""

    settings: dict
    context: dict            # task, base losses, subset sizes, time taken
    runs: list               # one dict per (method, lr, seed): see trace_run

    def matched(self, level: float | None = None) -> dict:
        """:func:`matched_quality` of these runs (default level: :func:`common_level`)."""
        return matched_quality(self.runs, self.context["base_corpus_loss"], level)

    def final_rises(self) -> list:
        """Per (method, lr): the corpus-loss rise and answer loss after the last step, mean and sd."""
        out = []
        for (method, lr), group in curves(self.runs).items():
            rise = _mean_sd(r["corpus_loss"][-1] - self.context["base_corpus_loss"] for r in group)
            ans = _mean_sd(r["answer_loss"][-1] for r in group)
            out.append({"method": method, "lr": lr, "rise_mean": rise[0], "rise_sd": rise[1],
                        "answer_mean": ans[0], "answer_sd": ans[1]})
        return out

    def summary(self) -> str:
        """The end of every curve, then the reading at matched quality, as text."""
        c = self.context
        lines = [f"forgetting on {c['task']}: {len(self.runs)} runs of {self.settings['steps']} "
                 f"steps in {c['seconds']:.0f} s; base answer loss {c['base_answer_loss']:.3f}, "
                 f"base corpus loss {c['base_corpus_loss']:.4f} ({c['corpus_chars']:,d} "
                 f"characters of validation text)",
                 "after the last step (mean ± sd over seeds):",
                 f"  {'method':8s} {'lr':>7s} {'answer loss':>16s} {'corpus rise':>18s}"]
        for f in self.final_rises():
            lines.append(f"  {f['method']:8s} {f['lr']:7.0e} {_pm(f['answer_mean'], f['answer_sd'])}"
                         f" {_pm(f['rise_mean'], f['rise_sd'], signed=True):>18s}")
        m = self.matched()
        lines.append(f"at matched quality (answer loss {m['level']:.3f}, reached by every "
                     "method at one of its rates): corpus-loss rise")
        for e in m["curves"]:
            shown = (_pm(e["rise_mean"], e["rise_sd"], signed=True) if e["reached"]
                     else "never reached")
            lines.append(f"  {e['method']:8s} {e['lr']:7.0e} {shown:>18s}   "
                         f"({e['reached']}/{e['seeds']} seeds)")
        for method, e in m["methods"].items():
            lines.append(f"  least for {method}: {_pm(e['rise_mean'], e['rise_sd'], signed=True)}"
                         f" at lr {e['lr']:.0e}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"settings": self.settings, "context": self.context, "runs": self.runs,
                "matched": self.matched()}

    def to_csv(self) -> str:
        buf = _stdio.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        base = self.context["base_corpus_loss"]
        for r in self.runs:
            for step, a, cl in zip(r["steps"], r["answer_loss"], r["corpus_loss"]):
                w.writerow([r["method"], f"{r['lr']:g}", r["seed"], step, f"{a:.6f}",
                            f"{cl:.6f}", f"{cl - base:.6f}"])
        return buf.getvalue()

    def write(self, out: str) -> list[str]:
        """Write results.json, results.csv and results.png into ``out``, each atomically.

        All three are rendered before the first is written, so a failure
        while rendering writes nothing.
        """
        io.ensure_writable_dir(out)
        payload = {
            "results.json": (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8"),
            "results.csv": self.to_csv().encode("utf-8"),
            "results.png": figure_png(self),
        }
        return [str(io.atomic_write_bytes(os.path.join(out, n), payload[n]))
                for n in RESULT_FILES]


def _pm(mean, sd, digits=3, signed=False) -> str:
    if mean is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def load_results(path: str) -> ForgettingResult:
    """A :class:`ForgettingResult` from a ``results.json`` that :meth:`ForgettingResult.write` wrote."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}): run `minipeft forgetting` "
                             "again to rewrite it") from None
    if not isinstance(data, dict) or not {"settings", "context", "runs"} <= set(data):
        raise ValueError(f"{path} is not a forgetting sweep's results.json (it needs settings, "
                         "context and runs)")
    return ForgettingResult(settings=data["settings"], context=data["context"], runs=data["runs"])


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------


def forgetting_sweep(settings: ForgettingSettings | None = None, configs: dict | None = None, *,
                     progress: bool = True) -> ForgettingResult:
    """Trace every method at each of its rates and seeds (see the module docstring).

    ``configs`` maps a method to its PEFT config (default: ``minipeft
    finetune``'s, :func:`minipeft.workflows.compare.default_configs`); each run's
    initialisation seed is the run's seed.
    """
    st = settings or ForgettingSettings()
    st.validate()
    if st.device == "gpu":
        backend.require_gpu()                 # a clear error before any work
    configs = {**default_configs(), **(configs or {})}
    task = get_task(st.task)
    val_ids = corpus_ids(st)
    jobs = [(m, lr, s) for m in st.methods for lr in st.rates_of(m) for s in st.seeds]
    bar = tqdm(total=len(jobs) * st.steps, disable=not progress, dynamic_ncols=True,
               unit="step", desc="forgetting")
    t0 = time.perf_counter()
    runs = []
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        stack.enter_context(cpu_threads(st.threads if st.device != "gpu" else None))
        base = load_base(device=st.device)
        base_answer = answer_loss(base, task, st.answer_examples)
        base_corpus = corpus_loss(base, val_ids, st)
        del base
        for method, lr, seed in jobs:
            bar.set_description_str(f"{method} lr {lr:.0e} seed {seed}")
            runs.append(trace_run(method, configs[method], task, st, lr, seed, val_ids,
                                  on_step=lambda: bar.update(1)))
    context = {"task": task.name, "metric": task.metric, "base_answer_loss": base_answer,
               "base_corpus_loss": base_corpus, "corpus_chars": st.corpus_chars(),
               "answer_examples": st.answer_examples, "seconds": time.perf_counter() - t0,
               "device": st.device}
    settings_dict = dataclasses.asdict(st)
    settings_dict.update(methods=list(st.methods), seeds=list(st.seeds),
                         rates={m: list(st.rates_of(m)) for m in st.methods})
    return ForgettingResult(settings=settings_dict, context=context, runs=runs)


# ---------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------

_COLOURS = {"full": "tab:red", "lora": "tab:blue", "bitfit": "tab:green", "adapter": "tab:purple",
            "ia3": "tab:orange", "layers": "tab:brown", "mask": "tab:pink", "prompt": "tab:olive",
            "prefix": "tab:cyan"}


def plot_forgetting(result: ForgettingResult, ax=None, level: float | None = None):
    """Draw every (method, rate) curve, mean over seeds at each checkpoint, on ``ax``.

    x: held-out answer loss (log scale, reversed: rightwards is more learned);
    y: the corpus-loss rise over the base (upwards is more forgotten). The
    rates of one method share its colour, darker for larger rates; a dotted
    line marks the matched level. Returns the axes.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6.4, 4.2))
    base = result.context["base_corpus_loss"]
    groups = curves(result.runs)
    rates: dict = {}
    for method, lr in groups:
        rates.setdefault(method, []).append(lr)
    for (method, lr), group in groups.items():
        n = min(len(r["steps"]) for r in group)
        xs = [statistics.fmean(r["answer_loss"][i] for r in group) for i in range(n)]
        ys = [statistics.fmean(r["corpus_loss"][i] - base for r in group) for i in range(n)]
        shade = 0.35 + 0.65 * (sorted(rates[method]).index(lr) + 1) / len(rates[method])
        ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=_COLOURS.get(method, "k"), alpha=shade,
                label=f"{method} {lr:.0e}")
    level = result.matched(level)["level"] if level is None else level
    ax.axvline(level, ls=":", color="grey", lw=1, label=f"matched: answer loss {level:.2f}")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xscale("log")                 # the answer loss falls by orders of magnitude
    ax.invert_xaxis()
    ax.set_xlabel("held-out answer loss, log scale (reversed: rightwards = learned more)")
    ax.set_ylabel("corpus-loss rise, adapter active (up = forgot more)")
    n_seeds = len(result.settings["seeds"])
    ax.set_title(f"learning against forgetting along training: {result.context['task']}, "
                 f"{result.settings['steps']} steps, mean of {n_seeds} seed(s)", fontsize=9)
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="best")
    return ax


def figure_png(result: ForgettingResult) -> bytes:
    """The figure of :func:`plot_forgetting`, rendered to PNG bytes in memory (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    plot_forgetting(result, fig.add_subplot())
    fig.tight_layout()
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
