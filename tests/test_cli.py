"""The `minipeft` command and the jobs behind it, run as a user would."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import pytest

from minipeft.base import (
    BASE_PATH,
    DEFAULT_WARMUP,
    PretrainRecipe,
    base_info,
    load_base,
    pretrain,
)
from minipeft.cli import main
from minipeft.optim import LRSchedule


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
    (["finetune", "--task", "poetry", "--steps", "1", "--quiet"], "known tasks"),
    (["eval", "--adapter", "/nonexistent/adapter"], "not found"),
    (["eval", "--adapter", "/nonexistent/adapter", "--task", "poetry"], "known tasks"),
    (["finetune", "--method", "lora", "--r", "0", "--steps", "1", "--quiet"], "r must be a positive"),
    # 0 is refused, not read as "not given" (it used to become r)
    (["finetune", "--method", "lora", "--lora-alpha", "0", "--steps", "1", "--quiet"],
     "lora_alpha must be positive"),
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
])
def test_option_values_out_of_range_are_refused_by_the_parser(argv, option, allowed, capsys,
                                                               monkeypatch):
    import minipeft.finetune as F

    # refused while parsing: nothing is trained, nothing is written
    monkeypatch.setattr(F, "finetune", lambda *a, **k: pytest.fail("ran with a bad option"))
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--quiet"] if argv[0] in ("finetune", "pretrain") else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and allowed in " ".join(err.split())


def test_finetune_without_lr_trains_at_the_methods_best_known_rate(tmp_path, capsys):
    from minipeft.compare import best_known_lr

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
    import minipeft.base as B

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
    import minipeft.base as B

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
    from minipeft.base import validation_loss
    from minipeft.data.corpus import pretraining_text
    from minipeft.data.tokenizer import CharTokenizer

    model = load_base()
    val_ids = CharTokenizer().encode(pretraining_text("val"))
    assert validation_loss(model, val_ids, batches=20) <= 0.70 * info["bigram_val_loss"]


def test_finetune_defaults_to_the_rate_compare_measured_best(capsys):
    from minipeft.cli import default_lr
    from minipeft.compare import LR_GRID, best_known_lr

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for method in LR_GRID:
        assert default_lr(method) == best_known_lr(method)
        assert f"{method} {best_known_lr(method):g}" in help_text
