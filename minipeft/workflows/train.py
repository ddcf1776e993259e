r"""The training loop: batches in, a History out.

One step of training is five lines, and :func:`train` is those five lines
plus the bookkeeping that makes a run readable:

1. set the learning rate for this step (an optional schedule),
2. forward: ``logits, loss = model(idx, targets)`` (mean cross-entropy),
3. backward: ``loss.backward()`` fills ``.grad`` of every trainable parameter,
4. clip the global gradient norm (optional),
5. ``optimizer.step()``, then drop the gradients before the next step.

Around them: a tqdm progress bar showing the loss (quiet on request), periodic
evaluation, and a :class:`History` of steps, losses, learning rates, gradient
norms, evaluations and wall time, which lessons plot and the CLI saves.

Batches are host NumPy integer arrays ``(idx, targets)`` of shape (B, T);
the loop moves them to the model's device. Randomness is explicit: nothing
here draws random numbers, the batches and the model take their generators
or seeds from the caller, and :func:`set_seed` exists for scripts that want
every library seeded at once.

Timings in the History are for reading, never for asserting.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from .. import backend
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..nn.module import Module
from ..optim import Optimizer, clip_grad_norm_
from ..validate import Float, Int

__all__ = ["History", "evaluate_loss", "set_seed", "train"]

#: what a schedule may hand the optimizer: a finite rate >= 0
_LR = Float(low=0.0)


# ---------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------


def set_seed(seed: int) -> np.random.Generator:
    """Seed Python's ``random``, NumPy's and CuPy's global generators; return a fresh Generator.

    minipeft's own code never draws from a global generator: it takes a seed
    or a ``Generator`` explicitly. The globals are seeded for third-party code
    a script may call. Use the returned ``np.random.Generator`` (or
    ``np.random.default_rng(seed)`` directly) for batches.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if backend.gpu_available():
        backend.require_gpu().random.seed(seed % 2**32)
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------


@dataclass
class History:
    """What a training run did, step by step.

    ``steps[i]`` is the 0-based index of an update; ``losses[i]`` the training
    loss of the batch it was computed from (before the update) and ``lrs[i]``
    the learning rate it used. ``grad_norms`` holds the norm before clipping
    (only when clipping is on). ``evals`` holds one dict per evaluation,
    ``{"step": i, <metric>: value, ...}``, made right after update ``i``.
    ``times[i]`` is seconds since the start after update ``i``; ``wall_time``
    the whole run, evaluations included.
    """

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    wall_time: float = 0.0

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def last_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    def to_dict(self) -> dict:
        """Plain lists and numbers, ready for JSON."""
        return asdict(self)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _to_device(a, device: str):
    """A batch array on the model's device (host NumPy in; Tensors pass through)."""
    if isinstance(a, Tensor):
        return a
    return backend.to_device(a, device)


def _modes(model: Module) -> list[tuple[Module, bool]]:
    """Every submodule's training flag, to be restored exactly after evaluation."""
    return [(m, m.training) for m in model.modules()]


def _restore(modes) -> None:
    for m, mode in modes:
        m.training = mode


