r"""Fine-tune the shipped base on a downstream task with any method, and load the result.

One function does the whole job the ``minipeft finetune`` command runs:

1. load the shipped base and wrap it with the method (``get_peft_model``);
2. train only what the method trains (AdamW over ``trainable_parameters()``,
   warmup and cosine decay, gradient clipping) on the task's training split;
3. score it on the test split (greedy answers, the task's metric) beside the
   majority baseline and the base model zero-shot;
4. save the adapter (for full fine-tuning, the whole model) to ``out``.

The saved folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` (see :meth:`PeftModel.save_pretrained`) plus
``finetune.json``: the task, the settings and the scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from . import io
from .base import load_base
from .data.tasks import get_task
from .evaluation import evaluate
from .optim import AdamW, LRSchedule
from .peft import PeftModel, get_peft_model
from .train import train

FINETUNE_INFO = "finetune.json"


@dataclass
class FinetuneSettings:
    """The training budget and optimiser settings of one fine-tuning run."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    eval_limit: int | None = None   # score only the first N test examples

    def validate(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class FinetuneResult:
    method: str
    task: str
    metric: str
    score: float
    majority: float
    zero_shot: float | None
    trainable: int
    total: int
    n_test: int
    seconds: float
    final_loss: float
    settings: dict = field(default_factory=dict)
    out: str | None = None

    def summary(self) -> str:
        zs = "n/a" if self.zero_shot is None else f"{self.zero_shot:.4f}"
        lines = [
            f"{self.method} on {self.task}: {self.trainable:,d} of {self.total:,d} parameters "
            f"trained ({100 * self.trainable / self.total:.4f}%), {self.settings['steps']} steps "
            f"in {self.seconds:.1f} s, final training loss {self.final_loss:.4f}",
            f"test {self.metric} ({self.n_test} examples): {self.score:.4f}   "
            f"majority baseline {self.majority:.4f}   base zero-shot {zs}",
        ]
        if self.out:
            lines.append(f"saved to {self.out}")
        return "\n".join(lines)


def finetune(config, task_name: str = "sentiment", settings: FinetuneSettings | None = None, *,
             device: str = "cpu", out: str | None = None, progress: bool = True,
             zero_shot: bool = True, base=None) -> FinetuneResult:
    """Fine-tune the shipped base with ``config`` on a task (see the module docstring)."""
    st = settings or FinetuneSettings()
    st.validate()
    task = get_task(task_name)
    if out is not None:
        io.ensure_writable_dir(out)         # a folder that cannot be written fails before training
    model = base if base is not None else load_base(device=device)
    n_test = len(task.examples("test")) if st.eval_limit is None else st.eval_limit
    # the zero-shot baseline is scored before wrapping: the bare base, on the same examples
    zs = evaluate(model, task, "test", limit=st.eval_limit) if zero_shot else None

    # 1. wrap; 2. train only what the method trains (the optimizer never sees the rest)
    pm = get_peft_model(model, config)
    opt = AdamW(pm.trainable_parameters(), lr=st.lr, weight_decay=st.weight_decay)
    schedule = LRSchedule(st.lr, st.steps, min(st.warmup, st.steps), min_lr=st.lr * 0.1)
    batches = task.batches("train", st.batch_size, seed=st.seed, epochs=None)
    t0 = time.perf_counter()
    history = train(pm, opt, batches, st.steps, schedule=schedule, clip=st.clip,
                    progress=progress, desc=f"{config.method} on {task.name}")
    seconds = time.perf_counter() - t0
    # 3. score it; the majority baseline is taken over the same (possibly limited) examples
    score = evaluate(pm, task, "test", limit=st.eval_limit)
    trainable, total = pm.get_nb_trainable_parameters()
    result = FinetuneResult(
        method=config.method, task=task.name, metric=task.metric, score=score,
        majority=task.majority_baseline("test") if st.eval_limit is None else
        sum(task.majority_answer == a for a in task.answers("test")[:n_test]) / n_test,
        zero_shot=zs, trainable=trainable, total=total, n_test=n_test, seconds=seconds,
        final_loss=history.last_loss, settings=dataclasses.asdict(st), out=out,
    )
    # 4. save the adapter (the whole model for full fine-tuning) and what the run was
    if out is not None:
        pm.save_pretrained(out)
        io.atomic_write_json(os.path.join(out, FINETUNE_INFO),
                             {**dataclasses.asdict(result), "config": config.to_dict()})
    result.model = pm
    return result


def load_finetuned(directory: str, device: str = "cpu"):
    """(model with the adapter applied, finetune.json contents) from a saved folder."""
    model = PeftModel.from_pretrained(load_base(device=device), directory)
    info_path = os.path.join(directory, FINETUNE_INFO)
    meta = {}
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            meta = json.load(f)
    return model, meta
