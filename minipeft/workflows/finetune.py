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
``finetune.json``: the task, the settings (with the learning rate the run
really used) and the scores. The record is saved with the adapter in one
commit (it travels inside the weights file), so a stopped save never leaves
one run's record beside another run's weights.

Bad settings are refused before anything is loaded or trained, with a
message that names the setting and what it may be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field

from .. import io
from ..data.tasks import get_task
from ..optim import AdamW, LRSchedule
from ..peft import PeftModel, get_peft_model
from ..peft.config import LR_GRID, PeftConfig, best_known_lr
from ..peft.model import RUN_RECORD, read_adapter_files
from ..peft.qlora import check_quantize, quantize_base, recipe_name
from ..validate import Float, Int, check_fields, knob
from .base import load_base
from .evaluation import evaluate
from .train import train

FINETUNE_INFO = RUN_RECORD      # "finetune.json"


@dataclass
class FinetuneSettings:
    """The training budget and optimiser settings of one fine-tuning run.

    ``lr=None`` (the default) means the method's best known rate on the
    shipped base (:func:`minipeft.peft.config.best_known_lr`: a soft prompt wants
    a far larger step than full fine-tuning); :func:`finetune` resolves it
    from the config and records the rate it used. ``eval_limit`` scores only
    the first N test examples; ``None`` scores the whole test split.
    """

    steps: int = knob(300, Int(low=1, expect="an integer >= 1 (optimizer updates)"))
    batch_size: int = knob(16, Int(low=1, expect="an integer >= 1 (examples per step)"))
    #: None: the method's best known rate
    lr: float | None = knob(None, Float(
        low=0.0, low_open=True, optional=True,
        expect="a positive finite number, or None for the method's best known rate"))
    warmup: int = knob(20, Int(low=0, expect="an integer >= 0 (steps of linear warmup)"))
    weight_decay: float = knob(0.0, Float(low=0.0))
    #: None: no gradient clipping
    clip: float | None = knob(1.0, Float(
        low=0.0, low_open=True, optional=True,
        expect="a positive finite gradient norm, or None for no clipping"))
    seed: int = knob(0, Int(low=0, expect="an integer >= 0 (the data order's random seed)"))
    #: score only the first N test examples
    eval_limit: int | None = knob(None, Int(
        low=1, optional=True,
        expect="an integer >= 1 (the number of test examples to score; None scores the whole "
               "test split)"))

    def validate(self):
        """Raise ValueError (KnobTypeError for a wrong type) naming the first bad setting."""
        check_fields(self)


def resolved_lr(settings: FinetuneSettings, method: str) -> float:
    """The learning rate a run uses: ``settings.lr``, or the method's best known rate if None."""
    return best_known_lr(method) if settings.lr is None else float(settings.lr)


def majority_score(task, split: str = "test", limit: int | None = None) -> float:
    """The majority answer's score on ``split`` (its first ``limit`` examples)."""
    if limit is None:
        return task.majority_baseline(split)
    answers = task.answers(split)[:limit]
    return sum(task.majority_answer == a for a in answers) / len(answers)


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
            f"at lr {self.settings['lr']:g} in {self.seconds:.1f} s, "
            f"final training loss {self.final_loss:.4f}",
            f"test {self.metric} ({self.n_test} examples): {self.score:.4f}   "
            f"majority baseline {self.majority:.4f}   base zero-shot {zs}",
        ]
        if self.out:
            lines.append(f"saved to {self.out}")
        return "\n".join(lines)


