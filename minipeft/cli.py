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
    minipeft docs --out docs/_build    the docs: guide, annotated source, lessons (HTML)

Each subcommand is a thin layer over the package's functions
(:mod:`minipeft.finetune`, :mod:`minipeft.memory`, :mod:`minipeft.compare`,
:mod:`minipeft.interop`, :mod:`minipeft.docs`); errors from bad input are
printed as one line (``minipeft: error: ...``) with exit code 2. An option
value out of range (``--lr 0``, ``--eval-limit 0``) is refused by the parser
itself, naming the option and what it takes, also with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

# ---------------------------------------------------------------------------
# Method knobs: the CLI options each method reads (and how they map to configs)
# ---------------------------------------------------------------------------

# A method's default learning rate is the one ``minipeft compare`` measured
# best on the shipped base (:func:`minipeft.compare.best_known_lr`, the middle
# of the method's grid): one table, kept with the grids it was chosen from.
# Each method wants its own scale: a soft prompt moves 20 vectors and needs a
# large step, full fine-tuning moves every weight and needs a small one.


def default_lr(method: str) -> float:
    """The learning rate ``minipeft finetune`` uses for ``method`` when ``--lr`` is not given."""
    from .compare import best_known_lr

    return best_known_lr(method)


def _default_lr_help() -> str:
    """The ``--lr`` help: every method's default, read from the one table."""
    from .compare import LR_GRID

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
# the option is absent (``is None``).


