"""The forgetting sweep: traced curves, their reading at matched quality, the files, bad input."""

from __future__ import annotations

import csv
import io as _stdio
import json
import math

import pytest

from minipeft.workflows.forgetting import (
    CSV_COLUMNS,
    RESULT_FILES,
    ForgettingResult,
    ForgettingSettings,
    common_level,
    forgetting_sweep,
    interpolate_at,
    load_results,
    matched_quality,
)

# -- a tiny real sweep, shared by the tests that read it ---------------------------------------


@pytest.fixture(scope="module")
def tiny():
    st = ForgettingSettings(methods=("full", "lora"), rates={"full": (3e-4,), "lora": (1e-2,)},
                            seeds=(0,), steps=4, warmup=1, every=2, answer_examples=50,
                            corpus_batches=1, test_limit=0)
    return forgetting_sweep(st, progress=False)


def test_a_sweep_traces_every_method_rate_and_seed_at_every_checkpoint(tiny):
    assert [(r["method"], r["lr"], r["seed"]) for r in tiny.runs] == [("full", 3e-4, 0),
                                                                      ("lora", 1e-2, 0)]
    for r in tiny.runs:
        # step 0, then every 2 updates, the last one included: strictly increasing
        assert r["steps"] == [0, 2, 4]
        assert all(a < b for a, b in zip(r["steps"], r["steps"][1:]))
        assert len(r["answer_loss"]) == len(r["corpus_loss"]) == len(r["steps"])
        assert all(math.isfinite(x) for x in r["answer_loss"] + r["corpus_loss"])
        # both methods are the identity before the first update: step 0 is the base
        assert r["answer_loss"][0] == pytest.approx(tiny.context["base_answer_loss"], rel=1e-5)
        assert r["corpus_loss"][0] == pytest.approx(tiny.context["base_corpus_loss"], rel=1e-5)
        # training on the task lowers its held-out answer loss
        assert r["answer_loss"][-1] < r["answer_loss"][0]
    assert tiny.context["corpus_chars"] == 1 * 16 * 128


def test_a_detached_adapter_is_the_base_again_and_full_fine_tuning_has_none(tiny):
    full, lora = tiny.runs
    assert full["detached_corpus_loss"] is None and full["detached_answer_loss"] is None
    assert lora["detached_corpus_loss"] == tiny.context["base_corpus_loss"]
    assert lora["detached_answer_loss"] == tiny.context["base_answer_loss"]
    # ...and, detached, it does not do the task it learned
    assert lora["detached_answer_loss"] > lora["answer_loss"][-1]


def test_a_progress_callback_never_stops_a_run_early():
    from minipeft.data.tasks import get_task
    from minipeft.workflows.compare import default_configs
    from minipeft.workflows.forgetting import corpus_ids, trace_run

    st = ForgettingSettings(methods=("bitfit",), seeds=(0,), steps=3, warmup=0, every=1,
                            answer_examples=50, corpus_batches=1, test_limit=0)
    calls = []
    run = trace_run("bitfit", default_configs()["bitfit"], get_task(st.task), st, 1e-2, 0,
                    corpus_ids(st), on_step=lambda: calls.append(1) or True)
    assert run["steps"] == [0, 1, 2, 3] and len(calls) == 3


