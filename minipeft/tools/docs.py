r"""``minipeft docs``: the documentation site, built from the source itself.

Reading the annotated source is one of the three ways people use minipeft
(with the lessons and the tests), so the source *is* the documentation and
this module only lays it out. One command,

    minipeft docs --out docs/_build

writes a static site that opens from the disk (``docs/_build/index.html``)
with no server, no network and no JavaScript:

* ``index.html``: where a reader starts; it links to everything below;
* ``guide.html``, ``concepts.html``, ``readme.html``: ``docs/guide.md``,
  ``docs/concepts.md`` and the README;
* ``source/<path>.py.html``: one **annotated page** per file of ``minipeft/``
  (and of ``tests/``). Each file is cut into sections at every comment block
  and docstring; the prose (markdown and reST-ish roles, with its maths) sits
  in the left column and the code it explains beside it on the right, in the
  manner of the "annotated" paper implementations;
* ``lessons/NN_name.html``: each lesson notebook with its outputs (plots
  included), the copy people read without running anything, plus the stored
  notebook itself to download.

The maths becomes MathML (:func:`tex_to_mathml`, via ``latex2mathml``), which
browsers draw themselves: nothing is fetched to read a page. Docstrings write
maths as ``:math:`...` ``, ``.. math::`` blocks or ``$...$``; notebooks and
the guide as ``$...$`` and ``$$...$$``. All of them are converted.

The stored notebooks carry no outputs. The build renders an executed copy
when it has one: the lesson tests write theirs to ``$MINIPEFT_EXECUTED_DIR``
(:func:`save_executed`), so CI renders what the tests already ran instead of
running the lessons twice. Without an executed copy the build runs the
lesson itself, in the full setting as a reader runs it (``fast=True``, the
command's ``--fast-lessons``: with ``MINIPEFT_FAST=1``), or with
``--no-execute`` renders it without outputs and says so at the top of the
page. A page rendered from a fast run says so too: the fast setting runs
the same code and checks the same claims on smaller runs.

Every page's internal links are checked at the end of the build
(:func:`check_links`): a link to a page or an anchor that does not exist
fails the build.

Needs the ``docs`` extra (``latex2mathml``, ``mistune``, ``pygments``,
``nbconvert``), imported when a build runs, never by ``import minipeft``.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import html.parser
import importlib
import inspect
import io as _io
import json
import os
import re
import shutil
import tokenize
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .. import io

#: The package folder, and the checkout that holds it (docs/, lessons/, tests/).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parent

#: Environment variable naming the folder of executed lesson notebooks.
EXECUTED_ENV = "MINIPEFT_EXECUTED_DIR"

#: What to install when the build's libraries are missing.
INSTALL_COMMAND = "pip install -e '.[docs]'"

#: Files listed first on the index, in the order the layers build on each
#: other (DESIGN.md's tree); the rest follow alphabetically.
LAYER_ORDER = [
    "minipeft/__init__.py",
    # the core: arrays, the engine (reference first, then the fast path beside it), the
    # model, the optimizers, files, data, the methods and the memory books
    "minipeft/backend.py", "minipeft/validate.py",
    "minipeft/autograd/__init__.py", "minipeft/autograd/tensor.py", "minipeft/autograd/function.py",
    "minipeft/autograd/ops.py", "minipeft/autograd/gradcheck.py", "minipeft/autograd/parallel.py",
    "minipeft/autograd/fused.py", "minipeft/autograd/profile.py",
    "minipeft/autograd/", "minipeft/nn/", "minipeft/optim.py", "minipeft/io.py", "minipeft/data/",
    "minipeft/peft/", "minipeft/memory/",
    # the workflows built on it
    "minipeft/workflows/__init__.py", "minipeft/workflows/train.py",
    "minipeft/workflows/evaluation.py", "minipeft/workflows/base.py",
    "minipeft/workflows/finetune.py", "minipeft/workflows/",
    # the tools around them
    "minipeft/tools/",
]


def _need(module: str):
    """Import a library of the ``docs`` extra, or say which command installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"building the docs needs {module.split('.')[0]}; install the docs extra "
                           f"with `{INSTALL_COMMAND}`") from None


# ---------------------------------------------------------------------------
# Maths: LaTeX to MathML, offline
# ---------------------------------------------------------------------------
#
# latex2mathml writes MathML Core, which Chromium, Firefox and Safari draw
# without any script. Two things it leaves to the reader's browser are patched
# here: letters in double-struck, script, fraktur or bold variants become the
# Unicode letters themselves (MathML Core ignores ``mathvariant`` except
# "normal", so an unpatched ``\mathbb R`` would show as a plain R), and a failed
# conversion shows the TeX as code instead of breaking the page.

_MATHVARIANT_BASE = {
    # variant: (offset of 'A', offset of 'a', exceptions that live elsewhere in Unicode)
    "double-struck": (0x1D538, 0x1D552, {"C": "ℂ", "H": "ℍ", "N": "ℕ", "P": "ℙ", "Q": "ℚ",
                                         "R": "ℝ", "Z": "ℤ"}),
    "script": (0x1D49C, 0x1D4B6, {"B": "ℬ", "E": "ℰ", "F": "ℱ", "H": "ℋ", "I": "ℐ", "L": "ℒ",
                                  "M": "ℳ", "R": "ℛ", "e": "ℯ", "g": "ℊ", "o": "ℴ"}),
    "fraktur": (0x1D504, 0x1D51E, {"C": "ℭ", "H": "ℌ", "I": "ℑ", "R": "ℜ", "Z": "ℨ"}),
    "bold": (0x1D400, 0x1D41A, {}),
}


def _variant_letters(text: str, variant: str) -> str | None:
    base = _MATHVARIANT_BASE.get(variant)
    if base is None:
        return None
    upper, lower, special = base
    out = []
    for ch in text:
        if ch in special:
            out.append(special[ch])
        elif "A" <= ch <= "Z":
            out.append(chr(upper + ord(ch) - ord("A")))
        elif "a" <= ch <= "z":
            out.append(chr(lower + ord(ch) - ord("a")))
        else:
            return None
    return "".join(out)


def _patch_variants(mathml: str) -> str:
    def swap(m):
        letters = _variant_letters(m.group(3), m.group(2))
        if letters is None:
            return m.group(0)
        return f"<{m.group(1)}>{letters}</{m.group(1)}>"

    return re.sub(r'<(mi)\s+mathvariant="([\w-]+)">([A-Za-z]+)</mi>', swap, mathml)


@dataclass
class MathStats:
    """How many formulas a build converted, and the ones it could not."""

    converted: int = 0
    failed: list[str] = field(default_factory=list)


#: Counts for the build in progress (reset by :func:`build`).
MATH_STATS = MathStats()


