"""`minipeft compare`: the five-axis table, its files, its fairness rules and its errors.

One ``--quick`` run (a smoke test: one learning rate, one seed, 8 steps) is
shared by the module; the other tests read its table and files, or rebuild
a method to check a number against the API that defines it. No timing is
asserted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import pytest

from minipeft import backend
from minipeft import compare as C
from minipeft.cli import main
from minipeft.compare import COMPARE_METHODS
from minipeft.data.tasks import get_task
from minipeft.memory import profile_step
from minipeft.optim import AdamW
from minipeft.peft.config import METHODS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``minipeft compare --quick`` once: (exit code, stdout, output folder, results.json)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compare", "--quick", "--quiet", "--out", str(out)])
    data = json.loads((out / "results.json").read_text()) if rc == 0 else None
    return rc, buf.getvalue(), out, data


def _rows_by_method(data):
    return {r["method"]: r for r in data["rows"]}


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def test_quick_run_prints_a_row_for_every_method_and_every_column(quick):
    rc, text, _, data = quick
    assert rc == 0
    lines = text.splitlines()
    for m in METHODS:
        assert any(line.startswith(f"{m} ") for line in lines), m
    header = next(line for line in lines if line.startswith("method "))
    for title in ("lr", "trainable", "%", "peak", "(meas.)", "grad+opt", "ms/step", "steps>=",
                  "test accuracy", "ms/token", "+FLOPs/tok", "KB (% full)", "dloss on", "detached"):
        assert title in header, title
    groups = lines[lines.index(header) - 1]
    for g in ("parameters", "memory", "training speed", "quality (32 ex.)", "inference (merged)",
              "storage", "forgetting"):
        assert g in groups, g
    # the rules and the baselines are stated with the numbers (lines wrap at 110 columns)
    flat = " ".join(text.split())
    for phrase in ("one budget for every method: 8 optimizer steps", "the same number of steps",
                   "same batches in the same order", "majority baseline", "base zero-shot",
                   "a single rate is used as given", "scored once per seed",
                   "--quick: a smoke test"):
        assert phrase in flat, phrase
    assert [r["method"] for r in data["rows"]] == list(COMPARE_METHODS)   # qlora last


def test_mergeable_methods_report_before_and_after_merging(quick):
    rows = _rows_by_method(quick[3])
    for m in ("lora", "ia3"):
        assert rows[m]["extra_flops"] > 0 and rows[m]["extra_flops_merged"] == 0
        assert rows[m]["ms_per_token_merged"] is not None
    for m in ("full", "bitfit", "layers", "mask"):
        assert rows[m]["extra_flops"] == 0 and rows[m]["extra_flops_merged"] is None
    for m in ("adapter", "prompt", "prefix"):
        assert rows[m]["extra_flops"] > 0 and rows[m]["extra_flops_merged"] is None
    # soft prompts: P more keys and values in every layer's attention
    assert rows["prefix"]["extra_flops"] == 4 * 4 * 128 * 20
    assert rows["full"]["adapter_fraction"] > 0.99
    assert all(r["adapter_bytes"] < r["full_bytes"] for m, r in rows.items() if m != "full")


def test_detached_adapters_are_the_base_again(quick):
    rows = _rows_by_method(quick[3])
    assert rows["full"]["dloss_detached_mean"] is None
    for m in METHODS[1:]:
        assert rows[m]["dloss_detached_mean"] == pytest.approx(0.0, abs=1e-5), m
    # qlora detached is the NF4 base, not the float one: the quantization's own change
    assert abs(rows["qlora"]["dloss_detached_mean"]) > 1e-4


def test_trainable_counts_equal_print_trainable_parameters(quick, capsys):
    _, text, _, data = quick
    seed = data["settings"]["seeds"][0]
    for m, row in _rows_by_method(data).items():
        pm = C.build_method(C.default_configs()[m], seed, quantize=C.quantized_format(m))
        capsys.readouterr()
        pm.print_trainable_parameters()
        line = capsys.readouterr().out.strip()
        assert line == (f"trainable params: {row['trainable']:,d} || all params: {row['total']:,d} "
                        f"|| trainable%: {row['trainable_pct']:.4f}")
        table_row = next(x for x in text.splitlines() if x.startswith(f"{m} "))
        assert f"{row['trainable']:,d}" in table_row and f"{row['trainable_pct']:.4f}" in table_row


def test_memory_columns_equal_the_memory_reports_accounted_view(quick):
    """The same method, batch and step (the second) under memory.profile_step directly.

    Gradients + optimizer state match to the byte. The accounted peak may
    differ by one small array between processes: run_backward decides whether
    a gradient may be summed in place by the ids of arrays it has handed on,
    and an id the allocator reuses makes it copy one more array (a 128-float
    bias gradient, 512 bytes, on this base), which moves the peak.
    """
    data = quick[3]
    st = data["settings"]
    task = get_task(st["task"])
    seed = st["seeds"][0]
    batch = C.memory_batch(task, st["batch_size"], seed)
    for m, row in _rows_by_method(data).items():
        pm = C.build_method(C.default_configs()[m], seed, quantize=C.quantized_format(m))
        opt = AdamW(pm.trainable_parameters(), lr=st["lr_grid"][m][0])
        C.warm_step(pm, opt, batch)
        rep = profile_step(pm, opt, batch)
        assert row["mem_grad_opt_bytes"] == rep.accounted["gradients"] + rep.accounted["optimizer"], m
        assert abs(row["mem_accounted_peak_bytes"] - rep.accounted_peak) <= 512, m
        assert row["mem_accounted_peak_mib"] == pytest.approx(rep.accounted_peak / 2**20, abs=1e-3)
        assert 0 < row["mem_accounted_peak_bytes"] < row["mem_measured_peak_bytes"]
        assert sum(data["memory_at_peak"][m].values()) == row["mem_accounted_peak_bytes"]


# ---------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------


def test_files_are_written_and_parse(quick):
    _, text, out, data = quick
    assert sorted(os.listdir(out)) == sorted(C.RESULT_FILES)   # no temporary files left
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == C.CSV_COLUMNS
        rows = list(reader)
    assert [r["method"] for r in rows] == list(COMPARE_METHODS)
    for r, j in zip(rows, data["rows"]):
        assert int(r["trainable"]) == j["trainable"]
        assert float(r["test_mean"]) == pytest.approx(j["test_mean"])
    assert set(data) >= {"settings", "context", "rows", "separations", "details", "memory_at_peak"}
    assert data["context"]["n_test"] == 32 and data["settings"]["quick"] is True
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the JSON holds everything the table is made of
    assert C.CompareResult.from_json(data).table() in text


def test_same_seeds_same_numbers(quick, tmp_path):
    """Reproducible for a seed set: a second run of one method repeats every non-timing number."""
    data = quick[3]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["compare", "--quick", "--quiet", "--methods", "lora",
                     "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    a, b = _rows_by_method(data)["lora"], again["rows"][0]
    for key in ("trainable", "test_mean", "dloss_active_mean", "mem_accounted_peak_bytes",
                "adapter_bytes", "extra_flops"):
        assert a[key] == b[key], key
    assert data["details"]["lora"]["seeds"][0]["val_curve"] == \
        again["details"]["lora"]["seeds"][0]["val_curve"]


def test_a_grid_picks_a_rate_on_the_validation_split_and_flags_an_edge(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["compare", "--quick", "--quiet", "--methods", "bitfit", "--lr",
                     "bitfit=1e-2,3e-2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    row, grid = data["rows"][0], data["details"]["bitfit"]["lr_grid"]
    assert [g["lr"] for g in grid] == [1e-2, 3e-2]
    best = max(grid, key=lambda g: (g["val_selection"], g["val_mean_over_checks"]))
    assert row["lr"] == best["lr"] and row["lr_at_grid_edge"] is True
    assert f"{'1e-2' if row['lr'] == 1e-2 else '3e-2'}*" in buf.getvalue()
    assert data["details"]["bitfit"]["seeds"][0]["seed"] == 0     # the chosen run is seed 0's


# ---------------------------------------------------------------------------
# Bad input and interruptions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--task", "poetry"], "known tasks"),
    (["--methods", "lora,nope"], "unknown method 'nope'"),
    (["--seeds", ""], "seed list is empty"),
    (["--seeds", " , "], "seed list is empty"),
    (["--seeds", "0,x"], "seeds must be integers"),
    (["--seeds", "1,1"], "seed is named twice"),
    (["--lr", "lora"], "METHOD=LR"),
    (["--steps", "0"], "steps must be >= 1"),
])
def test_bad_input_is_one_clear_line(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--quick", "--quiet", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error:") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()            # refused before anything was made


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["compare", "--quick", "--quiet", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error:") and "cannot write to output folder" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is present: --device gpu would run")
def test_gpu_without_cupy_is_a_clear_error(tmp_path, capsys):
    assert main(["compare", "--quick", "--quiet", "--device", "gpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error:") and "CuPy" in err
    assert os.listdir(tmp_path) == []


def test_interrupted_run_leaves_no_result_files(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second training run: nothing new written, old results untouched."""
    out = tmp_path / "out"
    out.mkdir()
    old = {name: f"an earlier run's {name}".encode() for name in C.RESULT_FILES}
    for name, data in old.items():
        (out / name).write_bytes(data)
    real, calls = C._train_run, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "_train_run", interrupted)
    assert main(["compare", "--quick", "--quiet", "--methods", "bitfit,lora",
                 "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted(C.RESULT_FILES)
    for name, data in old.items():
        assert (out / name).read_bytes() == data


def test_interrupted_while_writing_leaves_whole_files_only(quick, tmp_path, monkeypatch):
    result = C.CompareResult.from_json(quick[3])
    # while the figure renders (before the first write): nothing at all
    monkeypatch.setattr(C, "_render_png", lambda r: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        result.write(str(tmp_path / "a"))
    assert os.listdir(tmp_path / "a") == []
    monkeypatch.undo()
    # between two files: the first is whole, the others absent, no temporary file left
    real, calls = C.io.atomic_write_bytes, []

    def second_fails(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(C.io, "atomic_write_bytes", second_fails)
    with pytest.raises(KeyboardInterrupt):
        result.write(str(tmp_path / "b"))
    assert os.listdir(tmp_path / "b") == ["results.csv"]
    with open(tmp_path / "b" / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(COMPARE_METHODS)


# ---------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------


def test_separations_use_two_standard_deviations_of_the_difference():
    rows = [{"method": "a", "test_mean": 0.90, "test_std": 0.01},
            {"method": "b", "test_mean": 0.50, "test_std": 0.02},
            {"method": "c", "test_mean": 0.55, "test_std": 0.05},
            {"method": "d", "test_mean": 0.70, "test_std": None}]
    pairs = {(p["better"], p["worse"]): p["separated"] for p in C.separations(rows)}
    assert pairs == {("a", "b"): True, ("a", "c"): True, ("c", "b"): False}


def test_settings_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="no learning rates"):
        C.CompareSettings(methods=("lora",), lr_grid={}).validate()
    with pytest.raises(ValueError, match="named twice"):
        C.CompareSettings(methods=("lora", "lora")).validate()
    with pytest.raises(ValueError, match="target"):
        C.CompareSettings(target=1.5).validate()
    quick = C.CompareSettings.quick_settings()
    assert quick.lr_grid["lora"] == (C.best_known_lr("lora"),) and len(quick.seeds) == 1
    assert all(len(g) == 3 for g in C.LR_GRID.values())
    assert C.default_target(get_task("sentiment")) == 0.75
