r"""A deterministic synthetic pretraining corpus: a small world worth learning.

The reference model (4 layers, 128 wide, 128 characters of context) is far too
small for real text, so it learns a toy world instead, one line at a time. A
line is one of five kinds, each teaching a skill that a downstream task in
:mod:`minipeft.data.tasks` later asks for in a *different* format:

=============  ================================================  ===============
kind           example line                                      reused by
=============  ================================================  ===============
world          ``the red fox lives in the north forest.``        (knowledge)
people         ``ada is a baker in stonebridge.``                (knowledge)
arithmetic     ``23+45=68``                                      ``addition``
transform      ``reverse stone: enots``, ``upper ash: ASH``      ``reverse``
opinion        ``the soup was bland, so ben was upset.``         ``sentiment``
=============  ================================================  ===============

The world is fixed (the tables below): the fox is always red and always lives
in the north forest, so a model can memorise it and a later lesson can ask
whether fine-tuning made it forget. Arithmetic and transforms are drawn fresh
each line, so they can only be learned as procedures. Opinions pair sentiment
words with their consequences (``so ben was upset``), which is what the
sentiment task needs the model to have noticed.

Determinism: same seed, same bytes, on every machine and Python version.
Python guarantees only that :meth:`random.Random.random` keeps its sequence
across versions (``randrange``, ``choice`` and ``shuffle`` may change), so
every draw here goes through :class:`StableRandom`, which uses nothing else.
Every table is a tuple, so no dict or set order is ever involved.
:data:`TRAIN_FINGERPRINT` pins the default training text; a test checks it, and
a change to it means the shipped base model was trained on different text.

The module also holds the two things pretraining needs besides the text: the
character-bigram baseline (:func:`bigram_cross_entropy`) that the pretrained
base must beat, and the language-model batch samplers (:func:`lm_batches`,
:func:`lm_windows`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np

from .tokenizer import CharTokenizer

# ---------------------------------------------------------------------------
# A random source that stays the same across Python versions
# ---------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    r"""A 64-bit seed from a tuple of names and numbers, via SHA-256.

    Lets each stream (the corpus's train and val text, each task's pool) have
    its own seed from one user-facing ``seed`` without any two colliding.
    """
    key = "/".join(str(p) for p in parts).encode("ascii")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


class StableRandom:
    r"""Random draws built only on :meth:`random.Random.random`.

    That one method's sequence is the only one Python promises never to
    change, so everything here is derived from it: ``randint(a, b)`` is
    ``a + floor(u * (b - a + 1))`` for ``u`` uniform on [0, 1).
    """

    def __init__(self, seed: int):
        self._random = random.Random(seed).random

    def random(self) -> float:
        return self._random()

    def randint(self, a: int, b: int) -> int:
        """A uniform integer in [a, b], both ends included."""
        return a + int(self._random() * (b - a + 1))

    def choice(self, seq: Sequence):
        return seq[int(self._random() * len(seq))]

    def weighted(self, weights: Sequence[float]) -> int:
        """An index drawn with probability proportional to ``weights``."""
        u = self._random() * sum(weights)
        for i, w in enumerate(weights):
            u -= w
            if u < 0:
                return i
        return len(weights) - 1

    def shuffle(self, items: list) -> None:
        """Fisher-Yates, in place."""
        for i in range(len(items) - 1, 0, -1):
            j = int(self._random() * (i + 1))
            items[i], items[j] = items[j], items[i]


# ---------------------------------------------------------------------------
# The world: fixed facts, in tuples (never dicts or sets: order must not vary)
# ---------------------------------------------------------------------------

# (animal, colour, home, food), listed from the biggest animal to the smallest,
# so "bigger than" is a consistent order the model can learn.
ANIMALS = (
    ("bear", "brown", "east hills", "honey"),
    ("wolf", "grey", "north forest", "rabbits"),
    ("deer", "golden", "west meadow", "clover"),
    ("goat", "white", "high cliffs", "grass"),
    ("lynx", "silver", "stone cave", "birds"),
    ("swan", "white", "south lake", "weeds"),
    ("otter", "brown", "river bank", "fish"),
    ("badger", "black", "old wood", "worms"),
    ("fox", "red", "north forest", "berries"),
    ("owl", "grey", "old wood", "mice"),
    ("crow", "black", "high cliffs", "seeds"),
    ("hare", "sandy", "west meadow", "roots"),
    ("frog", "green", "south lake", "flies"),
    ("mole", "dark", "east hills", "beetles"),
)

# Friendships, as pairs of animals; "friends" is symmetric.
FRIENDS = (
    ("bear", "badger"), ("wolf", "crow"), ("deer", "hare"), ("goat", "lynx"),
    ("swan", "frog"), ("otter", "mole"), ("fox", "owl"),
)

# (name, job, town)
PEOPLE = (
    ("ada", "baker", "stonebridge"),
    ("ben", "farmer", "millford"),
    ("cara", "teacher", "ashdale"),
    ("dan", "doctor", "riverton"),
    ("eva", "potter", "stonebridge"),
    ("finn", "fisher", "riverton"),
    ("gus", "miller", "millford"),
    ("hana", "smith", "ashdale"),
    ("ivy", "cook", "riverton"),
    ("jon", "painter", "stonebridge"),
    ("kim", "weaver", "millford"),
    ("leo", "carpenter", "ashdale"),
)

# (job, workplace) for "ada works at the bakery."
WORKPLACES = (
    ("baker", "bakery"), ("farmer", "farm"), ("teacher", "school"), ("doctor", "clinic"),
    ("potter", "pottery"), ("fisher", "harbour"), ("miller", "mill"), ("smith", "forge"),
    ("cook", "inn"), ("painter", "studio"), ("weaver", "loom house"), ("carpenter", "workshop"),
)

# Opinion vocabulary: what is judged, grouped by aspect, each aspect with the
# sentiment words that fit it. The sentiment task reuses these exact words in
# its reviews, so pretraining is where the model learns which side they fall.
#   (aspect, nouns, positive adjectives, negative adjectives)
ASPECTS = (
    ("food",
     ("soup", "bread", "pasta", "pie", "coffee", "tea", "cake", "stew", "salad", "pizza"),
     ("tasty", "fresh", "delicious", "hot", "perfect"),
     ("bland", "stale", "cold", "soggy", "greasy")),
    ("service",
     ("waiter", "staff", "chef", "owner", "host"),
     ("friendly", "kind", "helpful", "quick", "polite"),
     ("rude", "slow", "careless", "grumpy", "unhelpful")),
    ("room",
     ("room", "table", "garden", "hall", "terrace"),
     ("clean", "cosy", "bright", "quiet", "lovely"),
     ("dirty", "noisy", "dark", "cramped", "smelly")),
    ("product",
     ("lamp", "chair", "kettle", "phone", "bag", "watch", "blanket", "radio"),
     ("sturdy", "reliable", "comfortable", "handy", "excellent"),
     ("broken", "flimsy", "useless", "faulty", "leaky")),
)

# Words that fit any aspect.
GENERAL_POSITIVE = ("great", "good", "wonderful", "amazing", "fantastic")
GENERAL_NEGATIVE = ("awful", "bad", "terrible", "horrible", "dreadful")

# How a person feels afterwards: the consequence that gives a word its side.
MOOD_POSITIVE = ("happy", "glad", "pleased", "delighted")
MOOD_NEGATIVE = ("upset", "angry", "sad", "annoyed")

# Places to eat at (food, service, room) and shops to buy from (product).
EATERIES = ("blue cafe", "old mill inn", "harbour grill", "corner diner", "green kitchen",
            "river tavern")
SHOPS = ("market stall", "corner shop", "town store", "craft fair")

LETTERS = "abcdefghijklmnopqrstuvwxyz"

# ---------------------------------------------------------------------------
# Line generators, one per kind. Each takes the random source and returns one
# line of text without its newline.
# ---------------------------------------------------------------------------


def _world_line(r: StableRandom) -> str:
    name, colour, home, food = r.choice(ANIMALS)
    k = r.randint(0, 9)
    if k == 0:
        return f"the {colour} {name} lives in the {home}."
    if k == 1:
        return f"the {name} is {colour}."
    if k == 2:
        return f"the {name} eats {food}."
    if k == 3:
        return f"in the {home} lives the {colour} {name}."
    if k == 4:
        return f"where does the {name} live? in the {home}."
    if k == 5:
        return f"what does the {name} eat? {food}."
    if k == 6:
        return f"what colour is the {name}? {colour}."
    if k == 7:
        # Size order is the table order: a lower index is bigger.
        i, j = r.randint(0, len(ANIMALS) - 1), r.randint(0, len(ANIMALS) - 2)
        j += j >= i  # a second, different animal
        big, small = ANIMALS[min(i, j)][0], ANIMALS[max(i, j)][0]
        if r.random() < 0.5:
            return f"the {big} is bigger than the {small}."
        return f"the {small} is smaller than the {big}."
    if k == 8:
        a, b = r.choice(FRIENDS)
        if r.random() < 0.5:
            a, b = b, a
        return f"the {a} and the {b} are friends."
    return f"the {colour} {name} from the {home} likes {food}."


def _people_line(r: StableRandom) -> str:
    name, job, town = r.choice(PEOPLE)
    k = r.randint(0, 4)
    if k == 0:
        return f"{name} is a {job} in {town}."
    if k == 1:
        return f"{name} lives in {town}."
    if k == 2:
        place = next(w for j, w in WORKPLACES if j == job)
        return f"{name} works at the {place}."
    if k == 3:
        return f"who is the {job} in {town}? {name}."
    # Neighbours: two people of the same town.
    others = tuple(p[0] for p in PEOPLE if p[2] == town and p[0] != name)
    return f"{name} and {r.choice(others)} are neighbours in {town}."


def _number(r: StableRandom) -> int:
    r"""An operand: mostly two digits, sometimes one, sometimes three."""
    u = r.random()
    if u < 0.15:
        return r.randint(0, 9)
    if u < 0.9:
        return r.randint(10, 99)
    return r.randint(100, 999)


def _arithmetic_line(r: StableRandom) -> str:
    a, b = _number(r), _number(r)
    if r.random() < 0.8:
        return f"{a}+{b}={a + b}"
    # Subtraction, arranged so the result is never negative.
    hi, lo = max(a, b), min(a, b)
    return f"{hi}-{lo}={hi - lo}"


def random_word(r: StableRandom, lo: int = 3, hi: int = 7) -> str:
    r"""A made-up lowercase word of ``lo``..``hi`` letters (not memorisable)."""
    return "".join(r.choice(LETTERS) for _ in range(r.randint(lo, hi)))


# Real words from the world, so transforms also see familiar spellings.
_WORLD_WORDS = tuple(a[0] for a in ANIMALS) + tuple(p[0] for p in PEOPLE) + tuple(
    n for a in ASPECTS for n in a[1])


def _transform_line(r: StableRandom) -> str:
    word = r.choice(_WORLD_WORDS) if r.random() < 0.3 else random_word(r, 2, 8)
    if r.random() < 0.65:
        return f"reverse {word}: {word[::-1]}"
    return f"upper {word}: {word.upper()}"


def _opinion_line(r: StableRandom) -> str:
    positive = r.random() < 0.5
    aspect = r.choice(ASPECTS)
    _, nouns, pos, neg = aspect
    noun = r.choice(nouns)
    adj = r.choice(pos if positive else neg)
    general = r.choice(GENERAL_POSITIVE if positive else GENERAL_NEGATIVE)
    mood = r.choice(MOOD_POSITIVE if positive else MOOD_NEGATIVE)
    name = r.choice(PEOPLE)[0]
    place = r.choice(SHOPS if aspect[0] == "product" else EATERIES)
    k = r.randint(0, 5)
    if k == 0:
        return f"the {noun} was {adj}, so {name} was {mood}."
    if k == 1:
        return f"{name} thought the {noun} at the {place} was {adj}."
    if k == 2:
        view = "positive" if positive else "negative"
        return f"{name} had a {view} view of the {place}: the {noun} was {adj}."
    if k == 3:
        verb = "loved" if positive else "hated"
        return f"a {general} {noun} at the {place}! {name} {verb} it."
    if k == 4:
        again = "will come back" if positive else "will never come back"
        return f"the {noun} was {adj} and {general}. {name} {again}."
    return f"{name} was {mood}: the {noun} at the {place} was {general}."


# (kind, generator, share of lines). Arithmetic and transforms get generous
# shares because they are procedures, learned only from many examples (and
# their lines are short: by characters, arithmetic is still only about 12%).
KINDS = (
    ("world", _world_line, 0.22),
    ("people", _people_line, 0.08),
    ("arithmetic", _arithmetic_line, 0.35),
    ("transform", _transform_line, 0.17),
    ("opinion", _opinion_line, 0.18),
)

# ---------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------

#: Default sizes of the two splits, in characters.
TRAIN_CHARS = 3_000_000
VAL_CHARS = 200_000

#: SHA-256 of ``pretraining_text("train")``: the text the shipped base learned.
TRAIN_FINGERPRINT = "57cd005f4dfaa6071b284d4e644950f68def82f7cc9da4bb53da4118ff4f9b60"


def generate_corpus(n_chars: int, seed: int = 0) -> str:
    r"""Whole lines of the synthetic corpus, at least ``n_chars`` characters in all.

    Lines are drawn one at a time (kind by :data:`KINDS`' shares, then the
    line) and each ends with ``'\n'``; the text stops at the first line end at
    or after ``n_chars``, so it is at most one line longer. A prefix of a
    longer corpus with the same seed is a shorter one: the text is one stream.
    """
    if n_chars < 0:
        raise ValueError(f"n_chars must be >= 0, got {n_chars}")
    r = StableRandom(derive_seed("corpus", seed))
    gens = tuple(k[1] for k in KINDS)
    weights = tuple(k[2] for k in KINDS)
    lines: list[str] = []
    total = 0
    while total < n_chars:
        line = gens[r.weighted(weights)](r) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines)


# Each split's text comes from its own seed. The offset is far outside any
# seed a person would type, so train and val never share a stream.
_SPLIT_SEED_OFFSET = (("train", 0, TRAIN_CHARS), ("val", 1_000_003, VAL_CHARS))


def pretraining_text(split: str = "train", seed: int = 0) -> str:
    r"""The default pretraining text of a split: ``'train'`` (~3 MB) or ``'val'`` (~200 kB).

    ``train`` is ``generate_corpus(TRAIN_CHARS, seed)``; ``val`` is
    ``generate_corpus(VAL_CHARS, seed + 1_000_003)``, a separate stream. The
    two share the world's fixed facts (that is the point) but not their
    arithmetic problems and made-up words, except by chance. Cached.
    """
    for name, offset, size in _SPLIT_SEED_OFFSET:
        if name == split:
            return _cached_corpus(size, int(seed) + offset)
    known = ", ".join(repr(s[0]) for s in _SPLIT_SEED_OFFSET)
    raise ValueError(f"unknown corpus split {split!r}; known splits: {known}")


@lru_cache(maxsize=4)
def _cached_corpus(n_chars: int, seed: int) -> str:
    return generate_corpus(n_chars, seed)


def fingerprint(text: str) -> str:
    """SHA-256 hex digest of ``text`` (ASCII bytes)."""
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ---------------------------------------------------------------------------
# The baseline: a character bigram model
# ---------------------------------------------------------------------------


def bigram_cross_entropy(train_text: str, eval_text: str, tokenizer: CharTokenizer | None = None,
                         k: float = 1.0) -> float:
    r"""Cross-entropy of a smoothed character-bigram model, in nats per character.

    Counts every adjacent pair in ``train_text``, smooths with add-``k``
    (Laplace for ``k = 1``), and scores each character of ``eval_text`` after
    the first given the one before it:

    .. math::

        p(b \mid a) = \frac{n(a, b) + k}{n(a) + k V}, \qquad
        H = -\frac{1}{N - 1} \sum_{t=1}^{N-1} \log p(x_t \mid x_{t-1})

    with :math:`V = 96`. A uniform guess scores :math:`\log 96 \approx 4.56`.
    The pretrained base must come in at least 30% below this number on the
    validation text: a model that only learned which letter follows which
    would not.
    """
    tok = tokenizer if tokenizer is not None else CharTokenizer()
    V = tok.vocab_size
    train, ev = tok.encode(train_text), tok.encode(eval_text)
    if train.size < 2 or ev.size < 2:
        raise ValueError("bigram_cross_entropy needs at least two characters of each text")
    # Pair (a, b) as the single index a * V + b, so one bincount counts them all.
    counts = np.bincount(train[:-1] * V + train[1:], minlength=V * V).reshape(V, V)  # [a, b]
    probs = (counts + k) / (counts.sum(axis=1, keepdims=True) + k * V)
    return float(-np.log(probs[ev[:-1], ev[1:]]).mean())


# ---------------------------------------------------------------------------
# Language-model batches
# ---------------------------------------------------------------------------


def _check_lm_args(text_ids, batch_size: int, seq_len: int) -> np.ndarray:
    ids = np.asarray(text_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"text_ids must be a 1-D integer array, got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if ids.size < seq_len + 1:
        raise ValueError(f"text of {ids.size} ids is too short for seq_len={seq_len} "
                         f"(needs at least seq_len + 1 = {seq_len + 1})")
    return ids.astype(np.int64, copy=False)


def lm_batches(text_ids: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
               n_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    r"""Random windows of the text: ``(idx, targets)``, both int64 of shape (B, T).

    Each row starts at a uniformly random offset ``i`` and is
    ``idx = ids[i : i+T]``, ``targets = ids[i+1 : i+T+1]``: the targets are
    already shifted by one, so position ``t`` is trained to predict the
    character after it and the model does no shifting of its own.

    Infinite unless ``n_batches`` is given. Offsets come from
    ``numpy.random.default_rng(seed)``, so a seed replays the same batches.
    """
    ids = _check_lm_args(text_ids, batch_size, seq_len)
    rng = np.random.default_rng(seed)
    # Row b covers ids[start_b + j] for j in 0..T; idx drops the last column,
    # targets the first.
    cols = np.arange(seq_len + 1)
    made = 0
    while n_batches is None or made < n_batches:
        starts = rng.integers(0, ids.size - seq_len, size=batch_size)
        window = ids[starts[:, None] + cols]  # (B, T+1)
        yield window[:, :-1].copy(), window[:, 1:].copy()  # (B, T), (B, T)
        made += 1


def lm_windows(text_ids: np.ndarray, batch_size: int, seq_len: int,
               max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    r"""Consecutive, non-overlapping windows in order: a deterministic evaluation pass.

    Same ``(idx, targets)`` layout as :func:`lm_batches`, covering the text
    from the start in steps of ``seq_len``; the last batch may have fewer
    rows, and a tail shorter than a window is left out. Averaging the loss
    over these gives a validation cross-entropy that does not depend on a
    seed (``max_batches`` caps the cost).
    """
    ids = _check_lm_args(text_ids, batch_size, seq_len)
    n_windows = (ids.size - 1) // seq_len
    cols = np.arange(seq_len + 1)
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        window = ids[starts[:, None] + cols]  # (B, T+1)
        yield window[:, :-1].copy(), window[:, 1:].copy()  # (B, T), (B, T)


def uniform_cross_entropy(vocab_size: int = CharTokenizer.vocab_size) -> float:
    """The cross-entropy of guessing uniformly: log V nats per character."""
    return math.log(vocab_size)
