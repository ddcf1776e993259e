r"""The rules every knob is checked by, in one place (PEFT configs, settings, optimizers).

A knob is a value a user sets: a LoRA rank, a learning rate, a list of
module names. Each kind of knob has one rule here, and every place that
takes a knob asks the rule, so a NaN learning rate, a rank of ``'8'`` or a
dropout of 1.5 is refused the same way wherever it is given:

* a dataclass declares each field's rule beside its default,
  ``r: int = knob(8, Int(low=1))``, and :func:`check_fields` walks the fields
  (the PEFT configs and :class:`~minipeft.workflows.finetune.FinetuneSettings` do this);
* a function checks its arguments with the same rules directly,
  ``lr = Float(low=0).check("lr", lr)`` (the optimizers and the training loop).

What the rules hold to:

* **Finite.** ``float('nan') <= 0`` is False, so a test written as "refuse
  what is <= 0" lets NaN through; every float rule refuses NaN and
  :math:`\pm\infty` first.
* **Honest types.** An int where a float is meant is exact and accepted
  (``lora_alpha=16``); a float where an int is meant is not (``r=2.0`` may be
  a typo for 2.5, or a computed value). ``True`` is not 1, a string is not a
  number (``'0.1'``), and a bool knob takes only ``True`` or ``False``
  (``'yes'`` and ``1`` are refused). NumPy scalars count as the Python
  numbers they stand for.
* **One message shape.** ``<name> must be <what it may be>, got <value>``:
  the name says what to change and the rest says to what.

A wrong type raises :class:`KnobTypeError`, which is both a ``TypeError``
(what it is) and a ``ValueError`` (so one ``except ValueError`` around a
config catches every bad knob); a value out of range raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any

__all__ = [
    "Bool", "Choice", "Float", "Int", "Ints", "KnobTypeError", "Names", "Rule", "Text",
    "check_fields", "knob",
]


class KnobTypeError(TypeError, ValueError):
    """A knob of the wrong type (``'0.1'`` for a float, ``1`` for a bool, ``2.0`` for an int)."""


def _is_bool(v) -> bool:
    """Python's bool or NumPy's (``np.bool_``, named ``bool`` in NumPy 2)."""
    return isinstance(v, bool) or (type(v).__module__ == "numpy"
                                   and type(v).__name__ in ("bool", "bool_"))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not _is_bool(v)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not _is_bool(v)


def _interval(low, high, low_open, high_open) -> str:
    """``[0, 1)``, ``> 0``, ``>= 1``: the words for a range."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one knob may be. ``check(name, value)`` returns the value normalised, or raises.

    ``optional``: None is allowed (and means what the field documents).
    ``expect``: the words after "must be" when the generated ones say too little.
    """

    optional: bool = False
    expect: str | None = None

    def describe(self) -> str:  # pragma: no cover - every rule overrides it
        raise NotImplementedError

    def words(self) -> str:
        text = self.expect or self.describe()
        return text + (", or None" if self.optional and not self.expect else "")

    def fail(self, name, value, cls=ValueError, hint: str = ""):
        raise cls(f"{name} must be {self.words()}, got {value!r}{hint}")

    def check(self, name: str, value: Any):
        if value is None:
            if self.optional:
                return None
            self.fail(name, value, KnobTypeError)
        return self._check(name, value)

    def _check(self, name, value):  # pragma: no cover - every rule overrides it
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Int(Rule):
    """An integer (NumPy's included; not a bool, not a float such as 2.0) in a range."""

    low: int | None = None
    high: int | None = None

    def describe(self):
        if self.high is None and self.low == 1:
            return "a positive integer"
        if self.high is None and self.low == 0:
            return "a non-negative integer"
        return f"an integer {_interval(self.low, self.high, False, False)}".rstrip()

    def _check(self, name, value):
        if not _is_int(value):
            hint = ""
            if _is_real(value) and math.isfinite(value) and float(value).is_integer():
                hint = f" (a float: write {int(value)})"
            self.fail(name, value, KnobTypeError, hint)
        value = int(value)
        if (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high):
            self.fail(name, value)
        return value


@dataclasses.dataclass(frozen=True)
class Float(Rule):
    """A finite real number (an int is fine: it is exact) in a range; returned as a float."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self):
        span = _interval(self.low, self.high, self.low_open, self.high_open)
        if self.low is not None and self.high is not None:
            return span                       # "in [0, 1)": finite goes without saying
        return f"a finite number {span}".rstrip()

    def _check(self, name, value):
        if not _is_real(value):
            self.fail(name, value, KnobTypeError)
        value = float(value)
        lo, hi = self.low, self.high
        if (not math.isfinite(value)
                or (lo is not None and (value <= lo if self.low_open else value < lo))
                or (hi is not None and (value >= hi if self.high_open else value > hi))):
            self.fail(name, value)
        return value


@dataclasses.dataclass(frozen=True)
class Bool(Rule):
    """``True`` or ``False`` (NumPy's bool too); not 1, not ``'yes'``."""

    def describe(self):
        return "True or False"

    def _check(self, name, value):
        if not _is_bool(value):
            self.fail(name, value, KnobTypeError)
        return bool(value)


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """One of a few strings."""

    choices: tuple = ()

    def describe(self):
        quoted = [repr(c) for c in self.choices]
        return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def _check(self, name, value):
        if value not in self.choices:
            self.fail(name, value, ValueError if isinstance(value, str) else KnobTypeError)
        return value


@dataclasses.dataclass(frozen=True)
class Text(Rule):
    """A string (``non_empty``: with something in it besides spaces)."""

    non_empty: bool = True

    def describe(self):
        return "a non-empty string" if self.non_empty else "a string"

    def _check(self, name, value):
        if not isinstance(value, str):
            self.fail(name, value, KnobTypeError)
        if self.non_empty and not value.strip():
            self.fail(name, value)
        return value


@dataclasses.dataclass(frozen=True)
class Names(Rule):
    """A list (or tuple) of non-empty strings; returned as a list.

    ``choices``: every entry must be one of these. ``regex``: every entry must
    compile as a regular expression. ``non_empty``: at least one entry (an
    empty list would select nothing).
    """

    non_empty: bool = True
    choices: tuple | None = None
    regex: bool = False
    example: str = "['c_attn']"
    of: str = "module names"

    def describe(self):
        return f"a list of {self.of} (e.g. {self.example})"

    def _check(self, name, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            self.fail(name, value, KnobTypeError,
                      " (a single name still goes in a list)" if isinstance(value, str) else "")
        bad_type = [v for v in value if not isinstance(v, str) or not v]
        if bad_type:
            self.fail(name, value, KnobTypeError if any(not isinstance(v, str) for v in bad_type)
                      else ValueError)
        if self.non_empty and not value:
            none = " (None means no filter)" if self.optional else ""
            raise ValueError(f"{name} is empty: name at least one (e.g. {self.example}){none}")
        if self.choices is not None:
            unknown = [v for v in value if v not in self.choices]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}: choose from {list(self.choices)}")
        if self.regex:
            for v in value:
                try:
                    re.compile(v)
                except re.error as exc:
                    raise ValueError(f"{name}: {v!r} is not a regular expression ({exc})") from None
        return list(value)


@dataclasses.dataclass(frozen=True)
class Ints(Rule):
    """A list (or tuple) of integers; returned as a list."""

    non_empty: bool = True
    what: str = "integers"

    def describe(self):
        return f"a list of {self.what}"

    def _check(self, name, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) \
                or not all(_is_int(v) for v in value):
            self.fail(name, value, KnobTypeError)
        if self.non_empty and not value:
            none = " (None means no filter)" if self.optional else ""
            raise ValueError(f"{name} is empty: name at least one{none}")
        return [int(v) for v in value]


# ---------------------------------------------------------------------------
# Dataclass fields that carry their rule
# ---------------------------------------------------------------------------


def knob(default, rule: Rule, *, since: int = 1, doc: str = ""):
    """A dataclass field whose ``metadata`` holds its rule (and the format version it came in).

    A list default is copied for every instance. ``since`` is the version of
    the saved format that introduced the field: a file of an older format
    lacks it and gets ``default``.
    """
    meta = {"rule": rule, "since": since, "doc": doc}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_fields(obj) -> None:
    """Check every field of the dataclass ``obj`` that declares a rule; store the normalised value.

    The first bad field raises (see the module docstring for which error).
    """
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("rule")
        if rule is not None:
            value = rule.check(f.name, getattr(obj, f.name))
            object.__setattr__(obj, f.name, value)