def _positive_int(text: str) -> int:
    """An integer >= 1 (a step count, a batch size, a number of examples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {text}")
    return value


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


def _block_indices(text: str | None) -> list[int] | None:
    """``--layers``: comma-separated block indices (negative from the end); None when not given."""
    if text is None:
        return None
    try:
        return [int(i) for i in text.split(",")]     # int("") fails too: no empty entries
    except ValueError:
        raise ValueError(f"--layers takes block indices separated by commas (negative count "
                         f"from the end), e.g. -2,-1; got {text!r}") from None


def build_config(method: str, args) -> object:
    """The PEFT config for ``method`` from the command-line knobs (a knob left out: its default)."""
    from .peft import config as C

    targets = _names("--target-modules", getattr(args, "target_modules", None))
    if method == "full":
        return C.FullFinetuneConfig()
    if method == "bitfit":
        return C.BitFitConfig(target_modules=targets)
    if method == "layers":
        layers = _block_indices(args.layers)
        comps = _names("--components", args.components)
        if layers is None and comps is None:
            layers = [-1]
        return C.LayerSelectConfig(layers=layers, components=comps)
    if method == "mask":
        return C.MaskConfig(density=args.density, selection=args.selection,
                            **({"target_modules": targets} if targets else {}))
    if method == "lora":
        alpha = args.r if args.lora_alpha is None else args.lora_alpha   # 0 is refused, not r
        return C.LoraConfig(r=args.r, lora_alpha=alpha,
                            lora_dropout=args.lora_dropout, use_dora=args.dora,
                            **({"target_modules": targets} if targets else {}))
    if method == "adapter":
        return C.AdapterConfig(bottleneck=args.bottleneck, placement=args.placement)
    if method == "prompt":
        return C.PromptTuningConfig(num_virtual_tokens=args.virtual_tokens)
    if method == "prefix":
        return C.PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens,
                                    prefix_projection=args.prefix_projection)
    if method == "ia3":
        return C.IA3Config(scale_queries=args.scale_queries,
                           **({"target_modules": targets} if targets else {}))
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(C.METHODS)}")


def _add_method_options(s: argparse.ArgumentParser) -> None:
    """The knobs of every method (read by :func:`build_config`), shared by finetune, memory, compare."""
    g = s.add_argument_group("method knobs")
    g.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: r)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--dora", action="store_true", help="LoRA with DoRA's magnitude")
    g.add_argument("--target-modules", default=None,
                   help="comma-separated module names (peft's rule: equal or ends with .NAME)")
    g.add_argument("--bottleneck", type=int, default=16, help="adapter width (default 16)")
    g.add_argument("--placement", choices=["houlsby", "pfeiffer"], default="houlsby")
    g.add_argument("--virtual-tokens", type=int, default=20,
                   help="prompt/prefix tuning: P virtual tokens (default 20)")
    g.add_argument("--prefix-projection", action="store_true",
                   help="prefix tuning: produce the prefixes with an MLP while training")
    g.add_argument("--scale-queries", action="store_true",
                   help="(IA)^3: scale q too (the fused c_attn as a whole, peft's count)")
    g.add_argument("--density", type=float, default=0.01, help="element masks: fraction trained")
    g.add_argument("--selection", choices=["random", "magnitude", "gradient"], default="random")
    g.add_argument("--layers", default=None, help="layer selection: block indices, e.g. -2,-1")
    g.add_argument("--components", default=None,
                   help="layer selection: any of attn,mlp,ln,embeddings,ln_f")


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def _cmd_info(args) -> int:
    import numpy as np

    from . import __version__, backend
    from .base import BASE_PATH, base_info

    print(f"minipeft {__version__}  (numpy {np.__version__})")
    print(f"gpu: {'available' if backend.gpu_available() else 'not available'}")
    if os.path.isfile(BASE_PATH):
        info = base_info()
        from .base import load_base

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
    from .base import BASE_PATH, REQUIRED_MARGIN, PretrainRecipe, pretrain, save_base

    if args.out is not None and not args.out.strip():
        # not the shipped base: an empty --out (an unset shell variable) must not replace it
        raise ValueError("--out is empty: name the file to write, or leave --out out to remake "
                         "the shipped base")
    recipe = PretrainRecipe(steps=args.steps, seed=args.seed)
    out = BASE_PATH if args.out is None else args.out
    from . import io

    io.ensure_writable_dir(os.path.dirname(os.path.abspath(out)))
    model, report = pretrain(recipe, device=args.device, progress=not args.quiet)
    save_base(model, report, out)
    print(f"validation cross-entropy {report['val_loss']:.4f} nats/char; "
          f"character bigram {report['bigram_val_loss']:.4f}; "
          f"{100 * report['margin']:.1f}% below (required: {100 * REQUIRED_MARGIN:.0f}%)")
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return 0


def _cmd_finetune(args) -> int:
    from .finetune import FinetuneSettings, finetune

    cfg = build_config(args.method, args)
    # lr None (--lr not given): finetune trains at the method's best known rate, default_lr
    settings = FinetuneSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, eval_limit=args.eval_limit,
    )
    result = finetune(cfg, args.task, settings, device=args.device, out=args.out,
                      progress=not args.quiet)
    print(result.summary())
    return 0


def _cmd_eval(args) -> int:
    from .data.tasks import TASKS, get_task
    from .evaluation import evaluate
    from .finetune import FINETUNE_INFO, load_finetuned, majority_score

    if args.task is not None:
        get_task(args.task)                   # an unknown task is refused before loading
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


def _cmd_generate(args) -> int:
    import numpy as np

    from .base import load_base
    from .data.tokenizer import CharTokenizer

    tok = CharTokenizer()
    prompt = args.prompt.replace("\\n", "\n")
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character to continue, "
                         "e.g. --prompt 'the red fox '")
    ids = tok.encode(prompt)[None, :]                 # (T,) -> (1, T): a batch of one
    if args.adapter is not None:
        from .finetune import load_finetuned

        model, _ = load_finetuned(args.adapter, device=args.device)
    else:
        model = load_base(device=args.device)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed)
    sys.stdout.write(prompt + tok.decode(np.asarray(out)[0, ids.shape[1]:]) + "\n")
    return 0


def _cmd_bench(args) -> int:
    from .bench import reexec_without_blas_overrides, run_bench

    if not args.keep_blas_env:
        reexec_without_blas_overrides()  # returns only when there is nothing to unset
    return run_bench(args)


# ---------------------------------------------------------------------------
# Hugging Face interop: export and import (minipeft.interop)
# ---------------------------------------------------------------------------


def _interop_base(args):
    """The base the adapters belong to: ``--checkpoint``, or the shipped base."""
    from .base import load_base

    return load_base(args.checkpoint) if args.checkpoint else load_base()


def _cmd_export(args) -> int:
    """Write a Hugging Face folder: the base as a GPT-2 model, or an adapter as a peft adapter."""
    from .interop import export_peft_adapter, save_hf_gpt2
    from .peft import FullFinetuneConfig, PeftModel

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
    from .interop import import_peft_adapter

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
    from .optim import SGD, AdamW

    if name == "adamw":
        return AdamW(params, lr=1e-3)
    return SGD(params, lr=1e-3, momentum=0.9 if name == "sgd_momentum" else 0.0)


def _cmd_memory(args) -> int:
    """Print the three views of one training step for a method (or all), and the estimator's tables."""
    import dataclasses

    import numpy as np

    from . import memory as M
    from .nn.gpt import GPT
    from .peft import get_peft_model
    from .peft.config import METHODS

    cfg = M.preset(args.config)
    if args.gradient_checkpointing:
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
    methods = list(METHODS) if args.method == "all" else [args.method]
    if args.fit:
        print(M.format_rule_of_thumb(M.rule_of_thumb("1b"), "1b"))
        print()
        print(M.format_fit_table(M.fit_table(batch_size=args.batch_size, seq_len=args.seq_len)))
        print()
    reports = []                          # the profiled steps, one per method
    for method in methods:
        pc = build_config(method, args)       # an unknown method is refused here
        T = args.seq_len
        virtual = getattr(pc, "num_virtual_tokens", 0)
        if args.method == "all" and T + virtual > cfg.n_positions:
            T = cfg.n_positions - virtual     # the soft prompt takes positions too
            print(f"({method}: {virtual} virtual tokens, so sequences of {T} tokens)")
        est = M.estimate(cfg, pc, optimizer=args.optimizer, batch_size=args.batch_size, seq_len=T,
                         dtype=args.dtype)         # refuses a bad dtype, batch or sequence length
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
        if len(methods) != 1:
            raise ValueError("--checkpointing compares one method: give --method NAME")
        pc = build_config(methods[0], args)
        res = M.checkpointing_tradeoff(dataclasses.replace(cfg, gradient_checkpointing=False), pc,
                                       batch_size=args.batch_size, seq_len=args.seq_len,
                                       device=args.device, seed=args.seed)
        print(M.format_checkpointing(res))
    if args.png:
        if not reports:
            raise ValueError("--png draws profiled steps, and none was profiled")
        print(f"wrote {M.plot(reports, args.png)}")
    return 0


