"""A save is one commit, and a refused load touches nothing.

* A save over an existing adapter, stopped just before or just after each
  file-system call it makes (an exception, Ctrl-C), leaves a folder that
  loads as exactly the old adapter or exactly the new one: weights, config
  and run record. The next save removes what it left.
* The same holds for a process killed (SIGKILL: no clean-up runs) at random
  moments while it saves two adapters in turn.
* A load that is refused (wrong rank, names, shapes, base, a missing file)
  leaves the caller's model as it was; a read-only folder loads, and a load
  writes nothing.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

import numpy as np
import pytest
from peft_cases import host, logits_of, small_base, tokens

from minipeft import io
from minipeft.peft import LoraConfig, PeftModel, get_peft_model
from minipeft.peft.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    REPLACES_DIGEST,
    RUN_RECORD,
    WEIGHTS_DIGEST,
    read_adapter_files,
)

TARGETS = ["c_attn", "c_fc"]
#: the three files of an adapter saved with a run record
ALL_FILES = sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_RECORD])
STAMPS = (WEIGHTS_DIGEST, REPLACES_DIGEST)


def _adapter(alpha, seed):
    """A LoRA adapter with non-zero weights; two alphas give same-shaped, different adapters."""
    pm = get_peft_model(small_base(), LoraConfig(r=2, lora_alpha=alpha, target_modules=TARGETS))
    rng = np.random.default_rng(seed)
    for p in pm.trainable_parameters():
        p.data = rng.standard_normal(p.shape).astype(p.dtype)
    return pm


def _record(name):
    return {"task": f"task-{name}", "score": {"a": 0.25, "b": 0.75}[name], "settings": {"lr": 1e-3}}


def _snapshot(files):
    """(config, arrays, run record) of what a folder loads as, stamps included."""
    return files.meta, {k: v.tobytes() for k, v in files.state.items()}, files.run_record


def _unstamped(snapshot):
    meta, state, record = snapshot
    strip = (lambda d: None if d is None else {k: v for k, v in d.items() if k not in STAMPS})
    return strip(meta), state, strip(record)


def _load_quietly(folder):
    """read_adapter_files, and whether it warned (a copy left by a stopped save was ignored)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = read_adapter_files(folder)
    return files, bool(caught)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Folders holding adapter A; B saved over A (with a record, and without); what each loads as."""
    root = tmp_path_factory.mktemp("pair")
    a, b = _adapter(4.0, 0), _adapter(8.0, 1)
    a.save_pretrained(root / "a", run_record=_record("a"))
    shutil.copytree(root / "a", root / "b")
    b.save_pretrained(root / "b", run_record=_record("b"))
    shutil.copytree(root / "a", root / "b-alone")
    b.save_pretrained(root / "b-alone")
    old, new, alone = (_snapshot(read_adapter_files(root / n)) for n in ("a", "b", "b-alone"))
    assert old[1].keys() == new[1].keys() and old[1] != new[1] and old[0] != new[0]
    assert alone[2] is None and alone[:2] == new[:2]
    return dict(root=root, a=a, b=b, old=old, new=new, alone=alone)


# ---------------------------------------------------------------------------
# Stopped at every file-system step
# ---------------------------------------------------------------------------

#: every call through which a save touches the file system
STEPS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "fsync"),
         (os, "open"), (os, "close"), (os, "chmod"), (os, "mkdir"), (os, "listdir"),
         (tempfile, "mkstemp"), (io, "open"), (fcntl, "flock")]


class Faults:
    """Count the save's file-system calls; raise at call number ``at``, before or after it runs."""

    def __init__(self, monkeypatch, at=None, when="before", exc=None):
        self.calls, self.at, self.when, self.exc = [], at, when, exc
        for owner, name in STEPS:
            real = getattr(owner, name) if hasattr(owner, name) else builtins.open
            monkeypatch.setattr(owner, name, self._wrap(name, real), raising=False)

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.calls.append(name)
            hit = len(self.calls) == self.at
            if hit and self.when == "before":
                raise self.exc
            out = real(*args, **kwargs)
            if hit and self.when == "after":
                raise self.exc
            return out
        return call


#: what stopped saves of this and of the older layout leave, for the next save to remove
LEFTOVERS = [f".{ADAPTER_WEIGHTS}.dead.tmp", f".{RUN_RECORD}.dead.tmp",
             f".{ADAPTER_CONFIG}.1234abcd.new", f".{ADAPTER_WEIGHTS}.1234abcd.old"]


