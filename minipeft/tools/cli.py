"""The `minipeft` command: one entry point, a subcommand per job.

    minipeft info                      versions, backend, device, the shipped base
    minipeft pretrain                  (re)make the shipped base from the corpus
    minipeft finetune --method lora    fine-tune the base on a task, save the adapter
    minipeft eval --adapter DIR        score a saved adapter on its task
    minipeft generate --prompt TEXT    continue a prompt (optionally with an adapter)
    minipeft bench                     time one training step
    minipeft memory --method lora      training memory: estimated, accounted, measured
    minipeft compare                   every method on one task: the five-axis trade-off table
    minipeft export --format hf        the base or an adapter as a Hugging Face folder
    minipeft import --adapter DIR      a Hugging Face peft adapter as a minipeft adapter
    minipeft docs --out DIR            the docs: guide, annotated source, lessons (HTML)

Each subcommand is a thin layer over the package's functions
(:mod:`minipeft.workflows.finetune`, :mod:`minipeft.memory`, :mod:`minipeft.workflows.compare`,
:mod:`minipeft.tools.interop`, :mod:`minipeft.tools.docs`). Bad input is refused before
any work starts (no base is loaded, nothing trains, nothing is written), in
one line that names the option and what to do:

* an option value out of range (``--lr -1e-3``, ``--eval-limit 0``,
  ``--lora-alpha nan``) is refused by the parser itself: ``minipeft
  finetune: error: argument --lr: ...`` (argparse's form), exit code 2;
* everything checked after parsing (an option the method does not use, a
  missing adapter folder, an output path that cannot be written, a step that
  would not fit in memory) is one line ``minipeft: error: ...``, exit code 2.

What :func:`main` does with an exception a job raises is in its docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys

import numpy as np

from .. import __version__, backend, io
from .. import memory as M
from ..data.tasks import DEFAULT_TASK, TASKS, TERMINATOR, get_task
from ..data.tokenizer import CharTokenizer
from ..memory import DTYPES, PRESETS
from ..memory.activations import activation_rows, format_activation_rows, long_config
from ..nn.gpt import GPT
from ..nn.quant import FORMATS
from ..optim import SGD, AdamW
from ..peft import FullFinetuneConfig, PeftModel, get_peft_model
from ..peft.config import LR_GRID, METHODS, best_known_lr, config_class, method_config
from ..peft.model import ADAPTER_CONFIG
from ..peft.qlora import RECIPES, TRAINS_LINEAR_WEIGHTS, quantize_base, split_method
from ..workflows.base import (
    BASE_PATH,
    REQUIRED_MARGIN,
    PretrainRecipe,
    base_info,
    load_base,
    pretrain,
    save_base,
)
from ..workflows.compare import (
    COMPARE_METHODS,
    DEFAULT_TIME,
    QUICK_TIME,
    TABLE_WIDTH,
    CompareSettings,
    compare,
)
from ..workflows.evaluation import evaluate
from ..workflows.finetune import FINETUNE_INFO, FinetuneSettings, finetune, load_finetuned, majority_score
from ..workflows.forgetting import ForgettingSettings, forgetting_sweep
from .bench import reexec_without_blas_overrides, run_bench
from .docs import build
from .interop import export_peft_adapter, import_peft_adapter, save_hf_gpt2

# ---------------------------------------------------------------------------
# The parser: negative numbers are values, not options
# ---------------------------------------------------------------------------
#
# argparse decides whether ``-1e-3`` after ``--lr`` is a value or another option
# with a pattern that knows only ``-1`` and ``-.5``: ``--lr -1e-3``, ``--lr -inf``
# and ``--layers -2,-1`` used to fail with "expected one argument". No option of
# this command starts with a digit, a dot or "inf"/"nan", so every such word is a
# value: it reaches the option's type, which refuses it by name ("must be
# positive") or accepts it (``--layers -2,-1``).


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads ``-1e-3``, ``-inf``, ``-nan`` and ``-2,-1`` as values.

    Its subparsers are made from the same class (argparse's default), so the
    rule holds for every subcommand.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


# ---------------------------------------------------------------------------
# Method knobs: the CLI options each method reads (and how they map to configs)
# ---------------------------------------------------------------------------

# A method's default learning rate is the one ``minipeft compare`` measured
# best on the shipped base (:func:`minipeft.peft.config.best_known_lr`, the middle
# of the method's grid): one table, kept with the grids it was chosen from.
# Each method wants its own scale: a soft prompt moves 20 vectors and needs a
# large step, full fine-tuning moves every weight and needs a small one.


def default_lr(method: str) -> float:
    """The learning rate ``minipeft finetune`` uses for ``method`` when ``--lr`` is not given."""
    return best_known_lr(method)


def _default_lr_help() -> str:
    """The ``--lr`` help: every method's default, read from the one table."""
    rates = ", ".join(f"{m} {default_lr(m):g}" for m in LR_GRID)
    return f"learning rate (default: the method's best known on the shipped base: {rates})"


# ---------------------------------------------------------------------------
# Option values: refused by the parser, with the option's name and what it takes
# ---------------------------------------------------------------------------
#
# An option whose default is "not given" (``--lr``, ``--eval-limit``) must not
# treat 0 as "not given": ``args.lr or default`` would train at the default
# when asked for 0. So a value out of range is refused here (argparse prints
# ``argument --lr: ...`` and exits with 2), and a default applies only when
# the option is absent (``is None``). Floats are finite or refused: NaN passes
# every comparison test (``nan <= 0`` is False), so it is refused by name.


def _integer(text: str, least: int) -> int:
    """An integer >= ``least``; else argparse's error, saying what it must be."""
    must = "a positive integer (1 or more)" if least == 1 else f"an integer >= {least}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
    return value


def _positive_int(text: str) -> int:
    """An integer >= 1 (a step count, a batch size, a number of examples)."""
    return _integer(text, 1)


def _nonneg_int(text: str) -> int:
    """An integer >= 0 (a seed, a number of warm-up steps or virtual tokens)."""
    return _integer(text, 0)