def _add_memory_parser(sub) -> None:
    s = sub.add_parser("memory", help="training memory per category: estimated, accounted, measured")
    s.add_argument("--method", default="lora",
                   help="a method (full, bitfit, layers, mask, lora, adapter, prompt, prefix, ia3) "
                        "or 'all' (default lora)")
    s.add_argument("--config", default="reference",
                   help="model size: reference, gpt2, gpt2-medium, gpt2-large, gpt2-xl, 1b, 7b, 65b "
                        "(larger than ~20M parameters: estimated only)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--dtype", default="fp32",
                   help="fp32 (what the engine runs), mixed, int8, int4 (estimated only), fp64")
    s.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "sgd_momentum"])
    s.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in backward instead of keeping its activations")
    s.add_argument("--checkpointing", action="store_true",
                   help="also compare one step with and without gradient checkpointing")
    s.add_argument("--estimate-only", action="store_true", help="the closed form only, no step")
    s.add_argument("--fit", action="store_true",
                   help="also print the 1B rule of thumb and what fits on 24/48/80 GB cards at 7B and 65B")
    s.add_argument("--png", default=None, help="write stacked bars of the three views to this PNG")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"])
    s.add_argument("--seed", type=int, default=0)
    _add_method_options(s)
    s.set_defaults(func=_cmd_memory)


# ---------------------------------------------------------------------------
# Docs: the guide, the annotated source and the lessons as HTML (minipeft.docs)
# ---------------------------------------------------------------------------


def _cmd_docs(args) -> int:
    """Build the docs site; a broken internal link or a lesson that fails to run is an error."""
    from .docs import build

    log = None if args.quiet else (lambda line: print(line, flush=True))
    report = build(args.out, executed=args.executed, execute=not args.no_execute,
                   fast=not args.full_lessons, log=log)
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
    s.add_argument("--full-lessons", action="store_true",
                   help="run lessons in the full setting (default: MINIPEFT_FAST=1)")
    s.add_argument("--quiet", action="store_true", help="print only the summary")
    s.set_defaults(func=_cmd_docs)


