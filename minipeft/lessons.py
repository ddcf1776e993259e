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
* :func:`answer_loss`: the quantity fine-tuning minimises, measured on
  held-out examples (cross-entropy on the answer characters only).
* :func:`finetune_and_score`: train a PEFT config on a task the way
  ``minipeft finetune`` does (:func:`minipeft.finetune.finetune`), keep it in
  memory, and score it: the training history, the held-out answer loss and
  the test metric, which is what a lesson plots and asserts.
* :func:`count_flops`, :func:`forward_flops` and :func:`step_flops`: the
  FLOPs of every matrix product a forward pass, or a training step forward
  and backward, forms: a count, where a step's milliseconds are a
  measurement of one machine.

It imports nothing heavy at import time, so ``import minipeft`` and the test
suite never need the ``lessons`` extra.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

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
    from . import __version__

    setting = ("fast setting (MINIPEFT_FAST=1): fewer steps and examples, the same claims"
               if FAST else "full setting")
    print(f"minipeft {__version__}, {setting}")
    plt.rcParams.update({"figure.figsize": (6.4, 3.6), "figure.dpi": 90,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def answer_loss(model, task, split: str = "val", n_examples: int = 200,
                batch_size: int = 50) -> float:
    r"""Mean cross-entropy (nats per character) on the answers of ``split``'s first examples.

    The prompt characters carry the ignore index (see
    :meth:`~minipeft.data.tasks.Task.batches`), so this is exactly what
    fine-tuning minimises, on examples it never trained on. No gradients,
    eval mode; a few forward passes, far cheaper than generating answers.
    """
    from .train import evaluate_loss

    if n_examples % batch_size:
        raise ValueError(f"n_examples ({n_examples}) must be a multiple of batch_size "
                         f"({batch_size}): every batch is weighted alike")
    batches = task.batches(split, batch_size, shuffle=False)
    return evaluate_loss(model, batches, n_examples // batch_size)


@dataclass
class Finetuned:
    """What :func:`finetune_and_score` returns: the trained model and what a lesson reads of it."""

    model: object           #: the PeftModel, adapter still attached (unmerged)
    history: object         #: the training :class:`~minipeft.train.History` (losses by step)
    answer_loss: float      #: held-out answer loss (:func:`answer_loss`, validation split)
    score: float            #: the task's metric on the first ``n_test`` test examples
    trainable: int          #: trained parameters (a masked weight counts its selected entries)


def finetune_and_score(config, task, lr: float, steps: int, n_test: int,
                       batch_size: int = 16, quantize: str | None = None,
                       seed: int = 0) -> Finetuned:
    r"""Fine-tune the shipped base with ``config`` on ``task``, as ``minipeft finetune`` does.

    This is :func:`minipeft.finetune.finetune` (wrap, AdamW over what trains
    with no weight decay, warmup and cosine decay to ``lr / 10``, gradient
    clipping at 1, batches of the training split in the order of seed 0),
    with nothing saved to disk and no zero-shot score, followed by
    :func:`answer_loss` on the validation split. ``lr`` is the lesson's own
    rate (each lesson says why it picked it). The warmup is 20 steps, or a
    fifth of a shorter run (the fast setting), so that a run of a few dozen
    steps still spends most of them at the full rate. ``n_test`` test
    examples are scored (greedy answers, the task's metric). ``quantize``
    stores the frozen Linears in that format first (``"nf4"`` with LoRA:
    QLoRA); ``seed`` orders the batches (and seeds the adapter's init).
    """
    from .compare import with_seed
    from .finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                warmup=min(20, steps // 5), eval_limit=n_test)
    config = with_seed(config, seed) if seed else config
    result = finetune(config, task.name, settings, out=None, progress=False, zero_shot=False,
                      quantize=quantize)
    return Finetuned(model=result.model, history=result.history,
                     answer_loss=answer_loss(result.model, task), score=result.score,
                     trainable=result.trainable)


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

    The engine logs each product it forms while
    :data:`minipeft.autograd.ops.matmul_log` is a list, as ``(batch, m, k,
    n)``: :math:`2\,b\,m\,k\,n` FLOPs. Read ``.total`` of what this yields at
    any point (after the forward pass, after backward); the log is switched
    off again on leaving the block, even on an error::

        with lessons.count_flops() as flops:
            _, loss = model(idx, targets)
            forward = flops.total
            loss.backward()
        backward = flops.total - forward
    """
    from .autograd import ops

    log = []
    previous, ops.matmul_log = ops.matmul_log, log
    try:
        yield FlopCount(log)
    finally:
        ops.matmul_log = previous


def forward_flops(model, idx) -> int:
    r"""FLOPs of the matrix products of one forward pass of ``model`` on ``idx`` (no loss).

    Run without gradients (:func:`minipeft.no_grad`): a forward pass forms
    the same products either way. This is the inference cost a lesson sets
    beside a method's ``extra_flops_per_token``: ``forward_flops(peft, idx)
    - forward_flops(base, idx)`` is exactly that times ``idx.size`` for a
    method that adds work to every token, and 0 for a merged one.
    """
    from . import backend, no_grad

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
    from . import backend

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
