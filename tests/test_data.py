r"""Data: tokenizer round trips, a corpus pinned to its bytes, tasks that keep their promises."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.data import IGNORE_INDEX, VOCAB, CharTokenizer

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