def _finite(text: str, ok, must: str) -> float:
    """A finite number for which ``ok(value)`` holds; else argparse's error, saying what it ``must`` be."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}")
    return value


def _positive_lr(text: str) -> float:
    """A learning rate: a finite number > 0."""
    return _finite(text, lambda v: v > 0, "a positive finite number (e.g. 1e-2); leave --lr out "
                                          "to use the method's best known rate")


def _positive_float(text: str) -> float:
    """A finite number > 0 (LoRA's alpha)."""
    return _finite(text, lambda v: v > 0, "a positive finite number")


def _unit_open(text: str) -> float:
    """A finite number in [0, 1) (a dropout probability)."""
    return _finite(text, lambda v: 0 <= v < 1, "a finite number in [0, 1)")


def _unit_closed(text: str) -> float:
    """A finite number in (0, 1] (a fraction of entries, a score to reach)."""
    return _finite(text, lambda v: 0 < v <= 1, "a finite number in (0, 1]")


def _temperature(text: str) -> float:
    """A sampling temperature: a finite number >= 0 (0 is greedy)."""
    return _finite(text, lambda v: v >= 0,
                   "a finite number >= 0 (0: greedy, always the likeliest token)")


def _names(option: str, text: str | None) -> list[str] | None:
    """A comma-separated list of names; None when the option was not given."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise ValueError(f"{option} takes names separated by commas, with none empty; got {text!r}")
    return items


def _block_indices(option: str, text: str | None) -> list[int] | None:
    """``--layers``: comma-separated block indices (negative from the end); None when not given."""
    if text is None:
        return None
    try:
        return [int(i) for i in text.split(",")]     # int("") fails too: no empty entries
    except ValueError:
        raise ValueError(f"{option} takes block indices separated by commas (negative count "
                         f"from the end), e.g. -2,-1; got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class _Knob:
    """One method option: its flag, the config field it sets, and how argparse reads it.

    Which methods an option applies to is not listed here: it is every method
    whose config class has ``field`` (:func:`methods_using`), so a new field
    or a new method changes the CLI's checks and help by itself.
    """

    flag: str
    field: str
    help: str
    type: object = None            # argparse type; None with action for a flag
    action: str | None = None
    choices: tuple | None = None
    convert: object = None         # text -> the config's value (lists of names, indices)
    default_text: str | None = None  # the default, when it is not the config's own

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


_KNOBS = (
    _Knob("--r", "r", "LoRA rank", type=_positive_int),
    _Knob("--lora-alpha", "lora_alpha", "LoRA alpha, the numerator of the scaling alpha/r",
          type=_positive_float, default_text="the value of --r"),
    _Knob("--lora-dropout", "lora_dropout", "dropout on the LoRA branch's input",
          type=_unit_open),
    _Knob("--dora", "use_dora", "LoRA with DoRA's magnitude", action="store_true"),
    _Knob("--target-modules", "target_modules",
          "comma-separated module names (peft's rule: equal or ends with .NAME)",
          convert=lambda t: _names("--target-modules", t)),
    _Knob("--bottleneck", "bottleneck", "adapter width", type=_positive_int),
    _Knob("--placement", "placement", "adapters after attention and the MLP (houlsby) or "
          "after the MLP only (pfeiffer)", choices=("houlsby", "pfeiffer")),
    _Knob("--virtual-tokens", "num_virtual_tokens", "P virtual tokens", type=_nonneg_int),
    _Knob("--prefix-projection", "prefix_projection",
          "produce the prefixes with an MLP while training", action="store_true"),
    _Knob("--scale-queries", "scale_queries",
          "scale q too (the fused c_attn as a whole, peft's count)", action="store_true"),
    _Knob("--density", "density", "element masks: the fraction of entries trained",
          type=_unit_closed),
    _Knob("--selection", "selection", "how element masks pick their entries",
          choices=("random", "magnitude", "gradient")),
    _Knob("--layers", "layers", "block indices, e.g. -2,-1",
          convert=lambda t: _block_indices("--layers", t),
          default_text="-1, the last block, unless --components is given"),
    _Knob("--components", "components", "any of attn,mlp,ln,embeddings,ln_f",
          convert=lambda t: _names("--components", t)),
)


def _fields(method: str) -> dict:
    """The config fields of ``method``: name -> dataclasses.Field."""
    return {f.name: f for f in dataclasses.fields(config_class(method))}


def methods_using(field: str) -> list[str]:
    """The methods whose config has ``field`` (the methods an option setting it applies to)."""
    return [m for m in METHODS if field in _fields(m)]


def _field_default(method: str, field: str) -> str:
    f = _fields(method)[field]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "all" if field == "target_modules" else "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _knob_help(knob: _Knob) -> str:
    """``help (lora; default 8)``: the methods and defaults read from the config classes."""
    users = methods_using(knob.field)
    if knob.action == "store_true":
        return f"{knob.help} ({', '.join(users)})"
    if knob.default_text is not None:
        default = knob.default_text
    else:
        defaults = {m: _field_default(m, knob.field) for m in users}
        if len(set(defaults.values())) == 1:
            default = next(iter(defaults.values()))
        else:
            default = "; ".join(f"{m} {d}" for m, d in defaults.items())
    return f"{knob.help} ({', '.join(users)}; default {default})"


def check_knobs_apply(methods, args) -> None:
    """Refuse a method option that none of ``methods`` reads, naming the methods that do."""
    for knob in _KNOBS:
        if getattr(args, knob.dest, None) is None:
            continue
        users = methods_using(knob.field)
        if any(m in users for m in methods):
            continue
        if len(methods) == 1:
            raise ValueError(f"{knob.flag} applies to {', '.join(users)}, not to {methods[0]}: "
                             f"leave it out, or choose --method {' or '.join(users)}")
        raise ValueError(f"{knob.flag} applies to {', '.join(users)}, and --methods does not "
                         f"include it: leave {knob.flag} out, or add {' or '.join(users)} "
                         "to --methods")


def build_config(method: str, args) -> object:
    """The PEFT config for ``method`` from the command-line knobs it reads (a knob left out: its default).

    Knobs of other methods are skipped here; :func:`check_knobs_apply` refuses
    one that no chosen method reads.
    """
    method = _trained_method(method)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    fields = _fields(method)
    values = {}
    for knob in _KNOBS:
        given = getattr(args, knob.dest, None)
        if given is None or knob.field not in fields:
            continue
        values[knob.field] = knob.convert(given) if knob.convert else given
    if method in ("lora", "lora_fa") and "lora_alpha" not in values and "r" in values:
        values["lora_alpha"] = values["r"]              # alpha defaults to r, so the scale is 1
    if method == "layers" and values.get("layers") is None and values.get("components") is None:
        values["layers"] = [-1]                         # the last block
    return method_config(method, **values)


def _trained_method(name: str) -> str:
    """The method a recipe trains (``qlora``: ``lora``); a method name is itself."""
    return RECIPES[name][0] if name in RECIPES else name


def _add_quantize_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--quantize", default=None, choices=FORMATS,
                   help="store the frozen Linears of the base in this format (blocks of 64, "
                        "double quantization for the 4-bit ones) under any method that keeps "
                        "them frozen; full and mask train them and are refused (qlora: nf4)")


def _add_method_options(s: argparse.ArgumentParser) -> None:
    """The knobs of every method (read by :func:`build_config`), shared by finetune, memory, compare."""
    g = s.add_argument_group("method knobs (each applies to the methods in brackets)")
    for knob in _KNOBS:
        kw = {"action": knob.action} if knob.action else {"type": knob.type, "choices": knob.choices}
        # default None: "not given", so an option the method does not use can be refused
        g.add_argument(knob.flag, default=None, help=_knob_help(knob),
                       **{k: v for k, v in kw.items() if v is not None})


# ---------------------------------------------------------------------------
# Paths: checked before any work, never created by a check
# ---------------------------------------------------------------------------


def _check_nonempty(option: str, path) -> None:
    if path is not None and not str(path).strip():
        raise ValueError(f"{option} is empty: name a path (an unset shell variable gives '')")


def check_out_folder(option: str, path) -> None:
    """Refuse an output folder that could not be made or written, before any work (nothing is created)."""
    _check_nonempty(option, path)
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"{option} {path} is a file, not a folder: choose a folder name")
    parent = full
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: {parent} is a file, so no folder can be made "
                         "inside it; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {parent} is not writable; choose a folder you can "
                         "write to")


def check_out_file(option: str, path, example: str, *, overwrite: bool = True) -> None:
    """Refuse an output file whose folder is missing or unwritable, or that is a folder."""
    _check_nonempty(option, path)
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{option} {path} is a folder: name a file, e.g. "
                         f"{os.path.join(path, example)}")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: the folder {parent} does not exist: create it first "
                         f"(mkdir -p {parent}) or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {parent} is not writable; choose a folder you can "
                         "write to")
    if not overwrite and os.path.exists(full):
        raise ValueError(f"{option} {path} already exists: pass --overwrite to replace it, or "
                         "choose a new name")


def check_adapter_folder(option: str, path, made_by: str = "`minipeft finetune --out DIR`") -> None:
    """Refuse an ``--adapter`` that is not a folder holding adapter_config.json, before loading anything."""
    _check_nonempty(option, path)
    if not os.path.exists(path):
        raise ValueError(f"{option} {path}: folder not found; give a folder written by {made_by}")
    if not os.path.isdir(path):
        raise ValueError(f"{option} {path} is a file, not an adapter folder; give the folder "
                         f"that holds {ADAPTER_CONFIG}")
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise ValueError(f"{option} {path} has no {ADAPTER_CONFIG}: an adapter folder holds "
                         f"{ADAPTER_CONFIG} and adapter_model.safetensors (finetune --out writes "
                         "them)")


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS says, else the count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes the OS says a new process can allocate (MemAvailable of /proc/meminfo); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024          # the file says kB
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------
# Tasks: their prompt formats, shown by generate --help and the README
# ---------------------------------------------------------------------------


def task_formats() -> str:
    """Each task's prompt format with an example, from the task definitions (one line per task)."""
    lines = []
    for name, spec in TASKS.items():
        ex = spec.example()
        lines.append(f"  {name}: {spec.description}")
        lines.append(f"    --prompt {ex.prompt!r}   (answer: {ex.answer})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def _cmd_info(args) -> int:
    print(f"minipeft {__version__}  (numpy {np.__version__})")
    print(f"gpu: {'available' if backend.gpu_available() else 'not available'}")
    if os.path.isfile(BASE_PATH):
        info = base_info()
        model = load_base()
        print(f"shipped base: {BASE_PATH} ({os.path.getsize(BASE_PATH) / 1e6:.1f} MB)")
        print(f"  config: {info.get('config')}")
        print(f"  parameters: {model.num_parameters():,d}")
        if "val_loss" in info:
            print(f"  validation cross-entropy: {info['val_loss']:.4f} nats/char "
                  f"(character bigram: {info['bigram_val_loss']:.4f})")
    else:
        print(f"shipped base: missing ({BASE_PATH}); make it with `minipeft pretrain`")
    return 0


def _cmd_pretrain(args) -> int:
    if args.out is not None and not args.out.strip():
        # not the shipped base: an empty --out (an unset shell variable) must not replace it
        raise ValueError("--out is empty: name the file to write, or leave --out out to remake "
                         "the shipped base")
    out = BASE_PATH if args.out is None else args.out
    # checked before minutes of training: a folder, a missing folder, a file saved earlier
    # (remaking the shipped base is what a bare `minipeft pretrain` is for)
    check_out_file("--out", out, "base.safetensors", overwrite=args.out is None or args.overwrite)
    recipe = PretrainRecipe(steps=args.steps, seed=args.seed)
    model, report = pretrain(recipe, device=args.device, progress=not args.quiet)
    save_base(model, report, out)
    print(f"validation cross-entropy {report['val_loss']:.4f} nats/char; "
          f"character bigram {report['bigram_val_loss']:.4f}; "
          f"{100 * report['margin']:.1f}% below (required: {100 * REQUIRED_MARGIN:.0f}%)")
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return 0


def _cmd_finetune(args) -> int:
    method, fmt = split_method(args.method, args.quantize)   # refuses full/mask on a quantized base
    check_knobs_apply([method], args)
    cfg = build_config(method, args)
    if args.out is not None:
        check_out_folder("--out", args.out)
    # lr None (--lr not given): finetune trains at the method's best known rate, default_lr
    settings = FinetuneSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, eval_limit=args.eval_limit,
    )
    result = finetune(cfg, args.task, settings, device=args.device, out=args.out,
                      progress=not args.quiet, quantize=fmt)
    print(result.summary())
    return 0


def _cmd_eval(args) -> int:
    if args.task is not None:
        get_task(args.task)                   # an unknown task is refused before loading
    check_adapter_folder("--adapter", args.adapter)
    model, meta = load_finetuned(args.adapter, device=args.device)
    name = args.task if args.task is not None else meta.get("task")
    if name is None:
        # an adapter made elsewhere (minipeft import) does not say what it was trained on
        raise ValueError(f"{args.adapter} has no {FINETUNE_INFO} saying which task it was "
                         f"trained on: name one with --task ({', '.join(TASKS)})")
    task = get_task(name)
    score = evaluate(model, task, args.split, limit=args.limit)
    n_all = len(task.examples(args.split))
    n = n_all if args.limit is None else min(args.limit, n_all)
    # the baseline over the same examples as the score
    print(f"{task.name} {args.split} ({n} examples) {task.metric}: {score:.4f} "
          f"(majority baseline {majority_score(task, args.split, args.limit):.4f})")
    return 0


#: new tokens ``generate`` asks for when --max-new-tokens is not given (fewer if fewer fit)
DEFAULT_NEW_TOKENS = 80


def _adapter_virtual_tokens(folder: str) -> int:
    """Positions an adapter's soft prompt or prefix takes (0 for the other methods), from its config."""
    try:
        with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as f:
            value = json.load(f).get("num_virtual_tokens", 0)
    except (OSError, ValueError, AttributeError):
        return 0                      # the load that follows says what is wrong with the file
    return value if isinstance(value, int) and value >= 0 else 0


def _cmd_generate(args) -> int:
    tok = CharTokenizer()
    prompt = args.prompt.replace("\\n", "\n")
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character to continue, "
                         "e.g. --prompt 'the red fox '")
    try:
        ids = tok.encode(prompt)[None, :]             # (T,) -> (1, T): a batch of one
    except ValueError as exc:
        raise ValueError(f"--prompt: {exc}") from None
    virtual = 0
    if args.adapter is not None:
        check_adapter_folder("--adapter", args.adapter)
        virtual = _adapter_virtual_tokens(args.adapter)
    # What fits the context, checked before anything is loaded: the adapter's
    # virtual tokens, the prompt and the new tokens share n_positions.
    n_pos = int(base_info().get("config", {}).get("n_positions", 128))
    T = ids.shape[1]
    room = n_pos - virtual - T
    soft = f" and the adapter's {virtual} virtual tokens" if virtual else ""
    if room < 1:
        raise ValueError(f"--prompt is {T} characters{soft}, and the model reads {n_pos} "
                         f"positions: shorten --prompt to at most {n_pos - virtual - 1} characters")
    if args.max_new_tokens is None:
        n_new = min(DEFAULT_NEW_TOKENS, room)
    elif args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit: the prompt "
                         f"takes {T}{soft} of the model's {n_pos} positions, so at most {room} "
                         f"new tokens fit: give --max-new-tokens {room} or fewer (or leave it "
                         f"out: as many as fit, up to {DEFAULT_NEW_TOKENS})")
    else:
        n_new = args.max_new_tokens
    # With a task adapter, the answer ends at the task's terminator (the end of
    # every training line): generation stops there, unless --no-stop.
    stop = None
    if args.adapter is not None:
        model, meta = load_finetuned(args.adapter, device=args.device)
        if meta.get("task") in TASKS and not args.no_stop:
            stop = TERMINATOR
    else:
        model = load_base(device=args.device)
    stop_id = None if stop is None else int(tok.encode(stop)[0])
    out = model.generate(ids, n_new, temperature=args.temperature, top_k=args.top_k,
                         seed=args.seed, stop_token=stop_id)
    text = tok.decode(np.asarray(out)[0, T:])
    if stop is not None:
        text = text.split(stop, 1)[0]                 # the answer, without the terminator
    sys.stdout.write(prompt + text + "\n")
    return 0


