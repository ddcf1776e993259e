"""`minipeft bench` runs and prints a table that parses (never a timing assertion)."""

from __future__ import annotations

import re

import pytest

from minipeft import backend
from minipeft.tools.bench import reference_available
from minipeft.tools.cli import main


def _row(out: str, case: str, method: str) -> list[str]:
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("case"))
    assert lines[head].split()[:3] == ["case", "method", "ms/step"]
    for line in lines[head + 1:]:
        fields = line.split()
        if fields[:2] == [case, method]:
            return fields
    raise AssertionError(f"no {case}/{method} row in:\n{out}")


def test_one_tiny_step_prints_a_row_that_parses(capsys):
    rc = main(["bench", "--case", "tiny", "--method", "full", "--steps", "1", "--warmup", "0",
               "--keep-blas-env"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "BLAS" in out and "OpenBLAS overrides" in out
    fields = _row(out, "tiny", "full")
    ms, spread, tokens, gflop, floor, eff = fields[2:8]
    assert float(ms) > 0 and re.fullmatch(r"[\d.]+-[\d.]+", spread)
    assert int(tokens.replace(",", "")) > 0
    # the tiny step's matrix products: 3 x 3.8 GFLOP (forward, and two products back)
    assert 10.0 < float(gflop) < 13.0
    assert float(floor) > 0 and eff.endswith("%")
    if reference_available():
        pt_ms, pt_spread, ratio = fields[8:11]
        assert float(pt_ms) > 0 and float(ratio) > 0
        diff = re.search(r"loss on the batch: minipeft ([\d.]+), PyTorch ([\d.]+)", out)
        assert diff and abs(float(diff[1]) - float(diff[2])) < 1e-4
        shifted = re.search(r"labels= .*? ([\d.]+) vs minipeft with the last target ignored "
                            r"([\d.]+)", out)
        assert shifted and abs(float(shifted[1]) - float(shifted[2])) < 1e-4
    else:
        assert fields[8:11] == ["-", "-", "-"]


def test_lora_row_and_profile_on_the_strict_backend(capsys):
    """The same step through the strict stand-in (no PyTorch column there), profiled."""
    rc = main(["bench", "--case", "tiny", "--method", "lora", "--steps", "1", "--warmup", "0",
               "--device", "strict", "--profile", "--keep-blas-env"])
    out = capsys.readouterr().out
    assert rc == 0
    fields = _row(out, "tiny", "lora")
    # LoRA skips the frozen weights' products: fewer FLOPs than the full step's
    assert float(fields[5]) < 10.0 and fields[8:11] == ["-", "-", "-"]
    # the profile lists the engine's ops and the optimizer
    assert "CausalAttention" in out and "Linear" in out and "AdamW step" in out


def test_reference_prints_both_paths_per_step_and_per_op(capsys):
    """--reference: the step on the reference ops beside the fast path's, and per op."""
    rc = main(["bench", "--case", "tiny", "--method", "full", "--steps", "1", "--warmup", "0",
               "--compare", "off", "--reference", "--keep-blas-env"])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(x for x in out.splitlines() if "the reference path:" in x)
    ref_ms, ratio = re.search(r"path: ([\d.]+) ms per step .*, ([\d.]+)x the fast", line).groups()
    assert float(ref_ms) > 0 and float(ratio) > 0
    ops_seen = {x.split()[0]: x.split() for x in out.splitlines()[out.splitlines().index(line):]
                if x.startswith("    ") and len(x.split()) == 4}
    for op in ("GELU", "LayerNorm", "CausalAttention", "Linear", "Embedding"):
        assert ops_seen[op][3].endswith("x"), ops_seen[op]  # timed on both paths
    from minipeft.autograd import fast_path_on
    assert fast_path_on()                                   # the switch is back


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is present here")
def test_gpu_without_cupy_says_what_to_install(capsys):
    rc = main(["bench", "--device", "gpu", "--steps", "1", "--keep-blas-env"])
    assert rc == 2
    assert "install" in capsys.readouterr().err.lower()


def test_unknown_case_is_refused(capsys):
    rc = main(["bench", "--case", "huge", "--keep-blas-env"])
    assert rc == 2
    assert "choose from tiny, medium, large" in capsys.readouterr().err
