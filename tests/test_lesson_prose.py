r"""The lessons' prose types no figure that a run computes.

A figure in a Markdown cell is frozen: when the run (fast or full, on any
machine) computes something else, the text and the numbers disagree. So a
figure the run computes is *printed by the run*: a computed Markdown cell
(``lessons.say(f"... {score:.2f} ...")``) or a ``print``. This test reads
every Markdown cell of every lesson notebook and fails on figures typed
into it.

**What is flagged** (after the parts below are set aside):

* percentages: ``16%``, ``0.3 percent``;
* decimals: ``0.42``, ``1.00`` (and e-notation, ``3e-2``);
* whole numbers with the unit of a measured or counted quantity: bytes
  (``86 GiB``, ``8 MiB``, ``106 bytes``), parameters and their kin
  (``3,072 parameters``, ``2,560 numbers``, ``16,384 entries``), data
  (``13 sequences``, ``2,048 tokens``, ``108 characters``), work (``300
  steps``, ``16 products``, ``FLOPs``), time, and ratios (``77 times``).

**Set aside before scanning** (not prose, or not a result):

* maths (``$...$``, ``$$...$$``): formulas and derivations are definitions;
  a formula's *value* written after it (``$PC$ = 2,560 numbers``) is prose
  and is scanned;
* code (inline ``code`` and fenced blocks): a chosen setting is written as
  the code that sets it (``r=8``, ``lr=3e-2``, ``MaskConfig(density=0.01)``,
  ``n_layer=4``), so the reader sees an input, not an outcome;
* link targets (``[text](url)``).

Because maths is set aside, a *result* is never written as maths: ``$10^{-12}$``
is for a format's constant or a chosen step, and the error the run found
goes through ``lessons.say`` like any other figure.

**Allowed in prose** (each rule small and explicit):

1. *Definitions by rate*: a number of bytes *a*/*an*/*per*/*each*/*for
   every* something: ``fp32 is 4 bytes a parameter``, ``8 bytes an entry``,
   ``12 bytes of gradient and state per trained parameter``. These state a
   format or a recipe, which no run changes. (Bytes only: "2,000 tokens a
   step" is a result.)
2. *Names of sizes*: digits and ``B`` with no space (``7B``, ``65B``): the
   names of the estimator's presets (a byte count always has its space,
   ``106 B``); and a card named by its memory, ``a 24 GB card``.
3. *Sourced figures*: a sentence that names its source may quote that
   source's figures: a citation with its year (``Hu et al. 2021``, ``Li and
   Liang, 2021``, ``(Rajbhandari et al., 2020)``) or ``(course notes)`` for
   the course's own rules of thumb. The papers' numbers are theirs, not the
   run's; the citation is the mark that says so.
4. Dates, lesson and section numbers, bare counts with no unit (``block
   0``, ``lesson 5``) and version numbers (``1.19.6``, ``version 2.1``) are
   not matched by the patterns above.

A figure the rules do not allow is fixed in one of three ways: print it
from the run (``lessons.say``), write the setting as code, or, for a
paper's figure, put its citation in the same sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]*_*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]

# a number: digits with thousands commas, maybe a decimal part
_NUM = r"\d[\d,]*(?:\.\d+)?"
# units of what a run measures or counts
_UNITS = (r"(?:[KMGT]i?B|bytes?|B|(?:[KMGT])?FLOPs?|parameters?|params|numbers|weights|entries"
          r"|elements|vectors|tokens?|sequences?|windows|examples?|words?|characters?"
          r"|positions|steps?|epochs?|seeds?|products|seconds?|s|ms|minutes?|hours?|times"
          r"|layers|blocks|heads|rows|columns)")
PATTERNS = {
    "percentage": re.compile(rf"(?<![\w.]){_NUM}\s*(?:%|percent\b)"),
    "decimal": re.compile(r"(?<![\w.])\d+\.\d+(?!\.?\d)(?!\w)"),
    "e-notation": re.compile(r"(?<![\w.])\d+(?:\.\d+)?e-?\d+\b"),
    # (a number joined to a word by a hyphen names a model, as GPT-2 does: not a count)
    "number with a unit": re.compile(rf"(?<![\w.])(?<![A-Za-z]-){_NUM}[ \t\n]*{_UNITS}(?!\w)"),
}
# rule 1: a definition by rate ("4 bytes a parameter", "12 bytes of gradient and state per ...")
_RATE = re.compile(r"\s+(?:of\s+(?:[\w+]+\s+){1,5}?)?(?:a|an|per|each|for\s+every)\b")
# rule 2: a preset's name (7B): digits then B, no space; a card named by its memory
_SIZE_NAME = re.compile(r"\d+B$")
_CARD = re.compile(r"\s+cards?\b")
_BYTES = re.compile(r"(?:[KMGT]i?B|bytes?|B)$")
# rule 3: a citation with its year, or the course's own rules
_CITATION = re.compile(r"[A-Z][\w-]+(?:\s+et\s+al\.?|\s+and\s+[A-Z][\w-]+)?,?\s+\(?(?:19|20)\d\d\)?"
                       r"|\(course notes\)")
# rule 4: a version number after "version"/"v"
_VERSION = re.compile(r"(?:version\s+|v)$")


def prose(markdown: str) -> str:
    """The cell's prose: maths, code and link targets replaced by blanks of equal length."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    for pat in (r"```.*?```", r"\$\$.*?\$\$", r"\$[^$\n]*\$", r"`[^`\n]*`", r"(?<=\])\([^)\s]*\)"):
        markdown = re.sub(pat, blank, markdown, flags=re.S)
    return markdown