def _cmd_bench(args) -> int:
    if not args.keep_blas_env:
        reexec_without_blas_overrides()  # returns only when there is nothing to unset
    return run_bench(args)


# ---------------------------------------------------------------------------
# Hugging Face interop: export and import (minipeft.tools.interop)
# ---------------------------------------------------------------------------


def _interop_base(args):
    """The base the adapters belong to: ``--checkpoint``, or the shipped base."""
    if args.checkpoint is not None:
        _check_nonempty("--checkpoint", args.checkpoint)
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint}: file not found; give a file "
                             "written by `minipeft pretrain --out`, or leave it out for the "
                             "shipped base")
    return load_base(args.checkpoint) if args.checkpoint else load_base()


def _cmd_export(args) -> int:
    """Write a Hugging Face folder: the base as a GPT-2 model, or an adapter as a peft adapter."""
    if not args.base:
        check_adapter_folder("--adapter", args.adapter)
    check_out_folder("--out", args.out)
    base = _interop_base(args)
    if args.base:
        save_hf_gpt2(base, args.out)
        print(f"wrote the base as a GPT-2 model folder to {args.out} "
              "(transformers.GPT2LMHeadModel.from_pretrained reads it)")
        return 0
    pm = PeftModel.from_pretrained(base, args.adapter)
    if isinstance(pm.peft_config[pm.active_adapter], FullFinetuneConfig):
        # a fully fine-tuned model is not an adapter: it is a whole GPT-2
        save_hf_gpt2(pm.base_model, args.out)
        print(f"{args.adapter} is a full fine-tuning: wrote the whole fine-tuned model as a "
              f"GPT-2 model folder to {args.out}")
        return 0
    export_peft_adapter(pm, args.out, base_model_name_or_path=args.base_model_name_or_path)
    print(f"wrote a Hugging Face peft adapter ({pm.peft_config[pm.active_adapter].peft_type}) to "
          f"{args.out} (peft.PeftModel.from_pretrained reads it onto the base exported with "
          "`minipeft export --format hf --base`)")
    return 0