def test_the_files_are_written_and_read_back(tiny, tmp_path):
    paths = tiny.write(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == list(RESULT_FILES)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["matched"]["level"] == pytest.approx(tiny.matched()["level"])
    rows = list(csv.DictReader(_stdio.StringIO((tmp_path / "results.csv").read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == sum(len(r["steps"]) for r in tiny.runs)
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    back = load_results(str(tmp_path / "results.json"))
    assert back.runs == json.loads(json.dumps(tiny.runs))
    assert back.summary() == tiny.summary()


def test_a_file_that_is_not_a_sweep_is_refused_clearly(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(str(bad))
    bad.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a forgetting sweep"):
        load_results(str(bad))


# -- matched quality, on curves made up for the purpose ------------------------------------------


def test_interpolation_reads_the_first_crossing_linearly():
    answer = [4.0, 2.0, 1.0, 1.5, 0.5]
    corpus = [1.0, 1.2, 1.6, 1.7, 2.0]
    assert interpolate_at(answer, corpus, 3.0) == pytest.approx(1.1)
    assert interpolate_at(answer, corpus, 1.5) == pytest.approx(1.4)     # not the later 1.5
    assert interpolate_at(answer, corpus, 2.0) == pytest.approx(1.2)     # a checkpoint itself
    assert interpolate_at(answer, corpus, 5.0) == 1.0                    # reached at the start
    assert interpolate_at(answer, corpus, 0.1) is None                   # never reached
    with pytest.raises(ValueError, match="as many answer losses"):
        interpolate_at([1.0, 2.0], [1.0], 1.5)


def _run(method, lr, seed, answer, corpus):
    return {"method": method, "lr": lr, "seed": seed, "steps": list(range(len(answer))),
            "answer_loss": answer, "corpus_loss": corpus}


def test_matched_quality_compares_the_curves_at_a_level_every_method_reaches():
    base = 1.0
    runs = [
        # "a" learns down to 0.5 at its large rate, only to 2.0 at its small one
        _run("a", 1e-3, 0, [4.0, 2.0, 0.5], [1.0, 1.1, 1.4]),
        _run("a", 1e-3, 1, [4.0, 2.0, 0.6], [1.0, 1.3, 1.6]),
        _run("a", 1e-4, 0, [4.0, 3.0, 2.0], [1.0, 1.0, 1.05]),
        _run("a", 1e-4, 1, [4.0, 3.0, 2.0], [1.0, 1.0, 1.05]),
        # "b" reaches 1.0 at best: it sets the common level
        _run("b", 1e-2, 0, [4.0, 2.0, 1.0], [1.0, 1.5, 2.0]),
        _run("b", 1e-2, 1, [4.0, 2.5, 0.9], [1.0, 1.5, 2.1]),
    ]
    assert common_level(runs) == pytest.approx(1.0)
    m = matched_quality(runs, base)
    assert m["level"] == pytest.approx(1.0)
    by = {(e["method"], e["lr"]): e for e in m["curves"]}
    # a at 1e-3: seed 0 crosses 1.0 a third of the way from 2.0 to 0.5 -> 1.1 + 0.3 * 2/3 = 1.3
    #            seed 1: 1.3 + 0.3 * 1/1.4
    a0, a1 = 0.3, 0.3 + 0.3 / 1.4
    assert by["a", 1e-3]["rises"] == pytest.approx([a0, a1])
    assert by["a", 1e-3]["rise_mean"] == pytest.approx((a0 + a1) / 2)
    assert by["a", 1e-3]["rise_sd"] == pytest.approx(abs(a1 - a0) / math.sqrt(2))
    assert by["a", 1e-4]["reached"] == 0 and by["a", 1e-4]["rise_mean"] is None
    # b seed 1 crosses between 2.5 and 0.9: 1.5 + 0.6 * 1.5/1.6
    assert by["b", 1e-2]["rises"] == pytest.approx([1.0, 0.5 + 0.6 * 1.5 / 1.6])
    # per method: the rate that reached the level in every seed
    assert m["methods"]["a"]["lr"] == 1e-3 and m["methods"]["b"]["lr"] == 1e-2
    # an explicit level every curve reaches
    easy = matched_quality(runs, base, level=3.0)
    assert all(e["reached"] == e["seeds"] for e in easy["curves"])


def test_a_result_summarises_synthetic_runs():
    runs = [_run("full", 1e-4, 0, [4.0, 1.0], [1.0, 1.2]), _run("lora", 1e-2, 0, [4.0, 1.0],
                                                                 [1.0, 1.5])]
    r = ForgettingResult(settings={"steps": 1, "seeds": [0]},
                         context={"task": "reverse", "seconds": 1.0, "base_answer_loss": 4.0,
                                  "base_corpus_loss": 1.0, "corpus_chars": 2048}, runs=runs)
    text = r.summary()
    assert "answer loss 1.000" in text and "+0.200" in text and "+0.500" in text


# -- settings refused before any work --------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"methods": ()}, "no methods"),
    ({"methods": ("full", "nope")}, "unknown method 'nope'"),
    ({"methods": ("full", "full")}, "named twice"),
    ({"seeds": ()}, "seed list is empty"),
    ({"seeds": (0, 0)}, "distinct"),
    ({"rates": {"ia3": (1e-2,)}}, "not among the methods"),
    ({"rates": {"lora": (-1e-3,)}}, "positive finite"),
    ({"rates": {"lora": (math.nan,)}}, "positive finite"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"answer_examples": 70}, "multiple of 50"),
    ({"every": 500}, "more than steps"),
    ({"task": "nope"}, "unknown task"),
    ({"device": "tpu"}, "device must be"),
    ({"corpus_batches": 10_000}, "validation text has"),
])
def test_bad_settings_are_refused_before_any_work(change, message, monkeypatch):
    import minipeft.workflows.forgetting as F

    def trip(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(F, "load_base", trip)
    monkeypatch.setattr(F, "trace_run", trip)
    st = ForgettingSettings(**change)
    with pytest.raises(ValueError, match=message):
        forgetting_sweep(st, progress=False)


def test_the_command_runs_a_sweep_and_writes_its_files(tmp_path, capsys):
    from minipeft.tools.cli import main

    out = tmp_path / "forgetting"
    rc = main(["forgetting", "--fast", "--methods", "bitfit", "--lr", "bitfit=1e-2",
               "--steps", "2", "--every", "1", "--corpus-batches", "1", "--out", str(out),
               "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "forgetting on reverse: 1 runs of 2 steps" in text and "at matched quality" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    back = load_results(str(out / "results.json"))
    assert back.settings["rates"] == {"bitfit": [1e-2]} and back.runs[0]["steps"] == [0, 1, 2]