def _prepare_tex(tex: str, display: bool) -> str:
    """TeX as latex2mathml wants it: Sphinx's multi-line equations become ``align*``."""
    tex = tex.strip()
    # a backslash that ends a line is a control space (\<newline>), not a stray "\"
    tex = re.sub(r"(?<!\\)\\[ \t]*\n", r"\\ ", tex)
    if display and ("\\\\" in tex or "&" in tex) and "\\begin" not in tex:
        tex = "\\begin{align*}" + tex + "\\end{align*}"
    return tex


@lru_cache(maxsize=4096)
def _convert(tex: str, display: bool) -> str | None:
    converter = _need("latex2mathml.converter")
    try:
        out = converter.convert(_prepare_tex(tex, display), display="block" if display else "inline")
        ET.fromstring(out)          # well-formed, or it would break the page around it
    except Exception:  # noqa: BLE001 - any failure falls back to showing the TeX
        return None
    return _patch_variants(out)


def tex_to_mathml(tex: str, display: bool = False) -> str:
    r"""MathML for a LaTeX formula (``display``: a block of its own, centred).

    A formula latex2mathml cannot convert is shown as its TeX in a ``<code
    class="tex">`` and listed in :data:`MATH_STATS`, so the build can report
    it; the page still renders.
    """
    out = _convert(tex, display)
    if out is None:
        MATH_STATS.failed.append(tex)
        code = f'<code class="tex">{html.escape(tex)}</code>'
        return f'<div class="math-display">{code}</div>' if display else code
    MATH_STATS.converted += 1
    return f'<div class="math-display">{out}</div>' if display else out


# ---------------------------------------------------------------------------
# Prose: reST-ish docstrings and comments to markdown, then to HTML
# ---------------------------------------------------------------------------
#
# Docstrings here are written for humans first and Sphinx second: ``code``,
# :func:`roles`, ``.. math::`` blocks, literal blocks after ``::``, underlined
# section titles. :func:`rst_to_markdown` turns those into markdown (fenced
# code, ATX headings, links), then :func:`render_prose` lifts the maths out,
# renders the markdown with mistune, and puts the maths back as MathML. The
# maths is lifted out first so that markdown never sees its ``_`` and ``*``.

_UNDERLINE = re.compile(r"^\s*([=\-~^\"'*+#`])\1{2,}\s*$")
_DIRECTIVE_MATH = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|obj|exc|const):`([^`]+)`")
_REST_LINK = re.compile(r"`([^`<]+?)\s*<([^`>]+)>`__?")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _take_indented(lines: list[str], i: int, indent: int) -> tuple[list[str], int]:
    """Lines from ``i`` on that are blank or indented deeper than ``indent``."""
    block = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
        i -= 1
    return block, i


def _dedent(block: list[str]) -> list[str]:
    nonblank = [_indent(s) for s in block if s.strip()]
    cut = min(nonblank) if nonblank else 0
    return [s[cut:] for s in block]


def _looks_like_python(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.Import, ast.ImportFrom,
                              ast.Call, ast.With, ast.For)) for n in ast.walk(tree))


def rst_to_markdown(text: str, resolve: Callable[[str, str], str | None] | None = None) -> list:
    r"""Split reST-ish prose into ``("md", text)`` and ``("code", lang, text)`` blocks.

    Handled: ``.. math::`` blocks (to ``$$...$$``; blank lines separate
    equations), literal blocks after a paragraph ending in ``::``, doctest
    blocks (``>>>``), underlined titles (to headings), ```text <url>`_``
    links, and roles (``:func:`~a.b``` to a code span, linked to its
    annotated page when ``resolve(role, target)`` knows it).
    """
    lines = text.split("\n")
    blocks: list = []
    md: list[str] = []
    heading_chars: list[str] = []

    def flush():
        if md:
            blocks.append(("md", "\n".join(md)))
            md.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE_MATH.match(line)
        if m:
            body, i = _take_indented(lines, i + 1, _indent(line))
            body = [m.group(2)] + _dedent(body) if m.group(2).strip() else _dedent(body)
            # equations separated by blank lines are separate displays
            eq: list[str] = []
            for s in body + [""]:
                if s.strip():
                    eq.append(s.strip())
                elif eq:
                    md.extend(["", "$$" + "\n".join(eq) + "$$", ""])
                    eq = []
            continue
        if line.lstrip().startswith(">>>") and (i == 0 or not lines[i - 1].strip()):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            flush()
            blocks.append(("code", "pycon", "\n".join(_dedent(block))))
            continue
        stripped = line.rstrip()
        if stripped.endswith("::") and not _DIRECTIVE_MATH.match(line):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > _indent(line):
                block, end = _take_indented(lines, j, _indent(line))
                lead = stripped[:-2].rstrip()
                if lead.strip():
                    md.append(lead + ("" if stripped.endswith(" ::") else ":"))
                flush()
                code = "\n".join(_dedent(block))
                blocks.append(("code", "python" if _looks_like_python(code) else "text", code))
                i = end
                continue
        if (i + 1 < len(lines) and line.strip() and _UNDERLINE.match(lines[i + 1])
                and len(lines[i + 1].strip()) >= len(line.strip()) and not _UNDERLINE.match(line)):
            ch = lines[i + 1].strip()[0]
            if ch not in heading_chars:
                heading_chars.append(ch)
            level = min(3 + heading_chars.index(ch), 6)
            md.extend(["", "#" * level + " " + line.strip(), ""])
            i += 2
            continue
        md.append(line)
        i += 1
    flush()

    def role(m):
        kind, target = m.group(1), m.group(2).strip()
        shown = target.lstrip("~.")
        if target.startswith("~"):
            shown = shown.rsplit(".", 1)[-1]
        if kind in ("func", "meth") and not shown.endswith(")"):
            shown += "()"
        href = resolve(kind, target.lstrip("~")) if resolve else None
        return f"[`{shown}`]({href})" if href else f"`{shown}`"

    out = []
    for b in blocks:
        if b[0] == "md":
            t = _REST_LINK.sub(lambda m: f"[{m.group(1)}]({m.group(2)})", b[1])
            out.append(("md", _ROLE.sub(role, t)))
        else:
            out.append(b)
    return out


# Code spans (left as they are), then the maths in each of its spellings.
_PROTECT = re.compile(
    r"(?P<fence>^[ \t]*(?P<fchar>```|~~~).*?^[ \t]*(?P=fchar)[ \t]*$)"
    r"|(?P<code2>``.+?``)"
    r"|(?P<role>:math:`(?P<role_tex>[^`]+)`)"
    r"|(?P<code1>`[^`\n]+`)"
    r"|\$\$(?P<dollars2>.+?)\$\$"
    r"|\\\[(?P<bracket>.+?)\\\]"
    r"|(?<![\\$\w])\$(?P<dollar>[^\s$](?:[^$\n]|\n(?!\s*\n))*?(?<![\s\\]))\$(?!\d)"
    r"|\\\((?P<paren>.+?)\\\)",
    re.S | re.M,
)

_PLACEHOLDER = "MATHxPHx{}x"


