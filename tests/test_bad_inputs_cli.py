"""Bad input through the `minipeft` command: one line naming the option and the fix, nothing run.

Each row is the arguments, the exit code, and a fragment of the one-line
message that says what to do. The rows run in-process (``main([...])``) with
every job that does real work (loading the base, training, profiling a step,
writing a folder) replaced by a tripwire, so a row passes only if its input
is refused before any work starts. One row runs as a subprocess, to see the
whole command as a user does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minipeft.tools.cli import main

# ``{tmp}`` is a fresh folder holding ``dir/`` (an existing folder), ``file`` (an
# existing file) and ``fake_adapter/`` (a folder that is not an adapter).
ROWS = [
    # -- numbers: negative, zero, NaN, inf, not a number ---------------------------
    ("finetune-lr-negative", ["finetune", "--lr", "-1e-3"], 2, "--lr: must be a positive finite"),
    ("finetune-lr-nan", ["finetune", "--lr", "nan"], 2, "--lr: must be a positive finite"),
    ("finetune-lr-neg-inf", ["finetune", "--lr", "-inf"], 2, "--lr: must be a positive finite"),
    ("finetune-lr-text", ["finetune", "--lr", "fast"], 2, "--lr: must be a positive finite"),
    ("finetune-steps-negative", ["finetune", "--steps", "-5"], 2, "--steps: must be a positive integer"),
    ("finetune-steps-float", ["finetune", "--steps", "1.5"], 2, "--steps: must be a positive integer"),
    ("finetune-batch-negative", ["finetune", "--batch-size", "-1"], 2,
     "--batch-size: must be a positive integer"),
    ("finetune-seed-negative", ["finetune", "--seed", "-1"], 2, "--seed: must be an integer >= 0"),
    ("finetune-eval-limit-negative", ["finetune", "--eval-limit", "-3"], 2,
     "--eval-limit: must be a positive integer"),
    ("lora-r-negative", ["finetune", "--method", "lora", "--r", "-4"], 2,
     "--r: must be a positive integer"),
    ("lora-r-zero", ["finetune", "--method", "lora", "--r", "0"], 2, "--r: must be a positive integer"),
    ("lora-alpha-nan", ["finetune", "--method", "lora", "--lora-alpha", "nan"], 2,
     "--lora-alpha: must be a positive finite number"),
    ("lora-alpha-inf", ["finetune", "--method", "lora", "--lora-alpha", "inf"], 2,
     "--lora-alpha: must be a positive finite number"),
    ("lora-alpha-negative", ["finetune", "--method", "lora", "--lora-alpha", "-2"], 2,
     "--lora-alpha: must be a positive finite number"),
    ("lora-dropout-one", ["finetune", "--method", "lora", "--lora-dropout", "1"], 2,
     "--lora-dropout: must be a finite number in [0, 1)"),
    ("lora-dropout-nan", ["finetune", "--method", "lora", "--lora-dropout", "nan"], 2,
     "--lora-dropout: must be a finite number in [0, 1)"),
    ("mask-density-zero", ["finetune", "--method", "mask", "--density", "0"], 2,
     "--density: must be a finite number in (0, 1]"),
    ("mask-density-nan", ["finetune", "--method", "mask", "--density", "nan"], 2,
     "--density: must be a finite number in (0, 1]"),
    ("mask-density-above-one", ["finetune", "--method", "mask", "--density", "2"], 2,
     "--density: must be a finite number in (0, 1]"),
    ("adapter-bottleneck-negative", ["finetune", "--method", "adapter", "--bottleneck", "-1"], 2,
     "--bottleneck: must be a positive integer"),
    ("prompt-virtual-tokens-negative", ["finetune", "--method", "prompt", "--virtual-tokens", "-3"],
     2, "--virtual-tokens: must be an integer >= 0"),
    # -- options that do not apply to the method -----------------------------------
    ("target-modules-with-prompt", ["finetune", "--method", "prompt", "--target-modules", "c_attn"],
     2, "--target-modules applies to bitfit, mask, lora, lora_fa, ia3, not to prompt"),
    ("r-with-bitfit", ["finetune", "--method", "bitfit", "--r", "4"], 2,
     "--r applies to lora, lora_fa, not to bitfit"),
    ("bottleneck-with-lora", ["finetune", "--method", "lora", "--bottleneck", "8"], 2,
     "--bottleneck applies to adapter, not to lora"),
    ("dora-with-prompt", ["finetune", "--method", "prompt", "--dora"], 2,
     "--dora applies to lora, lora_fa, not to prompt"),
    ("layers-with-lora", ["finetune", "--method", "lora", "--layers", "-2,-1"], 2,
     "--layers applies to layers, not to lora"),
    ("virtual-tokens-with-full", ["finetune", "--method", "full", "--virtual-tokens", "5"], 2,
     "--virtual-tokens applies to prompt, prefix, not to full"),
    ("memory-r-with-ia3", ["memory", "--method", "ia3", "--r", "4"], 2,
     "--r applies to lora, lora_fa, not to ia3"),
    ("compare-r-with-prompt-only", ["compare", "--methods", "prompt,prefix", "--r", "4"], 2,
     "--r applies to lora, lora_fa, and --methods does not include it"),
    # -- names, choices and empty strings --------------------------------------------
    ("finetune-task-unknown", ["finetune", "--task", "poetry"], 2, "invalid choice: 'poetry'"),
    ("finetune-task-empty", ["finetune", "--task", ""], 2, "invalid choice: ''"),
    ("finetune-out-empty", ["finetune", "--out", ""], 2, "--out is empty"),
    ("finetune-target-modules-empty-entry", ["finetune", "--target-modules", "c_attn,"], 2,
     "--target-modules takes names separated by commas"),
    ("layers-components-unknown", ["finetune", "--method", "layers", "--components", "heads"], 2,
     "unknown components"),
    ("generate-prompt-empty", ["generate", "--prompt", ""], 2, "--prompt is empty"),
    ("generate-prompt-not-ascii", ["generate", "--prompt", "café "], 2, "--prompt"),
    ("eval-adapter-empty", ["eval", "--adapter", ""], 2, "--adapter is empty"),
    ("memory-png-empty", ["memory", "--png", ""], 2, "--png is empty"),
    ("compare-seeds-empty", ["compare", "--seeds", ","], 2, "the seed list is empty"),
    # -- files and folders -----------------------------------------------------------
    ("eval-adapter-missing", ["eval", "--adapter", "{tmp}/none"], 2,
     "--adapter {tmp}/none: folder not found"),
    ("eval-adapter-not-an-adapter", ["eval", "--adapter", "{tmp}/fake_adapter"], 2,
     "has no adapter_config.json"),
    ("generate-adapter-missing", ["generate", "--adapter", "{tmp}/none"], 2,
     "--adapter {tmp}/none: folder not found"),
    ("generate-adapter-is-a-file", ["generate", "--adapter", "{tmp}/file"], 2,
     "is a file, not an adapter folder"),
    ("export-adapter-missing", ["export", "--adapter", "{tmp}/none", "--out", "{tmp}/hf"], 2,
     "--adapter {tmp}/none: folder not found"),
    ("import-adapter-missing", ["import", "--adapter", "{tmp}/none", "--out", "{tmp}/mp"], 2,
     "--adapter {tmp}/none: folder not found"),
    ("pretrain-out-existing-folder", ["pretrain", "--out", "{tmp}/dir"], 2,
     "--out {tmp}/dir is a folder"),
    ("pretrain-out-existing-file", ["pretrain", "--out", "{tmp}/file"], 2,
     "already exists: pass --overwrite"),
    ("pretrain-out-parent-missing", ["pretrain", "--out", "{tmp}/none/base.safetensors"], 2,
     "does not exist: create it first"),
    ("memory-png-parent-missing", ["memory", "--png", "{tmp}/none/m.png"], 2,
     "does not exist: create it first"),
    ("memory-png-is-a-folder", ["memory", "--png", "{tmp}/dir"], 2, "--png {tmp}/dir is a folder"),
    ("finetune-out-under-a-file", ["finetune", "--out", "{tmp}/file/sub"], 2,
     "is a file, so no folder can be made"),
    ("compare-out-is-a-file", ["compare", "--out", "{tmp}/file"], 2,
     "cannot write to output folder"),
    ("export-out-under-a-file", ["export", "--base", "--out", "{tmp}/file/hf"], 2,
     "is a file, so no folder can be made"),
    ("docs-out-under-a-file", ["docs", "--out", "{tmp}/file/site"], 2,
     "is a file, so no folder can be made"),
    # -- generation ------------------------------------------------------------------
    ("generate-temperature-nan", ["generate", "--temperature", "nan"], 2,
     "--temperature: must be a finite number >= 0"),
    ("generate-temperature-inf", ["generate", "--temperature", "inf"], 2,
     "--temperature: must be a finite number >= 0"),
    ("generate-temperature-negative", ["generate", "--temperature", "-0.5"], 2,
     "--temperature: must be a finite number >= 0"),
    ("generate-top-k-negative", ["generate", "--top-k", "-2"], 2, "--top-k: must be a positive integer"),
    ("generate-max-new-tokens-negative", ["generate", "--max-new-tokens", "-5"], 2,
     "--max-new-tokens: must be a positive integer"),
    ("generate-max-new-tokens-zero", ["generate", "--max-new-tokens", "0"], 2,
     "--max-new-tokens: must be a positive integer"),
    ("generate-max-new-tokens-beyond-context", ["generate", "--max-new-tokens", "1000"], 2,
     "at most 116 new tokens fit: give --max-new-tokens 116 or fewer"),
    ("generate-prompt-beyond-context", ["generate", "--prompt", "x" * 200], 2,
     "shorten --prompt to at most 127 characters"),
    ("generate-seed-negative", ["generate", "--seed", "-1"], 2, "--seed: must be an integer >= 0"),
    # -- memory ----------------------------------------------------------------------
    ("memory-batch-huge", ["memory", "--batch-size", "1000000"], 2, "bytes available"),
    ("memory-batch-negative", ["memory", "--batch-size", "-1"], 2,
     "batch_size must be a positive integer"),
    ("memory-seq-len-zero", ["memory", "--seq-len", "0"], 2, "seq_len must be a positive integer"),
    ("memory-seq-len-beyond-context", ["memory", "--seq-len", "1000"], 2, "seq_len"),
    ("memory-method-unknown", ["memory", "--method", "nope"], 2, "unknown method 'nope'; choose"),
    ("memory-config-unknown", ["memory", "--config", "gpt5"], 2, "unknown preset 'gpt5': choose"),
    ("memory-dtype-unknown", ["memory", "--dtype", "fp8"], 2, "unknown dtype 'fp8': choose"),
    ("memory-png-estimate-only", ["memory", "--png", "{tmp}/m.png", "--estimate-only"], 2,
     "--png draws profiled steps"),
    ("memory-checkpointing-all", ["memory", "--method", "all", "--checkpointing"], 2,
     "--checkpointing compares one method"),
    # -- compare ---------------------------------------------------------------------
    ("compare-threads-beyond-cores", ["compare", "--threads", "100000"], 2, "cores"),
    ("compare-threads-negative", ["compare", "--threads", "-1"], 2, "--threads must be >= 0"),
    ("compare-steps-negative", ["compare", "--steps", "-1"], 2, "steps must be >= 1"),
    ("compare-target-nan", ["compare", "--target", "nan"], 2, "target must be in (0, 1], got nan"),
    ("compare-target-above-one", ["compare", "--target", "2"], 2, "target must be in (0, 1]"),
    ("compare-method-unknown", ["compare", "--methods", "lora,nope"], 2, "unknown method 'nope'"),
    ("compare-lr-grid-negative", ["compare", "--lr", "lora=-1e-3"], 2, "learning rates must be positive"),
    ("compare-eval-every-zero", ["compare", "--eval-every", "0"], 2, "eval_every must be >= 1"),
    # -- bench -----------------------------------------------------------------------
    ("bench-steps-negative", ["bench", "--steps", "-1"], 2, "--steps: must be a positive integer"),
    ("bench-warmup-negative", ["bench", "--warmup", "-1"], 2, "--warmup: must be an integer >= 0"),
    ("bench-threads-zero", ["bench", "--threads", "0"], 2, "--threads: must be a positive integer"),
    # -- forgetting -----------------------------------------------------------------------
    ("forgetting-steps-zero", ["forgetting", "--steps", "0"], 2, "--steps: must be a positive integer"),
    ("forgetting-method-unknown", ["forgetting", "--methods", "full,nope"], 2,
     "unknown method 'nope'"),
    ("forgetting-lr-negative", ["forgetting", "--lr", "lora=-1e-3"], 2,
     "learning rates for 'lora' must be positive"),
    ("forgetting-lr-other-method", ["forgetting", "--methods", "full,lora", "--lr", "ia3=1e-2"], 2,
     "not among the methods"),
    ("forgetting-lr-malformed", ["forgetting", "--lr", "lora"], 2, "--lr takes METHOD=LR"),
    ("forgetting-seeds-twice", ["forgetting", "--seeds", "1,1"], 2, "distinct"),
    ("forgetting-answer-examples", ["forgetting", "--answer-examples", "70"], 2, "multiple of 50"),
    ("forgetting-every-beyond-steps", ["forgetting", "--steps", "10", "--every", "20"], 2,
     "more than steps"),
    ("forgetting-threads-beyond-cores", ["forgetting", "--threads", "100000"], 2, "cores"),
    ("forgetting-task-unknown", ["forgetting", "--task", "nope"], 2, "unknown task 'nope'"),
    ("forgetting-out-is-a-file", ["forgetting", "--out", "{tmp}/file"], 2, "is a file"),
    ("forgetting-out-empty", ["forgetting", "--out", ""], 2, "--out is empty"),
    # -- the command line itself ---------------------------------------------------------
    ("unknown-subcommand", ["finetuen"], 2, "invalid choice: 'finetuen'"),
    ("option-without-value", ["finetune", "--lr"], 2, "--lr: expected one argument"),
]


class WorkStarted(BaseException):
    """Raised by the tripwires: a bad input got as far as real work (not caught by main)."""


def install_tripwires(setattr):
    """Replace every job that loads, trains, profiles or writes with one that raises WorkStarted."""
    import minipeft.memory as M
    import minipeft.tools.bench as BE
    import minipeft.tools.docs as D
    import minipeft.tools.interop as I
    import minipeft.workflows.base as B
    import minipeft.workflows.compare as C
    import minipeft.workflows.finetune as F
    import minipeft.workflows.forgetting as FG

    def trip(name):
        def fn(*a, **k):
            raise WorkStarted(name)
        return fn

    for mod, name in [(B, "load_base"), (B, "pretrain"), (F, "finetune"), (F, "load_finetuned"),
                      (F, "load_base"), (C, "compare"), (M, "profile_step"),
                      (M, "checkpointing_tradeoff"), (BE, "run_bench"), (D, "build"),
                      (I, "import_peft_adapter"), (I, "save_hf_gpt2"), (I, "export_peft_adapter"),
                      (FG, "forgetting_sweep")]:
        setattr(mod, name, trip(f"{mod.__name__}.{name}"))


@pytest.fixture
def tripwires(monkeypatch):
    install_tripwires(monkeypatch.setattr)


def _layout(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("something a user saved")
    (tmp_path / "fake_adapter").mkdir()
    (tmp_path / "fake_adapter" / "notes.txt").write_text("not an adapter")


def _run(argv):
    """(exit code, stderr) of ``main(argv)``, whether it returns or exits."""
    try:
        return main(argv), None
    except SystemExit as exc:
        return exc.code, None


@pytest.mark.parametrize("argv, code, fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_in_one_line_before_any_work(argv, code, fragment, tmp_path,
                                                          tripwires, capsys, monkeypatch):
    _layout(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _ = _run(argv)
    out, err = capsys.readouterr()
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    # the error itself is the last line: one line (argparse puts its usage above it)
    last = lines[-1]
    assert last.startswith("minipeft"), err
    assert ": error: " in last
    assert fragment.replace("{tmp}", str(tmp_path)) in last, last
    # nothing was written, nothing a user saved was touched
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_the_table_covers_every_subcommand_and_enough_kinds():
    from minipeft.tools.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    covered = {r[1][0] for r in ROWS}
    assert commands - {"info"} <= covered        # info takes no input
    assert len({r[0] for r in ROWS}) == len(ROWS) >= 45


def test_a_bad_option_from_a_real_process_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "minipeft", "finetune", "--lr", "-1e-3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "argument --lr: must be a positive finite number (e.g. 1e-2); leave --lr out to use "
        "the method's best known rate, got '-1e-3'")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"temperature": "0.8"}, "temperature must be a finite number >= 0"),
    ({"top_k": 0}, "top_k must be a positive integer or None"),
    ({"top_k": 2.5}, "top_k must be a positive integer or None"),
    ({"top_k": True}, "top_k must be a positive integer or None"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0"),
    ({"max_new_tokens": float("nan")}, "max_new_tokens must be an integer >= 0"),
    ({"max_new_tokens": 200}, "ask for at most 124 new tokens (max_new_tokens; --max-new-tokens"),
    ({"stop_token": 96}, "stop_token must be a token id in [0, 96)"),
])
def test_generate_refuses_bad_settings_through_the_api(kwargs, fragment):
    import numpy as np

    from minipeft.nn.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, n_positions=128, vocab_size=96), seed=0)
    call = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError) as exc:
        model.generate(np.zeros((1, 4), dtype=np.int64), call.pop("max_new_tokens"), **call)
    assert fragment in str(exc.value)


def test_memory_compares_the_estimate_with_the_memory_available(tripwires, capsys, monkeypatch):
    import minipeft.tools.cli as cli
    from minipeft import memory as M

    est = M.estimate("reference", cli.build_config("lora", cli.build_parser().parse_args(
        ["memory"])), batch_size=64, seq_len=128)
    # less than one step needs: refused, with both numbers
    monkeypatch.setattr(cli, "available_memory", lambda: int(est.peak) - 1)
    assert main(["memory", "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert f"would need about {est.peak:,.0f} bytes" in err
    assert f"this machine has {int(est.peak) - 1:,d} bytes available" in err
    # enough, or unknown (no /proc/meminfo): the step runs (here, into the tripwire)
    for free in (int(est.peak) + 1, None):
        monkeypatch.setattr(cli, "available_memory", lambda free=free: free)
        with pytest.raises(WorkStarted, match="profile_step"):
            main(["memory", "--batch-size", "64"])


def test_available_memory_reads_meminfo():
    from minipeft.tools.cli import available_memory

    free = available_memory()
    if os.path.isfile("/proc/meminfo"):
        assert isinstance(free, int) and free > 0
    else:
        assert free is None