def _sentences(text: str):
    """(start, end) of each sentence; "et al.", "e.g.", "i.e." do not end one."""
    guarded = re.sub(r"\b(al|e\.g|i\.e|cf|vs)\.", lambda m: m.group(0)[:-1] + "\0", text)
    start = 0
    for m in re.finditer(r"[.!?:](?=\s+[A-Z*(\[\"])|\n\s*\n|\n\s*[*\d]+[.)]?\s", guarded):
        yield start, m.end()
        start = m.end()
    yield start, len(text)


def typed_figures(markdown: str):
    """Yield ``(kind, figure, sentence)`` for each figure the rules do not allow."""
    text = prose(markdown)
    spans = list(_sentences(text))
    for kind, pattern in PATTERNS.items():
        for m in pattern.finditer(text):
            figure = m.group(0)
            if kind == "number with a unit":
                if _SIZE_NAME.search(figure) and not re.search(r"\s", figure):
                    continue
                if _BYTES.search(figure) and (_RATE.match(text, m.end())
                                              or _CARD.match(text, m.end())):
                    continue
            if kind == "decimal" and _VERSION.search(text[:m.start()]):
                continue
            s, e = next((s, e) for s, e in spans if s <= m.start() < e)
            sentence = text[s:e]
            if _CITATION.search(sentence):
                continue
            yield kind, " ".join(figure.split()), " ".join(sentence.split())


def findings(path: Path):
    nb = nbformat.read(str(path), as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for kind, figure, sentence in typed_figures(cell.source):
                yield i, kind, figure, sentence


HOW_TO_FIX = (
    "A figure the run computes is printed by the run: turn the cell into a code cell that says it, "
    "lessons.say(f\"... {value:.2f} ...\"), or print it. A chosen setting is written as the code "
    "that sets it (`r=8`, `lr=3e-2`). A paper's figure sits in the sentence that cites it "
    "(Author et al. YEAR). The rules: tests/test_lesson_prose.py's docstring.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_figure_typed_into_prose(path):
    found = list(findings(path))
    lines = [f"  {path.name}, cell {i}: {kind} {figure!r} in: \"{sentence[:160]}\""
             for i, kind, figure, sentence in found]
    assert not found, (f"{path.name}: {len(found)} figure(s) typed into Markdown where the run "
                       "should print them:\n" + "\n".join(lines) + "\n" + HOW_TO_FIX)


@pytest.mark.parametrize("text", [
    "The fast adapter scored 0.42, below the baseline.",
    "Gradients and state take 86 GiB at this size.",
    "It packs 13 sequences into a batch.",
    "The paper's form trains 3,072\nparameters here.",
    "about 16% exact match for prompt tuning",
    "prompt tuning trains 77 times fewer numbers",
    "$PC$ = 2,560 numbers",
    "a learning rate of 3e-2 here",
    "The rule holds at 2,000 to 2,600 tokens a step.",
])
def test_the_scanner_flags_typed_results(text):
    assert list(typed_figures(text)), text


@pytest.mark.parametrize("text", [
    "Hu et al. 2021 cut trainable parameters 10,000 times and memory from 1.2 TB to 350 GB.",
    "QLoRA fits 65B on a 48 GB card (Dettmers et al., 2023).",
    "1B parameters take about 4 GB to store and 24 GB to train (course notes).",
    "fp32 is 4 bytes a parameter; an int64 index costs 8 bytes an entry.",
    "LoRA pays 12 bytes of gradient and state per trained parameter.",
    "We train LoRA with `r=8` at `lr=3e-3` for `steps` steps, like 7B models.",
    "Both fit a 24 GB card; a 48 GB card holds more.",
    "The update is $\\Delta W = BA$ with $r = 8$, so $d < 0.4375$.",
    "Written with jupytext version 1.19.6 in 2024, see lesson 5, block 0.",
    "A (128 × 384) weight.",
    "Its side blocks are GPT-2 blocks of their own config.",
])
def test_the_scanner_allows_definitions_citations_and_settings(text):
    assert not list(typed_figures(text)), list(typed_figures(text))