def protect_math(text: str) -> tuple[str, dict[str, str]]:
    """Replace each formula in markdown ``text`` by a placeholder; returns the text and the MathML.

    Code spans are skipped, so a ``$`` inside backticks stays a dollar.
    """
    found: dict[str, str] = {}

    def sub(m):
        if m.group("fence") or m.group("code2") or m.group("code1"):
            return m.group(0)
        display = m.group("dollars2") is not None or m.group("bracket") is not None
        tex = next(g for g in (m.group("role_tex"), m.group("dollars2"), m.group("bracket"),
                               m.group("dollar"), m.group("paren")) if g is not None)
        key = _PLACEHOLDER.format(len(found))
        found[key] = tex_to_mathml(tex, display)
        # a display formula is a paragraph of its own
        return f"\n\n{key}\n\n" if display else key

    return _PROTECT.sub(sub, text), found


def restore_math(rendered: str, found: dict[str, str]) -> str:
    for key, mathml in found.items():
        rendered = rendered.replace(f"<p>{key}</p>", mathml).replace(key, mathml)
    return rendered


def _slug(text: str) -> str:
    text = re.sub(r"<[^>]+>", "", html.unescape(text)).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "section"


@lru_cache(maxsize=4)
def _markdown(escape: bool):
    mistune = _need("mistune")

    class Renderer(mistune.HTMLRenderer):
        def block_code(self, code, info=None):
            lang = (info or "").split()[0] if info else ""
            return highlight_code(code.rstrip("\n"), lang)

        def heading(self, text, level, **attrs):
            return f'<h{level} id="{_slug(text)}">{text}</h{level}>\n'

    return mistune.create_markdown(escape=escape, renderer=Renderer(escape=escape),
                                   plugins=["table", "strikethrough"])


def render_prose(text: str, resolve=None, rst: bool = True, escape: bool = True) -> str:
    """HTML for prose: reST-ish (docstrings, comments) or plain markdown, maths as MathML."""
    blocks = rst_to_markdown(text, resolve) if rst else [("md", text)]
    out = []
    md = _markdown(escape)
    for b in blocks:
        if b[0] == "code":
            out.append(highlight_code(b[2], b[1]))
            continue
        body, found = protect_math(b[1])
        out.append(restore_math(md(body), found))
    return "\n".join(out)


def highlight_code(code: str, lang: str = "python") -> str:
    """Code highlighted by pygments (``python``, ``pycon``, ``bash``...), or escaped as is."""
    pygments = _need("pygments")
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        lexer = get_lexer_by_name(lang or "text")
    except ClassNotFound:
        lexer = get_lexer_by_name("text")
    return pygments.highlight(code, lexer, HtmlFormatter(cssclass="highlight"))


# ---------------------------------------------------------------------------
# Annotated source: a file cut into (prose, code) sections
# ---------------------------------------------------------------------------
#
# A section starts at every comment block and at every docstring. A
# docstring's section starts at its ``def``/``class`` line (decorators
# included), so the signature sits beside the text that explains it. A
# section left with no code (a comment just above a ``def``, say) gives its
# prose to the next one. Comments inside brackets (an argument list, a dict)
# stay in the code, where they annotate one item; so do comments at the end of
# a line (the shape comments, ``# (B, nh, T, hs)``).


@dataclass
class Section:
    """One row of an annotated page: the prose and the code it explains."""

    prose: str                  # reST-ish / markdown, already stripped of '#' and indentation
    code: str                   # the source lines, docstrings and prose comments removed
    first_line: int             # 1-based line of the section's first line in the file
    anchors: list[str] = field(default_factory=list)    # ids: defs and classes that start here


@dataclass
class _Span:
    start: int                  # first line of the prose (1-based)
    end: int                    # last line of the prose
    text: str
    section_start: int          # where the section begins (a def's first decorator, say)


_RULE = re.compile(r"^[-=#*~_]{3,}$")
_TITLED_RULE = re.compile(r"^[-=~]{2,}\s+(\S.*?)\s+[-=~]{3,}$")
_SKIP_COMMENT = re.compile(r"^#\s*(noqa|pragma|type:|fmt:|!|-\*-)")


def _comment_text(lines: list[str]) -> str:
    """Prose from comment lines: ``#``/``#:`` and one space dropped; a title between rules."""
    body = []
    for raw in lines:
        s = raw.strip()
        s = s[2:] if s.startswith("#:") else s[1:]
        body.append(s[1:] if s.startswith(" ") else s)
    # "-- forward ------": a title inside a rule
    body = [f"#### {m.group(1)}" if (m := _TITLED_RULE.match(s.strip())) else s for s in body]
    rules = [i for i, s in enumerate(body) if _RULE.match(s.strip())]
    if len(rules) >= 2 and rules[0] == 0:
        title = " ".join(s.strip() for s in body[1:rules[1]] if s.strip())
        rest = [s for i, s in enumerate(body[rules[1] + 1:]) if not _RULE.match(s.strip())]
        return (f"## {title}\n\n" if title else "") + "\n".join(rest)
    return "\n".join(s for s in body if not _RULE.match(s.strip()))


def _comment_blocks(source: str) -> list[_Span]:
    """Blocks of whole-line comments at statement level (not inside brackets)."""
    spans: list[_Span] = []
    current: list[tuple[int, str]] = []
    depth = 0
    lines = source.splitlines()

    def close():
        if current:
            text = _comment_text([s for _, s in current])
            if text.strip():
                spans.append(_Span(current[0][0], current[-1][0], text, current[0][0]))
            current.clear()

    tokens = tokenize.generate_tokens(_io.StringIO(source).readline)
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            whole_line = not lines[row - 1][:col].strip()
            if whole_line and depth == 0 and not _SKIP_COMMENT.match(tok.string) \
                    and not (row == 1 and tok.string.startswith("#!")):
                if current and current[-1][0] != row - 1:
                    close()
                current.append((row, tok.string))
                continue
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            close()
        elif tok.type == tokenize.NL and current and tok.start[0] != current[-1][0]:
            close()         # a blank line ends a block
    close()
    return spans


def _docstring_spans(tree: ast.Module) -> list[_Span]:
    spans = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            continue
        expr = body[0]
        if isinstance(node, ast.Module):
            start = 1
        else:
            if expr.lineno == node.lineno:      # def f(): """one line""" stays code
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        spans.append(_Span(expr.lineno, expr.end_lineno, inspect.cleandoc(expr.value.value), start))
    return spans


