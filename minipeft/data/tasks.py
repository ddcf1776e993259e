r"""Downstream tasks: skills pretraining taught, asked for in a new format.

Each task reuses something the pretraining corpus
(:mod:`minipeft.data.corpus`) teaches, but words the question in a way the
corpus never uses, so the base model half-knows the answer and does not know
it is being asked. That gap is what a parameter-efficient method has to
close: a few thousand parameters can teach a format, not a skill.

Three tasks, one line each (prompt | answer)::

    sentiment   review: the soup was bland. sentiment:  | negative    accuracy
                (reuses the corpus's opinion lines)
    addition    what is 23 plus 45?  | 68                             exact_match
                (reuses "23+45=68")
    reverse     spell mop backwards:  | pom                           exact_match
                (reuses "reverse mop: pom")

Each prompt ends in a space and the answer follows it directly.

``sentiment`` is the default task: two balanced classes (the majority
baseline is exactly 50%), meant to be learned quickly; a fifth of its
reviews turn on a "but", so matching the first sentiment word is not enough.

Every example is one line: ``prompt + answer + TERMINATOR`` with the
terminator ``'\n'``, at most :data:`MAX_EXAMPLE_CHARS` (96) characters, so even
with 20 virtual tokens prepended it fits the 128-position context. Generation
stops at the terminator; :meth:`Task.score` cuts a prediction there.

Splits are fixed by a seed: ``train`` 2000, ``val`` 200, ``test`` 500
examples (:data:`SPLIT_SIZES`), drawn as one stream of distinct prompts and
dealt out in that order, so no prompt is in two splits.

Training batches (:meth:`Task.batches`) hold one example per row, with the
loss on the answer only. For ``spell mop backwards: pom`` in a batch two
positions wider (``_`` a space, ``$`` the terminator, ``.`` padding with id 0,
``~`` the ignore index -100)::

    idx      spell_mop_backwards:_pom..
    targets  ~~~~~~~~~~~~~~~~~~~~pom$~~

``targets`` is ``idx`` shifted by one (the model does not shift), and
positions that would predict a prompt character, or sit in the padding, carry
:data:`~minipeft.data.tokenizer.IGNORE_INDEX`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .corpus import (
    ASPECTS,
    EATERIES,
    GENERAL_NEGATIVE,
    GENERAL_POSITIVE,
    SHOPS,
    StableRandom,
    derive_seed,
    random_word,
)
from .tokenizer import IGNORE_INDEX, CharTokenizer

#: Ends every answer; generation stops when the model writes it.
TERMINATOR = "\n"

#: The longest an example may be: prompt + answer + terminator, in characters.
MAX_EXAMPLE_CHARS = 96

#: Examples per split, the same for every task.
SPLIT_SIZES = (("train", 2000), ("val", 200), ("test", 500))

SPLITS = tuple(name for name, _ in SPLIT_SIZES)

_TOKENIZER = CharTokenizer()


@dataclass(frozen=True)
class Example:
    """One question and its gold answer (the answer without the terminator)."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The full training line: prompt, answer, terminator."""
        return self.prompt + self.answer + TERMINATOR