def _stopped_save(pair, folder, monkeypatch, record=True, **faults):
    """Save B over A (and leftovers) in ``folder`` with ``Faults(**faults)``; the calls it made."""
    shutil.copytree(pair["root"] / "a", folder)
    for name in LEFTOVERS:
        (folder / name).write_bytes(b"left by a stopped save")
    with monkeypatch.context() as m:
        f = Faults(m, **faults)
        try:
            pair["b"].save_pretrained(folder, run_record=_record("b") if record else None)
        except BaseException as exc:        # the injected fault (maybe explained), nothing else
            chain = [exc]
            while chain[-1].__cause__ is not None:
                chain.append(chain[-1].__cause__)
            assert faults.get("exc") in chain, exc
        # (no error at all is right where the save expects one: mkdir of an existing
        # folder, the best-effort flush of a folder)
    return f.calls


@pytest.mark.parametrize("record", [True, False], ids=["with-record", "without-record"])
def test_a_save_stopped_at_any_step_loads_as_the_old_or_the_new_adapter(record, pair, tmp_path,
                                                                       monkeypatch):
    calls = _stopped_save(pair, tmp_path / "count", monkeypatch, record)
    new = pair["new"] if record else pair["alone"]
    files = ALL_FILES if record else sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert _snapshot(read_adapter_files(tmp_path / "count")) == new
    assert sorted(os.listdir(tmp_path / "count")) == files
    # the save touches the folder through each kind of call that matters
    assert {"replace", "fsync", "mkstemp", "open", "unlink", "flock"} <= set(calls)
    landed = {"old": 0, "new": 0, "warned": 0}
    faults = [OSError(28, "No space left on device"), KeyboardInterrupt("Ctrl-C")]
    for at in range(1, len(calls) + 1):
        for when in ("before", "after"):
            for exc in faults:
                folder = tmp_path / f"{at}-{when}-{type(exc).__name__}"
                _stopped_save(pair, folder, monkeypatch, record, at=at, when=when, exc=exc)
                loaded, warned = _load_quietly(folder)
                got = _snapshot(loaded)
                assert got in (pair["old"], new), (at, calls[at - 1], when, exc)
                landed["old" if got == pair["old"] else "new"] += 1
                landed["warned"] += warned
                # the next save removes whatever was left and commits
                pair["b"].save_pretrained(folder, run_record=_record("b") if record else None)
                assert sorted(os.listdir(folder)) == files
                loaded, warned = _load_quietly(folder)
                assert not warned
                assert _unstamped(_snapshot(loaded)) == _unstamped(new)
                shutil.rmtree(folder)
    print(f"\n{len(calls)} file-system calls; {4 * len(calls)} stopped saves: {landed}")
    # both outcomes happen: the commit is somewhere in the middle, not at either end
    assert landed["old"] and landed["new"]


def test_the_weights_file_is_the_commit_point(pair, tmp_path, monkeypatch):
    # a save stopped just before the weights' rename is the old adapter, with the new
    # copies beside it ignored; just after, the new one
    calls = _stopped_save(pair, tmp_path / "count", monkeypatch)
    replaces = [i + 1 for i, c in enumerate(calls) if c == "replace"]
    # three renames: the config copy, the run record copy, then the weights
    assert len(replaces) == 3
    commit = replaces[-1]
    _stopped_save(pair, tmp_path / "before", monkeypatch, at=commit, when="before",
                  exc=KeyboardInterrupt())
    files, warned = _load_quietly(tmp_path / "before")
    assert _snapshot(files) == pair["old"] and warned
    on_disk = json.loads((tmp_path / "before" / ADAPTER_CONFIG).read_text())
    assert on_disk == pair["new"][0]        # the new copy is there, and ignored
    _stopped_save(pair, tmp_path / "after", monkeypatch, at=commit, when="after",
                  exc=KeyboardInterrupt())
    assert _snapshot(read_adapter_files(tmp_path / "after")) == pair["new"]


