r"""Docstrings with a backslash are raw strings.

``"\alpha"``, ``"\beta"``, ``"\frac"``, ``"\nabla"``, ``"\theta"`` are valid
escapes: a bell, a backspace, a form feed, a newline and a tab. Python gives
no warning for them, so LaTeX in a plain docstring is silently mangled (the
labml LoRA page lost its :math:`\alpha` that way). ruff's D301 catches most of
them; this test reads the raw source tokens, so it cannot be silenced by a
``noqa``, and it also looks at the symptom: control characters in the
docstring's value.
"""

from __future__ import annotations

import ast
import io
import tokenize
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "minipeft").rglob("*.py"))
ALLOWED_CONTROL = {"\n", "\t"}


def docstring_problems(source: str, filename: str = "<source>") -> list[str]:
    """Every docstring (module, class, function) with a backslash but no r prefix,
    or with a control character in its value."""
    tree = ast.parse(source, filename)
    # where each docstring starts: (line, column) of its first string token
    starts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                expr = body[0].value
                name = getattr(node, "name", "module")
                starts[(expr.lineno, expr.col_offset)] = (name, expr.value)
    problems = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.STRING or tok.start not in starts:
            continue
        name, value = starts[tok.start]
        prefix = tok.string[: len(tok.string) - len(tok.string.lstrip("rRbBuUfF"))]
        where = f"{filename}:{tok.start[0]} ({name})"
        if "\\" in tok.string and "r" not in prefix.lower():
            problems.append(f"{where}: docstring has a backslash but is not a raw string")
        bad = sorted({c for c in value if (ord(c) < 32 or ord(c) == 127)} - ALLOWED_CONTROL)
        if bad:
            problems.append(f"{where}: docstring contains control characters {bad!r}")
    return problems


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_with_backslashes_are_raw(path):
    assert not docstring_problems(path.read_text(encoding="utf-8"), str(path))


def test_the_checker_catches_the_mistake():
    bad = (
        '"""Module \\alpha."""\n'
        "class A:\n"
        "    '''Scaled by \\frac{1}{2}.'''\n"
        "    def f(self):\n"
        '        """Gradient \\nabla f, fine as \\\\n? no."""\n'
        "def g():\n"
        '    r"""Raw: \\alpha is kept."""\n'
        "def h():\n"
        '    x = "\\alpha: not a docstring"\n'
    )
    problems = docstring_problems(bad)
    assert len([p for p in problems if "not a raw string" in p]) == 3
    assert any("(module)" in p and "'\\x07'" in p for p in problems)   # \a became a bell
    assert any("(A)" in p and "'\\x0c'" in p for p in problems)        # \f a form feed
    assert not any("(g)" in p or "(h)" in p for p in problems)


def test_the_scan_sees_the_package():
    assert any(p.name == "ops.py" for p in SOURCES) and len(SOURCES) >= 6


def test_ruff_selects_d301():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "D301" in config["tool"]["ruff"]["lint"]["select"]
