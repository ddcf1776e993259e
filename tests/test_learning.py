"""Every method really learns: from the shipped base, within a stated budget.

Task: ``reverse`` (``spell mop backwards: `` -> ``pom``), exact match on the
first 100 test examples. The base reverses words in the corpus's own wording
but never in this one (zero-shot 0.0; the majority answer scores 0.0 too), so
a method must teach the format and reuse the skill. Each method gets its own
learning rate and step budget (soft prompts need more steps, see lesson 7);
the bar is the same for all: at least ``MARGIN`` above the better of the two
baselines. Scores on this machine are in the README's table of the main job
and in lesson 4-8; the bar leaves room for other machines' rounding.
"""

from __future__ import annotations

import pytest

from minipeft.data.tasks import get_task
from minipeft.peft import (
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    IA3Config,
    LayerSelectConfig,
    LoraConfig,
    MaskConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from minipeft.workflows.base import load_base
from minipeft.workflows.evaluation import evaluate
from minipeft.workflows.finetune import FinetuneSettings, finetune

TASK = "reverse"
N_TEST = 100
MARGIN = 0.20

#: method -> (config, learning rate, steps)
BUDGETS = {
    "full": (FullFinetuneConfig(), 1e-3, 150),
    "bitfit": (BitFitConfig(), 1e-2, 150),
    "layers": (LayerSelectConfig(layers=[-2, -1]), 3e-3, 150),
    "mask": (MaskConfig(density=0.01), 1e-2, 150),
    "lora": (LoraConfig(r=8, target_modules=["c_attn"]), 3e-3, 150),
    "adapter": (AdapterConfig(bottleneck=16), 3e-3, 150),
    "ia3": (IA3Config(), 3e-2, 150),
    "prompt": (PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text="reverse the word: "), 3e-2, 300),
    "prefix": (PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True), 1e-2, 300),
}


@pytest.fixture(scope="module")
def bar():
    task = get_task(TASK)
    zero_shot = evaluate(load_base(), task, "test", limit=N_TEST)
    majority = sum(a == task.majority_answer for a in task.answers("test")[:N_TEST]) / N_TEST
    return max(zero_shot, majority) + MARGIN


@pytest.mark.slow
@pytest.mark.parametrize("method", list(BUDGETS))
def test_method_beats_both_baselines(method, bar):
    config, lr, steps = BUDGETS[method]
    result = finetune(config, TASK, FinetuneSettings(steps=steps, lr=lr, eval_limit=N_TEST),
                      progress=False, zero_shot=False)
    print(f"{method}: exact match {result.score:.3f} ({steps} steps, lr {lr}); bar {bar:.3f}")
    assert result.score >= bar, (
        f"{method}: exact match {result.score:.3f} after {steps} steps at lr {lr}, "
        f"below the bar {bar:.3f} (best baseline + {MARGIN})"
    )