# ---------------------------------------------------------------------------
# Compare: every method on the five axes of the trade-off (minipeft.compare)
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
    from .peft.config import METHODS

    if text.strip() == "all":
        return tuple(METHODS)
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise ValueError(f"no methods in {text!r}: name some, e.g. --methods full,lora,prompt")
    for m in items:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)} (or all)")
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
    import dataclasses

    from . import io
    from .compare import CompareSettings, compare

    methods = _parse_methods(args.methods)
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else None
    configs = {m: build_config(m, args) for m in methods}   # a bad knob is refused here
    base = CompareSettings.quick_settings() if args.quick else CompareSettings()
    grids = {**base.lr_grid, **_parse_lr_grids(args.lr)}
    unknown = sorted(set(grids) - set(base.lr_grid))
    if unknown:
        raise ValueError(f"--lr names unknown method {unknown[0]!r}")
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: the engine's default), got {args.threads}")
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
    from .compare import DEFAULT_TIME, QUICK_TIME, TABLE_WIDTH

    s = sub.add_parser("compare", help="every method on one task: parameters, memory, speed, "
                                       "quality, inference cost, storage, forgetting")
    s.add_argument("--task", default="sentiment", help="sentiment (default), addition or reverse")
    s.add_argument("--methods", default="all",
                   help="comma-separated subset of full,bitfit,layers,mask,lora,adapter,prompt,"
                        "prefix,ia3 (default all)")
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
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"])
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--wide", action="store_true",
                   help=f"every column (the measured peak, seconds to the target, ms per token, "
                        f"storage, the loss with the adapter detached); the default table fits "
                        f"{TABLE_WIDTH} columns")
    _add_method_options(s)
    s.set_defaults(func=_cmd_compare)


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``minipeft`` parser: one subparser per job, each pointing at its ``_cmd_*`` function.

    Every subcommand stores its handler as ``func`` (``set_defaults``), so
    :func:`main` runs ``args.func(args)`` without a table of names. Building
    the parser imports the package and :mod:`minipeft.compare` (the method
    names and the default learning rates the help lists); everything else a
    job needs is imported inside its ``_cmd_*`` function, when it runs.
    """
    from .peft.config import METHODS

    p = argparse.ArgumentParser(
        prog="minipeft",
        description="Parameter-efficient fine-tuning, built from scratch to be read.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="versions, backend, device and the shipped base")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("pretrain", help="make the base model from the synthetic corpus")
    s.add_argument("--steps", type=_positive_int, default=3000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="where to write it (default: the shipped base)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"])
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("finetune", help="fine-tune the shipped base on a task")
    s.add_argument("--method", choices=METHODS, default="lora")
    s.add_argument("--task", default="sentiment")
    s.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default 300)")
    s.add_argument("--batch-size", type=_positive_int, default=16,
                   help="examples per step (default 16)")
    s.add_argument("--lr", type=_positive_lr, default=None, help=_default_lr_help())
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-limit", type=_positive_int, default=None,
                   help="score only the first N test examples (default: all)")
    s.add_argument("--out", default=None, help="folder for the adapter (or checkpoint)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"])
    s.add_argument("--quiet", action="store_true")
    _add_method_options(s)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("eval", help="score a saved adapter (or checkpoint folder) on a task")
    s.add_argument("--adapter", required=True)
    s.add_argument("--task", default=None, help="default: the task it was trained on")
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--limit", type=_positive_int, default=None,
                   help="score only the first N examples of the split (default: all)")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"])
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("generate", help="continue a prompt with the base (or an adapter)")
    s.add_argument("--prompt", default="the red fox ")
    s.add_argument("--adapter", default=None)
    s.add_argument("--max-new-tokens", type=int, default=80)
    s.add_argument("--temperature", type=_temperature, default=0.8,
                   help="sampling temperature (default 0.8; 0: greedy)")
    s.add_argument("--top-k", type=_positive_int, default=None,
                   help="sample among the K likeliest tokens only (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"])
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("bench", help="time one training step (forward, backward, AdamW), "
                                     "against PyTorch eager and the matmul floor")
    s.add_argument("--device", default="cpu", choices=["cpu", "gpu", "strict"])
    s.add_argument("--steps", type=int, default=20, help="timed steps after warm-up (default 20)")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--case", default="tiny,medium",
                   help="comma-separated cases: tiny, medium, large (default tiny,medium)")
    s.add_argument("--method", default="full,lora", help="full, lora or both (default both)")
    s.add_argument("--compare", choices=["auto", "on", "off"], default="auto",
                   help="time PyTorch eager too (auto: when torch, transformers and peft import)")
    s.add_argument("--profile", action="store_true",
                   help="print where minipeft's time goes, per op, forward and backward")
    s.add_argument("--threads", type=int, default=None,
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
    # Docs (guide, annotated source, lessons): see its section above the parser
    _add_docs_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``minipeft`` with ``argv`` (default: the command line); return the exit code.

    0 on success (a bare ``minipeft`` prints the help). 2 on bad input: a
    ValueError, OSError (a missing or unwritable file), TypeError or
    RuntimeError from a job is printed as one line, ``minipeft: error: ...``,
    without a traceback (argparse's own usage errors exit with 2 too, through
    SystemExit). 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, TypeError, RuntimeError) as exc:
        print(f"minipeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minipeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