def _cmd_import(args) -> int:
    """Convert a Hugging Face peft adapter folder into a minipeft adapter folder for the base."""
    check_adapter_folder("--adapter", args.adapter, made_by="peft's save_pretrained")
    check_out_folder("--out", args.out)
    pm = import_peft_adapter(_interop_base(args), args.adapter)
    pm.save_pretrained(args.out)
    cfg = pm.peft_config[pm.active_adapter]
    n = pm.adapters[pm.active_adapter].trainable_count(pm)
    print(f"imported a {cfg.peft_type} adapter ({n:,d} parameters) from {args.adapter}; "
          f"wrote a minipeft adapter folder to {args.out} (minipeft generate --adapter reads it; "
          "minipeft eval --adapter too, given the task it was trained on with --task)")
    return 0


def _add_interop_parsers(sub) -> None:
    s = sub.add_parser("export",
                       help="write a Hugging Face folder: the base (GPT-2) or an adapter (peft)")
    s.add_argument("--format", choices=["hf"], default="hf",
                   help="hf: transformers GPT-2 / peft adapter folders (the only format)")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", default=None, help="a minipeft adapter folder (finetune --out)")
    what.add_argument("--base", action="store_true", help="the base model, as a GPT-2 model folder")
    s.add_argument("--out", required=True, help="the folder to write")
    s.add_argument("--checkpoint", default=None,
                   help="the base checkpoint (default: the shipped base)")
    s.add_argument("--base-model-name-or-path", default=None,
                   help="recorded in adapter_config.json: where peft finds the base model")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("import", help="convert a Hugging Face peft adapter into a minipeft adapter")
    s.add_argument("--adapter", required=True,
                   help="a peft adapter folder (adapter_config.json, adapter_model.safetensors)")
    s.add_argument("--out", required=True, help="the minipeft adapter folder to write")
    s.add_argument("--checkpoint", default=None,
                   help="the base checkpoint (default: the shipped base)")
    s.set_defaults(func=_cmd_import)


