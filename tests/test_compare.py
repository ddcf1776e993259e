"""`minipeft compare`: the five-axis table, its files, its fairness rules and its errors.

One ``--quick`` run (a smoke test: one learning rate, one seed, 8 steps) is
shared by the module; the other tests read its table and files, or rebuild
a method to check a number against the API that defines it. No timing is
asserted.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest

from minipeft import backend
from minipeft.data.tasks import get_task
from minipeft.memory import profile_step
from minipeft.optim import AdamW
from minipeft.peft.config import LR_GRID, METHODS, best_known_lr
from minipeft.tools.cli import main
from minipeft.workflows import compare as C
from minipeft.workflows.compare import COMPARE_METHODS


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
    for title in ("lr", "trainable", "%", "peak", "grad+opt", "ms/step", "steps>=",
                  "test accuracy", "+FLOPs/tok", "dloss on"):
        assert title in header, title
    groups = lines[lines.index(header) - 1]
    for g in ("parameters", "memory", "training speed", "quality", "inference", "forgetting"):
        assert g in groups, g
    # every column behind --wide
    wide = C.CompareResult.from_json(data).table(wide=True).splitlines()
    header = next(line for line in wide if line.startswith("method "))
    for title in ("(meas.)", " s ", "ms/token", "+FLOPs/tok", "KB (% full)", "detached"):
        assert title in header, title
    groups = wide[wide.index(header) - 1]
    for g in ("quality (32 ex.)", "inference (merged)", "storage"):
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
    for m in ("lora", "lora_fa", "ia3"):
        assert rows[m]["extra_flops"] > 0 and rows[m]["extra_flops_merged"] == 0
        assert rows[m]["ms_per_token_merged"] is not None
    for m in ("full", "bitfit", "layers", "mask"):
        assert rows[m]["extra_flops"] == 0 and rows[m]["extra_flops_merged"] is None
    for m in ("adapter", "prompt", "prefix", "lst"):
        assert rows[m]["extra_flops"] > 0 and rows[m]["extra_flops_merged"] is None
    # LST runs a side network of width 128 / 8 = 16 beside the backbone: its L + 1
    # ladders, four side blocks and the up-projection, at inference too
    assert rows["lst"]["extra_flops"] == 2 * (5 * 128 * 16 + 12 * 4 * 16 * 16 + 16 * 128)
    assert rows["lora_fa"]["extra_flops"] == rows["lora"]["extra_flops"]
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
        assert f"{row['trainable']:,d}" in table_row and f"{row['trainable_pct']:.2f}" in table_row
        wide_row = next(x for x in C.CompareResult.from_json(data).table(wide=True).splitlines()
                        if x.startswith(f"{m} "))
        assert f"{row['trainable_pct']:.4f}" in wide_row


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
    assert quick.lr_grid["lora"] == (best_known_lr("lora"),) and len(quick.seeds) == 1
    assert all(len(g) == 3 for g in LR_GRID.values())
    assert C.default_target(get_task("sentiment")) == 0.75


# ---------------------------------------------------------------------------
# What is printed agrees with what happens
# ---------------------------------------------------------------------------

#: the README's table (150 steps, seeds 0,1,2): method, lr, trainable, peak, measured
#: peak, grad+opt, ms/step, steps to target, seconds, test mean, test sd, ms/token
#: (merged), extra FLOPs (merged), adapter bytes, dloss on (sd)
README_ROWS = [
    ("full", 3e-4, 822016, 57.8, 58.4, 9.407, 141, 58, 8.4, .999, .002, 2.59, None, 0, None,
     3292500, .256, .011),
    ("bitfit", 3e-2, 5760, 36.0, 36.6, .066, 98, 108, 10.8, .658, .063, 2.83, None, 0, None,
     25000, 2.791, .113),
    ("layers", 3e-3, 198272, 20.5, 21.0, 2.269, 68, 75, 5.1, .833, .114, 2.49, None, 0, None,
     794100, .288, .018),
    ("mask", 1e-1, 7864, 51.6, 52.6, 3.120, 131, 75, 10.0, .905, .128, 2.61, None, 0, None,
     65900, 2.904, .343),
    ("lora", 1e-2, 16384, 38.7, 39.5, .188, 111, 92, 10.2, .901, .076, 2.87, 2.52, 32768, 0,
     66300, 1.321, .330),
    ("adapter", 1e-2, 33920, 38.0, 39.0, .388, 111, 67, 7.4, .897, .043, 3.04, None, 65536, None,
     138700, 1.984, .122),
    ("prompt", 3e-1, 2560, 47.2, 48.0, .029, 132, None, None, .556, .038, 2.36, None, 40960, None,
     10400, 2.263, .127),
    ("prefix", 1e-1, 20480, 38.2, 39.0, .234, 105, None, None, .563, .029, 1.96, None, 40960, None,
     82100, 1.889, .061),
    ("ia3", 1e-1, 3072, 52.9, 55.4, .035, 118, 108, 12.9, .727, .038, 2.35, 2.21, 3072, 0,
     13000, 1.097, .033),
]


def _fake_result(seeds=(0, 1, 2), **context) -> C.CompareResult:
    """A CompareResult from the README's numbers, without training anything."""
    total, full_bytes = 838400, 3292500
    rows = []
    for (m, lr, n, peak, meas, go, ms, steps, secs, mean, sd, mst, mstm, fl, flm, ab, dl,
         dls) in README_ROWS:
        one = len(seeds) == 1
        rows.append({
            "method": m, "lr": lr, "lr_at_grid_edge": m == "mask", "trainable": n,
            "total": total, "trainable_pct": 100 * n / total, "mem_accounted_peak_mib": peak,
            "mem_measured_peak_mib": meas, "mem_grad_opt_mib": go, "ms_per_step": ms,
            "steps_to_target": steps, "seconds_to_target": secs,
            "seeds_reached": 0 if steps is None else len(seeds), "n_seeds": len(seeds),
            "test_mean": mean, "test_std": None if one else sd, "ms_per_token": mst,
            "ms_per_token_merged": mstm, "extra_flops": fl, "extra_flops_merged": flm,
            "adapter_bytes": ab, "adapter_fraction": ab / full_bytes,
            "dloss_active_mean": dl, "dloss_active_std": None if one else dls,
            "dloss_detached_mean": None if m == "full" else 0.0})
    settings = dict(dataclasses.asdict(C.CompareSettings(seeds=tuple(seeds))),
                    methods=list(METHODS), seeds=list(seeds),
                    lr_grid={m: list(g) for m, g in LR_GRID.items()})
    ctx = {"task": "sentiment", "description": "label a short restaurant or shop review "
           "'positive' or 'negative'", "metric": "accuracy", "n_test": 500, "n_val_split": 200,
           "majority": 0.5, "zero_shot": 0.0, "target": 0.76,
           "target_rule": "halfway from the majority answer's validation score to a perfect score",
           "base_val_loss": 0.6565, "base_ms_per_token": 2.09, "base_flops": 1597440,
           "gen_tokens": 32, "gen_prompts": 4, "memory_seq_len": 77, "full_bytes": full_bytes,
           "device": "cpu", "blas_threads": "1", "cpu_cores": 2, **context}
    return C.CompareResult(settings=settings, context=ctx, rows=rows, details={},
                           peaks={r[0]: {"parameters": 1 << 20} for r in README_ROWS})


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_the_default_table_fits_a_120_column_terminal(seeds):
    result = _fake_result(seeds)
    text = result.table()
    widest = max(text.splitlines(), key=len)
    assert len(widest) <= C.TABLE_WIDTH == 120, widest
    assert "--wide" in text                           # and it says where the rest is
    # --wide: the full layout, every column (wider than a terminal, on purpose)
    wide = result.table(wide=True)
    assert max(len(line) for line in wide.splitlines()) > 120
    for m, *_ in README_ROWS:
        assert any(line.startswith(f"{m} ") for line in text.splitlines()), m
    # the numbers the default leaves out are in the wide table, not lost
    assert "(58.4)" in wide and "(58.4)" not in text
    assert "3,292.5 (100.0%)" in wide


