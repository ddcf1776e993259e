"""Checkpoints: exact round trips, atomic writes, and clear errors."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import safetensors.numpy

from minipeft import Tensor, backend, io
from minipeft.nn import Module, Parameter


class Tiny(Module):
    """Parameters of both float dtypes and odd shapes, and an integer buffer."""

    def __init__(self, device="cpu", seed=0, n_out=4):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weight = Parameter(rng.standard_normal((3, n_out)), dtype=np.float32, device=device)
        self.bias = Parameter(rng.standard_normal(n_out), dtype=np.float32, device=device)
        self.scale = Parameter(rng.standard_normal((2, 1, 3)), dtype=np.float64, device=device)
        self.register_buffer("positions", backend.to_device(np.arange(5, dtype=np.int64), device))


def host_state(model) -> dict[str, np.ndarray]:
    return {k: backend.asnumpy(v).copy() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def only_file(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_exact(device, tmp_path):
    src = Tiny(device, seed=0)
    path = tmp_path / "model.safetensors"
    io.save_checkpoint(src, path, metadata={"step": "12", "config": json.dumps({"n": 3})})

    state, meta = io.load_checkpoint(path)
    assert meta == {"step": "12", "config": '{"n": 3}'}
    assert_bit_identical(state, host_state(src))
    assert state["scale"].dtype == np.float64      # float64 stays float64
    assert state["weight"].dtype == np.float32

    dst = Tiny(device, seed=1)
    assert io.load_into(dst, path) == meta
    assert dst.device == device
    assert_bit_identical(host_state(dst), host_state(src))


def test_save_tensors_takes_state_dicts_and_tensors(tmp_path):
    t = Tensor(np.linspace(0, 1, 7), dtype=np.float64)
    path = io.save_tensors({"a": t, "b": np.ones((2, 3), np.float32).T}, tmp_path / "t.st")
    state, meta = io.load_checkpoint(path)
    assert meta == {}
    assert state["a"].tobytes() == t.data.tobytes()
    np.testing.assert_array_equal(state["b"], np.ones((3, 2), np.float32))  # made contiguous
    with pytest.raises(TypeError, match="'step': int"):
        io.save_checkpoint({"a": np.ones(2)}, tmp_path / "u.st", metadata={"step": 3})
    with pytest.raises(TypeError, match="Module or a state dict"):
        io.save_checkpoint([np.ones(2)], tmp_path / "v.st")


def test_json_and_bytes_helpers(tmp_path):
    path = tmp_path / "sub" / "cfg.json"                 # missing folders are created
    io.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")
    io.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert only_file(path.parent) == ["cfg.json"]


# ---------------------------------------------------------------------------
# Atomic writes: a failure mid-write leaves the old file and no debris
# ---------------------------------------------------------------------------


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    io.save_checkpoint(Tiny(seed=0), path)
    good = path.read_bytes()

    def half_write_then_die(tensors, filename, metadata=None):
        with open(filename, "wb") as f:              # the temporary file, not `path`
            f.write(b"\x10\x00\x00\x00 half a header")
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(Tiny(seed=1), path)
    assert path.read_bytes() == good
    assert only_file(tmp_path) == ["model.safetensors"]  # the temporary file is gone
    io.load_checkpoint(path)                              # and the old one still loads


def test_failure_at_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "adapter.json"
    io.atomic_write_json(path, {"version": 1})

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        io.atomic_write_json(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert only_file(tmp_path) == ["adapter.json"]


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def test_mismatched_names_and_shapes_are_all_listed(tmp_path):
    path = tmp_path / "other.safetensors"
    state = host_state(Tiny(n_out=5))                   # weight (3, 5), bias (5,)
    del state["scale"]                                  # missing in the file
    state["extra.weight"] = np.zeros(2, np.float32)     # unexpected in the model
    io.save_checkpoint(state, path)

    model = Tiny(n_out=4)
    before = host_state(model)
    with pytest.raises(ValueError) as err:
        io.load_into(model, path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in ("missing: scale", "unexpected: extra.weight",
                   "weight: checkpoint (3, 5) vs model (3, 4)",
                   "bias: checkpoint (5,) vs model (4,)"):
        assert needle in msg, needle
    assert_bit_identical(host_state(model), before)      # nothing was changed


def test_missing_and_foreign_files_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.safetensors"):
        io.load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        io.load_into(Tiny(), tmp_path / "nope.safetensors")

    text = tmp_path / "notes.txt"
    text.write_text("these are not tensors, but quite a long line of text")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        io.load_checkpoint(text)

    good = tmp_path / "good.safetensors"
    io.save_checkpoint(Tiny(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])             # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        io.load_checkpoint(cut)
    with pytest.raises(IsADirectoryError, match="folder"):
        io.load_checkpoint(tmp_path)


def test_unwritable_output_folder_is_named_with_the_reason(tmp_path, monkeypatch):
    # A "folder" that is really a file: refused by the OS even for root.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(NotADirectoryError) as err:
        io.save_checkpoint(Tiny(), blocker / "out" / "model.safetensors")
    assert f"'{blocker / 'out'}'" in str(err.value)
    assert "model.safetensors" in str(err.value)
    with pytest.raises(NotADirectoryError, match="cannot write to output folder"):
        io.ensure_writable_dir(blocker / "out")

    # Permission denied (simulated: the suite may run as root, which chmod cannot stop).
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    locked = tmp_path / "locked"
    with pytest.raises(PermissionError) as err:
        io.save_checkpoint(Tiny(), locked / "model.safetensors")
    assert f"cannot write to output folder '{locked}' (Permission denied)" in str(err.value)
    with pytest.raises(PermissionError, match="Permission denied"):
        io.ensure_writable_dir(locked)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders; the simulated case covers it")
def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"'{folder}'"):
            io.save_checkpoint(Tiny(), folder / "model.safetensors")
    finally:
        folder.chmod(0o700)