def finetune(config, task_name: str = "sentiment", settings: FinetuneSettings | None = None, *,
             device: str = "cpu", out: str | None = None, progress: bool = True,
             zero_shot: bool = True, base=None, quantize: str | None = None,
             blocksize: int = 64, double_quant: bool = True) -> FinetuneResult:
    """Fine-tune the shipped base with ``config`` on a task (see the module docstring).

    ``settings.lr=None`` trains at the method's best known rate; the rate used
    is in ``result.settings["lr"]`` and in the saved ``finetune.json``.
    ``out=None`` saves nothing. Besides its fields, the result carries what
    stays in memory and is not written to ``finetune.json``: ``result.model``,
    the trained :class:`PeftModel`, and ``result.history``, the training
    :class:`~minipeft.workflows.train.History` (the loss of every step).

    ``quantize`` (``nf4``, ``fp4``, ``int4``, ``int8``) stores the base's
    frozen Linears in that format once the method has wrapped it (QLoRA is
    LoRA with ``quantize="nf4"``: :mod:`minipeft.peft.qlora`); the saved adapter
    records it, and loading quantizes the float base the same way. Methods
    that train the Linear weights (full, mask) are refused.
    """
    # bad input is refused here, before the base is loaded or anything is trained
    if not isinstance(config, PeftConfig):
        raise TypeError(f"finetune needs a PEFT config (e.g. LoraConfig()), got {config!r}; "
                        "minipeft.workflows.compare.default_configs() has one per method")
    st = settings if settings is not None else FinetuneSettings()
    if not isinstance(st, FinetuneSettings):
        raise TypeError(f"settings must be a FinetuneSettings (e.g. FinetuneSettings(steps=100)), "
                        f"got {type(st).__name__}")
    st.validate()
    check_quantize(config.method, quantize)
    name = recipe_name(config.method, quantize)       # qlora for LoRA on NF4
    lr_key = name if name in LR_GRID else config.method
    st = dataclasses.replace(st, lr=resolved_lr(st, lr_key))   # the caller's is untouched
    task = get_task(task_name)
    if out is not None and not str(out).strip():
        # "" would mean the current folder, and replace any adapter saved there
        raise ValueError("out is empty: name the folder to save the adapter in, or pass None "
                         "not to save it")
    # a folder that cannot be written fails before training; one this run creates is
    # removed again if the run stops before saving into it
    made = _make_folder(out) if out is not None else []
    try:
        return _finetune(config, task, st, device, out, progress, zero_shot, base,
                         name, quantize, blocksize, double_quant)
    except BaseException:
        for folder in reversed(made):       # the deepest first; only what is still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _make_folder(out) -> list[str]:
    """Create ``out`` (checked writable) and return the folders this made, outermost first."""
    made, folder = [], os.path.abspath(os.fspath(out))
    while not os.path.exists(folder):
        made.insert(0, folder)
        folder = os.path.dirname(folder)
    try:
        io.ensure_writable_dir(out)
    except BaseException:
        for f in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(f)
        raise
    return made


def _finetune(config, task, st, device, out, progress, zero_shot, base,
              name, quantize, blocksize, double_quant) -> FinetuneResult:
    """The run itself (see :func:`finetune`); ``st`` is validated and its rate resolved,
    ``name`` is the method's or its recipe's (``qlora``)."""
    model = base if base is not None else load_base(device=device)
    n_all = len(task.examples("test"))
    n_test = n_all if st.eval_limit is None else min(st.eval_limit, n_all)
    # the zero-shot baseline is scored before wrapping: the bare base, on the same examples
    zs = evaluate(model, task, "test", limit=st.eval_limit) if zero_shot else None

    # 1. wrap; 2. train only what the method trains (the optimizer never sees the rest)
    pm = get_peft_model(model, config)
    if quantize is not None:
        # after wrapping: the method froze what it does not train, and the
        # fingerprint was taken from the float weights
        quantize_base(pm, quantize, blocksize, double_quant)
    params = pm.trainable_parameters()
    if sum(p.size for p in params) == 0:
        raise ValueError(f"{type(config).__name__} trains no parameters of this model, so there "
                         "is nothing to fine-tune: give it something to train (a soft prompt "
                         "needs num_virtual_tokens >= 1)")
    opt = AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
    schedule = LRSchedule(st.lr, st.steps, min(st.warmup, st.steps), min_lr=st.lr * 0.1)
    batches = task.batches("train", st.batch_size, seed=st.seed, epochs=None)
    t0 = time.perf_counter()
    history = train(pm, opt, batches, st.steps, schedule=schedule, clip=st.clip,
                    progress=progress, desc=f"{name} on {task.name}")
    seconds = time.perf_counter() - t0
    # 3. score it; the majority baseline is taken over the same (possibly limited) examples
    score = evaluate(pm, task, "test", limit=st.eval_limit)
    trainable, total = pm.get_nb_trainable_parameters()
    result = FinetuneResult(
        method=name, task=task.name, metric=task.metric, score=score,
        majority=majority_score(task, "test", st.eval_limit),
        zero_shot=zs, trainable=trainable, total=total, n_test=n_test, seconds=seconds,
        final_loss=history.last_loss,
        settings={**dataclasses.asdict(st), "quantize": quantize,
                  "blocksize": blocksize if quantize else None,
                  "double_quant": bool(double_quant) if quantize else None}, out=out,
    )
    # 4. save the adapter (the whole model for full fine-tuning) and what the run was
    # (the run record travels inside the adapter's weights file: one commit for both)
    if out is not None:
        pm.save_pretrained(out, run_record={**dataclasses.asdict(result),
                                            "config": config.to_dict()})
    result.model, result.history = pm, history
    return result


def load_finetuned(directory: str, device: str = "cpu"):
    """(model with the adapter applied, finetune.json contents) from a saved folder.

    One read gives both, so the record always belongs to the weights loaded
    (see :func:`minipeft.peft.model.read_adapter_files`); an adapter saved
    without a record (``minipeft import``) gives ``{}``.
    """
    files = read_adapter_files(directory)
    model = PeftModel.from_pretrained(load_base(device=device), files)
    return model, dict(files.run_record or {})
