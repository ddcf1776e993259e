r"""The docs: the build runs, every page is there, every link lands, the maths is MathML.

The whole site is built once for this module (``minipeft.tools.docs.build``), the
way ``minipeft docs`` builds it but without running any lesson: a lesson is
rendered from its executed copy when ``$MINIPEFT_EXECUTED_DIR`` holds one
(the lesson tests leave theirs there), and without outputs otherwise. On it:

* a page for every source file of ``minipeft/`` and every lesson;
* no broken internal link (every ``href``/``src`` inside the build names a
  file that exists, and every ``#anchor`` an element on that page), and a
  check that the checker does catch one;
* the maths rendered: MathML ``<math>`` elements, well-formed, and no raw
  ``$...$``, ``:math:`` or ``.. math::`` left in the prose of
  ``minipeft/autograd/ops.py``'s page; no formula left as TeX anywhere;
* no script or stylesheet from the network on any page;
* in a real browser (headless Chromium, skipped where there is none): every
  formula on the ops page drawn as MathML, the prose beside the code, no raw
  TeX shown, and a screenshot taken.

Without building anything: the concept map's references all resolve (each
``file::name`` by ``ast``, each test in its file, each lesson on disk), the
map covers every concept of the story, and every ``minipeft`` command line in
the guide parses with the real parser. A small synthetic checkout tests how
lessons are chosen: an executed copy is rendered, a stale one is ignored, and
a lesson without one says so at the top of its page.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("latex2mathml")
pytest.importorskip("mistune")
pytest.importorskip("pygments")

from minipeft.tools import docs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ROOT / "docs" / "concepts.md"
GUIDE = ROOT / "docs" / "guide.md"


# ---------------------------------------------------------------------------
# The concept map: every reference resolves, and the story is all there
# ---------------------------------------------------------------------------


def concept_rows() -> list[dict[str, str]]:
    """The rows of every table in docs/concepts.md, as {column header: cell}."""
    rows, header = [], None
    for line in CONCEPTS.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append(dict(zip(header, cells)))
    return rows


def refs(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_concept_map_has_its_columns():
    rows = concept_rows()
    assert len(rows) >= 20
    for row in rows:
        assert set(row) == {"Concept", "What it says", "Lesson", "Source", "Test"}, row


@pytest.mark.parametrize("row", concept_rows(), ids=lambda r: r["Concept"])
def test_every_reference_in_the_concept_map_resolves(row):
    lessons, sources, tests = refs(row["Lesson"]), refs(row["Source"]), refs(row["Test"])
    assert lessons and sources and tests, f"{row['Concept']}: a lesson, a source and a test each"
    for ref in lessons:
        assert re.fullmatch(r"lessons/\d\d[a-z]?_\w+\.ipynb", ref), ref
        assert (ROOT / ref).is_file(), f"{row['Concept']}: no lesson {ref}"
    for ref in sources:
        assert ref.startswith("minipeft/") and "::" in ref, f"{ref}: want minipeft/file.py::name"
        assert docs.resolve_reference(ref, ROOT), f"{row['Concept']}: {ref} does not exist"
    for ref in tests:
        path, _, name = ref.partition("::")
        assert path.startswith("tests/test_") and name.startswith("test_"), ref
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"{row['Concept']}: {path} has no test {name}"


def test_the_resolver_refuses_what_does_not_exist():
    assert docs.resolve_reference("minipeft/peft/lora.py::LoraLinear.merge", ROOT)
    assert docs.resolve_reference("minipeft/autograd/function.py::LEDGER", ROOT)
    assert not docs.resolve_reference("minipeft/peft/lora.py::LoraLinear.no_such_method", ROOT)
    assert not docs.resolve_reference("minipeft/peft/lora.py::NoSuchClass", ROOT)
    assert not docs.resolve_reference("minipeft/no_such_file.py::f", ROOT)


def test_the_annotated_pages_show_the_reference_engine_before_the_fast_path():
    files = docs.source_files(ROOT, tests=False)
    order = [f"minipeft/autograd/{name}.py" for name in
             ("tensor", "function", "ops", "gradcheck", "parallel", "fused", "profile")]
    assert [f for f in files if f in order] == order
    assert files.index("minipeft/backend.py") < files.index(order[0])
    assert files.index(order[-1]) < files.index("minipeft/nn/gpt.py")


#: The story of DESIGN.md, concept by concept: each must have a row.
STORY = [
    "memory categories", "bytes-per-parameter", "activation ledger",
    "selective", "full fine-tuning", "bitfit", "layers", "element masks",
    "reparameterization", "lora", "dora",
    "additive", "adapters", "prompt tuning", "prefix tuning", "(ia)³",
    "frozen means not computed", "masked means computed", "merging",
    "parameter efficiency", "memory efficiency", "training speed", "model quality",
    "inference cost", "adapter swapping", "catastrophic forgetting", "strict backend",
]


@pytest.mark.parametrize("concept", STORY)
def test_the_concept_map_covers_the_story(concept):
    names = [row["Concept"].lower() for row in concept_rows()]
    assert any(concept in n for n in names), f"no row of docs/concepts.md is about {concept!r}"


def test_every_command_line_in_the_guide_parses():
    from minipeft.tools.cli import build_parser

    text = GUIDE.read_text(encoding="utf-8")
    lines = [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("minipeft ")]
    assert {c[0] for c in commands} >= {"finetune", "compare", "memory", "bench", "docs"}
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the guide shows `minipeft {' '.join(argv)}`, which the CLI refuses")


# ---------------------------------------------------------------------------
# The site, built once
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "_build"
    report = docs.build(out, execute=False)
    return report


def test_a_page_for_every_source_file(site):
    for path in sorted((ROOT / "minipeft").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" in rel:
            continue
        page = site.out / docs.source_page(rel)
        assert page.is_file(), f"no annotated page for {rel}"
    index = (site.out / "index.html").read_text(encoding="utf-8")
    assert 'href="source/minipeft/peft/lora.py.html"' in index


def test_a_page_for_every_lesson(site):
    lessons = docs.lesson_files(ROOT)
    assert lessons, "no lessons to render"
    index = (site.out / "index.html").read_text(encoding="utf-8")
    for nb in lessons:
        page = site.out / docs.lesson_page(nb.stem)
        assert page.is_file(), f"no page for {nb.name}"
        assert f'href="{docs.lesson_page(nb.stem)}"' in index
        assert (site.out / "lessons" / nb.name).is_file()     # the notebook, to download
        how = site.lesson_pages[docs.lesson_page(nb.stem)]
        text = page.read_text(encoding="utf-8")
        if how == "without outputs":
            assert "rendered <strong>without outputs</strong>" in text
        else:
            assert how == "from executed copies" and "jp-OutputArea" in text


def test_the_guide_and_the_concept_map_are_pages(site):
    guide = (site.out / "guide.html").read_text(encoding="utf-8")
    assert "The minipeft guide" in guide and "<math" in guide
    concepts = (site.out / "concepts.html").read_text(encoding="utf-8")
    # every reference of the map became a link to its annotated page, at its anchor
    assert 'href="source/minipeft/peft/lora.py.html#LoraLinear.forward"' in concepts
    assert 'href="source/tests/test_peft_merge.py.html#test_merge_equals_unmerged_and_unmerge_restores"' \
        in concepts
    assert 'href="lessons/05_lora.html"' in concepts


def test_no_broken_internal_link(site):
    assert site.broken_links == []
    assert docs.check_links(site.out) == []


def test_the_link_checker_catches_a_broken_link_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.html").write_text('<a href="b.html#there">b</a> <a href="c.html">c</a>'
                                     '<img src="img/x.png"> <a href="#here">self</a>'
                                     '<a href="https://example.org/">out</a>', encoding="utf-8")
    (tmp_path / "b.html").write_text('<h1 id="elsewhere">b</h1>', encoding="utf-8")
    assert docs.check_links(tmp_path) == [
        "a.html: #here (no such anchor)",
        "a.html: b.html#there (no such anchor)",
        "a.html: c.html",
        "a.html: img/x.png",
    ]


def prose_columns(page_html: str) -> list[str]:
    return re.findall(r'<div class="docs">(.*?)</div><div class="code">', page_html, flags=re.S)


def test_the_maths_is_mathml_on_the_ops_page(site):
    text = (site.out / docs.source_page("minipeft/autograd/ops.py")).read_text(encoding="utf-8")
    maths = re.findall(r"<math\b.*?</math>", text, flags=re.S)
    assert len(maths) >= 20
    for m in maths:
        ET.fromstring(m)                                   # well-formed MathML
    prose = "".join(prose_columns(text))
    without_math = re.sub(r"<math\b.*?</math>", "", prose, flags=re.S)
    without_code = re.sub(r"<code>.*?</code>|<pre>.*?</pre>", "", without_math, flags=re.S)
    assert ":math:" not in without_code and ".. math::" not in without_code
    assert not re.search(r"\$[^$\s][^$]*\$", without_code), "raw $...$ left in the prose"
    assert 'class="tex"' not in text


# The same page in a real browser: headless Chromium (from the system
# packages) opens it in a frame of a small probe page whose script measures
# what was drawn and writes it into the DOM, which ``--dump-dom`` prints.
# A browser that draws MathML gives ``<math>`` the display type "math"; one
# that does not shows its text inline. A screenshot is kept beside the probe.
_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_PROBE = """<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="f" src="PAGE" width="1400" height="900"></iframe>
<script>
document.getElementById("f").onload = function () {
  const d = this.contentDocument, w = this.contentWindow;
  const maths = Array.from(d.querySelectorAll("math"));
  const drawn = maths.filter(m => w.getComputedStyle(m).display.includes("math")
                               && m.getBoundingClientRect().width > 0);
  const docs = d.querySelector(".docs").getBoundingClientRect();
  const code = d.querySelector(".code").getBoundingClientRect();
  const prose = Array.from(d.querySelectorAll(".docs")).map(e => e.innerText).join("\\n");
  document.getElementById("out").textContent = JSON.stringify({
    maths: maths.length, drawn: drawn.length, prose: prose,
    docs_right: docs.right, code_left: code.left});
};
</script></body></html>"""


def _browser():
    import shutil  # noqa: PLC0415

    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _headless(browser, *args, timeout=120):
    import subprocess  # noqa: PLC0415

    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--allow-file-access-from-files", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(_browser() is None, reason="no Chromium on this machine (apt install chromium)")
def test_a_real_browser_draws_the_maths_beside_the_code(site, tmp_path):
    browser = _browser()
    page = site.out / docs.source_page("minipeft/autograd/ops.py")
    probe = tmp_path / "probe.html"
    probe.write_text(_PROBE.replace("PAGE", page.as_uri()), encoding="utf-8")
    proc = _headless(browser, "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="out">(.*?)</pre>', proc.stdout, flags=re.S)
    assert found and found.group(1) != "pending", (
        f"the probe never reported (exit {proc.returncode}): {proc.stderr[-1500:]}")
    import html  # noqa: PLC0415

    seen = json.loads(html.unescape(found.group(1)))
    assert seen["maths"] >= 20
    assert seen["drawn"] == seen["maths"], f"{seen['maths'] - seen['drawn']} formulas not drawn as MathML"
    assert seen["docs_right"] <= seen["code_left"], "the prose is not beside the code"
    assert not re.search(r"\$[^$\s][^$]*\$", seen["prose"]), "raw $...$ shown to the reader"
    assert "\\frac" not in seen["prose"] and ":math:" not in seen["prose"]
    # the screenshot: a reader's first view of the page
    shot = tmp_path / "ops.png"
    _headless(browser, f"--screenshot={shot}", "--window-size=1400,900", page.as_uri())
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_formula_was_left_as_tex(site):
    assert site.math_failures == []
    assert site.math_converted > 200


def test_no_tex_command_is_shown_as_text_on_any_source_page(site):
    # a docstring that writes maths without :math: or $...$ shows its TeX raw
    shown = {}
    for page in sorted((site.out / "source").rglob("*.html")):
        prose = "".join(prose_columns(page.read_text(encoding="utf-8")))
        prose = re.sub(r"<math\b.*?</math>|<code>.*?</code>|<pre>.*?</pre>", "", prose, flags=re.S)
        hits = sorted(set(re.findall(r"\\[a-zA-Z]+", prose)))
        if hits:
            shown[page.relative_to(site.out).as_posix()] = hits
    assert not shown, f"TeX shown as text (wrap it in :math:`...` or $...$): {shown}"


def test_nothing_is_fetched_from_the_network(site):
    for page in site.out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        remote = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(https?:[^"]*)"', text)
        assert not remote, f"{page.name} loads {remote}"


def test_the_derivative_sits_beside_the_backward_pass(site):
    # Linear's docstring (its derivatives) and its backward are on one page
    # with the code, the prose in the left column of the row that holds the class
    text = (site.out / docs.source_page("minipeft/autograd/ops.py")).read_text(encoding="utf-8")
    row = re.search(r'<div class="section"[^>]*><div class="docs"><span id="Linear">.*?'
                    r'(?=<div class="section")', text, flags=re.S)
    assert row, "no section starts at class Linear"
    code = re.sub(r"<[^>]+>", "", row.group(0).split('<div class="code">', 1)[1])
    assert "<math" in row.group(0).split('<div class="code">', 1)[0]
    assert "class Linear(Function):" in code and "def backward(ctx, g):" in code


# ---------------------------------------------------------------------------
# Sections: how a file is cut into prose and code
# ---------------------------------------------------------------------------

SAMPLE = '''r"""A module.

