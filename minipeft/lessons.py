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
* :func:`step_flops`: the FLOPs of every matrix product one training step
  forms, forward and backward: a count, where a step's milliseconds are a
  measurement of one machine.

It imports nothing heavy at import time, so ``import minipeft`` and the test
suite never need the ``lessons`` extra.
"""

from __future__ import annotations

import os

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


def step_flops(model, batch) -> dict:
    r"""FLOPs of the matrix products one forward and backward pass on ``batch`` forms.

    Every product the engine forms is logged (:data:`minipeft.autograd.ops.matmul_log`,
    ``(batch, m, k, n)``, :math:`2\,b\,m\,k\,n` FLOPs each). Returns
    ``{"forward": ..., "backward": ..., "tokens": ...}``: the forward pass
    with the loss, then backward, and the number of tokens in ``batch``. A
    frozen weight's :math:`x^\top G` is never formed, so the backward count
    is where freezing shows; it depends on the method and the shapes only,
    never on the machine or the weights' values. The gradients are cleared
    afterwards and no optimizer step is taken: the model is left as it was.
    """
    from . import backend
    from .autograd import ops

    idx, targets = (backend.to_device(np.asarray(a), model.device) for a in batch)
    ops.matmul_log = []
    try:
        _, loss = model(idx, targets)
        forward = sum(2 * b * m * k * n for b, m, k, n in ops.matmul_log)
        loss.backward()
        backward = sum(2 * b * m * k * n for b, m, k, n in ops.matmul_log) - forward
    finally:
        ops.matmul_log = None
        model.zero_grad()
    return {"forward": int(forward), "backward": int(backward), "tokens": int(np.size(batch[0]))}
