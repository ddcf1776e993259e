"""The `minipeft` command and the jobs behind it, run as a user would."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import pytest

from minipeft.optim import LRSchedule
from minipeft.tools.cli import main
from minipeft.workflows.base import (
    BASE_PATH,
    DEFAULT_WARMUP,
    PretrainRecipe,
    base_info,
    load_base,
    pretrain,
)


def test_info_describes_the_shipped_base(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "822,016" in out and "bigram" in out


def test_finetune_save_eval_generate_round_trip(tmp_path, capsys):
    out = tmp_path / "lora"
    rc = main(["finetune", "--method", "lora", "--steps", "3", "--eval-limit", "8",
               "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "16,384 of 838,400" in text and "majority baseline" in text
    for name in ("adapter_config.json", "adapter_model.safetensors", "finetune.json"):
        assert (out / name).is_file()
    info = json.loads((out / "finetune.json").read_text())
    assert info["task"] == "sentiment" and info["trainable"] == 16384

    assert main(["eval", "--adapter", str(out), "--limit", "8"]) == 0
    assert "sentiment test (8 examples) accuracy" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(out), "--prompt", "review: the soup was cold. ",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("review: the soup was cold. ")


@pytest.mark.parametrize("argv, message", [
    (["eval", "--adapter", "/nonexistent/adapter"], "not found"),
    (["eval", "--adapter", "/nonexistent/adapter", "--task", "poetry"], "known tasks"),
    (["finetune", "--method", "layers", "--layers", "a,b", "--steps", "1", "--quiet"],
     "--layers takes block indices separated by commas"),
    (["finetune", "--method", "layers", "--layers", "", "--steps", "1", "--quiet"],
     "--layers takes block indices"),
    (["finetune", "--method", "lora", "--target-modules", "", "--steps", "1", "--quiet"],
     "--target-modules takes names separated by commas"),
    (["finetune", "--method", "prompt", "--virtual-tokens", "0", "--steps", "1", "--eval-limit", "1",
      "--quiet"], "trains no parameters"),
    (["generate", "--prompt", ""], "--prompt is empty"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error:") and message in err


@pytest.mark.parametrize("argv, option, allowed", [
    (["finetune", "--lr", "0"], "--lr", "must be a positive finite number"),
    (["finetune", "--lr=-1e-3"], "--lr", "must be a positive finite number"),
    (["finetune", "--lr", "nan"], "--lr", "leave --lr out to use the method's best known rate"),
    (["finetune", "--lr", "inf"], "--lr", "must be a positive finite number"),
    (["finetune", "--eval-limit", "0"], "--eval-limit", "must be a positive integer"),
    (["finetune", "--eval-limit", "-3"], "--eval-limit", "must be a positive integer"),
    (["finetune", "--steps", "0"], "--steps", "must be a positive integer"),
    (["finetune", "--batch-size", "0"], "--batch-size", "must be a positive integer"),
    (["eval", "--adapter", "x", "--limit", "0"], "--limit", "must be a positive integer"),
    (["generate", "--temperature", "nan"], "--temperature", "must be a finite number >= 0"),
    (["generate", "--temperature", "-1"], "--temperature", "must be a finite number >= 0"),
    (["generate", "--top-k", "0"], "--top-k", "must be a positive integer"),
    (["pretrain", "--steps", "0"], "--steps", "must be a positive integer"),
    (["finetune", "--task", "poetry"], "--task", "invalid choice: 'poetry' (choose from 'sentiment'"),
    (["finetune", "--method", "lora", "--r", "0"], "--r", "must be a positive integer"),
    # 0 is refused, not read as "not given" (it used to become r)
    (["finetune", "--method", "lora", "--lora-alpha", "0"], "--lora-alpha",
     "must be a positive finite number"),
    # negative numbers are values (they used to be taken for options: "expected one argument")
    (["finetune", "--lr", "-1e-3"], "--lr", "must be a positive finite number"),
])
def test_option_values_out_of_range_are_refused_by_the_parser(argv, option, allowed, capsys,
                                                               monkeypatch):
    import minipeft.workflows.finetune as F

    # refused while parsing: nothing is trained, nothing is written
    monkeypatch.setattr(F, "finetune", lambda *a, **k: pytest.fail("ran with a bad option"))
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--quiet"] if argv[0] in ("finetune", "pretrain") else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and allowed in " ".join(err.split())


def test_finetune_without_lr_trains_at_the_methods_best_known_rate(tmp_path, capsys):
    from minipeft.peft.config import best_known_lr

    out = tmp_path / "ia3"
    assert main(["finetune", "--method", "ia3", "--steps", "1", "--eval-limit", "2",
                 "--out", str(out), "--quiet"]) == 0
    assert f"at lr {best_known_lr('ia3'):g}" in capsys.readouterr().out
    info = json.loads((out / "finetune.json").read_text())
    assert info["settings"]["lr"] == best_known_lr("ia3")
    assert main(["finetune", "--method", "ia3", "--steps", "1", "--eval-limit", "2", "--lr", "0.002",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "finetune.json").read_text())["settings"]["lr"] == 0.002


def test_eval_needs_a_task_when_the_adapter_does_not_name_one(tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["finetune", "--steps", "1", "--eval-limit", "2", "--out", str(out), "--quiet"]) == 0
    (out / "finetune.json").unlink()             # as an adapter converted by `minipeft import`
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--limit", "2"]) == 2
    assert "has no finetune.json saying which task it was trained on: name one with --task" \
        in capsys.readouterr().err
    assert main(["eval", "--adapter", str(out), "--limit", "2", "--task", "addition"]) == 0
    assert "addition test (2 examples)" in capsys.readouterr().out


def test_eval_reports_the_examples_scored_and_their_majority(tmp_path, capsys):
    from minipeft.data.tasks import get_task

    out = tmp_path / "lora"
    assert main(["finetune", "--steps", "1", "--eval-limit", "2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    task = get_task("sentiment")
    n = len(task.examples("val"))
    assert main(["eval", "--adapter", str(out), "--split", "val", "--limit", str(n + 50)]) == 0
    text = capsys.readouterr().out
    assert f"({n} examples)" in text
    assert f"(majority baseline {task.majority_baseline('val'):.4f})" in text
    # a limited run: the baseline is taken over the same first examples as the score
    answers = task.answers("val")[:3]
    majority = sum(a == task.majority_answer for a in answers) / 3
    assert main(["eval", "--adapter", str(out), "--split", "val", "--limit", "3"]) == 0
    assert f"(majority baseline {majority:.4f})" in capsys.readouterr().out


def test_an_empty_out_never_replaces_saved_work(tmp_path, capsys, monkeypatch):
    import minipeft.workflows.base as B

    # pretrain: "" is not "the shipped base" (an unset shell variable must not overwrite it)
    monkeypatch.setattr(B, "BASE_PATH", str(tmp_path / "base.safetensors"))
    monkeypatch.setattr(B, "pretrain", lambda *a, **k: pytest.fail("pretrained with --out ''"))
    assert main(["pretrain", "--out", "", "--steps", "1", "--quiet"]) == 2
    assert "--out is empty" in capsys.readouterr().err
    # finetune: "" is not the current folder (where an adapter may already be saved)
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--out", "", "--steps", "1", "--eval-limit", "1", "--quiet"]) == 2
    assert "out is empty" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--method", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["finetune", "--steps", "1", "--quiet", "--out", str(blocker / "sub")]) == 2
    assert "minipeft: error:" in capsys.readouterr().err


def test_short_pretrain_is_deterministic_and_learns():
    recipe = PretrainRecipe(steps=12, warmup=2, eval_every=100, val_batches=2)
    m1, r1 = pretrain(recipe, progress=False)
    m2, r2 = pretrain(recipe, progress=False)
    for (n1, a), (n2, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and np.array_equal(a, b), n1
    losses = r1["history"]["losses"]
    assert losses[-1] < losses[0] - 0.5
    assert r1["val_loss"] == r2["val_loss"]


def test_default_recipe_is_the_one_the_shipped_base_was_made_with():
    # the shipped base records the recipe it was trained with; the defaults, resolved,
    # must give exactly that recipe, so exactly the same warmup and cosine schedule
    recorded = base_info()["recipe"]
    resolved = dataclasses.asdict(PretrainRecipe().resolved())
    assert {k: resolved[k] for k in recorded} == recorded
    assert resolved["warmup"] == recorded["warmup"] == DEFAULT_WARMUP == 100
    ours = LRSchedule(resolved["lr"], resolved["steps"], resolved["warmup"], resolved["min_lr"])
    made = LRSchedule(recorded["lr"], recorded["steps"], recorded["warmup"], recorded["min_lr"])
    assert [ours(i) for i in range(recorded["steps"])] == [made(i) for i in range(recorded["steps"])]


@pytest.mark.parametrize("steps, warmup", [(1, 0), (9, 0), (10, 1), (50, 5), (99, 9),
                                           (500, 50), (999, 99), (1000, 100), (3000, 100)])
def test_default_warmup_is_a_tenth_of_a_short_run(steps, warmup):
    assert PretrainRecipe(steps=steps).resolved().warmup == warmup
    # a warmup given explicitly is kept as it is
    assert PretrainRecipe(steps=steps, warmup=steps).resolved().warmup == steps


def test_a_warmup_longer_than_the_run_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"warmup must be in \[0, steps=50\], got 100.*warmup=None"):
        PretrainRecipe(steps=50, warmup=100).resolved()


def test_pretrain_command_with_fewer_steps_than_the_default_warmup(tmp_path, monkeypatch, capsys):
    # `minipeft pretrain --steps 20` once failed: the warmup was 100 steps whatever the run.
    # (Only the final validation is shortened here, to keep the test quick.)
    import minipeft.workflows.base as B

    monkeypatch.setattr(B, "PretrainRecipe", functools.partial(PretrainRecipe, val_batches=2))
    out = tmp_path / "base.safetensors"
    assert main(["pretrain", "--steps", "20", "--out", str(out), "--quiet"]) == 0
    assert "validation cross-entropy" in capsys.readouterr().out
    recipe = base_info(str(out))["recipe"]
    assert (recipe["steps"], recipe["warmup"]) == (20, 2)       # recorded as trained
    load_base(str(out))


def test_shipped_base_beats_the_bigram_by_thirty_percent():
    info = base_info()
    assert os.path.getsize(BASE_PATH) < 4_000_000
    assert info["val_loss"] <= 0.70 * info["bigram_val_loss"]
    # the stored number is what the weights really give (first 20 validation windows)
    from minipeft.data.corpus import pretraining_text
    from minipeft.data.tokenizer import CharTokenizer
    from minipeft.workflows.base import validation_loss

    model = load_base()
    val_ids = CharTokenizer().encode(pretraining_text("val"))
    assert validation_loss(model, val_ids, batches=20) <= 0.70 * info["bigram_val_loss"]


def test_finetune_defaults_to_the_rate_compare_measured_best(capsys):
    from minipeft.peft.config import LR_GRID, best_known_lr
    from minipeft.tools.cli import default_lr

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for method in LR_GRID:
        assert default_lr(method) == best_known_lr(method)
        assert f"{method} {best_known_lr(method):g}" in help_text


def _actions(parser, path="minipeft"):
    """(where, action) for every action of ``parser`` and of its subcommands, recursively."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_of_every_subcommand_has_help():
    import argparse

    from minipeft.tools.cli import build_parser

    missing = [f"{where} {'/'.join(a.option_strings) or a.dest}"
               for where, a in _actions(build_parser())
               if not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == []


def test_method_options_apply_to_the_methods_whose_config_has_the_field():
    import argparse

    from minipeft.peft.config import METHODS, config_class
    from minipeft.tools.cli import _KNOBS, build_config, build_parser, methods_using

    assert methods_using("target_modules") == ["bitfit", "mask", "lora", "lora_fa", "ia3"]
    assert methods_using("r") == ["lora", "lora_fa"]
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["finetune"]
    values = {"--r": "4", "--lora-alpha": "2", "--lora-dropout": "0.5", "--target-modules": "c_fc",
              "--bottleneck": "3", "--placement": "pfeiffer", "--virtual-tokens": "7",
              "--density": "0.5", "--selection": "magnitude", "--layers": "-2,-1",
              "--components": "mlp"}
    for knob in _KNOBS:
        users = methods_using(knob.field)
        assert users, f"{knob.flag} sets {knob.field}, which no config has"
        # the help names exactly the methods that use it
        assert f"({', '.join(users)}" in sub._option_string_actions[knob.flag].help
        argv = [knob.flag] if knob.action else [knob.flag, values[knob.flag]]
        for method in METHODS:
            args = sub.parse_args(["--method", method, *argv])
            if method not in users:
                continue
            cfg = build_config(method, args)
            assert isinstance(cfg, config_class(method))
            default = config_class(method).__dataclass_fields__[knob.field]
            assert getattr(cfg, knob.field) != (default.default if default.default is not
                                                dataclasses.MISSING else default.default_factory()), \
                (knob.flag, method)
    # a knob left out: the config's own default (LoRA's alpha follows r)
    args = sub.parse_args(["--method", "lora", "--r", "4"])
    assert (build_config("lora", args).r, build_config("lora", args).lora_alpha) == (4, 4)
    assert isinstance(args, argparse.Namespace)


def test_readme_and_generate_help_show_each_tasks_prompt_format(capsys):
    from minipeft.data.tasks import TASKS
    from minipeft.tools.cli import task_formats

    formats = task_formats()
    for name, spec in TASKS.items():
        assert f"  {name}: {spec.description}" in formats
        ex = spec.example()
        assert f"--prompt {ex.prompt!r}" in formats and f"(answer: {ex.answer})" in formats
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert formats in capsys.readouterr().out
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    # the README's block is this text, regenerated with python -c
    # "from minipeft.tools.cli import task_formats; print(task_formats())"
    assert formats in readme


def test_generate_with_a_task_adapter_stops_at_the_end_of_the_answer(tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["finetune", "--steps", "1", "--eval-limit", "1", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    prompt = "review: the soup was cold. sentiment: "
    args = ["generate", "--adapter", str(out), "--prompt", prompt, "--temperature", "0"]
    assert main([*args, "--no-stop"]) == 0
    free = capsys.readouterr().out
    assert main(args) == 0
    stopped = capsys.readouterr().out
    # without the stop the model writes past the answer's terminator (a newline) ...
    assert "\n" in free[len(prompt):-1]
    # ... with it, the output is the prompt and the answer, up to the terminator
    assert stopped == free[:free.index("\n", len(prompt))] + "\n"
    assert stopped.count("\n") == 1


def test_generate_asks_by_default_for_no_more_tokens_than_fit(capsys):
    prompt = "x" * 100
    assert main(["generate", "--prompt", prompt, "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(prompt) and len(text) == 128 + 1          # 28 new tokens, and "\n"


def test_main_keeps_bugs_tracebacks_and_reports_interrupts_in_one_line(monkeypatch, capsys):
    import minipeft.tools.cli as cli

    def raising(exc):
        def job(args):
            raise exc
        return job

    monkeypatch.setattr(cli, "_cmd_info", raising(KeyboardInterrupt()))
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "minipeft: interrupted\n"
    monkeypatch.setattr(cli, "_cmd_info", raising(ValueError("bad\n  value")))
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "minipeft: error: bad value\n"
    monkeypatch.setattr(cli, "_cmd_info", raising(MemoryError("Unable to allocate 61 GiB")))
    assert main(["info"]) == 2
    assert "out of memory (Unable to allocate 61 GiB): give a smaller --batch-size" in \
        capsys.readouterr().err
    # an unexpected exception is a bug: it keeps its traceback
    monkeypatch.setattr(cli, "_cmd_info", raising(ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):
        main(["info"])
    # MINIPEFT_DEBUG=1 shows where a refusal came from
    monkeypatch.setenv("MINIPEFT_DEBUG", "1")
    monkeypatch.setattr(cli, "_cmd_info", raising(ValueError("bad value")))
    with pytest.raises(ValueError, match="bad value"):
        main(["info"])