# ---------------------------------------------------------------------------
# Memory: estimated, accounted and measured, per category (minipeft.memory)
# ---------------------------------------------------------------------------

#: profile a real step only for models up to this many parameters (CPU minutes beyond)
_PROFILE_MAX_PARAMS = 20_000_000


def _memory_optimizer(name, params):
    if name == "adamw":
        return AdamW(params, lr=1e-3)
    return SGD(params, lr=1e-3, momentum=0.9 if name == "sgd_momentum" else 0.0)


def _cmd_memory(args) -> int:
    """Print the three views of one training step for a method (or all), and the estimator's tables."""
    cfg = M.preset(args.config)
    if args.activations:
        return _memory_activations(args, cfg)
    if args.gradient_checkpointing:
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
    if args.method != "all":
        methods = [args.method]
    elif args.quantize is None:
        methods = list(METHODS) + list(RECIPES)
    else:                                 # a quantized base: the methods that keep it frozen
        methods = [m for m in METHODS if m not in TRAINS_LINEAR_WEIGHTS]
        print(f"(--quantize {args.quantize}: {', '.join(TRAINS_LINEAR_WEIGHTS)} train the "
              "Linear weights and are left out)")
    if args.method == "all" and cfg.gradient_checkpointing and "lst" in methods:
        methods.remove("lst")             # its backbone saves nothing: nothing to checkpoint
        print("(lst left out: it runs its backbone under no_grad, with nothing to checkpoint)")
    # Everything that can be refused is refused before the first step runs.
    formats = {m: split_method(m, args.quantize)[1] for m in methods}
    check_knobs_apply([_trained_method(m) for m in methods], args)
    if args.checkpointing and len(methods) != 1:
        raise ValueError("--checkpointing compares one method: give --method NAME")
    if args.png is not None:
        check_out_file("--png", args.png, "memory.png")
    plans = []                            # (method, config, sequence length, estimate, why not run)
    for method in methods:
        pc = build_config(method, args)
        T = args.seq_len
        virtual = getattr(pc, "num_virtual_tokens", 0)
        note = None
        if args.method == "all" and T + virtual > cfg.n_positions:
            T = cfg.n_positions - virtual     # the soft prompt takes positions too
            note = f"({method}: {virtual} virtual tokens, so sequences of {T} tokens)"
        est = M.estimate(cfg, pc, optimizer=args.optimizer, batch_size=args.batch_size, seq_len=T,
                         dtype=args.dtype,         # refuses a bad dtype, batch or sequence length
                         quantize=formats[method])
        # The closed form answers for any size and dtype; a real step (accounted and
        # measured beside it) runs only in fp32 and up to _PROFILE_MAX_PARAMS parameters.
        why_not = None
        if args.estimate_only:
            why_not = "--estimate-only"
        elif args.dtype != "fp32":
            why_not = f"the engine runs fp32; {args.dtype} is estimated only"
        elif est.n_params > _PROFILE_MAX_PARAMS:
            why_not = (f"{est.n_params:,d} parameters: too large to run on this machine; "
                       "estimated only")
        plans.append((method, pc, T, est, note, why_not))
    if args.png is not None and all(p[5] for p in plans):
        raise ValueError(f"--png draws profiled steps, and none was profiled ({plans[0][5]}): "
                         "leave --png out, or run a step")
    # A step that cannot fit in this machine's memory is refused with the bytes it would
    # need (the estimator's peak; the measured peak is a little higher) and those there are.
    free = available_memory()
    for method, _, _, est, _, why_not in plans:
        if why_not is None and free is not None and est.peak > free:
            raise ValueError(
                f"one {method} step at --batch-size {args.batch_size} --seq-len {args.seq_len} "
                f"would need about {est.peak:,.0f} bytes ({est.peak / M.GiB:.1f} GiB, estimated) "
                f"and this machine has {free:,d} bytes available ({free / M.GiB:.1f} GiB): give "
                "a smaller --batch-size or --seq-len, or --estimate-only for the closed form alone")
    if args.fit:
        print(M.format_rule_of_thumb(M.rule_of_thumb("1b"), "1b"))
        print()
        print(M.format_fit_table(M.fit_table(batch_size=args.batch_size, seq_len=args.seq_len)))
        print()
    reports = []                          # the profiled steps, one per method
    for method, pc, T, est, note, why_not in plans:
        if note:
            print(note)
        if why_not:
            print(est.table(detail=True))
            print(f"(not profiled: {why_not})")
            print()
            continue
        # Random token ids: what a step holds depends on the shapes, not on the text
        # (a fresh GPT of the preset's size, not the shipped base, for the same reason).
        rng = np.random.default_rng(args.seed)
        idx = rng.integers(0, cfg.vocab_size, (args.batch_size, T))
        targets = rng.integers(0, cfg.vocab_size, (args.batch_size, T))
        extra = {"calibration_batch": (idx, targets)} if method == "mask" and \
            pc.selection == "gradient" else {}
        model = get_peft_model(GPT(cfg, seed=args.seed).to(args.device), pc, **extra).train()
        if formats[method] is not None:
            quantize_base(model, formats[method])
        opt = _memory_optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad])
        rep = M.profile_step(model, opt, (idx, targets))
        print(rep.table())
        print()
        reports.append(rep)
    # With several methods, one line each: the three views of the peak side by side.
    if len(reports) > 1:
        print(f"{'method':<8} {'trained':>10} {'grads+state':>12} {'activations':>12} "
              f"{'peak est.':>10} {'peak acc.':>10} {'peak meas.':>11}   (MiB)")
        for r in reports:
            a, e = r.accounted, r.estimated
            print(f"{r.method:<8} {e.n_trained:>10,d} {(a['gradients'] + a['optimizer']) / M.MiB:>12.3f} "
                  f"{a['activations'] / M.MiB:>12.2f} {e.peak / M.MiB:>10.2f} "
                  f"{r.accounted_peak / M.MiB:>10.2f} {r.measured_peak / M.MiB:>11.2f}")
        print()
    if args.checkpointing:
        pc = plans[0][1]
        res = M.checkpointing_tradeoff(dataclasses.replace(cfg, gradient_checkpointing=False), pc,
                                       batch_size=args.batch_size, seq_len=args.seq_len,
                                       device=args.device, seed=args.seed)
        print(M.format_checkpointing(res))
    if args.png:
        print(f"wrote {M.plot(reports, args.png)}")
    return 0


