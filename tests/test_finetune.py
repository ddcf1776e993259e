"""One fine-tuning run as a library call: its settings, the rate it uses, what it saves, bad input.

Runs here are one step and a couple of test examples: they check the plumbing
(what is refused, what is recorded), not learning, which ``test_learning``
covers with real budgets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

from minipeft.data.tasks import get_task
from minipeft.peft import IA3Config, LoraConfig, PromptTuningConfig
from minipeft.peft.config import best_known_lr
from minipeft.workflows.finetune import FINETUNE_INFO, FinetuneSettings, finetune, load_finetuned


def quick(**over) -> FinetuneSettings:
    return FinetuneSettings(**{"steps": 1, "eval_limit": 2, **over})


@pytest.mark.parametrize("field, value, message", [
    ("eval_limit", 0, "eval_limit must be an integer >= 1"),
    ("eval_limit", -3, "None scores the whole test split"),
    ("eval_limit", 2.5, "eval_limit must be an integer"),
    ("lr", 0.0, "lr must be a positive finite number, or None for the method's best known rate"),
    ("lr", -1e-3, "lr must be a positive finite number"),
    ("lr", math.nan, "lr must be a positive finite number"),
    ("lr", math.inf, "lr must be a positive finite number"),
    ("lr", "0.1", "lr must be a positive finite number"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("steps", 2.5, "steps must be an integer >= 1"),
    ("batch_size", "4", "batch_size must be an integer >= 1"),
    ("batch_size", True, "batch_size must be an integer >= 1"),
    ("warmup", -1, "warmup must be an integer >= 0"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("weight_decay", math.nan, "weight_decay must be a finite number >= 0"),
    ("clip", 0.0, "clip must be a positive finite gradient norm, or None for no clipping"),
])
def test_bad_settings_are_refused_before_any_work(field, value, message, monkeypatch):
    import minipeft.workflows.finetune as F

    def no_base(*a, **k):
        raise AssertionError("the base was loaded before the settings were checked")

    monkeypatch.setattr(F, "load_base", no_base)
    with pytest.raises(ValueError, match=re.escape(message)):
        finetune(LoraConfig(), "sentiment", quick(**{field: value}), progress=False)


def test_settings_accept_what_they_document():
    FinetuneSettings().validate()
    quick(lr=None, clip=None, eval_limit=None, seed=np.int64(3), warmup=0).validate()


def test_bad_config_task_and_settings_types_are_refused(monkeypatch):
    import minipeft.workflows.finetune as F

    monkeypatch.setattr(F, "load_base", lambda *a, **k: pytest.fail("loaded the base"))
    with pytest.raises(TypeError, match="finetune needs a PEFT config .*default_configs"):
        finetune("lora", "sentiment", quick())
    with pytest.raises(TypeError, match="settings must be a FinetuneSettings .* got dict"):
        finetune(LoraConfig(), "sentiment", {"steps": 1})
    with pytest.raises(ValueError, match="out is empty"):
        finetune(LoraConfig(), "sentiment", quick(), out="")


@pytest.mark.parametrize("config", [IA3Config(), LoraConfig()], ids=["ia3", "lora"])
def test_lr_defaults_to_the_methods_best_known_rate_and_is_recorded(config, tmp_path):
    settings = quick()
    result = finetune(config, "sentiment", settings, out=str(tmp_path), progress=False,
                      zero_shot=False)
    assert settings.lr is None                          # the caller's settings are untouched
    assert result.settings["lr"] == best_known_lr(config.method)
    assert f"at lr {best_known_lr(config.method):g}" in result.summary()
    saved = json.loads((tmp_path / FINETUNE_INFO).read_text())
    assert saved["settings"]["lr"] == best_known_lr(config.method)
    given = finetune(config, "sentiment", quick(lr=1e-3), progress=False, zero_shot=False)
    assert given.settings["lr"] == 1e-3


def test_a_run_without_out_saves_nothing_and_keeps_model_and_history(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = finetune(LoraConfig(), "sentiment", quick(steps=3), progress=False, zero_shot=False)
    assert os.listdir(tmp_path) == [] and result.out is None
    assert result.model.get_nb_trainable_parameters()[0] == result.trainable
    assert len(result.history.losses) == 3 and result.history.last_loss == result.final_loss
    # neither is part of what finetune.json would record
    assert "model" not in dataclasses.asdict(result) and "history" not in dataclasses.asdict(result)


def test_eval_limit_beyond_the_test_split_scores_the_whole_split():
    task = get_task("sentiment")
    n = len(task.examples("test"))
    result = finetune(LoraConfig(), "sentiment", quick(eval_limit=10 * n), progress=False,
                      zero_shot=False)
    assert result.n_test == n
    assert result.majority == task.majority_baseline("test")


def test_a_config_that_trains_nothing_is_refused():
    with pytest.raises(ValueError, match="trains no parameters .* num_virtual_tokens >= 1"):
        finetune(PromptTuningConfig(num_virtual_tokens=0), "sentiment", quick(), progress=False,
                 zero_shot=False)


def test_a_damaged_finetune_json_is_named_and_the_adapter_kept(tmp_path):
    finetune(LoraConfig(), "sentiment", quick(), out=str(tmp_path), progress=False,
             zero_shot=False)
    info = tmp_path / FINETUNE_INFO
    info.write_text("{not json")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=rf"{FINETUNE_INFO} is not valid JSON .* adapter beside it"):
        load_finetuned(str(tmp_path))
    info.write_text("[1, 2]")
    with pytest.raises(ValueError, match="should hold a JSON object"):
        load_finetuned(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before
    info.unlink()
    _, meta = load_finetuned(str(tmp_path))             # the adapter alone still loads
    assert meta == {}