def _defined_names(tree: ast.Module) -> dict[int, list[str]]:
    """Anchor ids by first line: top-level functions and classes, and ``Class.method``."""
    out: dict[int, list[str]] = {}

    def first(node):
        return min([node.lineno] + [d.lineno for d in node.decorator_list])

    for node in tree.body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out.setdefault(node.lineno, []).append(t.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.setdefault(node.lineno, []).append(node.target.id)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.setdefault(first(node), []).append(node.name)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        out.setdefault(first(sub), []).append(f"{node.name}.{sub.name}")
    return out


def split_sections(source: str) -> list[Section]:
    """Cut a Python file into sections of (prose, code); see the section comment above."""
    tree = ast.parse(source)
    lines = source.splitlines()
    spans = sorted(_docstring_spans(tree) + _comment_blocks(source), key=lambda s: s.start)
    prose_lines = set()
    for s in spans:
        prose_lines.update(range(s.start, s.end + 1))
    starts = sorted({s.section_start for s in spans} | {1})
    # a section begins at each start; its prose are the spans whose section_start it is
    by_start: dict[int, list[_Span]] = {}
    for s in spans:
        by_start.setdefault(s.section_start, []).append(s)
    anchors = _defined_names(tree)
    sections: list[Section] = []
    carried = ""
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else len(lines) + 1
        prose = "\n\n".join(s.text for s in by_start.get(start, []))
        code = [lines[n - 1] for n in range(start, stop) if n not in prose_lines]
        while code and not code[0].strip():
            code.pop(0)
        while code and not code[-1].strip():
            code.pop()
        names = [a for n in range(start, stop) for a in anchors.get(n, [])]
        if carried:
            prose = carried + ("\n\n" + prose if prose else "")
            carried = ""
        if not code and k + 1 < len(starts):
            carried = prose                 # no code to stand beside: give it to the next one
            if names:                       # its anchors move along with the prose
                anchors.setdefault(starts[k + 1], [])[:0] = names
            continue
        sections.append(Section(prose, "\n".join(code), start, names))
    return sections


# ---------------------------------------------------------------------------
# Symbols: where :func:`x` and `file.py::name` point to
# ---------------------------------------------------------------------------


@dataclass
class SymbolIndex:
    """Every annotated page, by module name, and the anchors (defs and classes) on it."""

    pages: dict[str, str] = field(default_factory=dict)          # dotted module -> page path
    names: dict[str, set[str]] = field(default_factory=dict)     # dotted module -> anchor ids
    paths: dict[str, str] = field(default_factory=dict)          # repo path -> dotted module

    def add(self, rel_path: str, page: str, names: set[str]) -> None:
        mod = rel_path[:-3].replace("/", ".")
        if mod.endswith(".__init__"):
            mod = mod[: -len(".__init__")]
        self.pages[mod] = page
        self.names[mod] = names
        self.paths[rel_path] = mod

    def resolve(self, kind: str, target: str, current: str) -> str | None:
        """The page (and ``#anchor``) for a role's target, seen from module ``current``."""
        target = target.strip().rstrip("()")
        package = current if self.pages.get(current, "").endswith("__init__.py.html") \
            else current.rpartition(".")[0]
        candidates = []
        if target.startswith("."):
            up = package
            rest = target[1:]
            while rest.startswith("."):
                up, rest = up.rpartition(".")[0], rest[1:]
            candidates.append(f"{up}.{rest}" if rest else up)
        else:
            candidates += [target, f"{package}.{target}", f"minipeft.{target}", f"{current}.{target}"]
        for cand in candidates:
            if cand in self.pages:
                return self.pages[cand]
            mod, _, name = cand.rpartition(".")
            while mod:
                if mod in self.pages:
                    rest = cand[len(mod) + 1:]
                    if rest in self.names[mod]:
                        return f"{self.pages[mod]}#{rest}"
                    break
                mod, _, _ = mod.rpartition(".")
        # a name defined in exactly one module (PeftModel, PeftModel.save_pretrained),
        # also when it is spelt through a package that re-exports it (minipeft.nn.Module)
        parts = target.lstrip(".").split(".")
        for i in range(len(parts)):
            name = ".".join(parts[i:])
            owners = [m for m, names in self.names.items() if name in names]
            if len(owners) == 1:
                return f"{self.pages[owners[0]]}#{name}"
        return None


def _names_in(tree: ast.Module) -> set[str]:
    return {n for names in _defined_names(tree).values() for n in names}


def resolve_reference(ref: str, root: Path = REPO_ROOT) -> bool:
    """Whether ``path.py::Name.attr`` (or a bare path) names something that exists.

    ``Name`` may be a function, class or module-level variable of the file;
    ``Name.attr`` a method or class attribute. Used by the concept map's test.
    """
    path, _, qual = ref.partition("::")
    file = root / path
    if not file.is_file():
        return False
    if not qual:
        return True
    tree = ast.parse(file.read_text(encoding="utf-8"))
    scope: list[ast.stmt] = tree.body
    for part in qual.split("."):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and node.name == part:
                found = node
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == part for t in node.targets):
                found = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == part:
                found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


# ---------------------------------------------------------------------------
# Page shell: every page shares one stylesheet and the same top bar
# ---------------------------------------------------------------------------

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --docs-bg: #ffffff;
        --code-bg: #f6f8fa; --accent: #0b5fbf; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 16px/1.55 -apple-system, "Segoe UI", "Helvetica Neue", Arial, sans-serif; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code, pre { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
            font-size: 0.86em; }