def _memory_activations(args, cfg) -> int:
    """``minipeft memory --activations``: the six variants' activations, three views each."""
    cfg = long_config(cfg, args.seq_len)        # positions for --seq-len (512 needs 512)
    profile = not args.estimate_only and args.dtype == "fp32"
    rows = activation_rows(cfg, args.batch_size, args.seq_len, profile=profile, seed=args.seed)
    print(format_activation_rows(rows, cfg, args.batch_size))
    return 0


def _add_memory_parser(sub) -> None:
    s = sub.add_parser("memory", help="training memory per category: estimated, accounted, measured")
    s.add_argument("--method", default="lora",
                   help=f"a method ({', '.join(METHODS)}, or qlora: LoRA on an NF4 base) or all "
                        "of them (default lora)")
    s.add_argument("--config", default="reference",
                   help=f"model size: {', '.join(PRESETS)} (default reference; larger than ~20M "
                        "parameters: estimated only)")
    s.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    s.add_argument("--seq-len", type=int, default=128,
                   help="tokens per example (default 128, the reference context)")
    s.add_argument("--dtype", default="fp32",
                   help=f"{', '.join(DTYPES)}: fp32 is what the engine runs (the default); the "
                        "others are estimated only")
    s.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "sgd_momentum"],
                   help="the optimizer whose state is counted (default adamw)")
    s.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in backward instead of keeping its activations")
    s.add_argument("--checkpointing", action="store_true",
                   help="also compare one step with and without gradient checkpointing")
    s.add_argument("--estimate-only", action="store_true", help="the closed form only, no step")
    s.add_argument("--activations", action="store_true",
                   help="the activations of full, lora, lora_fa, lst, prompt and full with "
                        "checkpointing, split into the backbone's and the method's (n_positions "
                        "raised to --seq-len)")
    s.add_argument("--fit", action="store_true",
                   help="also print the 1B rule of thumb and what fits on 24/48/80 GB cards at 7B and 65B")
    s.add_argument("--png", default=None, help="write stacked bars of the three views to this PNG")
    _add_quantize_option(s)
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seeds the random model and batch (default 0)")
    _add_method_options(s)
    s.set_defaults(func=_cmd_memory)


# ---------------------------------------------------------------------------
# Docs: the guide, the annotated source and the lessons as HTML (minipeft.tools.docs)
# ---------------------------------------------------------------------------


def _cmd_docs(args) -> int:
    """Build the docs site; a broken internal link or a lesson that fails to run is an error."""
    check_out_folder("--out", args.out)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    report = build(args.out, executed=args.executed, execute=not args.no_execute,
                   fast=args.fast_lessons, log=log)
    print(report.summary())
    if report.lesson_failures:
        raise RuntimeError(f"{len(report.lesson_failures)} lesson(s) failed to run (listed above)")
    if report.broken_links:
        raise RuntimeError(f"{len(report.broken_links)} broken internal link(s) (listed above)")
    print(f"open {os.path.abspath(os.path.join(args.out, 'index.html'))} in a browser")
    return 0


def _add_docs_parser(sub) -> None:
    s = sub.add_parser("docs", help="build the docs: the guide, the annotated source and the "
                                    "lessons as HTML, readable offline")
    s.add_argument("--out", default="docs/_build", help="the folder to write (default docs/_build)")
    s.add_argument("--executed", default=None,
                   help="a folder of executed lesson notebooks to render (default: "
                        "$MINIPEFT_EXECUTED_DIR, where the lesson tests leave theirs)")
    s.add_argument("--no-execute", action="store_true",
                   help="render a lesson that has no executed copy without outputs, instead of "
                        "running it")
    s.add_argument("--fast-lessons", action="store_true",
                   help="run lessons in the fast setting (MINIPEFT_FAST=1: smaller runs, the same "
                        "claims; default: the full setting, as a reader runs them)")
    s.add_argument("--quiet", action="store_true", help="print only the summary")
    s.set_defaults(func=_cmd_docs)


# ---------------------------------------------------------------------------
# Compare: every method on the five axes of the trade-off (minipeft.workflows.compare)
# ---------------------------------------------------------------------------


def _parse_seeds(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"the seed list is empty ({text!r}): give at least one seed, e.g. --seeds 0,1,2")
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise ValueError(f"seeds must be integers separated by commas, got {text!r}") from None


def _parse_methods(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return tuple(COMPARE_METHODS)
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise ValueError(f"no methods in {text!r}: name some, e.g. --methods full,lora,prompt")
    for m in items:
        if m not in COMPARE_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(COMPARE_METHODS)} (or all)")
    return items


def _parse_lr_grids(entries) -> dict:
    """``["lora=1e-3,1e-2", ...]`` -> ``{"lora": (1e-3, 1e-2)}``."""
    out = {}
    for entry in entries or []:
        method, sep, values = entry.partition("=")
        try:
            grid = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            grid = ()
        if not sep or not grid:
            raise ValueError(f"--lr takes METHOD=LR[,LR...], e.g. lora=3e-3,1e-2; got {entry!r}")
        out[method.strip()] = grid
    return out


def _cmd_compare(args) -> int:
    """Fine-tune every method on one task, print the trade-off table, write CSV, JSON and PNG."""
    methods = _parse_methods(args.methods)
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else None
    check_knobs_apply([_trained_method(m) for m in methods], args)
    configs = {m: build_config(m, args) for m in methods}   # a bad knob is refused here
    base = CompareSettings.quick_settings() if args.quick else CompareSettings()
    grids = {**base.lr_grid, **_parse_lr_grids(args.lr)}
    unknown = sorted(set(grids) - set(base.lr_grid))
    if unknown:
        raise ValueError(f"--lr names unknown method {unknown[0]!r}")
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: the engine's default), got {args.threads}")
    if args.threads is not None and args.threads > usable_cores():
        raise ValueError(f"--threads {args.threads} is more than the {usable_cores()} cores this "
                         f"process may use: give at most {usable_cores()} (or 0 for the "
                         "engine's default)")
    overrides = {k: v for k, v in {
        "steps": args.steps, "batch_size": args.batch_size, "seeds": seeds,
        "target": args.target, "eval_every": args.eval_every, "val_limit": args.val_limit,
        "test_limit": args.test_limit,
    }.items() if v is not None}
    if args.threads is not None:
        overrides["threads"] = None if args.threads == 0 else args.threads
    settings = dataclasses.replace(base, task=args.task, methods=methods, lr_grid=grids,
                                   device=args.device, **overrides)
    settings.validate()                       # bad input fails before the output folder is made
    io.ensure_writable_dir(args.out)          # and an unwritable folder before any training
    result = compare(settings, configs, progress=not args.quiet)
    print(result.table(wide=args.wide))
    paths = result.write(args.out)
    print(f"wrote {', '.join(paths)}")
    return 0