def _as_metrics(result) -> dict[str, float]:
    """An eval function's result as ``name -> float`` (a bare number is ``loss``)."""
    if isinstance(result, dict):
        return {str(k): float(v) for k, v in result.items()}
    return {"loss": float(result)}


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def evaluate_loss(model: Module, batches: Iterable, n_batches: int) -> float:
    """Mean loss over the first ``n_batches`` batches, without gradients, in eval mode.

    ``model.eval()`` turns dropout off; :func:`~minipeft.autograd.no_grad`
    records no graph, so nothing is saved for backward. Every module's
    training flag is restored afterwards, whatever it was. The result is the
    mean of the per-batch mean losses (batches are expected to be of equal
    size).
    """
    n_batches = Int(low=1).check("n_batches", n_batches)
    device = model.device
    modes = _modes(model)
    model.eval()
    total, n = 0.0, 0
    try:
        with no_grad():
            for idx, targets in itertools.islice(iter(batches), n_batches):
                _, loss = model(_to_device(idx, device), _to_device(targets, device))
                total += loss.item()
                n += 1
    finally:
        _restore(modes)
    if n == 0:
        raise ValueError("evaluate_loss: the batches were empty")
    return total / n


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def train(
    model: Module,
    optimizer: Optimizer,
    batches: Iterable,
    steps: int,
    *,
    schedule: Callable[[int], float] | None = None,
    clip: float | None = None,
    eval_every: int | None = None,
    eval_fn: Callable[[Module], float | dict] | None = None,
    progress: bool = True,
    desc: str | None = None,
    on_step: Callable[[int, History], bool | None] | None = None,
) -> History:
    """Train ``model`` for ``steps`` updates; return the :class:`History`.

    Args:
        model: a Module with ``model(idx, targets) -> (logits, loss)``.
        optimizer: e.g. :class:`~minipeft.optim.AdamW` over the trainable parameters.
        batches: an iterable of ``(idx, targets)`` host integer arrays; it must
            last ``steps`` batches (running out is an error, not a short run).
        steps: number of updates.
        schedule: ``step -> lr`` (e.g. :class:`~minipeft.optim.LRSchedule`),
            called before each update to set ``optimizer.lr``.
        clip: clip the global gradient norm to this value before each update.
        eval_every: evaluate after every ``eval_every`` updates and after the
            last one. Without it, ``eval_fn`` runs once, at the end.
        eval_fn: ``eval_fn(model) -> float | dict[str, float]``, e.g.
            ``lambda m: evaluate_loss(m, val_batches, 8)``. Its training-mode
            changes are undone afterwards.
        progress: show a tqdm bar with loss and learning rate (False: silent).
        desc: the bar's label.
        on_step: ``on_step(step, history)`` after each update (checkpointing,
            logging); returning True stops training early.
    """
    # Check the settings before any work is done.
    steps = Int(low=1).check("steps", steps)
    clip = Float(low=0.0, low_open=True, optional=True).check("clip", clip)
    eval_every = Int(low=1, optional=True).check("eval_every", eval_every)
    if eval_every is not None and eval_fn is None:
        raise ValueError("eval_every was given without an eval_fn to call")

    history = History()
    device = model.device
    batch_iter = iter(batches)
    # every step allocates the same large arrays: keep freed ones for reuse
    # rather than paying the kernel's page faults for them again
    backend.keep_freed_memory()
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for step in range(steps):
            # 1. The learning rate for this update.
            if schedule is not None:
                optimizer.lr = _LR.check(f"the schedule's lr at step {step}", schedule(step))
            lr = optimizer.lr

            # 2. Forward on the next batch, moved to the model's device.
            try:
                idx, targets = next(batch_iter)
            except StopIteration:
                raise ValueError(f"batches ran out after {step} of {steps} steps") from None
            optimizer.zero_grad()
            _, loss = model(_to_device(idx, device), _to_device(targets, device))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training loss is {loss_value} at step {step} (lr {lr:.3g}); "
                    "try a smaller learning rate or gradient clipping"
                )

            # 3. Backward: gradients for the trainable parameters only.
            loss.backward()

            # 4. Clip the global gradient norm.
            if clip is not None:
                norm = clip_grad_norm_(optimizer.parameters(), clip)
                if not math.isfinite(norm):
                    raise FloatingPointError(f"gradient norm is {norm} at step {step}")
                history.grad_norms.append(norm)

            # 5. Update, then free the gradients (they are not needed until
            #    the next backward).
            optimizer.step()
            optimizer.zero_grad()

            # Bookkeeping.
            history.steps.append(step)
            history.losses.append(loss_value)
            history.lrs.append(lr)
            history.times.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

            # Periodic evaluation (and always after the last update).
            last = step == steps - 1
            if eval_fn is not None and (last or (eval_every and (step + 1) % eval_every == 0)):
                modes = _modes(model)
                metrics = _as_metrics(eval_fn(model))
                _restore(modes)
                history.evals.append({"step": step, **metrics})
                if progress:  # a line above the bar (on its stream), kept in the scrollback
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    bar.write(f"step {step + 1}/{steps}: eval {shown}", file=sys.stderr)

            if on_step is not None and on_step(step, history):
                break
    finally:
        bar.close()
        history.wall_time = time.perf_counter() - start
    return history
