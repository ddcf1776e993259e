r"""The lesson notebooks: each runs top to bottom, checks its claim, and is stored clean.

Every notebook in ``lessons/`` is executed with ``MINIPEFT_FAST=1`` (fewer
steps and examples; the same computations and the same assertions) through
nbclient, in a fresh ``python3`` kernel started in ``lessons/``. A lesson
whose claim stops being true fails here, because each one ends its story
with an assertion cell. The time each notebook took is reported at the end
of the module, never asserted; a generous per-cell timeout only guards
against a hang.

Also checked, without running anything: notebooks are stored without
outputs, each has an assertion cell, each has its jupytext twin
(``NN_name.py``, percent format) with the same cells, the solutions file
parses, and a lesson started without the ``lessons`` extra stops with the
command that installs it.
"""

from __future__ import annotations

import ast
import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "lessons"
# NN_name.ipynb, or NNa_name.ipynb where one lesson's story is told in two parts (03a, 03b)
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]*_*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]

#: seconds any one cell may run before the kernel is judged hung (FAST cells take seconds)
CELL_TIMEOUT = 600


def read(path: Path):
    return nbformat.read(str(path), as_version=4)


def code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def python_of(source: str) -> str:
    """A cell's source without IPython's magics and shell lines, for ``ast``."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def lesson_number(path: Path) -> str:
    """``3a`` for ``03a_training_memory.ipynb``, ``5`` for ``05_lora.ipynb``."""
    prefix = path.name.split("_", 1)[0]
    assert re.fullmatch(r"\d\d[a-z]?", prefix), f"{path.name}: name it NN_name or NNa_name"
    return prefix.lstrip("0")


def test_the_lessons_are_there_and_numbered():
    assert NOTEBOOKS, "no notebooks in lessons/"
    numbers = [lesson_number(p) for p in NOTEBOOKS]
    assert len(set(numbers)) == len(numbers), f"two lessons share a number: {numbers}"
    for expected in ("01_tour", "02_autograd", "03a_training_memory", "03b_what_fits", "05_lora"):
        assert (LESSONS / f"{expected}.ipynb").is_file(), expected


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_without_outputs(path):
    nb = read(path)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} are stored with outputs; clear them "
                       "(jupyter nbconvert --clear-output --inplace, or regenerate from the twin)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_has_an_assertion_cell(path):
    nb = read(path)
    with_assert = [src for src in code_cells(nb)
                   if any(isinstance(n, ast.Assert) for n in ast.walk(ast.parse(python_of(src))))]
    assert with_assert, f"{path.name} checks no claim: no code cell has an assert"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_starts_with_the_setup_cell(path):
    first = code_cells(read(path))[0]
    assert "lessons.setup()" in first, (
        f"{path.name}: the first code cell must call minipeft.tools.lessons.setup(), which checks "
        "the lessons extra and says how to install it")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_twin_in_sync(path):
    jupytext = pytest.importorskip("jupytext")
    twin = path.with_suffix(".py")
    assert twin.is_file(), f"{path.name} has no text twin {twin.name}"
    from_twin = jupytext.read(str(twin), fmt="py:percent")
    stored = read(path)

    def cells(nb):
        return [(c.cell_type, c.source.strip()) for c in nb.cells]

    a, b = cells(stored), cells(from_twin)
    assert len(a) == len(b), f"{path.name}: {len(a)} cells, its twin {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, (f"{path.name} cell {i} differs from its twin {twin.name}; regenerate "
                        f"the notebook: jupytext --update --to ipynb lessons/{twin.name}")


def test_solutions_parse():
    text = (LESSONS / "solutions.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        ast.parse(block)
    for path in NOTEBOOKS:
        n = lesson_number(path)
        assert re.search(rf"^## Lesson {n}\b", text, flags=re.M), (
            f"solutions.md has no section for lesson {n}")


# ---------------------------------------------------------------------------
# What the notebooks share (minipeft/tools/lessons.py)
# ---------------------------------------------------------------------------


def test_finetune_and_score_is_the_training_loop_the_lessons_wrote_out():
    # lessons 4 to 8 once wrote this loop themselves; the helper must train the very
    # same model (bit for bit), so their numbers did not move when they switched to it
    import numpy as np

    from minipeft.data import get_task
    from minipeft.optim import AdamW, LRSchedule
    from minipeft.peft import LoraConfig, get_peft_model
    from minipeft.tools import lessons
    from minipeft.workflows.base import load_base
    from minipeft.workflows.evaluation import evaluate
    from minipeft.workflows.train import train

    task, lr, steps, n_test = get_task("reverse"), 3e-3, 6, 4
    config = LoraConfig(r=4, target_modules=["c_attn"])
    pm = get_peft_model(load_base(), config)
    opt = AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.0)
    history = train(pm, opt, task.batches("train", 16, seed=0, epochs=None), steps,
                    schedule=LRSchedule(lr, steps, min(20, steps // 5), min_lr=lr / 10),
                    clip=1.0, progress=False)
    run = lessons.finetune_and_score(config, task, lr, steps, n_test)
    assert run.history.losses == history.losses and run.history.lrs == history.lrs
    ours = dict(run.model.named_parameters())
    for name, p in pm.named_parameters():
        assert np.array_equal(ours[name].numpy(), p.numpy()), name
    assert run.answer_loss == lessons.answer_loss(pm, task)
    assert run.score == evaluate(pm, task, "test", limit=n_test)
    assert run.trainable == pm.get_nb_trainable_parameters()[0] == 4 * 4 * (128 + 384)


def test_finetune_seeds_draws_each_seed_and_reports_the_spread():
    import dataclasses

    import numpy as np

    from minipeft.data import get_task
    from minipeft.peft import LoraConfig
    from minipeft.tools import lessons

    task, config = get_task("reverse"), LoraConfig(r=2, target_modules=["c_attn"])
    seeded = lessons.finetune_seeds(config, task, 3e-3, 3, 2, seeds=(0, 1, 2), n_val=50)
    assert seeded.seeds == [0, 1, 2] and len(seeded.runs) == 3
    # seed 0 is the single run; seed 1 differs in its batches and in LoRA's A
    single = lessons.finetune_and_score(config, task, 3e-3, 3, 2, n_val=50)
    assert seeded.runs[0].history.losses == single.history.losses
    one = lessons.finetune_and_score(dataclasses.replace(config, init_seed=1), task, 3e-3, 3, 2,
                                     seed=1, n_val=50)
    assert seeded.runs[1].history.losses == one.history.losses != single.history.losses
    losses = [run.answer_loss for run in seeded.runs]
    assert seeded.answer_loss == pytest.approx((np.mean(losses), np.std(losses, ddof=1)))
    assert seeded.answer_loss[1] > 0 and seeded.trainable == 4 * 2 * (128 + 384)
    with pytest.raises(ValueError, match="seeds is empty"):
        lessons.finetune_seeds(config, task, 3e-3, 3, 2, seeds=())


def test_rslora_scales_by_the_square_root_of_the_rank():
    from minipeft.peft import LoraConfig, config_from_dict

    assert LoraConfig(r=16, lora_alpha=8).scaling == 0.5
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling == 2.0 and config_from_dict(rs.to_dict()).scaling == 2.0


def test_the_flop_counters_agree_and_switch_the_log_off():
    import numpy as np

    from minipeft.autograd import profile
    from minipeft.data import get_task
    from minipeft.peft import LoraConfig, get_peft_model
    from minipeft.tools import lessons
    from minipeft.workflows.base import load_base

    idx, targets = next(get_task("reverse").batches("val", 4, shuffle=False))
    base, lora = load_base(), get_peft_model(load_base(), LoraConfig(r=8))
    # one forward pass, with or without the loss, forms the same products
    assert lessons.forward_flops(base, idx) == lessons.step_flops(base, (idx, targets))["forward"]
    extra = lora.active_method.extra_flops_per_token(lora)
    assert lessons.forward_flops(lora, idx) - lessons.forward_flops(base, idx) == extra * idx.size
    with lessons.count_flops() as flops:
        base(np.asarray(idx))
        assert flops.total == lessons.forward_flops(base, idx) > 0
    assert profile.matmul_log is None
    with pytest.raises(RuntimeError), lessons.count_flops():
        raise RuntimeError("a cell fails halfway")
    assert profile.matmul_log is None


def test_table_aligns_names_left_and_numbers_right():
    from minipeft.tools import lessons

    text = lessons.table([["full", 822016, 1.0], ["LoRA r=8", 16384, 0.5]],
                         ["method", "trainable", "score"], ["", ",d", ".2f"])
    lines = text.splitlines()
    assert lines[0].split() == ["method", "trainable", "score"]
    assert lines[1].startswith("full ") and lines[1].endswith("822,016   1.00")
    assert lines[2].startswith("LoRA r=8") and lines[2].endswith(" 16,384   0.50")
    assert len({len(line) for line in lines}) == 1                 # every line as wide
    with pytest.raises(ValueError, match="3 entries"):
        lessons.table([["full", 1]], ["method", "trainable", "score"])


def test_say_prints_outside_a_notebook(capsys):
    from minipeft.tools import lessons

    lessons.say("the adapter scored 0.91")
    assert capsys.readouterr().out == "the adapter scored 0.91\n"


# ---------------------------------------------------------------------------
# Without the lessons extra
# ---------------------------------------------------------------------------


def test_setup_names_the_install_command(monkeypatch):
    from minipeft.tools import lessons

    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=re.escape(lessons.INSTALL_COMMAND)):
        lessons.setup()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_a_lesson_without_the_extra_says_how_to_install_it(path):
    # The notebook's first cell, in a fresh interpreter in which matplotlib
    # cannot be imported (as where the extra was never installed).
    block = ("import sys\n"
             "sys.modules['matplotlib'] = None\n"
             "sys.modules['matplotlib.pyplot'] = None\n")
    proc = subprocess.run([sys.executable, "-c", block + python_of(code_cells(read(path))[0])],
                          cwd=LESSONS, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "pip install -e '.[lessons]'" in proc.stderr, proc.stderr[-2000:]
    assert "LessonsExtraMissing" in proc.stderr


# ---------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timings(request):
    """Seconds each notebook took; written to the terminal after the last one."""
    seen: dict[str, float] = {}
    yield seen
    if not seen:
        return
    lines = [f"  {name:20s} {s:6.1f} s" for name, s in seen.items()]
    lines.append(f"  {'these lessons':20s} {sum(seen.values()):6.1f} s (MINIPEFT_FAST=1)")
    text = "\nlesson notebooks, time to run (reported, not asserted):\n" + "\n".join(lines)
    # past pytest's output capture, so that the report shows on a passing run
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line(text)
        else:  # pragma: no cover
            print(text)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_runs_top_to_bottom(path, timings, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    # The kernel inherits this environment. MINIPEFT_FAST=1: the fast setting.
    # Thread counts and the BLAS kernel are left as they are, as in a
    # student's kernel: a lesson's claim must hold at the default thread count
    # (the engine's threads split products, and the order a product is summed
    # in is the kernel's).
    monkeypatch.setenv("MINIPEFT_FAST", "1")
    nb = read(path)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        timings[path.stem] = time.perf_counter() - start
    # the stored file is untouched: nbclient ran an in-memory copy
    assert not any(c.get("outputs") for c in read(path).cells if c.cell_type == "code")
    # with $MINIPEFT_EXECUTED_DIR set (CI sets it), keep this run for `minipeft docs`,
    # which renders it instead of running the lesson a second time
    from minipeft.tools.docs import save_executed

    save_executed(nb, path.stem)