def _add_compare_parser(sub) -> None:
    s = sub.add_parser("compare", help="every method on one task: parameters, memory, speed, "
                                       "quality, inference cost, storage, forgetting")
    s.add_argument("--task", default="sentiment", help="sentiment (default), addition or reverse")
    s.add_argument("--methods", default="all",
                   help=f"comma-separated subset of {','.join(COMPARE_METHODS)} (default all; "
                        "qlora is LoRA on an NF4 base)")
    s.add_argument("--seeds", default=None,
                   help="comma-separated seeds (default 0,1,2; --quick: 0); the first picks the lr")
    s.add_argument("--quick", action="store_true",
                   help="a smoke test: one lr per method (the best known), one seed, 8 steps, "
                        f"small evaluation subsets ({QUICK_TIME} on one CPU thread; the default "
                        f"run: {DEFAULT_TIME})")
    s.add_argument("--steps", type=int, default=None,
                   help="the one budget: optimizer steps for every method (default 150; --quick 8)")
    s.add_argument("--batch-size", type=int, default=None, help="examples per step (default 16)")
    s.add_argument("--lr", action="append", default=None, metavar="METHOD=LR[,LR...]",
                   help="a method's learning-rate grid (repeatable), e.g. --lr lora=3e-3,1e-2")
    s.add_argument("--target", type=float, default=None,
                   help="validation score to reach (default: halfway from majority to perfect)")
    s.add_argument("--eval-every", type=int, default=None,
                   help="steps between validation checks (default 25; --quick 8)")
    s.add_argument("--val-limit", type=int, default=None,
                   help="validation examples per check (default 64; --quick 16)")
    s.add_argument("--test-limit", type=int, default=None,
                   help="score only the first N test examples (default all; --quick 32)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads while it runs (default 1: this model is too small to gain "
                        "from more; 0: the engine's default, as many as NumPy's BLAS has)")
    s.add_argument("--out", default=os.path.join("runs", "compare"),
                   help="folder for results.csv, results.json, results.png (default runs/compare)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--wide", action="store_true",
                   help=f"every column (the measured peak, seconds to the target, ms per token, "
                        f"storage, the loss with the adapter detached); the default table fits "
                        f"{TABLE_WIDTH} columns")
    _add_method_options(s)
    s.set_defaults(func=_cmd_compare)


def _cmd_forgetting(args) -> int:
    """Trace learning against forgetting along training; print the reading; write JSON, CSV, PNG."""
    _check_nonempty("--out", args.out)
    methods = _parse_methods(args.methods)
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else None
    rates = _parse_lr_grids(args.lr)
    if args.threads is not None and args.threads > usable_cores():
        raise ValueError(f"--threads {args.threads} is more than the {usable_cores()} cores this "
                         f"process may use: give at most {usable_cores()}")
    base = ForgettingSettings.fast_settings() if args.fast else ForgettingSettings()
    overrides = {k: v for k, v in {
        "seeds": seeds, "steps": args.steps, "every": args.every,
        "answer_examples": args.answer_examples, "corpus_batches": args.corpus_batches,
        "test_limit": args.test_limit, "threads": args.threads,
    }.items() if v is not None}
    settings = dataclasses.replace(base, task=args.task, methods=methods, rates=rates,
                                   device=args.device, **overrides)
    settings.validate()                       # bad input fails before the output folder is made
    check_out_folder("--out", args.out)
    io.ensure_writable_dir(args.out)          # and an unwritable folder before any training
    result = forgetting_sweep(settings, progress=not args.quiet)
    print(result.summary())
    paths = result.write(args.out)
    print(f"wrote {', '.join(paths)}")
    return 0


