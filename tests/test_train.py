"""The training loop on a tiny stand-in model: it learns, it keeps its books.

The stand-in is a bigram language model (one table of next-token logits per
token) built from the same pieces as the GPT: ``nn.Module``, ``Parameter``,
``ops.embedding`` and ``ops.cross_entropy``. No assertion here is about time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minipeft import backend
from minipeft.autograd import ops
from minipeft.nn import Module, Parameter
from minipeft.optim import SGD, AdamW, LRSchedule
from minipeft.workflows.train import History, evaluate_loss, set_seed, train

V = 8  # vocabulary of the toy problem


class Bigram(Module):
    """logits[b, t] = table[idx[b, t]] + offset, a frozen bias; loss = mean cross-entropy."""

    def __init__(self, device="cpu", seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.table = Parameter(0.01 * rng.standard_normal((V, V)), dtype=np.float32,
                               device=device)
        self.offset = Parameter(np.zeros(V), dtype=np.float32, device=device,
                                requires_grad=False)
        self.seen_modes = []  # the training flag at each forward

    def forward(self, idx, targets=None):
        self.seen_modes.append(self.training)
        B, T = idx.shape
        logits = ops.embedding(self.table, idx) + self.offset       # (B, T, V)
        if targets is None:
            return logits, None
        loss = ops.cross_entropy(ops.reshape(logits, B * T, V), targets.reshape(-1))
        return logits, loss


def toy_batches(seed: int, batch_size: int = 8, seq_len: int = 12):
    """Endless batches of a learnable sequence: next = (3 * token + 1) mod V, 10% noise."""
    rng = np.random.default_rng(seed)
    while True:
        seq = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        seq[:, 0] = rng.integers(0, V, size=batch_size)
        for t in range(seq_len):
            nxt = (3 * seq[:, t] + 1) % V
            noise = rng.random(batch_size) < 0.1
            seq[:, t + 1] = np.where(noise, rng.integers(0, V, size=batch_size), nxt)
        yield seq[:, :-1], seq[:, 1:]                                # (B, T), (B, T)


def val_loss(model):
    return evaluate_loss(model, toy_batches(seed=99), n_batches=4)


# ---------------------------------------------------------------------------
# It learns, and the History says so
# ---------------------------------------------------------------------------


def test_train_decreases_loss_and_records_history(device):
    model = Bigram(device)
    offset_before = backend.asnumpy(model.offset.data).copy()
    opt = AdamW(model.parameters(), lr=0.2, weight_decay=0.0)
    sched = LRSchedule(base_lr=0.2, total_steps=40, warmup_steps=5)
    start = val_loss(model)
    assert start == pytest.approx(math.log(V), rel=0.02)           # uniform guessing

    hist = train(model, opt, toy_batches(seed=0), steps=40, schedule=sched, clip=1.0,
                 eval_every=15, eval_fn=val_loss, progress=False)

    # The books: one entry per step, evaluations after updates 14, 29 and the last.
    assert isinstance(hist, History)
    assert hist.steps == list(range(40))
    assert len(hist.losses) == len(hist.lrs) == len(hist.grad_norms) == len(hist.times) == 40
    assert hist.lrs == [sched(s) for s in range(40)]
    assert [e["step"] for e in hist.evals] == [14, 29, 39]
    assert all(set(e) == {"step", "loss"} for e in hist.evals)
    assert hist.wall_time >= hist.times[-1] >= hist.times[0] >= 0.0
    assert hist.to_dict()["losses"] == hist.losses

    # The learning: the noise floor is about 0.5 nats, uniform is log 8 = 2.08.
    assert np.mean(hist.losses[-5:]) < 0.5 * hist.losses[0]
    assert hist.last_eval["loss"] < 0.5 * start
    assert hist.evals[0]["loss"] < start

    # The frozen offset: not one bit changed, never a gradient buffer.
    assert backend.asnumpy(model.offset.data).tobytes() == offset_before.tobytes()
    assert model.offset.grad is None
    assert model.training                                           # back in training mode


def test_same_seeds_same_run():
    runs = []
    for _ in range(2):
        set_seed(0)
        model = Bigram(seed=3)
        opt = SGD(model.parameters(), lr=0.5, momentum=0.9)
        runs.append(train(model, opt, toy_batches(seed=7), steps=10, progress=False).losses)
    assert runs[0] == runs[1]
    rng = set_seed(5)
    assert isinstance(rng, np.random.Generator)
    assert rng.integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)


# ---------------------------------------------------------------------------
# Evaluation mode
# ---------------------------------------------------------------------------


def test_evaluate_loss_runs_in_eval_mode_and_restores_modes():
    model = Bigram()
    model.train()
    loss = evaluate_loss(model, toy_batches(seed=1), n_batches=3)
    assert model.seen_modes == [False, False, False]
    assert model.training
    assert loss == pytest.approx(math.log(V), rel=0.02)
    assert model.table.grad is None                                # no graph, no gradient

    model.eval()                                                   # a model left in eval
    evaluate_loss(model, toy_batches(seed=1), n_batches=1)
    assert not model.training

    with pytest.raises(ValueError, match="empty"):
        evaluate_loss(model, [], n_batches=2)


def test_eval_fn_without_eval_every_runs_once_at_the_end():
    model = Bigram()
    calls = []

    def metrics(m):
        calls.append(m.training)
        m.eval()                                  # an eval_fn that forgets to restore
        return {"acc": 0.5, "loss": 1.0}

    hist = train(model, SGD(model.parameters(), lr=0.1), toy_batches(seed=0), steps=4,
                 eval_fn=metrics, progress=False)
    assert hist.evals == [{"step": 3, "acc": 0.5, "loss": 1.0}]
    assert model.training                         # the loop restored it


# ---------------------------------------------------------------------------
# Progress bar, early stop, errors
# ---------------------------------------------------------------------------


def test_progress_bar_shows_loss_and_is_quiet_on_request(capsys):
    model = Bigram()
    train(model, SGD(model.parameters(), lr=0.1), toy_batches(seed=0), steps=3,
          eval_fn=val_loss, eval_every=3, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""

    train(model, SGD(model.parameters(), lr=0.1), toy_batches(seed=0), steps=3,
          eval_fn=val_loss, eval_every=3, progress=True, desc="toy")
    err = capsys.readouterr().err
    assert "toy" in err and "loss=" in err and "eval loss" in err


def test_on_step_can_stop_early():
    model = Bigram()
    seen = []

    def stop_after_two(step, history):
        seen.append((step, len(history.losses)))
        return step == 1

    hist = train(model, SGD(model.parameters(), lr=0.1), toy_batches(seed=0), steps=10,
                 on_step=stop_after_two, progress=False)
    assert seen == [(0, 1), (1, 2)]
    assert hist.steps == [0, 1]


def test_bad_settings_and_short_data_are_clear_errors():
    model = Bigram()
    opt = SGD(model.parameters(), lr=0.1)
    two_batches = [next(toy_batches(seed=0)) for _ in range(2)]
    with pytest.raises(ValueError, match="ran out after 2 of 5 steps"):
        train(model, opt, two_batches, steps=5, progress=False)
    with pytest.raises(ValueError, match="without an eval_fn"):
        train(model, opt, two_batches, steps=1, eval_every=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train(model, opt, two_batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="clip"):
        train(model, opt, two_batches, steps=1, clip=0.0, progress=False)


def test_non_finite_loss_stops_training_with_the_step():
    model = Bigram()
    model.table.data[...] = np.nan
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, SGD(model.parameters(), lr=0.1), toy_batches(seed=0), steps=3,
              progress=False)
