r"""Data: tokenizer round trips, a corpus pinned to its bytes, tasks that keep their promises."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.data import (
    IGNORE_INDEX,
    TRAIN_FINGERPRINT,
    VOCAB,
    CharTokenizer,
    bigram_cross_entropy,
    fingerprint,
    generate_corpus,
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