def test_a_save_without_a_run_record_removes_the_old_one(pair, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(pair["root"] / "a", folder)
    pair["b"].save_pretrained(folder)
    assert sorted(os.listdir(folder)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert read_adapter_files(folder).run_record is None
    # a stale record left beside it (a save stopped before removing it) is ignored, warned
    shutil.copy(pair["root"] / "a" / RUN_RECORD, folder / RUN_RECORD)
    with pytest.warns(UserWarning, match="belongs to the adapter these weights replaced"):
        assert read_adapter_files(folder).run_record is None


# ---------------------------------------------------------------------------
# Killed at random moments
# ---------------------------------------------------------------------------

SAVER = """
import os, sys
sys.path.insert(0, {tests!r})
from peft_cases import small_base
from minipeft.peft import PeftModel
from minipeft.peft.model import read_adapter_files

# the two adapters, each with its own run record, read from reference folders
pairs = []
for ref in {refs!r}:
    files = read_adapter_files(ref)
    pairs.append((PeftModel.from_pretrained(small_base(), files), files.run_record))
print("ready", flush=True)
# for each line read: fork a saver that saves A, B, A, ... into the folder until killed
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        # before each save, which adapter it writes (one small write: whole or not at all)
        progress = os.open({progress!r}, os.O_WRONLY | os.O_CREAT)
        n = 0
        while True:
            pm, record = pairs[n % 2]
            os.pwrite(progress, b"AB"[n % 2:n % 2 + 1], 0)
            pm.save_pretrained({folder!r}, run_record=record)
            n += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_a_save_killed_at_random_moments_loads_as_one_adapter(pair, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(pair["root"] / "a", folder)
    refs = [str(pair["root"] / n) for n in "ab"]
    progress = tmp_path / "saving"
    code = SAVER.format(tests=os.path.dirname(__file__), refs=refs, folder=str(folder),
                        progress=str(progress))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    # one process imports once and forks each saver, so that a kill costs milliseconds
    zygote = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rng = random.Random(0)
    wanted = {"old": _unstamped(pair["old"]), "new": _unstamped(pair["new"])}
    seen = {"A": 0, "B": 0, "old": 0, "new": 0, "stale copy ignored": 0, "leftovers": 0}
    kills, start, pid = 0, time.monotonic(), None
    try:
        assert zygote.stdout.readline().strip() == "ready"
        # bounded by count, and by a time cap for a very busy machine
        while kills < 60 and time.monotonic() - start < 50:
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.2))     # a save takes tens of ms
            os.kill(pid, signal.SIGKILL)
            assert zygote.stdout.readline().strip() == "reaped"
            kills += 1
            files, warned = _load_quietly(folder)
            got = _unstamped(_snapshot(files))
            assert got in wanted.values(), f"kill {kills}: a mix of two adapters"
            name = "A" if got == wanted["old"] else "B"
            seen[name] += 1
            # new: the save the kill stopped had committed (or it had just finished)
            seen["new" if progress.read_text() == name else "old"] += 1
            seen["stale copy ignored"] += warned
            seen["leftovers"] += any(n.startswith(".") for n in os.listdir(folder))
            # the run record is the one saved with these weights
            assert files.run_record["task"] == f"task-{name.lower()}"
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        zygote.stdin.close()
        zygote.kill()
        zygote.wait()
    print(f"\n{kills} kills: {seen}")
    assert kills >= 50
    assert seen["A"] and seen["B"] and seen["old"] and seen["new"]


# ---------------------------------------------------------------------------
# A refused load touches nothing
# ---------------------------------------------------------------------------


def _state_of(model):
    """Everything a refused load must leave as it was."""
    return (model.get_nb_trainable_parameters() if isinstance(model, PeftModel)
            else sum(p.size for p in model.parameters() if p.requires_grad),
            [(n, type(m).__name__) for n, m in model.named_modules()],
            {n: (host(p).tobytes(), p.requires_grad) for n, p in model.named_parameters()},
            getattr(model, "active_adapter", None), list(getattr(model, "adapters", {})))


def _edit_config(folder, **config):
    path = folder / ADAPTER_CONFIG
    meta = json.loads(path.read_text())
    meta["config"].update(config)
    path.write_text(json.dumps(meta))


def _respell_weights(folder, change):
    """Rewrite the weights (without their digest: as a hand-made file would be)."""
    state, _ = io.load_tensors(folder / ADAPTER_WEIGHTS)
    meta = read_adapter_files(folder).meta
    io.save_tensors(change(state), folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))


REFUSALS = {
    "wrong r": (lambda f: _edit_config(f, r=4), ValueError, "shape mismatch"),
    "wrong names": (lambda f: _edit_config(f, target_modules=["c_attn", "c_proj"]), ValueError,
                    "missing .*unexpected"),
    "wrong shapes": (lambda f: _respell_weights(f, lambda s: {k: v[:1] for k, v in s.items()}),
                     ValueError, "shape mismatch"),
    "renamed weights": (lambda f: _respell_weights(
        f, lambda s: {k.replace("c_fc", "c_proj"): v for k, v in s.items()}),
        ValueError, "missing .*unexpected"),
    "wrong count": (lambda f: (lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "trainable_count": 7})))(f / ADAPTER_CONFIG),
        ValueError, "records trainable_count 7"),
    "missing weights": (lambda f: os.remove(f / ADAPTER_WEIGHTS), FileNotFoundError,
                        ADAPTER_WEIGHTS),
    "missing config": (lambda f: os.remove(f / ADAPTER_CONFIG), FileNotFoundError,
                       ADAPTER_CONFIG),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_load_leaves_the_model_untouched(case, pair, tmp_path):
    spoil, error, message = REFUSALS[case]
    folder = tmp_path / "adapter"
    shutil.copytree(pair["root"] / "a", folder)
    spoil(folder)
    base = small_base()
    before = _state_of(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # an edited config is announced, then checked
        with pytest.raises(error, match=message):
            PeftModel.from_pretrained(base, folder)
    assert _state_of(base) == before
    # load_adapter onto a PeftModel: no adapter added, the active one still active
    pm = get_peft_model(small_base(), LoraConfig(r=3, target_modules=["c_proj"]))
    before = _state_of(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            pm.load_adapter(folder, "other")
    assert _state_of(pm) == before


def test_loading_onto_another_base_touches_nothing(pair):
    for target in (small_base(seed=1), get_peft_model(small_base(seed=1), LoraConfig(r=2))):
        before = _state_of(target)
        with pytest.raises(ValueError, match="trained on another base model"):
            if isinstance(target, PeftModel):
                target.load_adapter(pair["root"] / "a", "other")
            else:
                PeftModel.from_pretrained(target, pair["root"] / "a")
        assert _state_of(target) == before


def test_a_hand_edit_of_the_config_loads_and_is_announced(pair, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(pair["root"] / "a", folder)
    _edit_config(folder, lora_alpha=8.0)
    with pytest.warns(UserWarning, match=r"config\.lora_alpha: it was edited after saving"):
        pm = PeftModel.from_pretrained(small_base(), folder)
    assert pm.peft_config["default"].lora_alpha == 8.0
    # the same weights under alpha 8: adapter B's alpha, adapter A's numbers
    assert not np.array_equal(logits_of(pm, tokens()), logits_of(pair["a"], tokens()))


# ---------------------------------------------------------------------------
# Loads never write; saving into "" is refused
# ---------------------------------------------------------------------------


def test_a_read_only_folder_loads_and_a_load_writes_nothing(pair, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    shutil.copytree(pair["root"] / "a", folder)
    # a concurrent save's staged file, and a copy left by a stopped save: both stay
    staged = folder / f".{ADAPTER_WEIGHTS}.x1y2.tmp"
    staged.write_bytes(b"being written")
    shutil.copy(pair["root"] / "b" / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)

    def refuse(*args, **kwargs):
        raise AssertionError("a load wrote to the file system")

    try:
        # root ignores the modes: make every writing call fail as well
        with monkeypatch.context() as m:
            for owner, name in [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"),
                                (os, "mkdir"), (os, "chmod"), (tempfile, "mkstemp")]:
                m.setattr(owner, name, refuse)
            with pytest.warns(UserWarning, match="stopped before its weights replaced these"):
                pm = PeftModel.from_pretrained(small_base(), folder)
        assert np.array_equal(logits_of(pm, tokens()), logits_of(pair["a"], tokens()))
        assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["", "  ", None, 3])
def test_saving_into_no_folder_is_refused(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="needs a folder to save the adapter in"):
        _adapter(4.0, 0).save_pretrained(where)
    assert os.listdir(tmp_path) == []


def test_an_interrupted_finetune_leaves_no_folder_it_made(tmp_path, monkeypatch):
    import minipeft.workflows.finetune as ft

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "train", stop)
    settings = ft.FinetuneSettings(steps=1, batch_size=2, eval_limit=2)
    for out in (tmp_path / "new", tmp_path / "deeper" / "new"):
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(LoraConfig(), "sentiment", settings, out=str(out), progress=False,
                        zero_shot=False)
    assert os.listdir(tmp_path) == []
    # a folder that was there before stays, with what it held
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "empty").mkdir()
    for out in ("mine", "empty"):
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(LoraConfig(), "sentiment", settings, out=str(tmp_path / out),
                        progress=False, zero_shot=False)
    assert sorted(os.listdir(tmp_path)) == ["empty", "mine"]
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
