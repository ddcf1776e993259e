"""The fast path equals the reference ops: a GPT training step, then three AdamW steps.

Every op's own float64 checks run on both paths in ``test_ops.py``; here the
whole model is held to it in float32, for full fine-tuning and every PEFT
method of ``peft_cases.py``, with dropout on (the reference run replays the
fast run's masks). The comparison is per tensor, ``||a - b|| / ||b||``, not
per element: split products and blocked reductions round differently, and an
entry near zero can differ relatively by much more than the tensor does.

Each method's zero-initialised parts (LoRA's B, the adapters' up
projections, ...) are set to random values first: with B = 0 the gradient of
LoRA's A is exactly zero on both paths and the check would prove nothing.

After three AdamW steps only the losses are compared: AdamW divides by the
root of the second moment, which amplifies float32 rounding in the small
entries of a gradient, so the parameters drift apart by more than the
rounding of one step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft_cases import CASES, batch, host, perturb, small_base, wrap

from minipeft import no_grad
from minipeft.autograd import fast_path_on, reference_ops
from minipeft.nn.layers import record_dropout_masks, replay_dropout_masks
from minipeft.optim import AdamW

TOL = 1e-5


def relative(a, b) -> float:
    """||a - b|| / ||b||, 0 when both are zero."""
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / nb if nb else float(np.linalg.norm(a))


def model_for(name):
    """The named case on a small base with dropout, every trainable part random."""
    pm = wrap(name, base=small_base(dropout=0.1))
    perturb(pm)
    pm.train()
    return pm


def step(model, data, masks=None):
    """One forward and backward: (loss, {name: gradient}, the dropout masks it used)."""
    for p in model.parameters():
        p.grad = None
    tape = record_dropout_masks() if masks is None else replay_dropout_masks(masks)
    with tape as t:
        _, loss = model(*data)
    loss.backward()
    grads = {n: host(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, t.masks


def test_the_switch_is_on_by_default_and_restored():
    assert fast_path_on()
    with reference_ops():
        assert not fast_path_on()
        with reference_ops(on=False):
            assert fast_path_on()
        assert not fast_path_on()
    assert fast_path_on()


def test_the_environment_switches_a_whole_process():
    """MINIPEFT_REFERENCE=1 runs the reference path from import on; a value that is
    not 0 or 1 is refused, saying what it may be."""
    root = Path(__file__).resolve().parents[1]
    code = "import minipeft.autograd as a; print(a.fast_path_on(), a.ops.GELU.kernel.__module__)"

    def run(value):
        env = {**os.environ, "MINIPEFT_REFERENCE": value, "PYTHONPATH": str(root)}
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                              capture_output=True, text=True)
    assert run("1").stdout.split() == ["False", "minipeft.autograd.ops"]
    assert run("0").stdout.split() == ["True", "minipeft.autograd.fused"]
    bad = run("yes")
    assert bad.returncode != 0 and "MINIPEFT_REFERENCE must be 1" in bad.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_a_training_step_gives_the_same_loss_and_gradients_on_both_paths(name):
    model = model_for(name)
    data = batch()
    loss, grads, masks = step(model, data)
    assert masks, "dropout drew no mask: the step does not exercise it"
    with reference_ops():
        ref_loss, ref_grads, _ = step(model, data, masks)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    assert grads and set(grads) == set(ref_grads)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable
    for n, g in grads.items():
        assert np.linalg.norm(ref_grads[n]) > 0, f"{n}: a zero gradient proves nothing"
        assert relative(g, ref_grads[n]) <= TOL, f"{n}: {relative(g, ref_grads[n]):.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_three_adamw_steps_give_the_same_losses_on_both_paths(name):
    model = model_for(name)
    start = {n: host(p) for n, p in model.named_parameters()}
    data = [batch(seed=s) for s in range(3)]

    def train(masks=None):
        for n, p in model.named_parameters():
            p.data[...] = start[n]
        opt = AdamW(model.trainable_parameters(), lr=1e-2)
        losses, used = [], []
        for i, d in enumerate(data):
            loss, _, m = step(model, d, None if masks is None else masks[i])
            opt.step()
            losses.append(loss)
            used.append(m)
        with no_grad():
            model.eval()
            losses.append(model(*data[0])[1].item())
            model.train()
        return losses, used

    losses, masks = train()
    with reference_ops():
        ref_losses, _ = train(masks)
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= TOL * abs(b), f"loss {i}: {a} against {b}"