def test_the_quick_runs_table_fits_too(quick):
    data = quick[3]
    table = C.CompareResult.from_json(data).table()
    assert max(len(line) for line in table.splitlines()) <= C.TABLE_WIDTH
    assert table in quick[1]


def test_the_plot_says_sd_over_seeds_only_with_several_seeds(monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    ctx = {"metric": "accuracy", "n_test": 500}
    assert "sd" not in C.score_axis_label(ctx, [0]) and "one seed (0)" in C.score_axis_label(ctx, [0])
    assert C.score_axis_label(ctx, [0, 1, 2]).endswith("mean ± sd over 3 seeds")
    # the figure itself carries the label
    labels, real = [], Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda ax, text, *a, **k: (
        labels.append(text), real(ax, text, *a, **k))[1])
    for seeds in ((0,), (0, 1, 2)):
        labels.clear()
        assert _fake_result(seeds).figure_png()[:4] == b"\x89PNG"
        assert any(x.startswith("test accuracy") for x in labels), labels
        assert any("± sd" in x for x in labels) == (len(seeds) > 1), labels


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_and_readme_give_the_same_run_times(capsys):
    help_text = _help_text(capsys)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("minipeft compare ") and "#" in x)
    for phrase in (C.QUICK_TIME, C.DEFAULT_TIME):
        assert phrase in help_text, phrase
        assert phrase in line, (phrase, line)
    assert line.index("--quick") < line.index(C.QUICK_TIME)
    assert "--wide" in help_text


def test_readme_and_the_run_say_the_same_of_the_cpu(capsys):
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(
        encoding="utf-8").split())
    # the default run is on one thread: the settings, the help and the README agree
    assert C.CompareSettings().threads == 1
    assert "default 1" in _help_text(capsys)
    assert f"{C.DEFAULT_TIME} on one CPU thread (the default)" in readme
    # the header the README quotes is the header a run prints
    quoted = C.threads_line("1", 2)
    assert quoted == "CPU threads: 1 (of 2 cores)" and f'"{quoted}"' in readme
    header = " ".join(_fake_result().header().split())
    assert f"device cpu, {quoted};" in header
    with C.cpu_threads(1) as used:
        assert used == "1"