It has :math:`x^2` maths.
"""

import numpy as np

# ---------------------------------------------------------------------------
# Section title
# ---------------------------------------------------------------------------


# a comment just above a function goes with it
@staticmethod
def f(x):
    r"""Square it: :math:`y = x^2`."""
    # the product, elementwise
    y = x * x          # (B, T, C)
    z = np.stack([
        # a comment inside brackets stays in the code
        y,
    ])
    return z
'''


def test_sections_put_prose_beside_the_code_it_explains():
    secs = docs.split_sections(SAMPLE)
    assert [s.first_line for s in secs] == [1, 14, 17]   # line 14: the decorator
    assert secs[0].prose.startswith("A module.") and secs[0].code == "import numpy as np"
    # the title between rules, the comment above the def and its docstring: one section,
    # whose code starts at the decorator
    assert "## Section title" in secs[1].prose
    assert "a comment just above" in secs[1].prose and "Square it" in secs[1].prose
    assert secs[1].code.startswith("@staticmethod\ndef f(x):")
    assert "Square it" not in secs[1].code
    assert secs[1].anchors == ["f"]
    # an inline comment (a shape) and a comment inside brackets stay in the code
    assert secs[2].prose == "the product, elementwise"
    assert "# (B, T, C)" in secs[2].code and "# a comment inside brackets" in secs[2].code


def test_rest_roles_math_and_literal_blocks_become_html():
    text = ("See :func:`~minipeft.peft.lora.LoraLinear.merge` and :class:`Nowhere`.\n\n"
            ".. math::\n    a = b \\\\\n    c &= d\n\nExample::\n\n    x = f(1)\n\n"
            "Title\n-----\n\nA ``$literal$`` stays, $e^x$ is maths.")
    index = docs.SymbolIndex()
    index.add("minipeft/peft/lora.py", "source/minipeft/peft/lora.py.html", {"LoraLinear.merge"})
    out = docs.render_prose(text, lambda kind, t: index.resolve(kind, t, "minipeft.x"))
    assert '<a href="source/minipeft/peft/lora.py.html#LoraLinear.merge"><code>merge()</code></a>' in out
    assert "<code>Nowhere</code>" in out
    assert out.count("<math") == 2 and 'display="block"' in out
    assert '<h3 id="title">Title</h3>' in out
    assert "<code>$literal$</code>" in out
    assert 'class="highlight"' in out and "Example:" in out and "Example::" not in out


# ---------------------------------------------------------------------------
# Lessons: an executed copy, a stale one, none (a synthetic checkout)
# ---------------------------------------------------------------------------


def _notebook(source: str):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Lesson 1: a test\n\nWith $x^2$."),
                nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_lessons_come_from_executed_copies_when_fresh(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert")
    root = tmp_path / "checkout"
    (root / "minipeft").mkdir(parents=True)
    (root / "minipeft" / "__init__.py").write_text('"""A package."""\n', encoding="utf-8")
    (root / "lessons").mkdir()
    for stem in ("01_fresh", "02_stale", "03_none"):
        nbformat.write(_notebook(f"print('{stem}')"), str(root / "lessons" / f"{stem}.ipynb"))
    executed = tmp_path / "executed"
    for stem, source in (("01_fresh", "print('01_fresh')"), ("02_stale", "print('old code')")):
        nb = _notebook(source)
        nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                      text=f"output of {stem}\n")]
        assert docs.save_executed(nb, stem, executed) == executed / f"{stem}.ipynb"
    report = docs.build(tmp_path / "out", root=root, executed=executed, execute=False, tests=False)
    assert report.ok, report.summary()
    assert report.lesson_pages == {"lessons/01_fresh.html": "from executed copies",
                                   "lessons/02_stale.html": "without outputs",
                                   "lessons/03_none.html": "without outputs"}
    fresh = (tmp_path / "out/lessons/01_fresh.html").read_text(encoding="utf-8")
    assert "output of 01_fresh" in fresh and "rendered <strong>without outputs" not in fresh
    assert "<math" in fresh and "$x^2$" not in fresh
    stale = (tmp_path / "out/lessons/02_stale.html").read_text(encoding="utf-8")
    assert "old code" not in stale and "rendered <strong>without outputs</strong>" in stale


def test_a_page_says_when_its_outputs_come_from_the_fast_setting(tmp_path, monkeypatch):
    """The lesson tests run the fast setting and keep their copies; a page rendered from one
    says so. The build's own runs are the full setting unless asked for the fast one."""
    import inspect

    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert")
    assert inspect.signature(docs.build).parameters["fast"].default is False
    root = tmp_path / "checkout"
    (root / "minipeft").mkdir(parents=True)
    (root / "minipeft" / "__init__.py").write_text('"""A package."""\n', encoding="utf-8")
    (root / "lessons").mkdir()
    executed = tmp_path / "executed"
    for stem, fast in (("01_fast", "1"), ("02_full", "0")):
        nbformat.write(_notebook(f"print('{stem}')"), str(root / "lessons" / f"{stem}.ipynb"))
        nb = _notebook(f"print('{stem}')")
        nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="out\n")]
        monkeypatch.setenv("MINIPEFT_FAST", fast)
        docs.save_executed(nb, stem, executed)
    report = docs.build(tmp_path / "out", root=root, executed=executed, execute=False, tests=False)
    assert report.ok, report.summary()
    fast = (tmp_path / "out/lessons/01_fast.html").read_text(encoding="utf-8")
    full = (tmp_path / "out/lessons/02_full.html").read_text(encoding="utf-8")
    assert "<strong>fast setting</strong>" in fast and "fast setting" not in full


def test_save_executed_is_a_no_op_without_a_folder(monkeypatch):
    monkeypatch.delenv(docs.EXECUTED_ENV, raising=False)
    assert docs.save_executed(_notebook("1"), "01_x") is None


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def test_the_command_builds_and_says_where(tmp_path, capsys):
    from minipeft.tools.cli import main

    out = tmp_path / "site"
    assert main(["docs", "--out", str(out), "--no-execute", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert f"open {out / 'index.html'}" in said and "annotated source pages" in said
    assert (out / "index.html").is_file() and (out / "_static" / "style.css").is_file()


def test_an_output_path_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    from minipeft.tools.cli import main

    f = tmp_path / "taken"
    f.write_text("x", encoding="utf-8")
    assert main(["docs", "--out", str(f), "--no-execute", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error:") and "taken" in err


def test_the_report_serialises():
    report = docs.BuildReport(out=Path("x"))
    assert json.loads(json.dumps(docs.report_as_dict(report)))["out"] == "x"
