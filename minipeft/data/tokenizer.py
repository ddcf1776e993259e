r"""A character tokenizer over the reference vocabulary of 96 symbols.

The reference model reads characters, not words or byte-pair merges, so the
whole tokenizer is one table. The vocabulary is newline plus the 95 printable
ASCII characters, in this order::

    id 0        '\n'           newline: ends a line, and a task's answer
    id 1        ' '            space (code point 32)
    id 2 .. 95  '!' .. '~'     code points 33 .. 126

So ``id = 0`` for newline and ``id = ord(c) - 31`` otherwise. Keeping the
printable characters in code-point order makes ids easy to read by eye
(``'a'`` is 66, ``'0'`` is 17) and the mapping a line of arithmetic.

Padding is deliberately *not* a token. A padded position gets target
:data:`IGNORE_INDEX` (``-100``, PyTorch's convention) and the loss skips it;
the input id under the padding can be anything valid (the batchers use 0), as
causal attention never lets a real position look at a later padded one.

Text outside the vocabulary (tabs, accents, emoji, carriage returns) is an
error naming the characters and where they are, rather than a silent
replacement that would corrupt a dataset without anyone noticing.
"""

from __future__ import annotations

import numpy as np

#: Target id that the loss ignores: padding and prompt positions.
IGNORE_INDEX = -100

#: The 96 symbols in id order: newline, then chr(32) .. chr(126).
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer:
    r"""Characters <-> ids over :data:`VOCAB` (see the module docstring).

    >>> tok = CharTokenizer()
    >>> tok.encode("hi\n").tolist()
    [73, 74, 0]
    >>> tok.decode([73, 74, 0])
    'hi\n'
    """

    vocab_size = len(VOCAB)  # 96
    chars = VOCAB

    def __init__(self):
        # Two lookup tables, built once. Encoding maps a code point (0..127)
        # to its id, or -1 where the character is not in the vocabulary;
        # decoding maps an id to its character's ASCII byte.
        self._code_to_id = np.full(128, -1, dtype=np.int64)
        for i, ch in enumerate(VOCAB):
            self._code_to_id[ord(ch)] = i
        self._id_to_byte = np.frombuffer(VOCAB.encode("ascii"), dtype=np.uint8)
        self.stoi = {ch: i for i, ch in enumerate(VOCAB)}
        self.itos = dict(enumerate(VOCAB))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> np.ndarray:
        r"""Ids of ``text`` as a 1-D int64 array; ValueError if a character is not in the vocabulary.

        Vectorised so a few megabytes of corpus encode in a fraction of a
        second: UTF-32 gives one fixed-width code point per character, and the
        lookup table does the rest.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        in_ascii = codes < 128
        ids = np.where(in_ascii, self._code_to_id[np.where(in_ascii, codes, 0)], -1)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            raise ValueError(self._unknown_message(text, bad))
        return ids.astype(np.int64, copy=False)

    def decode(self, ids) -> str:
        r"""The text of a 1-D sequence of ids (list, NumPy array, or a device array with ``.get()``)."""
        # A CuPy array (or the strict stand-in) refuses implicit conversion to
        # NumPy; both move to the host explicitly through .get().
        if not isinstance(ids, np.ndarray) and hasattr(ids, "get"):
            ids = ids.get()
        arr = np.asarray(ids)
        if arr.size == 0:
            return ""
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            shown = ", ".join(f"{int(arr[i])} at position {int(i)}" for i in bad[:5])
            more = f" (and {bad.size - 5} more)" if bad.size > 5 else ""
            raise ValueError(
                f"ids outside the vocabulary 0..{self.vocab_size - 1}: {shown}{more}"
                f" (targets use {IGNORE_INDEX} for ignored positions; drop them before decoding)"
            )
        return self._id_to_byte[arr].tobytes().decode("ascii")

    @staticmethod
    def _unknown_message(text: str, bad: np.ndarray) -> str:
        shown = ", ".join(f"{text[i]!r} (U+{ord(text[i]):04X}) at position {int(i)}"
                          for i in bad[:5])
        more = f" (and {bad.size - 5} more)" if bad.size > 5 else ""
        return (
            f"text has {bad.size} character(s) outside the vocabulary: {shown}{more}."
            " The vocabulary is newline and the printable ASCII characters ' '..'~'."
        )