class Task:
    r"""A downstream task: fixed splits of :class:`Example`, a metric and batchers.

    Attributes
    ----------
    name : str
        Registry name (``'sentiment'``, ``'addition'``, ``'reverse'``).
    metric : str
        ``'accuracy'`` (a label out of a few) or ``'exact_match'`` (free
        text); both are the fraction of predictions equal to the answer.
    description : str
        One sentence for tables and ``--help``.
    splits : dict[str, tuple[Example, ...]]
        ``'train'``, ``'val'``, ``'test'``; tuples, so a shared task object
        cannot be changed by accident.
    terminator : str
        ``'\n'``: ends every answer.
    """

    def __init__(self, name: str, metric: str, description: str,
                 splits: dict[str, Sequence[Example]], terminator: str = TERMINATOR):
        if metric not in ("accuracy", "exact_match"):
            raise ValueError(f"metric must be 'accuracy' or 'exact_match', got {metric!r}")
        self.name = name
        self.metric = metric
        self.description = description
        self.terminator = terminator
        self.splits = {s: tuple(splits[s]) for s in SPLITS}
        # Token ids of each split's examples, encoded on first use:
        # split -> list of (ids of the full text, number of prompt tokens).
        self._encoded: dict[str, list[tuple[np.ndarray, int]]] = {}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={n}" for s, n in self.sizes.items())
        return f"Task({self.name!r}, metric={self.metric!r}, {sizes})"

    # -- the examples ---------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        """Examples per split: ``{'train': 2000, 'val': 200, 'test': 500}``."""
        return {s: len(exs) for s, exs in self.splits.items()}

    @property
    def max_answer_len(self) -> int:
        """Longest answer over all splits, in characters, terminator excluded."""
        return max(len(ex.answer) for exs in self.splits.values() for ex in exs)

    @property
    def max_new_tokens(self) -> int:
        """Tokens a generator needs to write any answer and its terminator."""
        return self.max_answer_len + len(self.terminator)

    def examples(self, split: str) -> tuple[Example, ...]:
        """The examples of ``split``; a clear error for an unknown split."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        return self.splits[split]

    def prompts(self, split: str) -> list[str]:
        return [ex.prompt for ex in self.examples(split)]

    def answers(self, split: str) -> list[str]:
        return [ex.answer for ex in self.examples(split)]

    def prompt_ids(self, split: str) -> list[np.ndarray]:
        """Each prompt of ``split`` encoded (1-D int64), in split order: input to greedy decoding."""
        return [_TOKENIZER.encode(p) for p in self.prompts(split)]

    def prompt_batches(self, split: str, batch_size: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        r"""Prompts grouped by length, for batched generation without padding.

        Yields ``(rows, idx)``: ``rows`` the examples' positions in the split
        (int64, shape (B,)), ``idx`` their prompts' ids, int64 of shape (B, P)
        where every prompt in the batch has the same length P. Put the
        predictions back with ``predictions[rows[i]] = ...``. Shorter prompts
        come first; within a length, split order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.prompt_ids(split)
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        # Walk the sorted rows, closing a batch when it is full or the
        # prompt length changes.
        start = 0
        while start < len(order):
            length = len(ids[order[start]])
            stop = start
            while (stop < len(order) and stop - start < batch_size
                   and len(ids[order[stop]]) == length):
                stop += 1
            rows = np.array(order[start:stop], dtype=np.int64)
            yield rows, np.stack([ids[i] for i in rows])  # (B,), (B, P)
            start = stop

    # -- scoring ----------------------------------------------------------------
    def clean(self, prediction: str) -> str:
        r"""A generated continuation cut at the first terminator, spaces stripped."""
        return prediction.split(self.terminator, 1)[0].strip()

    def score(self, predictions: Sequence[str], split: str) -> float:
        r"""Fraction of ``predictions`` equal to the gold answers of ``split``.

        Each prediction is cleaned first (:meth:`clean`), so the raw text a
        generator wrote, terminator and whatever followed it included, can be
        passed as it is. Accuracy and exact match are the same computation;
        the name says whether the answer is a label or free text.
        """
        answers = self.answers(split)
        if len(predictions) != len(answers):
            raise ValueError(f"{self.name}/{split}: got {len(predictions)} predictions for "
                             f"{len(answers)} examples")
        if not answers:
            return 0.0
        hits = sum(self.clean(p) == a.strip() for p, a in zip(predictions, answers))
        return hits / len(answers)

    @property
    def majority_answer(self) -> str:
        """The most common training answer; ties go to the alphabetically first."""
        counts = Counter(self.answers("train"))
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    def majority_baseline(self, split: str = "test") -> float:
        """Score of answering :attr:`majority_answer` to every example of ``split``."""
        return self.score([self.majority_answer] * len(self.examples(split)), split)

    # -- training batches ---------------------------------------------------------
    def _encoded_split(self, split: str) -> list[tuple[np.ndarray, int]]:
        if split not in self._encoded:
            self._encoded[split] = [
                (_TOKENIZER.encode(ex.text), len(ex.prompt)) for ex in self.examples(split)
            ]
        return self._encoded[split]

    def encode_example(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        r"""One example as ``(idx, targets)``, 1-D int64 of length ``len(text) - 1``.

        ``idx = ids[:-1]``, ``targets = ids[1:]`` with the first ``P - 1``
        targets (those that predict prompt characters; P the prompt's length)
        set to :data:`IGNORE_INDEX`. What is left is exactly the answer and the
        terminator: position ``P - 1``, the prompt's last character, predicts
        the answer's first.
        """
        ids = _TOKENIZER.encode(example.text)
        return self._row(ids, len(example.prompt))

    @staticmethod
    def _row(ids: np.ndarray, n_prompt: int) -> tuple[np.ndarray, np.ndarray]:
        idx, targets = ids[:-1].copy(), ids[1:].copy()
        targets[: n_prompt - 1] = IGNORE_INDEX
        return idx, targets

    def batches(self, split: str, batch_size: int, seed: int = 0, *,
                seq_len: int | None = None, shuffle: bool = True, epochs: int | None = 1,
                drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        r"""Batches of whole examples: ``(idx, targets)``, int64 of shape (B, T).

        Each row is one example laid out as in the module docstring, padded on
        the right (idx 0, target -100) to T: the longest row of the batch, or
        ``seq_len`` if given (every row must fit; examples are at most 95
        positions). ``shuffle`` draws a new order each epoch from
        ``numpy.random.default_rng(seed)``; ``epochs=None`` repeats forever.
        The last, smaller batch of an epoch is kept unless ``drop_last``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epochs is not None and epochs < 0:
            raise ValueError(f"epochs must be >= 0 or None (forever), got {epochs}")
        encoded = self._encoded_split(split)
        longest = max(len(ids) - 1 for ids, _ in encoded)
        if seq_len is not None and seq_len < longest:
            raise ValueError(f"{self.name}/{split}: seq_len={seq_len} is shorter than the "
                             f"longest example ({longest} positions)")
        rng = np.random.default_rng(seed)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(len(encoded)) if shuffle else np.arange(len(encoded))
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                if drop_last and len(chosen) < batch_size:
                    break
                rows = [self._row(*encoded[i]) for i in chosen]
                T = seq_len if seq_len is not None else max(len(x) for x, _ in rows)
                # Padding: input id 0 (any valid id would do: causal attention
                # never lets a real position see it) and target -100 (no loss).
                idx = np.zeros((len(rows), T), dtype=np.int64)  # (B, T)
                targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)  # (B, T)
                for b, (x, y) in enumerate(rows):
                    idx[b, : len(x)] = x
                    targets[b, : len(y)] = y
                yield idx, targets
            epoch += 1


# ---------------------------------------------------------------------------
# Building the splits
# ---------------------------------------------------------------------------


def _draw_splits(name: str, seed: int,
                 draw: Callable[[StableRandom, int], Example]) -> dict[str, list[Example]]:
    r"""Draw distinct examples, deal them out to the splits in order.

    ``draw(r, i)`` makes the ``i``-th accepted example's candidate (``i`` lets
    a task balance its classes: even ``i`` one label, odd the other).
    Candidates that repeat an earlier prompt or are longer than
    :data:`MAX_EXAMPLE_CHARS` are thrown away and drawn again, so splits never
    share a prompt.
    """
    r = StableRandom(derive_seed("task", name, seed))
    total = sum(n for _, n in SPLIT_SIZES)
    pool: list[Example] = []
    seen: set[str] = set()  # membership only; never iterated
    tries = 0
    while len(pool) < total:
        tries += 1
        if tries > 50 * total:
            raise RuntimeError(f"task {name!r}: could not draw {total} distinct examples")
        ex = draw(r, len(pool))
        if ex.prompt in seen or len(ex.text) > MAX_EXAMPLE_CHARS:
            continue
        seen.add(ex.prompt)
        pool.append(ex)
    splits, start = {}, 0
    for split, n in SPLIT_SIZES:
        part = pool[start:start + n]
        # Shuffle within the split so a class-balanced draw does not
        # alternate labels row by row.
        r.shuffle(part)
        splits[split], start = part, start + n
    return splits


# -- sentiment ------------------------------------------------------------------

def _clause(r: StableRandom, aspects: Sequence, positive: bool, avoid: str = "") -> tuple[str, str]:
    """A ``(noun, adjective)`` of the given side from one of ``aspects``."""
    _, nouns, pos, neg = r.choice(aspects)
    noun = r.choice(nouns)
    while noun == avoid:
        noun = r.choice(nouns)
    return noun, r.choice(pos if positive else neg)


def _sentiment_example(r: StableRandom, i: int) -> Example:
    positive = i % 2 == 0
    label = "positive" if positive else "negative"
    # An eatery review talks about food, service and the room; a shop review
    # about a product.
    shop = r.random() < 0.3
    aspects = ASPECTS[3:] if shop else ASPECTS[:3]
    place = r.choice(SHOPS if shop else EATERIES)
    verb = "is" if shop else "was"
    general = r.choice(GENERAL_POSITIVE if positive else GENERAL_NEGATIVE)
    n1, a1 = _clause(r, aspects, positive)
    n2, a2 = _clause(r, aspects, positive, avoid=n1)
    k = r.randint(0, 9)
    if k <= 1:
        review = f"the {n1} {verb} {a1}."
    elif k <= 3:
        review = f"the {n1} {verb} {a1} and the {n2} {verb} {a2}."
    elif k <= 5:
        review = f"{general} {place}. the {n1} {verb} {a1}."
    elif k <= 7:
        review = f"the {n1} at the {place} {verb} {a1}. {general}!"
    else:
        # A contrast: the first clause has the other side; the verdict is the
        # clause after "but". The hardest fifth of the task.
        n0, a0 = _clause(r, aspects, not positive, avoid=n2)
        review = f"the {n0} {verb} {a0}, but the {n2} {verb} {a2}."
    return Example(f"review: {review} sentiment: ", label)


# -- addition -------------------------------------------------------------------

def _addition_example(r: StableRandom, i: int) -> Example:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return Example(f"what is {a} plus {b}? ", str(a + b))


# -- reverse --------------------------------------------------------------------

def _reverse_example(r: StableRandom, i: int) -> Example:
    word = random_word(r, 3, 6)
    return Example(f"spell {word} backwards: ", word[::-1])


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """What defines a task: its metric, a description, and how to draw an example."""

    name: str
    metric: str
    description: str
    draw: Callable[[StableRandom, int], Example]

    def example(self) -> Example:
        """One example of the format, for help texts (drawn alone: no split is built)."""
        return self.draw(StableRandom(derive_seed("example", self.name, 0)), 0)

    def build(self, seed: int = 0) -> Task:
        """The task with splits drawn from ``seed`` (uncached; prefer :func:`get_task`)."""
        return Task(self.name, self.metric, self.description,
                    _draw_splits(self.name, seed, self.draw))


_SPECS = (
    TaskSpec("sentiment", "accuracy",
             "label a short restaurant or shop review 'positive' or 'negative'",
             _sentiment_example),
    TaskSpec("addition", "exact_match",
             "add two two-digit numbers asked in words ('what is 23 plus 45? ' -> '68')",
             _addition_example),
    TaskSpec("reverse", "exact_match",
             "spell a made-up word of 3 to 6 letters backwards",
             _reverse_example),
)

#: The registry: task name -> :class:`TaskSpec`, in the order tables list them.
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}

#: The task the README's main command and the CLI use unless told otherwise.
DEFAULT_TASK = "sentiment"


def get_task(name: str = DEFAULT_TASK, seed: int = 0) -> Task:
    r"""The task ``name`` with splits drawn from ``seed`` (cached: same seed, same object).

    Raises ValueError listing the known tasks for an unknown name.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return _cached_task(name, int(seed))


# Cached on positional arguments only, so get_task() and get_task("sentiment", 0)
# hit the same entry.
@lru_cache(maxsize=16)
def _cached_task(name: str, seed: int) -> Task:
    return TASKS[name].build(seed)
