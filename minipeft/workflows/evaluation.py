r"""Scoring a model on a downstream task: greedy answers, the metric, the baselines,
and the held-out answer loss (:func:`answer_loss`: what fine-tuning minimises).

A task's score is what the model *writes*: each test prompt is fed to the
model (a base GPT or a PeftModel with its adapter applied), the answer is
decoded greedily with the key/value cache until the task's terminator, and
the task's metric compares it with the gold answer. Prompts of equal length
are batched together, so no padding ever enters a prompt.

Every score is reported beside the two baselines a reader needs to judge it:
the majority answer and the base model zero-shot (:func:`baselines`).
"""

from __future__ import annotations

import numpy as np

from ..autograd import no_grad
from ..data.tokenizer import CharTokenizer
from .train import evaluate_loss

_TOKENIZER = CharTokenizer()


def generate_answers(model, task, split: str = "test", batch_size: int = 64,
                     limit: int | None = None) -> list[str]:
    """Greedy continuations of ``split``'s prompts (raw text, terminator included)."""
    n = len(task.examples(split))
    predictions = [""] * n
    stop = int(_TOKENIZER.encode(task.terminator)[0])
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for rows, idx in task.prompt_batches(split, batch_size):
                if limit is not None:
                    keep = rows < limit
                    rows, idx = rows[keep], idx[keep]
                    if len(rows) == 0:
                        continue
                out = model.generate(idx, task.max_new_tokens, temperature=0.0,
                                     stop_token=stop)
                new = np.asarray(out)[:, idx.shape[1]:]
                for r, ids in zip(rows, new):
                    predictions[int(r)] = _TOKENIZER.decode(ids)
    finally:
        model.train(was_training)
    return predictions if limit is None else predictions[:limit]


def evaluate(model, task, split: str = "test", batch_size: int = 64,
             limit: int | None = None) -> float:
    """The task's metric of ``model``'s greedy answers on ``split`` (first ``limit`` examples)."""
    preds = generate_answers(model, task, split, batch_size, limit)
    if limit is None:
        return task.score(preds, split)
    gold = task.answers(split)[:limit]
    hits = sum(task.clean(p) == a.strip() for p, a in zip(preds, gold))
    return hits / max(len(gold), 1)


def baselines(base_model, task, split: str = "test", batch_size: int = 64,
              limit: int | None = None) -> dict[str, float]:
    """The majority answer's score and the base model's zero-shot score on ``split``."""
    return {
        "majority": task.majority_baseline(split) if limit is None
        else float(np.mean([task.majority_answer == a for a in task.answers(split)[:limit]])),
        "zero_shot": evaluate(base_model, task, split, batch_size, limit),
    }


def answer_loss(model, task, split: str = "val", n_examples: int = 200,
                batch_size: int = 50) -> float:
    r"""Mean cross-entropy (nats per character) on the answers of ``split``'s first examples.

    The prompt characters carry the ignore index (see
    :meth:`~minipeft.data.tasks.Task.batches`), so this is exactly what
    fine-tuning minimises, on examples it never trained on. No gradients,
    eval mode; a few forward passes, far cheaper than generating answers.
    """
    if n_examples % batch_size:
        raise ValueError(f"n_examples ({n_examples}) must be a multiple of batch_size "
                         f"({batch_size}): every batch is weighted alike")
    batches = task.batches(split, batch_size, shuffle=False)
    return evaluate_loss(model, batches, n_examples // batch_size)