def _add_forgetting_parser(sub) -> None:
    s = sub.add_parser("forgetting", help="learning against forgetting, traced along training "
                                          "for several methods, rates and seeds")
    s.add_argument("--task", default="reverse", help="reverse (default), sentiment or addition")
    s.add_argument("--methods", default="full,lora,bitfit",
                   help="comma-separated methods to trace (default full,lora,bitfit)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --fast: 0)")
    s.add_argument("--lr", action="append", default=None, metavar="METHOD=LR[,LR...]",
                   help="a method's learning rates (repeatable), e.g. --lr lora=3e-3,1e-2 "
                        "(default: the three of its compare grid)")
    s.add_argument("--fast", action="store_true",
                   help="a small sweep: one seed, 30 steps, smaller measurement subsets")
    s.add_argument("--steps", type=_positive_int, default=None,
                   help="optimizer steps of every run (default 150; --fast 30)")
    s.add_argument("--every", type=_positive_int, default=None,
                   help="steps between checkpoints (default 15; --fast 10)")
    s.add_argument("--answer-examples", type=_positive_int, default=None,
                   help="validation examples for the answer loss, a multiple of 50 "
                        "(default 100; --fast 50)")
    s.add_argument("--corpus-batches", type=_positive_int, default=None,
                   help="windows of 16 x 128 characters of the corpus's validation text for the "
                        "corpus loss (default 4; --fast 2)")
    s.add_argument("--test-limit", type=_nonneg_int, default=None,
                   help="test examples scored after the last step (default 100; --fast 0: none)")
    s.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads while it runs (default 1: this model is too small to gain "
                        "from more)")
    s.add_argument("--out", default=os.path.join("runs", "forgetting"),
                   help="folder for results.json, results.csv, results.png "
                        "(default runs/forgetting)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_forgetting)


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


_DEVICE_HELP = "cpu (NumPy, the default), gpu (CuPy) or strict (NumPy refusing what CuPy refuses)"


def build_parser() -> argparse.ArgumentParser:
    """The ``minipeft`` parser: one subparser per job, each pointing at its ``_cmd_*`` function.

    Every subcommand stores its handler as ``func`` (``set_defaults``), so
    :func:`main` runs ``args.func(args)`` without a table of names. Building
    the parser imports the package and :mod:`minipeft.workflows.compare` (the method
    names and the default learning rates the help lists); everything else a
    job needs is imported inside its ``_cmd_*`` function, when it runs.
    Every option has help text (a test walks the parser to keep it so).
    """
    p = _Parser(
        prog="minipeft",
        description="Parameter-efficient fine-tuning, built from scratch to be read.",
        epilog="Bad input is refused in one line (exit code 2). An unexpected error prints its "
               "traceback: it is a bug, please report it. MINIPEFT_DEBUG=1 prints the traceback "
               "of refused input too.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="versions, backend, device and the shipped base")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("pretrain", help="make the base model from the synthetic corpus")
    s.add_argument("--steps", type=_positive_int, default=3000,
                   help="optimizer steps (default 3000, the shipped base's recipe)")
    s.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seeds the initial weights and the batches (default 0)")
    s.add_argument("--out", default=None,
                   help="the checkpoint file to write (default: remake the shipped base); its "
                        "folder must exist, and an existing file is kept unless --overwrite")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (the shipped base is always remade)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("finetune", help="fine-tune the shipped base on a task")
    s.add_argument("--method", choices=METHODS + tuple(RECIPES), default="lora",
                   help="the PEFT method (default lora; qlora: LoRA on an NF4 base)")
    s.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK,
                   help=f"the task to learn (default {DEFAULT_TASK}; `minipeft generate --help` "
                        "shows each task's prompt format)")
    s.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default 300)")
    s.add_argument("--batch-size", type=_positive_int, default=16,
                   help="examples per step (default 16)")
    s.add_argument("--lr", type=_positive_lr, default=None, help=_default_lr_help())
    s.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seeds the order of the training examples (default 0)")
    s.add_argument("--eval-limit", type=_positive_int, default=None,
                   help="score only the first N test examples (default: all)")
    s.add_argument("--out", default=None,
                   help="folder for the adapter (or checkpoint) (default: not saved)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_quantize_option(s)
    _add_method_options(s)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("eval", help="score a saved adapter (or checkpoint folder) on a task")
    s.add_argument("--adapter", required=True, help="the folder finetune --out wrote")
    s.add_argument("--task", default=None, help="default: the task it was trained on")
    s.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the examples to score (default test)")
    s.add_argument("--limit", type=_positive_int, default=None,
                   help="score only the first N examples of the split (default: all)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser(
        "generate", help="continue a prompt with the base (or an adapter)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="An adapter answers a prompt written in its task's format (an example each):\n"
               + task_formats()
               + "\nWith an adapter trained on a task, generation stops at the end of the "
                 "answer\n(--no-stop: keep going).")
    s.add_argument("--prompt", default="the red fox ",
                   help="the text to continue (\\n for a newline; default 'the red fox ')")
    s.add_argument("--adapter", default=None,
                   help="a folder finetune --out wrote (default: the shipped base alone)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help=f"tokens to add at most (default {DEFAULT_NEW_TOKENS}, or as many as fit "
                        "the context after the prompt)")
    s.add_argument("--temperature", type=_temperature, default=0.8,
                   help="sampling temperature (default 0.8; 0: greedy)")
    s.add_argument("--top-k", type=_positive_int, default=None,
                   help="sample among the K likeliest tokens only (default: all)")
    s.add_argument("--no-stop", action="store_true",
                   help="with a task adapter, do not stop at the end of the answer")
    s.add_argument("--seed", type=_nonneg_int, default=0, help="seeds the sampling (default 0)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("bench", help="time one training step (forward, backward, AdamW), "
                                     "against PyTorch eager and the matmul floor")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"], help=_DEVICE_HELP)
    s.add_argument("--steps", type=_positive_int, default=20,
                   help="timed steps after warm-up (default 20)")
    s.add_argument("--warmup", type=_nonneg_int, default=3,
                   help="untimed steps first (default 3)")
    s.add_argument("--case", default="tiny,medium",
                   help="comma-separated cases: tiny, medium, large (default tiny,medium)")
    s.add_argument("--method", default="full,lora", help="full, lora or both (default both)")
    s.add_argument("--compare", choices=["auto", "on", "off"], default="auto",
                   help="time PyTorch eager too (auto: when torch, transformers and peft import)")
    s.add_argument("--profile", action="store_true",
                   help="print where minipeft's time goes, per op, forward and backward")
    s.add_argument("--reference", action="store_true",
                   help="time the reference ops too (autograd/ops.py, no fast kernels): per step "
                        "and per op, beside the fast path")
    s.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for minipeft and for PyTorch (default: MINIPEFT_NUM_THREADS, "
                        "else as many as NumPy's BLAS uses)")
    s.add_argument("--keep-blas-env", action="store_true",
                   help="time under OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE if set, instead of "
                        "re-running without them")
    s.set_defaults(func=_cmd_bench)

    # Hugging Face interop (export, import): see the section above the parser
    _add_interop_parsers(sub)
    # Memory (estimated, accounted, measured): see its section above the parser
    _add_memory_parser(sub)
    # Compare (every method, five axes): see its section above the parser
    _add_compare_parser(sub)
    _add_forgetting_parser(sub)
    # Docs (guide, annotated source, lessons): see its section above the parser
    _add_docs_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``minipeft`` with ``argv`` (default: the command line); return the exit code.

    * 0 on success (a bare ``minipeft`` prints the help).
    * 2 on bad input, in one line and without a traceback: argparse's own
      errors (through SystemExit), and a ValueError, TypeError, OSError (a
      missing or unwritable file) or RuntimeError from a job, printed as
      ``minipeft: error: ...``. A MemoryError is one line too, saying which
      options make a step smaller: the size of a step is the user's input.
    * 130 on Ctrl-C, with one line (``minipeft: interrupted``).
    * Anything else is a bug, not bad input: it keeps its traceback.

    ``MINIPEFT_DEBUG=1`` (any value but empty or 0) lets every exception
    through with its traceback, to see where a refusal came from.
    """
    debug = os.environ.get("MINIPEFT_DEBUG", "") not in ("", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("minipeft: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError, RuntimeError) as exc:
        if debug:
            raise
        print(f"minipeft: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        if debug:
            raise
        print(f"minipeft: error: out of memory ({' '.join(str(exc).split()) or 'MemoryError'}): "
              "give a smaller --batch-size (or --seq-len, --steps)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

