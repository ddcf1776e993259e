r"""What the lesson notebooks (``lessons/``) share, so that no notebook repeats it.

The notebooks build everything with the package's own code; this module holds
only the few lines each of them would otherwise copy:

* :func:`setup`: the first cell of every lesson. It checks that the
  ``lessons`` extra is installed (matplotlib) and, when it is not, stops with
  the command that installs it; it says which setting the lesson runs in.
* :data:`FAST` and :func:`pick`: the fast setting. ``MINIPEFT_FAST=1`` in the
  environment (the test suite sets it) makes the lessons smaller: fewer
  training steps, fewer examples scored. It never changes *what* a lesson
  computes or asserts, only how much of it.
* :func:`answer_loss` (:func:`minipeft.workflows.evaluation.answer_loss`): the
  quantity fine-tuning minimises, measured on held-out examples
  (cross-entropy on the answer characters only).
* :func:`finetune_and_score`: train a PEFT config on a task the way
  ``minipeft finetune`` does (:func:`minipeft.workflows.finetune.finetune`), keep it in
  memory, and score it: the training history, the held-out answer loss and
  the test metric, which is what a lesson plots and asserts;
  :func:`finetune_seeds` does it once per seed, for the spread.
* :func:`say` and :func:`table`: prose whose figures the run computed (a
  computed Markdown cell), and the one layout every printed table uses.
* :func:`count_flops`, :func:`forward_flops` and :func:`step_flops`: the
  FLOPs of every matrix product a forward pass, or a training step forward
  and backward, forms: a count, where a step's milliseconds are a
  measurement of one machine.

It imports nothing heavy at import time, so ``import minipeft`` and the test
suite never need the ``lessons`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from .. import __version__, backend, no_grad
from ..autograd import fast_path_on, profile
from ..workflows.compare import with_seed
from ..workflows.evaluation import answer_loss
from ..workflows.finetune import FinetuneSettings, finetune

#: The command that installs what the notebooks need beyond the package.
INSTALL_COMMAND = "pip install -e '.[lessons]'"


def _read_fast() -> bool:
    return os.environ.get("MINIPEFT_FAST", "").strip().lower() not in ("", "0", "false", "no")


#: True when ``MINIPEFT_FAST`` is set (to anything but 0/false/no): small sizes, few steps.
FAST = _read_fast()


def pick(full, fast):
    """``fast`` under ``MINIPEFT_FAST=1``, ``full`` otherwise (sizes and step counts only)."""
    return fast if FAST else full


class LessonsExtraMissing(ImportError):
    """Raised by :func:`setup` when a package the notebooks need cannot be imported."""


def setup():
    """Check the ``lessons`` extra, announce the setting, and return ``matplotlib.pyplot``.

    Every lesson starts with ``plt = lessons.setup()``. Without matplotlib
    it raises :class:`LessonsExtraMissing`, whose message is the command to
    run (``pip install -e '.[lessons]'`` in the repository root).
    """
    try:
        import matplotlib  # noqa: F401
        import matplotlib.pyplot as plt
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "matplotlib"
        raise LessonsExtraMissing(
            f"the lessons extra is missing ({missing} cannot be imported). Install it with\n\n"
            f"    {INSTALL_COMMAND}\n\n"
            "in the repository root (it adds Jupyter and matplotlib), then restart the kernel."
        ) from None
    setting = ("fast setting (MINIPEFT_FAST=1): fewer steps and examples, the same claims"
               if FAST else "full setting")
    print(f"minipeft {__version__}, {setting}")
    plt.rcParams.update({"figure.figsize": (6.4, 3.6), "figure.dpi": 90,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


@dataclass
class Finetuned:
    """What :func:`finetune_and_score` returns: the trained model and what a lesson reads of it."""

    model: object           #: the PeftModel, adapter still attached (unmerged)
    history: object         #: the training :class:`~minipeft.workflows.train.History` (losses by step)
    answer_loss: float      #: held-out answer loss (:func:`answer_loss`, validation split)
    score: float            #: the task's metric on the first ``n_test`` test examples
    trainable: int          #: trained parameters (a masked weight counts its selected entries)


def finetune_and_score(config, task, lr: float, steps: int, n_test: int,
                       batch_size: int = 16, quantize: str | None = None, seed: int = 0,
                       n_val: int = 200) -> Finetuned:
    r"""Fine-tune the shipped base with ``config`` on ``task``, as ``minipeft finetune`` does.

    This is :func:`minipeft.workflows.finetune.finetune` (wrap, AdamW over what trains
    with no weight decay, warmup and cosine decay to ``lr / 10``, gradient
    clipping at 1, batches of the training split in the order of seed 0),
    with nothing saved to disk and no zero-shot score, followed by
    :func:`answer_loss` on the validation split. ``lr`` is the lesson's own
    rate (each lesson says why it picked it). The warmup is 20 steps, or a
    fifth of a shorter run (the fast setting), so that a run of a few dozen
    steps still spends most of them at the full rate. ``n_test`` test
    examples are scored (greedy answers, the task's metric), and the answer
    loss is taken over the first ``n_val`` validation examples (a multiple
    of 50). ``quantize`` stores the frozen Linears in that format first
    (``"nf4"`` with LoRA: QLoRA); ``seed`` orders the batches (and seeds the
    adapter's init).
    """
    settings = FinetuneSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                warmup=min(20, steps // 5), eval_limit=n_test)
    config = with_seed(config, seed) if seed else config
    result = finetune(config, task.name, settings, out=None, progress=False, zero_shot=False,
                      quantize=quantize)
    return Finetuned(model=result.model, history=result.history,
                     answer_loss=answer_loss(result.model, task, n_examples=n_val),
                     score=result.score, trainable=result.trainable)


@dataclass
class Seeded:
    """What :func:`finetune_seeds` returns: one :class:`Finetuned` per seed, and their spread."""

    runs: list              #: the :class:`Finetuned` runs, in the order of the seeds
    seeds: list             #: the seeds, each one both the data order and the init seed

    def _stat(self, key: str):
        values = np.array([getattr(run, key) for run in self.runs], dtype=np.float64)
        # the sample standard deviation (n - 1), 0 for a single run
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    @property
    def answer_loss(self) -> tuple[float, float]:
        """(mean, sample standard deviation) of the runs' held-out answer losses."""
        return self._stat("answer_loss")

    @property
    def score(self) -> tuple[float, float]:
        """(mean, sample standard deviation) of the runs' test scores."""
        return self._stat("score")

    @property
    def trainable(self) -> int:
        """Trained parameters (the same for every seed)."""
        return self.runs[0].trainable


def finetune_seeds(config, task, lr: float, steps: int, n_test: int, seeds=(0, 1, 2),
                   **kwargs) -> Seeded:
    r""":func:`finetune_and_score` once per seed: the spread a single run hides.

    Each seed sets the order of the training batches and, for a config with
    an ``init_seed`` (LoRA's A, an adapter's down-projection), the random
    initialisation too, so two seeds differ in everything that is drawn.
    Other keywords (``batch_size``, ``n_val``) go to :func:`finetune_and_score`.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed, e.g. seeds=(0, 1, 2)")
    has_init = "init_seed" in {f.name for f in dataclasses.fields(config)}
    runs = [finetune_and_score(dataclasses.replace(config, init_seed=s) if has_init else config,
                               task, lr, steps, n_test, seed=s, **kwargs) for s in seeds]
    return Seeded(runs=runs, seeds=seeds)


class FlopCount:
    """The matrix-product FLOPs logged so far inside :func:`count_flops` (``.total``)."""

    def __init__(self, log: list):
        self._log = log

    @property
    def total(self) -> int:
        r""":math:`\sum 2\,b\,m\,k\,n` over every product logged so far."""
        return int(sum(2 * b * m * k * n for b, m, k, n in self._log))


@contextlib.contextmanager
def count_flops():
    r"""Count the FLOPs of every matrix product formed inside the ``with`` block.

    The engine's fast kernels (the default path) log each product they form
    while :data:`minipeft.autograd.profile.matmul_log` is a list, as
    ``(batch, m, k, n)``: :math:`2\,b\,m\,k\,n` FLOPs. Read ``.total`` of what
    this yields at any point (after the forward pass, after backward); the
    log is switched off again on leaving the block, even on an error::

        with lessons.count_flops() as flops:
            _, loss = model(idx, targets)
            forward = flops.total
            loss.backward()
        backward = flops.total - forward
    """
    if not fast_path_on():
        raise RuntimeError("count_flops counts the products of the fast kernels; the reference "
                           "ops are on (reference_ops() or MINIPEFT_REFERENCE=1): count outside them")
    log = []
    previous, profile.matmul_log = profile.matmul_log, log
    try:
        yield FlopCount(log)
    finally:
        profile.matmul_log = previous


def forward_flops(model, idx) -> int:
    r"""FLOPs of the matrix products of one forward pass of ``model`` on ``idx`` (no loss).

    Run without gradients (:func:`minipeft.no_grad`): a forward pass forms
    the same products either way. This is the inference cost a lesson sets
    beside a method's ``extra_flops_per_token``: ``forward_flops(peft, idx)
    - forward_flops(base, idx)`` is exactly that times ``idx.size`` for a
    method that adds work to every token, and 0 for a merged one.
    """
    idx = backend.to_device(np.asarray(idx), model.device)
    with no_grad(), count_flops() as flops:
        model(idx)
    return flops.total


def step_flops(model, batch) -> dict:
    r"""FLOPs of the matrix products one forward and backward pass on ``batch`` forms.

    Every product the engine forms is counted (:func:`count_flops`). Returns
    ``{"forward": ..., "backward": ..., "tokens": ...}``: the forward pass
    with the loss, then backward, and the number of tokens in ``batch``. A
    frozen weight's :math:`x^\top G` is never formed, so the backward count
    is where freezing shows; it depends on the method and the shapes only,
    never on the machine or the weights' values. The gradients are cleared
    afterwards and no optimizer step is taken: the model is left as it was.
    """
    idx, targets = (backend.to_device(np.asarray(a), model.device) for a in batch)
    try:
        with count_flops() as flops:
            _, loss = model(idx, targets)
            forward = flops.total
            loss.backward()
        backward = flops.total - forward
    finally:
        model.zero_grad()
    return {"forward": forward, "backward": backward, "tokens": int(np.size(batch[0]))}


def say(text: str) -> None:
    """Show ``text`` as Markdown in the notebook: prose whose figures the run computed.

    A lesson never types a figure that its run computes into a Markdown cell
    (``tests/test_lesson_prose.py`` checks that). It writes the sentence as
    an f-string instead, ``lessons.say(f"... {score:.2f} ...")``, so that the
    text and the numbers come from the same run, fast or full. Outside
    IPython the text is printed.
    """
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - the lessons extra brings IPython
        print(text)
        return
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))


def table(rows, header, fmt=None) -> str:
    """The lessons' one table layout: a header line, then a line per row, columns aligned.

    ``rows`` is a sequence of sequences, ``header`` a column title for each
    entry, ``fmt`` an optional format spec for each column (``",d"``,
    ``".3f"``; ``""`` for as-is); strings are never formatted. The first
    column is aligned left (names), the others right (numbers). Returns the
    text, for ``print``.
    """
    header = [str(h) for h in header]
    fmt = list(fmt) if fmt is not None else [""] * len(header)
    if any(len(row) != len(header) for row in rows) or len(fmt) != len(header):
        raise ValueError(f"every row and fmt need {len(header)} entries, one per column of "
                         f"{header}")
    cells = [[v if isinstance(v, str) else format(v, f) for v, f in zip(row, fmt)] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(header)] + [line(r) for r in cells])