.topbar { position: sticky; top: 0; z-index: 10; display: flex; gap: 1rem; align-items: center;
          padding: 0.5rem 1.25rem; background: #24292f; color: #fff; font-size: 0.9rem; }
.topbar a { color: #fff; } .topbar .crumbs { flex: 1; } .topbar .nav a { margin-left: 1rem; }
.prose { max-width: 52rem; margin: 0 auto; padding: 1.5rem 1.25rem 4rem; }
.prose table { border-collapse: collapse; margin: 1rem 0; font-size: 0.92rem; }
.prose th, .prose td { border: 1px solid var(--line); padding: 0.35rem 0.6rem; vertical-align: top; }
.prose th { background: var(--code-bg); }
.prose.wide { max-width: 90rem; }
.prose.wide table { table-layout: fixed; width: 100%; }
.prose.wide th:nth-child(1) { width: 11%; } .prose.wide th:nth-child(2) { width: 25%; }
.prose.wide th:nth-child(3) { width: 14%; } .prose.wide th:nth-child(4) { width: 24%; }
td code { overflow-wrap: anywhere; }
p code, li code, td code { background: var(--code-bg); padding: 0.1em 0.3em; border-radius: 4px; }
.highlight { background: var(--code-bg); } .highlight pre { margin: 0; padding: 0.6rem 0.9rem;
            overflow-x: auto; line-height: 1.45; }
.math-display { overflow-x: auto; margin: 0.8rem 0; text-align: center; }
math { font-size: 1.08em; } math[display="block"] { display: block math; }
code.tex { color: #b31d28; }
h1, h2, h3, h4 { line-height: 1.25; }
.note { background: #fff8c5; border: 1px solid #d4a72c; padding: 0.6rem 0.9rem; border-radius: 6px;
        margin: 1rem 1.25rem; font-size: 0.95rem; }
/* the annotated source: prose left, code right */
.annotated { width: 100%; }
.annotated .title { padding: 1rem 1.25rem 0.5rem; border-bottom: 1px solid var(--line); }
.annotated .title h1 { margin: 0; font-size: 1.4rem; font-family: monospace; }
.annotated .title p { margin: 0.3rem 0 0; color: var(--muted); font-size: 0.9rem; }
.section { display: grid; grid-template-columns: minmax(0, 5fr) minmax(0, 7fr);
           border-bottom: 1px solid #eef1f4; }
.section .docs { padding: 0.6rem 1.25rem; background: var(--docs-bg); font-size: 0.95rem;
                 overflow-wrap: break-word; position: relative; }
.section .docs > :first-child { margin-top: 0.2rem; }
.section .docs .highlight pre { font-size: 0.82rem; }
.section .code { background: var(--code-bg); border-left: 1px solid var(--line); padding: 0.2rem 0; }
.section .code .highlight pre { padding: 0.35rem 1rem; }
.section .pilcrow { position: absolute; left: 0.35rem; top: 0.6rem; color: #c0c7ce; font-size: 0.8rem;
                    visibility: hidden; }
.section:hover .pilcrow { visibility: visible; }
.section .lineno { display: block; color: #8c959f; font-size: 0.75rem; padding: 0.25rem 1rem 0;
                   font-family: monospace; }
@media (max-width: 900px) { .section { grid-template-columns: 1fr; }
                            .section .code { border-left: none; } }
.index h2 { margin-top: 2rem; border-bottom: 1px solid var(--line); padding-bottom: 0.2rem; }
.files { list-style: none; padding: 0; } .files li { margin: 0.25rem 0; }
.files .what { color: var(--muted); }
.files code { font-size: 0.9rem; }
"""

_LESSON_CSS = """
.topbar { position: sticky; top: 0; z-index: 10; display: flex; gap: 1rem; align-items: center;
          padding: 0.5rem 1.25rem; background: #24292f; color: #fff;
          font: 0.9rem/1.4 -apple-system, "Segoe UI", "Helvetica Neue", Arial, sans-serif; }
.topbar a { color: #fff; text-decoration: none; } .topbar a:hover { text-decoration: underline; }
.topbar .crumbs { flex: 1; } .topbar .nav a { margin-left: 1rem; }
.note { background: #fff8c5; border: 1px solid #d4a72c; padding: 0.6rem 0.9rem; border-radius: 6px;
        margin: 1rem 1.25rem; font: 0.95rem/1.5 -apple-system, "Segoe UI", Arial, sans-serif; }
.note.download { background: #eef6ff; border-color: #9cc3f5; }
code.tex { color: #b31d28; }
math[display="block"] { display: block math; }
.math-display { overflow-x: auto; margin: 0.8rem 0; text-align: center; }
"""


def _topbar(rel: str, crumbs: list[tuple[str, str | None]], prev=None, next_=None) -> str:
    parts = [f'<a href="{rel}index.html">minipeft docs</a>']
    for text, href in crumbs:
        parts.append(f'<a href="{href}">{html.escape(text)}</a>' if href else html.escape(text))
    nav = []
    if prev:
        nav.append(f'<a href="{prev[1]}" title="{html.escape(prev[0])}">&larr; previous</a>')
    if next_:
        nav.append(f'<a href="{next_[1]}" title="{html.escape(next_[0])}">next &rarr;</a>')
    return (f'<header class="topbar"><span class="crumbs">{" &rsaquo; ".join(parts)}</span>'
            f'<span class="nav">{"".join(nav)}</span></header>')


def _page(title: str, body: str, rel: str, topbar: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n"
            f'<link rel="stylesheet" href="{rel}_static/style.css">\n'
            f'<link rel="stylesheet" href="{rel}_static/pygments.css">\n'
            f"</head>\n<body>\n{topbar}\n{body}\n</body>\n</html>\n")


def _rel_root(page: str) -> str:
    """``../`` as many times as ``page`` (a path in the build) is deep."""
    return "../" * page.count("/")


def _rel(from_page: str, to_page: str) -> str:
    return os.path.relpath(to_page, os.path.dirname(from_page) or ".").replace(os.sep, "/")


# ---------------------------------------------------------------------------
# What there is to build
# ---------------------------------------------------------------------------


def source_files(root: Path = REPO_ROOT, tests: bool = True) -> list[str]:
    """The files that get an annotated page, as repo-relative paths, in reading order."""
    files = sorted(p.relative_to(root).as_posix() for p in (root / "minipeft").rglob("*.py")
                   if "__pycache__" not in p.parts)
    if tests and (root / "tests").is_dir():
        files += sorted(p.relative_to(root).as_posix() for p in (root / "tests").glob("*.py"))

    def key(path: str):
        for i, prefix in enumerate(LAYER_ORDER):
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                inner = 0 if path.endswith("__init__.py") else 1
                return (0, i, inner, path)
        return (1 if path.startswith("minipeft/") else 2, 0, 0, path)

    return sorted(files, key=key)


def lesson_files(root: Path = REPO_ROOT) -> list[Path]:
    """The lesson notebooks (``lessons/NN_name.ipynb``, or ``NNa_name`` for a lesson in parts), in order."""
    return sorted((root / "lessons").glob("[0-9][0-9]*_*.ipynb"))


def source_page(rel_path: str) -> str:
    """Where a source file's annotated page lives in the build."""
    return f"source/{rel_path}.html"


def lesson_page(stem: str) -> str:
    return f"lessons/{stem}.html"


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# ---------------------------------------------------------------------------
# Annotated pages
# ---------------------------------------------------------------------------


def render_source_page(rel_path: str, source: str, index: SymbolIndex, prev=None, next_=None) -> str:
    """The annotated page for one file: a title, then one (prose | code) row per section."""
    page = source_page(rel_path)
    rel = _rel_root(page)
    current = index.paths.get(rel_path, "")

    def resolve(kind, target):
        href = index.resolve(kind, target, current)
        if href is None:
            return None
        target_page, _, frag = href.partition("#")
        return _rel(page, target_page) + (f"#{frag}" if frag else "")

    rows = []
    n_lines = source.count("\n") + 1
    # one grid row per section: the anchors of the defs it holds, the prose (left),
    # and the code (right) headed by the file and line it starts at
    for k, sec in enumerate(split_sections(source)):
        ids = "".join(f'<span id="{html.escape(a)}"></span>' for a in sec.anchors)
        prose = render_prose(sec.prose, resolve) if sec.prose.strip() else ""
        code = (f'<span class="lineno">{rel_path}:{sec.first_line}</span>'
                + highlight_code(sec.code, "python")) if sec.code.strip() else ""
        rows.append(f'<div class="section" id="section-{k}">'
                    f'<div class="docs">{ids}<a class="pilcrow" href="#section-{k}">&para;</a>{prose}</div>'
                    f'<div class="code">{code}</div></div>')
    title = (f'<div class="title"><h1>{html.escape(rel_path)}</h1>'
             f"<p>{n_lines:,d} lines &middot; the prose on the left is this file's own comments "
             "and docstrings; the code on the right is the file itself.</p></div>")
    top = _topbar(rel, [("source", f"{rel}index.html#source"), (rel_path, None)],
                  (prev, _rel(page, source_page(prev))) if prev else None,
                  (next_, _rel(page, source_page(next_))) if next_ else None)
    return _page(f"{rel_path} · minipeft", f'<main class="annotated">{title}{"".join(rows)}</main>',
                 rel, top)


# ---------------------------------------------------------------------------
# Markdown pages (guide, concept map, README, solutions) and their links
# ---------------------------------------------------------------------------
#
# Links in the markdown files are written for someone reading them on disk or
# on a forge (``../minipeft/peft/lora.py``, ``05_lora.ipynb``); in the built
# site they must point to the built pages. A code span that names a file
# (``minipeft/peft/lora.py::LoraLinear.forward``, ``lessons/05_lora.ipynb``)
# becomes a link too, which is what turns the concept map into a map.

_CODE_REF = re.compile(r"<code>((?:minipeft|tests)/[\w/]+\.py(?:::[\w.]+)?"
                       r"|lessons/\d\d[a-z]?_\w+\.ipynb)</code>")


@dataclass
class _Site:
    """What the build knows about its own pages, to point links at them."""

    root: Path
    pages: dict[str, str] = field(default_factory=dict)     # repo path -> built page

    def page_for(self, repo_path: str) -> str | None:
        if repo_path in self.pages:
            return self.pages[repo_path]
        if repo_path.startswith("lessons/") and repo_path.endswith(".py"):
            return self.pages.get(repo_path[:-3] + ".ipynb")   # the jupytext twin
        return None


def _rewrite_links(body: str, site: _Site, repo_file: str, page: str) -> str:
    """Point links and file-naming code spans of a rendered markdown file at built pages."""
    base = os.path.dirname(repo_file)

    def target(url: str) -> str | None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme or parts.netloc or not parts.path:
            return None
        joined = os.path.join(base, urllib.parse.unquote(parts.path))
        repo_path = os.path.normpath(joined).replace(os.sep, "/")
        built = site.page_for(repo_path)
        if built is None:
            return None
        return _rel(page, built) + (f"#{parts.fragment}" if parts.fragment else "")

    def href(m):
        new = target(html.unescape(m.group(2)))
        return m.group(0) if new is None else f'{m.group(1)}"{html.escape(new)}"'

    body = re.sub(r'(href=)"([^"]*)"', href, body)

    def code_ref(m):
        path, _, qual = m.group(1).partition("::")
        built = site.page_for(path)
        if built is None:
            return m.group(0)
        url = _rel(page, built) + (f"#{qual}" if qual else "")
        return f'<a href="{html.escape(url)}">{m.group(0)}</a>'

    # code spans already inside a link are left alone
    pieces = re.split(r"(<a\b[^>]*>.*?</a>)", body, flags=re.S)
    return "".join(p if p.startswith("<a") else _CODE_REF.sub(code_ref, p) for p in pieces)


def render_markdown_page(repo_file: str, page: str, site: _Site, title: str,
                         crumbs: list[tuple[str, str | None]], wide: bool = False) -> str:
    text = (site.root / repo_file).read_text(encoding="utf-8")
    body = render_prose(text, rst=False, escape=False)
    body = _rewrite_links(body, site, repo_file, page)
    rel = _rel_root(page)
    cls = "prose wide" if wide else "prose"
    return _page(f"{title} · minipeft", f'<main class="{cls}">{body}</main>', rel,
                 _topbar(rel, crumbs))


# ---------------------------------------------------------------------------
# Lessons: executed copies, rendered with nbconvert
# ---------------------------------------------------------------------------


def executed_dir() -> Path | None:
    """The folder named by ``$MINIPEFT_EXECUTED_DIR``, or None when it is unset."""
    value = os.environ.get(EXECUTED_ENV, "").strip()
    return Path(value) if value else None


def save_executed(nb, name: str, folder: str | os.PathLike | None = None) -> Path | None:
    """Keep an executed notebook for the docs build (no-op unless a folder is given or set).

    The lesson tests call this after running a notebook, so that the build
    renders what they ran: ``save_executed(nb, path.stem)`` writes
    ``$MINIPEFT_EXECUTED_DIR/<name>.ipynb`` atomically.
    """
    folder = Path(folder) if folder is not None else executed_dir()
    if folder is None:
        return None
    nbformat = _need("nbformat")
    _mark_setting(nb, os.environ.get("MINIPEFT_FAST", "").strip() == "1")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.ipynb"
    io.atomic_write_bytes(str(out), nbformat.writes(nb).encode("utf-8"))
    return out


def _mark_setting(nb, fast: bool) -> None:
    """Record in the notebook's metadata which setting its outputs come from."""
    nb.metadata["minipeft"] = {"setting": "fast" if fast else "full"}


def _ran_fast(nb) -> bool:
    return nb.metadata.get("minipeft", {}).get("setting") == "fast"


def _cell_sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _has_outputs(nb) -> bool:
    return any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def execute_notebook(nb, cwd: Path, fast: bool = True, timeout: int = 900):
    """Run a notebook top to bottom in a fresh kernel (``MINIPEFT_FAST=1`` when ``fast``)."""
    nbclient = _need("nbclient")
    saved = os.environ.get("MINIPEFT_FAST")
    os.environ["MINIPEFT_FAST"] = "1" if fast else "0"
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(cwd)}})
        client.execute()
    finally:
        if saved is None:
            os.environ.pop("MINIPEFT_FAST", None)
        else:
            os.environ["MINIPEFT_FAST"] = saved
    return nb


def _math_in_markdown_cells(nb) -> None:
    """Markdown cells' maths as MathML (nbconvert would leave it for MathJax, from the network)."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        body, found = protect_math(cell.source)
        for key, mathml in found.items():
            # display maths is an HTML block of its own; inline maths is inline HTML
            body = body.replace(key, mathml)
        cell.source = body


@lru_cache(maxsize=1)
def _exporter():
    return _need("nbconvert").HTMLExporter(template_name="lab")


def render_notebook(nb, title: str, page: str, note: str | None, site: _Site, repo_file: str,
                    prev=None, next_=None) -> str:
    """HTML for a notebook: JupyterLab's look, our top bar, no script from the network."""
    nb = json.loads(json.dumps(nb))                 # a copy: the caller's notebook is left alone
    nbformat = _need("nbformat")
    nb = nbformat.from_dict(nb)
    _math_in_markdown_cells(nb)
    body, _ = _exporter().from_notebook_node(nb)
    # Scripts from a CDN (require.js, MathJax, mermaid) are dropped: the maths is
    # MathML already, and nothing on these pages needs them.
    body = re.sub(r"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>", "", body)
    body = re.sub(r"<script\b[^>]*>(?:(?!</script>).)*https?://cdn(?:(?!</script>).)*</script>", "",
                  body, flags=re.S)
    body = _rewrite_links(body, site, repo_file, page)
    rel = _rel_root(page)
    stem = Path(repo_file).stem
    top = _topbar(rel, [("lessons", f"{rel}index.html#lessons"), (title, None)],
                  (prev[0], _rel(page, prev[1])) if prev else None,
                  (next_[0], _rel(page, next_[1])) if next_ else None)
    download = (f'<div class="note download">'
                f'The notebook: <a href="{stem}.ipynb">{stem}.ipynb</a> (stored without outputs; '
                f"run it with <code>jupyter lab lessons/</code>).</div>")
    extra = (f'<div class="note">{note}</div>' if note else "") + download
    head_css = f'<link rel="stylesheet" href="{rel}_static/style-lesson.css">\n'
    body = body.replace("</head>", head_css + "</head>", 1)
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + "\n" + top + extra, body, count=1)
    return body


# ---------------------------------------------------------------------------
# The index: where a reader starts
# ---------------------------------------------------------------------------


def _index_page(sources: list[tuple[str, str]], lessons: list[tuple[str, str, str]],
                extra: list[tuple[str, str]], built: set[str]) -> str:
    """The first page a reader sees: what minipeft is, where to start, and every page."""
    def file_list(items):
        return "<ul class=\"files\">" + "".join(
            f'<li><a href="{source_page(p)}"><code>{html.escape(p)}</code></a> '
            f'<span class="what">{render_inline(what)}</span></li>' for p, what in items) + "</ul>"

    package = [(p, w) for p, w in sources if p.startswith("minipeft/")]
    tests = [(p, w) for p, w in sources if p.startswith("tests/")]
    start = []
    if "guide.html" in built:
        start.append('<li><a href="guide.html"><strong>The guide</strong></a>: what PEFT is, the three '
                     "families, how the engine works, and how to run everything.</li>")
    if "concepts.html" in built:
        start.append('<li><a href="concepts.html"><strong>The concept map</strong></a>: each concept, '
                     "with the lesson that shows it, the code that implements it and the test that "
                     "checks it.</li>")
    start += [f'<li><a href="{href}">{html.escape(text)}</a></li>' for text, href in extra]
    first = ('New here? Read <a href="guide.html">the guide</a> first.' if "guide.html" in built
             else "")
    lesson_items = "".join(f'<li><a href="{href}">{html.escape(title)}</a></li>'
                           for _, title, href in lessons)
    sections = [
        '<main class="prose index">',
        "<h1>minipeft</h1>",
        "<p>Parameter-efficient fine-tuning (PEFT), built from scratch to be read: a tiny "
        "GPT-2-shaped transformer on a handwritten array autograd that runs on NumPy or CuPy with "
        "the same code, every PEFT method written out, and every byte of training memory "
        "accounted for.</p>",
        "<p>There are three ways in, and each stands on its own: <strong>the lessons</strong> "
        "(notebooks that build one idea each, measure it and check it), <strong>the annotated "
        "source</strong> (every file with its explanations beside the code), and <strong>the "
        f"tests</strong> (the claims, proved on every run). {first}</p>",
    ]
    if start:
        sections += ['<h2 id="start">Start here</h2>', "<ul>" + "".join(start) + "</ul>"]
    if lessons:
        sections += ['<h2 id="lessons">Lessons</h2>', f'<ul class="lessons">{lesson_items}</ul>']
    sections += ['<h2 id="source">Annotated source</h2>',
                 "<p>One page per file, in the order the layers build on each other: each imports "
                 "only from those above it in this list.</p>", file_list(package)]
    if tests:
        sections += ['<h2 id="tests">Tests, annotated</h2>', file_list(tests)]
    sections.append("</main>")
    return _page("minipeft docs", "\n".join(sections), "", _topbar("", []))


def render_inline(text: str) -> str:
    """One line of reST-ish prose as inline HTML (no paragraph around it)."""
    out = render_prose(text)
    return re.sub(r"^<p>|</p>\s*$", "", out.strip())


# ---------------------------------------------------------------------------
# Checking the links of the built site
# ---------------------------------------------------------------------------


class _LinkParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name") and tag != "meta":
                self.ids.add(value)
            if (name == "href" and tag in ("a", "link", "area")) or (
                    name == "src" and tag in ("img", "script", "iframe", "source")):
                self.links.append(value)


def check_links(out: str | os.PathLike) -> list[str]:
    """Every internal link (href, src) of every page that points to nothing, as ``page: link``.

    Links to other sites (``http:``, ``https:``, ``mailto:``) and ``data:``
    URIs are not followed; a link inside the build must name a file that
    exists and, with a ``#fragment``, an element with that id on that page.
    """
    out = Path(out)
    parsed: dict[Path, _LinkParser] = {}
    for page in out.rglob("*.html"):
        p = _LinkParser()
        p.feed(page.read_text(encoding="utf-8"))
        parsed[page.resolve()] = p
    broken = []
    for page, p in parsed.items():
        for link in p.links:
            parts = urllib.parse.urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("javascript:", "data:")):
                continue
            path = urllib.parse.unquote(parts.path)
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(out.resolve())}: {link}")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else set()
                frag = urllib.parse.unquote(parts.fragment)
                if frag not in ids and parts.fragment not in ids:
                    broken.append(f"{page.relative_to(out.resolve())}: {link} (no such anchor)")
    return sorted(broken)


# ---------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What a build wrote and what went wrong (nothing, when all is well)."""

    out: Path
    source_pages: list[str] = field(default_factory=list)
    lesson_pages: dict[str, str] = field(default_factory=dict)     # page -> how: executed copy, ...
    other_pages: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    math_failures: list[str] = field(default_factory=list)
    math_converted: int = 0
    lesson_failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.broken_links and not self.lesson_failures

    def summary(self) -> str:
        how: dict[str, int] = {}
        for v in self.lesson_pages.values():
            how[v] = how.get(v, 0) + 1
        lessons = ", ".join(f"{n} {k}" for k, n in sorted(how.items())) or "none"
        lines = [f"wrote {self.out / 'index.html'}",
                 f"  {len(self.source_pages)} annotated source pages, {len(self.lesson_pages)} lessons "
                 f"({lessons}), {len(self.other_pages)} other pages; "
                 f"{self.math_converted} formulas as MathML"]
        for tex in self.math_failures:
            lines.append(f"  formula shown as TeX (latex2mathml could not convert it): {tex}")
        for name, why in self.lesson_failures.items():
            lines.append(f"  lesson {name} failed to run: {why}")
        for link in self.broken_links:
            lines.append(f"  broken link: {link}")
        return "\n".join(lines)


def build(out: str | os.PathLike = "docs/_build", *, root: str | os.PathLike | None = None,
          executed: str | os.PathLike | None = None, execute: bool = True, fast: bool = False,
          tests: bool = True, log: Callable[[str], None] | None = None) -> BuildReport:
    """Build the site into ``out``; see the module docstring for what it holds.

    ``executed``: a folder of executed notebooks (default ``$MINIPEFT_EXECUTED_DIR``);
    ``execute``: run a lesson that has no executed copy (in the full setting,
    or with ``fast`` in the fast one), else render it without outputs; ``tests=False``
    leaves the tests without pages.
    """
    log = log or (lambda s: None)
    root = Path(root) if root is not None else REPO_ROOT
    out = Path(out)
    if not (root / "minipeft").is_dir():
        raise FileNotFoundError(f"{root} holds no minipeft/ package: build the docs from a checkout")
    for name in ("latex2mathml.converter", "mistune", "pygments"):
        _need(name)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    io.ensure_writable_dir(str(out))
    MATH_STATS.converted, MATH_STATS.failed = 0, []
    report = BuildReport(out=out)
    static = out / "_static"
    static.mkdir(parents=True, exist_ok=True)
    from pygments.formatters import HtmlFormatter

    (static / "style.css").write_text(_CSS, encoding="utf-8")
    (static / "pygments.css").write_text(HtmlFormatter(style="default").get_style_defs(".highlight"),
                                         encoding="utf-8")
    (static / "style-lesson.css").write_text(_LESSON_CSS, encoding="utf-8")

    site = _Site(root)
    # -- annotated source -------------------------------------------------
    files = source_files(root, tests=tests)
    index = SymbolIndex()
    trees = {}
    for f in files:
        text = (root / f).read_text(encoding="utf-8")
        trees[f] = text
        index.add(f, source_page(f), _names_in(ast.parse(text)))
        site.pages[f] = source_page(f)
    lesson_paths = lesson_files(root)
    for p in lesson_paths:
        site.pages[f"lessons/{p.name}"] = lesson_page(p.stem)
    md_pages = [("docs/guide.md", "guide.html", "The guide"),
                ("docs/concepts.md", "concepts.html", "The concept map"),
                ("README.md", "readme.html", "README"),
                ("lessons/solutions.md", "lessons/solutions.html", "Solutions to the exercises")]
    md_pages = [m for m in md_pages if (root / m[0]).is_file()]
    for repo_file, page, _ in md_pages:
        site.pages[repo_file] = page

    descriptions = []
    for k, f in enumerate(files):
        prev = files[k - 1] if k else None
        nxt = files[k + 1] if k + 1 < len(files) else None
        page = out / source_page(f)
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(render_source_page(f, trees[f], index, prev, nxt), encoding="utf-8")
        report.source_pages.append(source_page(f))
        doc = ast.get_docstring(ast.parse(trees[f])) or ""
        descriptions.append((f, _first_line(doc)))
    log(f"{len(files)} annotated source pages")

    # -- guide, concept map, README, solutions -----------------------------
    for repo_file, page, title in md_pages:
        crumbs = [("lessons", "index.html#lessons")] if page.startswith("lessons/") else []
        rel = _rel_root(page)
        crumbs = [(t, rel + h) for t, h in crumbs] + [(title, None)]
        path = out / page
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown_page(repo_file, page, site, title, crumbs,
                                             wide=page == "concepts.html"), encoding="utf-8")
        report.other_pages.append(page)

    # -- lessons ------------------------------------------------------------
    lesson_entries = []
    if lesson_paths:
        nbformat = _need("nbformat")
        _need("nbconvert")
        folder = Path(executed) if executed is not None else executed_dir()
        titles = {}
        notebooks = {}
        for p in lesson_paths:
            nb = nbformat.read(str(p), as_version=4)
            notebooks[p.stem] = nb
            titles[p.stem] = _lesson_title(nb, p.stem)
        for k, p in enumerate(lesson_paths):
            stored = notebooks[p.stem]
            nb, how, note = stored, "", None
            copy = folder / p.name if folder is not None else None
            if copy is not None and copy.is_file():
                candidate = nbformat.read(str(copy), as_version=4)
                if _cell_sources(candidate) == _cell_sources(stored) and _has_outputs(candidate):
                    nb, how = candidate, "from executed copies"
                else:
                    log(f"{copy}: stale (its cells differ from {p.name}) or without outputs; ignored")
            if not how and execute:
                log(f"running {p.name} ({'MINIPEFT_FAST=1' if fast else 'full setting'}) ...")
                nb = nbformat.from_dict(json.loads(json.dumps(stored)))
                try:
                    execute_notebook(nb, p.parent, fast=fast)
                    _mark_setting(nb, fast)
                    how = "executed by the build"
                except Exception as exc:  # noqa: BLE001 - reported, and the page says so
                    msg = str(exc).strip().splitlines()
                    report.lesson_failures[p.stem] = msg[-1] if msg else type(exc).__name__
                    how = "failed to run"
                    note = ("This lesson <strong>failed to run</strong> when the docs were built; "
                            "the outputs stop where it failed.")
            if not how:
                how = "without outputs"
                note = ("This copy was rendered <strong>without outputs</strong>: no executed "
                        "notebook was at hand. Build with executed copies "
                        f"(<code>{EXECUTED_ENV}</code>) or let <code>minipeft docs</code> run the "
                        "lessons to see every table and plot.")
            if note is None and _has_outputs(nb) and _ran_fast(nb):
                note = ("These outputs come from the <strong>fast setting</strong> "
                        "(<code>MINIPEFT_FAST=1</code>): the same code and the same claims, checked "
                        "on smaller runs. <code>minipeft docs</code> without executed copies runs "
                        "the full setting.")
            page = lesson_page(p.stem)
            prev = (titles[lesson_paths[k - 1].stem], lesson_page(lesson_paths[k - 1].stem)) if k else None
            nxt = ((titles[lesson_paths[k + 1].stem], lesson_page(lesson_paths[k + 1].stem))
                   if k + 1 < len(lesson_paths) else None)
            text = render_notebook(nb, titles[p.stem], page, note, site, f"lessons/{p.name}", prev, nxt)
            (out / "lessons").mkdir(parents=True, exist_ok=True)
            (out / page).write_text(text, encoding="utf-8")
            shutil.copyfile(p, out / "lessons" / p.name)
            report.lesson_pages[page] = how
            lesson_entries.append((p.stem, titles[p.stem], page))
            log(f"{page}: {how}")

    built = {page for _, page, _ in md_pages}
    extra = [(text, page) for text, page in (("The README", "readme.html"),
                                             ("Solutions to the lessons' exercises",
                                              "lessons/solutions.html")) if page in built]
    (out / "index.html").write_text(_index_page(descriptions, lesson_entries, extra, built),
                                    encoding="utf-8")
    report.other_pages.append("index.html")
    report.math_converted = MATH_STATS.converted
    report.math_failures = list(dict.fromkeys(MATH_STATS.failed))
    report.broken_links = check_links(out)
    return report


def _lesson_title(nb, stem: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", cell.source, flags=re.M)
            if m:
                return re.sub(r"[*_`]", "", m.group(1)).strip()
    return stem


def report_as_dict(report: BuildReport) -> dict:
    """A build report as plain JSON-ready data (the output folder as a string)."""
    d = dataclasses.asdict(report)
    d["out"] = str(report.out)
    return d
