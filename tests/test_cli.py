"""The `minipeft` command and the jobs behind it, run as a user would."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minipeft.base import BASE_PATH, PretrainRecipe, base_info, load_base, pretrain
from minipeft.cli import main


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
    (["finetune", "--steps", "0", "--quiet"], "steps must be >= 1"),
    (["finetune", "--method", "lora", "--r", "0", "--steps", "1", "--quiet"], "r must be a positive"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error:") and message in err


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
