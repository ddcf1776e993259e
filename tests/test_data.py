r"""Data: tokenizer round trips, a corpus pinned to its bytes, tasks that keep their promises."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.data import (
    DEFAULT_TASK,
    IGNORE_INDEX,
    MAX_EXAMPLE_CHARS,
    TASKS,
    TERMINATOR,
    TRAIN_FINGERPRINT,
    VOCAB,
    CharTokenizer,
    Example,
    bigram_cross_entropy,
    fingerprint,
    generate_corpus,
    get_task,
    lm_batches,
    lm_windows,
    pretraining_text,
)
from minipeft.data.corpus import StableRandom

TOK = CharTokenizer()
vocab_text = st.text(alphabet=st.sampled_from(VOCAB), max_size=300)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def test_vocabulary_is_newline_then_printable_ascii():
    assert TOK.vocab_size == len(TOK) == 96
    assert VOCAB[0] == "\n" and VOCAB[1:] == "".join(map(chr, range(32, 127)))
    assert TOK.encode("\n").tolist() == [0]
    assert TOK.encode(" ~").tolist() == [1, 95]
    assert TOK.encode("a0").tolist() == [ord("a") - 31, ord("0") - 31]


@given(vocab_text)
def test_round_trip(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ((ids >= 0) & (ids < 96)).all()
    assert TOK.decode(ids) == text
    assert TOK.decode(ids.tolist()) == text


@given(st.lists(st.integers(0, 95), max_size=200))
def test_ids_round_trip(ids):
    assert TOK.encode(TOK.decode(ids)).tolist() == ids


@pytest.mark.parametrize("bad, pos", [("tab\there", 3), ("caf\u00e9", 3), ("\r\n", 0),
                                      ("ok \U0001f600", 3), ("\x7f", 0)])
def test_unknown_characters_are_named_with_their_position(bad, pos):
    with pytest.raises(ValueError, match=f"position {pos}") as info:
        TOK.encode(bad)
    assert repr(bad[pos]) in str(info.value)


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="-100 at position 1"):
        TOK.decode([5, IGNORE_INDEX])
    with pytest.raises(ValueError, match="96 at position 0"):
        TOK.decode(np.array([96]))
    with pytest.raises(ValueError, match="1-D"):
        TOK.decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        TOK.encode(b"bytes")


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------


def test_default_train_text_is_pinned():
    text = pretraining_text("train")
    assert 2_000_000 <= len(text) <= 4_000_000
    assert fingerprint(text) == TRAIN_FINGERPRINT, (
        "the default pretraining text changed; the shipped base was trained on the old one. "
        "If the change is intended, retrain the base and re-pin TRAIN_FINGERPRINT."
    )


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = generate_corpus(20_000, seed=7)
    assert a == generate_corpus(20_000, seed=7)
    assert a != generate_corpus(20_000, seed=8)
    # One stream: a shorter corpus is a prefix of a longer one.
    assert generate_corpus(50_000, seed=7).startswith(a)


def test_corpus_is_whole_lines_of_the_vocabulary():
    text = generate_corpus(5_000, seed=3)
    assert 5_000 <= len(text) < 5_000 + 200 and text.endswith("\n")
    TOK.encode(text)  # raises if any character is outside the vocabulary
    assert generate_corpus(0) == ""
    with pytest.raises(ValueError):
        generate_corpus(-1)


def test_splits_differ_and_unknown_split_is_named():
    train, val = pretraining_text("train"), pretraining_text("val")
    assert 100_000 <= len(val) < len(train)
    assert val[:2000] not in train
    with pytest.raises(ValueError, match="'train', 'val'"):
        pretraining_text("test")


def test_corpus_contains_every_kind_of_structure():
    text = generate_corpus(100_000, seed=0)
    lines = text.splitlines()
    # The world: fixed facts, always told the same way.
    assert "the red fox lives in the north forest." in lines
    assert not any("fox lives in" in s and "north forest" not in s for s in lines)
    # Arithmetic, and every sum correct.
    sums = [s for s in lines if re.fullmatch(r"\d+\+\d+=\d+", s)]
    assert len(sums) > 100
    for s in sums:
        a, b, c = map(int, re.split(r"[+=]", s))
        assert a + b == c
    # Transforms, and every one correct.
    for kind, fn in (("reverse", lambda w: w[::-1]), ("upper", str.upper)):
        found = [s for s in lines if s.startswith(kind + " ")]
        assert len(found) > 50
        for s in found:
            word, out = s[len(kind) + 1:].split(": ")
            assert out == fn(word)
    # Opinions with sentiment words and their consequences.
    assert any(re.search(r"was (tasty|fresh|delicious), so \w+ was (happy|glad)", s)
               for s in lines)
    assert any(re.search(r"was (bland|stale|cold), so \w+ was (upset|angry|sad)", s)
               for s in lines)
    # The tasks' formats are new: the corpus never asks that way.
    for phrase in ("sentiment:", " plus ", "backwards", "review:"):
        assert phrase not in text


def test_bigram_cross_entropy_is_a_real_but_beatable_baseline():
    ce = bigram_cross_entropy(pretraining_text("train"), pretraining_text("val"), TOK)
    assert math.isfinite(ce)
    assert ce < 0.6 * math.log(96)
    # Add-one on a repeated pattern: p(b|a) = (n + 1) / (n + 96) exactly.
    ce = bigram_cross_entropy("ab" * 50, "abab", TOK)
    assert ce == pytest.approx(-math.log(50 / 145) / 3 - 2 * math.log(51 / 146) / 3)


def test_stable_random_is_the_documented_function_of_random():
    import random

    u = random.Random(5)
    r = StableRandom(5)
    for _ in range(100):
        a, b = r.randint(3, 9), 3 + int(u.random() * 7)
        assert a == b


def test_lm_batches_are_shifted_windows():
    ids = np.arange(1000, dtype=np.int64)  # position = value, so windows are easy to read
    batches = list(lm_batches(ids, batch_size=4, seq_len=16, seed=1, n_batches=3))
    assert len(batches) == 3
    for idx, tgt in batches:
        assert idx.shape == tgt.shape == (4, 16)
        assert idx.dtype == tgt.dtype == np.int64
        for row, trow in zip(idx, tgt):
            np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 16))
            np.testing.assert_array_equal(trow, row + 1)
    again = next(lm_batches(ids, 4, 16, seed=1))
    np.testing.assert_array_equal(again[0], batches[0][0])
    with pytest.raises(ValueError, match="too short"):
        next(lm_batches(ids[:10], 2, 16))


def test_lm_batches_cover_the_real_text_exactly():
    ids = TOK.encode(generate_corpus(3_000, seed=2))
    idx, tgt = next(lm_batches(ids, 8, 32, seed=0))
    for row, trow in zip(idx, tgt):
        text, nxt = TOK.decode(row), TOK.decode(trow)
        assert text[1:] == nxt[:-1]
        assert TOK.decode(np.concatenate([row, trow[-1:]])) in TOK.decode(ids)


def test_lm_windows_tile_the_text_in_order():
    ids = np.arange(100, dtype=np.int64) % 96
    batches = list(lm_windows(ids, batch_size=2, seq_len=10))
    rows = np.concatenate([b[0] for b in batches])
    tgts = np.concatenate([b[1] for b in batches])
    assert rows.shape == (9, 10)  # (100 - 1) // 10 windows
    np.testing.assert_array_equal(rows.reshape(-1), ids[:90])
    np.testing.assert_array_equal(tgts.reshape(-1), ids[1:91])
    assert len(list(lm_windows(ids, 2, 10, max_batches=2))) == 2


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------

task_names = pytest.mark.parametrize("name", list(TASKS))


def test_registry():
    assert list(TASKS) == ["sentiment", "addition", "reverse"]
    assert DEFAULT_TASK == "sentiment"
    assert get_task() is get_task("sentiment")
    with pytest.raises(ValueError, match="known tasks: sentiment, addition, reverse"):
        get_task("translation")


@task_names
def test_split_sizes_and_no_overlap(name):
    task = get_task(name)
    assert task.sizes == {"train": 2000, "val": 200, "test": 500}
    prompts = {s: {ex.prompt for ex in exs} for s, exs in task.splits.items()}
    assert all(len(prompts[s]) == task.sizes[s] for s in prompts)  # distinct within
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    with pytest.raises(ValueError, match="known splits"):
        task.examples("dev")


@task_names
def test_examples_fit_and_are_one_line(name):
    task = get_task(name)
    for exs in task.splits.values():
        for ex in exs:
            assert isinstance(ex, Example)
            assert len(ex.text) <= MAX_EXAMPLE_CHARS
            assert ex.text.count(TERMINATOR) == 1 and ex.text.endswith(TERMINATOR)
            assert ex.prompt.endswith(" ") and ex.answer == ex.answer.strip() != ""
            TOK.encode(ex.text)
    assert task.max_answer_len == max(len(ex.answer) for exs in task.splits.values()
                                      for ex in exs)
    assert task.max_new_tokens == task.max_answer_len + 1


@task_names
def test_tasks_are_deterministic_per_seed(name):
    spec = TASKS[name]
    a, b, c = spec.build(0), spec.build(0), spec.build(1)
    assert a.splits == b.splits
    assert a.splits["train"] != c.splits["train"]


def test_gold_answers_are_correct():
    for ex in get_task("addition").splits["test"]:
        a, b = map(int, re.fullmatch(r"what is (\d+) plus (\d+)\? ", ex.prompt).groups())
        assert ex.answer == str(a + b)
    for ex in get_task("reverse").splits["test"]:
        (word,) = re.fullmatch(r"spell ([a-z]+) backwards: ", ex.prompt).groups()
        assert ex.answer == word[::-1]
    assert {ex.answer for ex in get_task("sentiment").splits["train"]} == {"positive",
                                                                           "negative"}


@task_names
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_batches_mask_prompt_and_padding(name, split):
    task = get_task(name)
    examples = task.examples(split)
    seen = 0
    for idx, tgt in task.batches(split, batch_size=64, seed=0, shuffle=False):
        assert idx.dtype == tgt.dtype == np.int64 and idx.shape == tgt.shape
        for b in range(idx.shape[0]):
            ex = examples[seen + b]
            ids = TOK.encode(ex.text)
            n = len(ids) - 1
            np.testing.assert_array_equal(idx[b, :n], ids[:-1])
            assert (idx[b, n:] == 0).all()  # padding id
            keep = tgt[b] != IGNORE_INDEX
            # Only the answer and terminator are trained, in their places.
            assert TOK.decode(tgt[b][keep]) == ex.answer + TERMINATOR
            assert np.flatnonzero(keep).tolist() == list(range(len(ex.prompt) - 1, n))
            # Where a target is kept it is the next input token.
            np.testing.assert_array_equal(tgt[b, : n - 1][keep[: n - 1]],
                                          idx[b, 1:n][keep[: n - 1]])
        # Right-padded to the batch's longest example.
        assert idx.shape[1] == max(len(ex.text) - 1
                                   for ex in examples[seen:seen + idx.shape[0]])
        seen += idx.shape[0]
    assert seen == len(examples)


def test_batches_options():
    task = get_task("reverse")
    a = list(task.batches("train", 32, seed=3, epochs=2))
    assert len(a) == 2 * math.ceil(2000 / 32)
    b = list(task.batches("train", 32, seed=3, epochs=2))
    assert all((x[0] == y[0]).all() for x, y in zip(a, b))
    # Each epoch is a permutation of the whole split, and epochs differ.
    per_epoch = len(a) // 2
    firsts = [TOK.decode(x[0][0]) for x in (a[0], a[per_epoch])]
    assert firsts[0] != firsts[1]
    rows = [TOK.decode(r[r != 0]) for idx, _ in a[:per_epoch] for r in idx]
    assert sorted(rows) == sorted(ex.text[:-1] for ex in task.splits["train"])
    # Fixed width, dropping the ragged tail, forever.
    idx, tgt = next(task.batches("val", 16, seq_len=128))
    assert idx.shape == tgt.shape == (16, 128)
    assert len(list(task.batches("val", 64, drop_last=True))) == 200 // 64
    forever = task.batches("val", 64, epochs=None)
    assert len([next(forever) for _ in range(20)]) == 20
    with pytest.raises(ValueError, match="seq_len"):
        next(task.batches("val", 4, seq_len=10))


@task_names
def test_gold_scores_one_and_garbage_scores_zero(name):
    task = get_task(name)
    for split in ("val", "test"):
        gold = task.answers(split)
        assert task.score(gold, split) == 1.0
        # A generator's raw output: answer, terminator, then whatever followed.
        assert task.score([g + "\nreview: more" for g in gold], split) == 1.0
        assert task.score(["?"] * len(gold), split) == 0.0
    with pytest.raises(ValueError, match="predictions"):
        task.score(["x"], "test")


def test_majority_baselines():
    sentiment = get_task("sentiment")
    for split in ("train", "val", "test"):
        assert sentiment.majority_baseline(split) == 0.5  # exactly balanced classes
    assert sentiment.majority_answer == "negative"  # a tie, broken alphabetically
    for name in ("addition", "reverse"):
        task = get_task(name)
        answers = task.answers("test")
        expected = answers.count(task.majority_answer) / len(answers)
        assert task.majority_baseline("test") == expected < 0.05


@task_names
def test_prompt_batches_cover_every_prompt_once(name):
    task = get_task(name)
    ids = task.prompt_ids("test")
    assert len(ids) == 500 and all(x.dtype == np.int64 for x in ids)
    covered = []
    for rows, idx in task.prompt_batches("test", batch_size=50):
        assert idx.shape[0] == len(rows) <= 50 and idx.dtype == np.int64
        for r, row in zip(rows, idx):
            np.testing.assert_array_equal(row, ids[r])
        covered.extend(rows.tolist())
    assert sorted(covered) == list(range(500))


def test_encode_example_matches_the_batch_layout():
    ex = Example("spell mop backwards: ", "pom")
    idx, tgt = get_task("reverse").encode_example(ex)
    assert TOK.decode(idx) == "spell mop backwards: pom"
    assert TOK.decode(tgt[tgt != IGNORE_INDEX]) == "pom\n"
    assert (tgt[:20] == IGNORE_INDEX).all() and tgt[20] == TOK.encode("p")[0]
