"""Adapter files: save_pretrained then from_pretrained round-trips bit for bit, the file
holds only what the method trained (its size is the count times the dtype size plus a
small header), and a wrong base or a missing file is refused clearly."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from peft_cases import (
    CASES,
    MASKS,
    SMALL,
    P,
    batch,
    config_of,
    host,
    logits_of,
    small_base,
    tokens,
    wrap,
)

from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, PeftModel, get_peft_model
from minipeft.peft.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

#: a safetensors header: names, dtypes, shapes and offsets of a few dozen arrays
HEADER_LIMIT = 4096


def _trained(name, device="cpu", steps=3, base=None, adapter_name="default"):
    pm = wrap(name, base=base if base is not None else small_base(device),
              adapter_name=adapter_name)
    opt = AdamW(pm.trainable_parameters(), lr=2e-2)
    for s in range(steps):
        idx, targets = batch(seed=s)
        _, loss = pm(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return pm


def _safetensors_layout(path):
    """(header bytes, data bytes) of a safetensors file, and its parsed header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return n, os.path.getsize(path) - 8 - n, header


@pytest.mark.parametrize("name", list(CASES))
def test_save_then_load_gives_bit_identical_outputs(name, device, tmp_path):
    pm = _trained(name, device)
    idx = tokens()
    out = logits_of(pm, idx)
    assert not np.array_equal(out, logits_of(small_base(device), idx))
    pm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])

    loaded = PeftModel.from_pretrained(small_base(device), tmp_path)
    assert np.array_equal(logits_of(loaded, idx), out)
    # loaded for inference: nothing trains, until asked
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(small_base(device), tmp_path, is_trainable=True)
    assert np.array_equal(logits_of(trainable, idx), out)
    # (prefix tuning's MLP is not saved: the prefixes it made are what trains on)
    assert trainable.get_nb_trainable_parameters()[0] == pm.adapters["default"].trainable_count(pm)
    # the generated text agrees too
    assert np.array_equal(loaded.generate(idx, 3, temperature=0), pm.generate(idx, 3, temperature=0))


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])
def test_an_inference_adapter_stays_frozen_through_switching(name, tmp_path):
    _trained(name).save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(small_base(), tmp_path)
    with pm.disable_adapter():
        pass
    pm.set_adapter("default")
    assert pm.get_nb_trainable_parameters()[0] == 0
    assert all(p.grad_mask is None for p in pm.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_file_holds_only_what_the_method_trained(name, tmp_path):
    pm = _trained(name, steps=1)
    pm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    n_header, n_data, header = _safetensors_layout(tmp_path / ADAPTER_WEIGHTS)
    assert n_header < HEADER_LIMIT
    C, L = SMALL["n_embd"], SMALL["n_layer"]
    if name in MASKS:
        # k float32 values and k int32 flat indices per masked weight
        k = pm.get_nb_trainable_parameters()[0]
        assert n_data == k * (4 + 4)
        assert meta["trainable_count"] == k
        dtypes = {v["dtype"] for key, v in header.items() if key != "__metadata__"}
        assert dtypes == {"F32", "I32"}
    elif name == "prefix_projection":
        # the P x n_layer x 2 x n_embd prefixes the MLP produces, not the MLP
        assert n_data == P * L * 2 * C * 4
        assert meta["trainable_count"] == P * L * 2 * C
        assert pm.get_nb_trainable_parameters()[0] > P * L * 2 * C
    elif name == "lora_fa":
        # the frozen A is part of the adapter (an ordinary LoRA file), beside the trained B
        count = pm.get_nb_trainable_parameters()[0]
        frozen_A = sum(p.size for n, p in pm.adapters["default"].named_parameters(pm).items()
                       if n.endswith(".lora_A"))
        assert frozen_A > 0 and n_data == (count + frozen_A) * 4
        assert meta["trainable_count"] == count
    else:
        count = pm.get_nb_trainable_parameters()[0]
        assert n_data == count * 4
        assert meta["trainable_count"] == count
    assert meta["config"] == pm.peft_config["default"].to_dict()
    assert meta["base_config"]["n_embd"] == C


def test_reference_lora_file_size(tmp_path):
    from minipeft import GPT, GPTConfig
    pm = get_peft_model(GPT(GPTConfig(), seed=0), LoraConfig(r=8, target_modules=["c_attn"]))
    pm.save_pretrained(tmp_path)
    n_header, n_data, _ = _safetensors_layout(tmp_path / ADAPTER_WEIGHTS)
    assert n_data == 16_384 * 4
    assert os.path.getsize(tmp_path / ADAPTER_WEIGHTS) == 8 + n_header + 65_536
    assert n_header < 2048


def test_prefix_with_projection_loads_as_plain_prefixes(tmp_path):
    pm = _trained("prefix_projection")
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(small_base(), tmp_path, is_trainable=True)
    names = [n for n, _ in loaded.named_parameters() if "prompt_encoder" in n]
    assert names == ["prompt_encoder.default.embedding"]
    assert loaded.get_nb_trainable_parameters()[0] == P * SMALL["n_layer"] * 2 * SMALL["n_embd"]


def test_loading_onto_another_base_is_refused(tmp_path):
    pm = _trained("lora")
    pm.save_pretrained(tmp_path)
    other = small_base(seed=1)
    before = {n: host(p) for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"trained on another base model \(fingerprint"):
        PeftModel.from_pretrained(other, tmp_path)
    # refused before touching the model
    assert [n for n, _ in other.named_parameters()] == list(before)
    assert all(p.requires_grad for p in other.parameters())
    # one changed number is enough
    tweaked = small_base()
    tweaked.h[1].ln_2.bias.data[3] += 1e-6
    with pytest.raises(ValueError, match="fingerprint"):
        PeftModel.from_pretrained(tweaked, tmp_path)
    # and load_adapter onto a PeftModel of another base
    host_pm = get_peft_model(small_base(seed=1), LoraConfig(r=2))
    with pytest.raises(ValueError, match="fingerprint"):
        host_pm.load_adapter(tmp_path, "other")
    assert list(host_pm.adapters) == ["default"]


def test_the_fingerprint_ignores_adapters_and_dtype_matters():
    from minipeft.peft.model import fingerprint
    base = small_base()
    fp = fingerprint(base)
    pm = _trained("lora", base=base)
    assert fingerprint(pm.base_model) == fp == pm.base_fingerprint
    assert fingerprint(small_base(dtype=np.float64)) != fp


@pytest.mark.parametrize("missing", [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
def test_missing_files_name_the_file(missing, tmp_path):
    _trained("lora", steps=1).save_pretrained(tmp_path)
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        PeftModel.from_pretrained(small_base(), tmp_path)
    with pytest.raises(FileNotFoundError, match=missing):
        get_peft_model(small_base(), LoraConfig(r=2)).load_adapter(tmp_path, "b")


def test_a_corrupt_config_is_refused(tmp_path):
    _trained("lora", steps=1).save_pretrained(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PeftModel.from_pretrained(small_base(), tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"config": {"peft_type": "LORA"}}))
    with pytest.raises(ValueError, match="no 'base_fingerprint'"):
        PeftModel.from_pretrained(small_base(), tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    from minipeft import io
    pm = _trained("lora", steps=1)
    pm.save_pretrained(tmp_path)
    state, _ = io.load_tensors(tmp_path / ADAPTER_WEIGHTS)
    name = next(iter(state))
    state[name] = state[name][:1]
    io.save_tensors(state, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match="shape mismatch"):
        PeftModel.from_pretrained(small_base(), tmp_path)


# ---------------------------------------------------------------------------
# The two files of an adapter change together
# ---------------------------------------------------------------------------


def _files(folder):
    """{name: bytes} of every file in ``folder``, hidden helper files included."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _fail_when_replacing(monkeypatch, target, exc):
    """Make ``os.replace`` raise ``exc`` when it would put a file at ``target``."""
    real = os.replace

    def replace(src, dst):
        if os.path.abspath(dst) == os.path.abspath(target):
            raise exc
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"),
                                 KeyboardInterrupt("interrupted between the two files")])
def test_a_save_that_fails_between_the_files_leaves_the_previous_adapter(exc, tmp_path,
                                                                         monkeypatch):
    idx = tokens()
    first = _trained("lora", steps=1)
    first.save_pretrained(tmp_path)
    before, out_first = _files(tmp_path), logits_of(first, idx)
    second = _trained("lora", steps=3)
    # the new weights are already in place when replacing the config fails
    _fail_when_replacing(monkeypatch, tmp_path / ADAPTER_CONFIG, exc)
    with pytest.raises(type(exc)):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    # the previous adapter, byte for byte, and nothing left over
    assert _files(tmp_path) == before
    assert np.array_equal(logits_of(PeftModel.from_pretrained(small_base(), tmp_path), idx),
                          out_first)
    # and the next save goes through
    second.save_pretrained(tmp_path)
    assert np.array_equal(logits_of(PeftModel.from_pretrained(small_base(), tmp_path), idx),
                          logits_of(second, idx))
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])


def test_a_first_save_that_fails_between_the_files_leaves_no_adapter(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    _fail_when_replacing(monkeypatch, tmp_path / ADAPTER_CONFIG, OSError(5, "I/O error"))
    with pytest.raises(OSError):
        _trained("lora", steps=1).save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


def _older_layout(folder, pm):
    """Write ``pm``'s adapter as the older layout did: two files that record one digest."""
    from minipeft import io
    from minipeft.peft.model import read_adapter

    pm.save_pretrained(folder)
    meta, state = read_adapter(folder)
    meta = {k: v for k, v in meta.items() if k != "replaces_sha256"}
    io.atomic_write_json(folder / ADAPTER_CONFIG, meta)
    io.save_tensors(state, folder / ADAPTER_WEIGHTS,
                    metadata={"format": "minipeft-adapter-1", "weights_sha256": meta["weights_sha256"]})
    return meta, state


def test_an_older_layout_pair_left_by_a_stopped_save_is_refused_and_either_adapter_recovered(
        tmp_path):
    # what an older save stopped between its two renames left: new weights beside the old
    # config, the new config and the old weights under hidden names
    import shutil

    from minipeft.peft.model import read_adapter

    a_dir, b_dir, folder = tmp_path / "a", tmp_path / "b", tmp_path / "adapter"
    a_meta, a_state = _older_layout(a_dir, _trained("lora", steps=1))
    b_meta, b_state = _older_layout(b_dir, _trained("lora", steps=3))
    folder.mkdir()
    shutil.copy(a_dir / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    shutil.copy(b_dir / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    shutil.copy(b_dir / ADAPTER_CONFIG, folder / f".{ADAPTER_CONFIG}.1234abcd.new")
    shutil.copy(a_dir / ADAPTER_WEIGHTS, folder / f".{ADAPTER_WEIGHTS}.1234abcd.old")
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(small_base(), folder)
    message = " ".join(str(info.value).split())
    assert "do not belong together" in message and "stopped between" in message
    assert "save the adapter again" in message.lower()
    staged = [n for n in os.listdir(folder) if n.startswith(f".{ADAPTER_CONFIG}.")]
    kept = [n for n in os.listdir(folder) if n.startswith(f".{ADAPTER_WEIGHTS}.")]
    assert staged[0] in message and kept[0] in message
    # following the message recovers either adapter exactly
    for spare, name, meta, state in ((staged[0], ADAPTER_CONFIG, b_meta, b_state),
                                     (kept[0], ADAPTER_WEIGHTS, a_meta, a_state)):
        copy = tmp_path / f"recovered-{name}"
        shutil.copytree(folder, copy)
        os.replace(copy / spare, copy / name)
        got_meta, got_state = read_adapter(copy)
        assert got_meta == meta
        assert got_state.keys() == state.keys()
        assert all(np.array_equal(got_state[k], state[k]) for k in state)
    # and a save over it leaves one adapter and no helper files
    pm = _trained("lora", steps=2)
    pm.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert np.array_equal(logits_of(PeftModel.from_pretrained(small_base(), folder), tokens()),
                          logits_of(pm, tokens()))


def test_weights_from_another_adapter_are_refused(tmp_path):
    import shutil

    _trained("lora", steps=1).save_pretrained(tmp_path / "a")
    _trained("lora", steps=3).save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / ADAPTER_WEIGHTS, tmp_path / "a" / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match="do not belong together"):
        PeftModel.from_pretrained(small_base(), tmp_path / "a")


def test_damaged_weights_are_refused(tmp_path):
    _trained("lora", steps=1).save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40                      # one bit of the last array's last number
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged"):
        PeftModel.from_pretrained(small_base(), tmp_path)


def test_an_adapter_saved_without_digests_still_loads(tmp_path):
    # folders written before the digest existed (or by hand) hold none, and load as before
    from minipeft import io

    idx = tokens()
    pm = _trained("lora")
    pm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta.pop("weights_sha256")
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(meta))
    state, _ = io.load_tensors(tmp_path / ADAPTER_WEIGHTS)
    io.save_tensors(state, tmp_path / ADAPTER_WEIGHTS, metadata={"format": "minipeft-adapter-1"})
    loaded = PeftModel.from_pretrained(small_base(), tmp_path)
    assert np.array_equal(logits_of(loaded, idx), logits_of(pm, idx))


@pytest.mark.parametrize("name", ["lora", "bitfit", "mask_random", "prefix_projection",
                                  "ia3", "layers"])
def test_load_adapter_adds_a_second_adapter_that_switches_exactly(name, tmp_path):
    idx = tokens()
    first = _trained(name)
    out_first = logits_of(first, idx)
    first.save_pretrained(tmp_path)

    base = small_base()
    ref = logits_of(base, idx)
    pm = _trained("lora", base=base, adapter_name="mine", steps=2)
    mine = logits_of(pm, idx)
    pm.load_adapter(tmp_path, "loaded")
    assert pm.active_adapter == "loaded"
    assert np.array_equal(logits_of(pm, idx), out_first)
    pm.set_adapter("mine")
    assert np.array_equal(logits_of(pm, idx), mine)
    with pm.disable_adapter():
        assert np.array_equal(logits_of(pm, idx), ref)
    pm.set_adapter("loaded")
    assert np.array_equal(logits_of(pm, idx), out_first)


def test_saving_an_inactive_adapter_saves_its_own_values(tmp_path):
    # selective adapters keep their values aside while inactive; saving one must
    # write those, not what the base holds at that moment
    idx = tokens()
    base = small_base()
    pm = _trained("bitfit", base=base, adapter_name="a")
    out_a = logits_of(pm, idx)
    config, _ = config_of("layers")
    pm.add_adapter("b", config)
    pm.set_adapter("b")
    pm.save_pretrained(tmp_path, adapter_name="a")
    loaded = PeftModel.from_pretrained(small_base(), tmp_path)
    assert np.array_equal(logits_of(loaded, idx), out_a)


def test_mask_files_with_bad_indices_are_refused(tmp_path):
    from minipeft import io
    _trained("mask_random", steps=1).save_pretrained(tmp_path)
    good, _ = io.load_tensors(tmp_path / ADAPTER_WEIGHTS)
    name = next(k for k in good if k.endswith(".indices"))
    stem = name[:-len(".indices")]
    cases = {
        "out of range": (lambda s: s.__setitem__(name, s[name] + 10_000),
                         r"entries must lie in \[0, "),
        "unsorted": (lambda s: s.__setitem__(name, s[name][::-1].copy()),
                     "sorted and distinct"),
        "values too short": (lambda s: s.__setitem__(stem + ".values", s[stem + ".values"][:-1]),
                             "values has shape"),
        "missing weight": (lambda s: s.pop(name), "mask adapter weights do not fit"),
    }
    for _, (spoil, message) in cases.items():
        state = {k: v.copy() for k, v in good.items()}
        spoil(state)
        io.save_tensors(state, tmp_path / ADAPTER_WEIGHTS)
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(small_base(), tmp_path)


LOAD_PAIRS = [("bitfit", "bitfit"), ("layers", "bitfit"), ("bitfit", "layers"),
              ("mask_random", "mask_magnitude"), ("mask_magnitude", "mask_random"),
              ("mask_gradient", "layers")]


@pytest.mark.parametrize("active, loaded", LOAD_PAIRS, ids=[f"{a}+{b}" for a, b in LOAD_PAIRS])
def test_loading_a_selective_adapter_beside_an_active_one_keeps_both(active, loaded, device,
                                                                     tmp_path):
    # both train entries of the same base arrays: loading the second must not
    # overwrite the first one's trained values, nor take them as the base's
    idx = tokens()
    saved = _trained(loaded, steps=2)
    out_saved = logits_of(saved, idx)
    saved.save_pretrained(tmp_path)

    base = small_base(device)
    ref = logits_of(base, idx)
    pm = _trained(active, base=base, adapter_name="mine", steps=2)
    out_mine = logits_of(pm, idx)
    pm.load_adapter(tmp_path, "loaded")
    assert np.array_equal(logits_of(pm, idx), out_saved)
    for _ in range(2):
        pm.set_adapter("mine")
        assert np.array_equal(logits_of(pm, idx), out_mine)
        with pm.disable_adapter():
            assert np.array_equal(logits_of(pm, idx), ref)
        pm.set_adapter("loaded")
        assert np.array_equal(logits_of(pm, idx), out_saved)
    # loading into an adapter that already exists and is inactive works the same way
    pm.set_adapter("mine")
    from minipeft.peft.model import read_adapter
    _, state = read_adapter(tmp_path)
    pm.adapters["loaded"].load_state_dict(pm, state)
    assert np.array_equal(logits_of(pm, idx), out_mine)
    pm.set_adapter("loaded")
    assert np.array_equal(logits_of(pm, idx), out_saved)
    # with the first adapter gone, the second still restores the base exactly
    pm.delete_adapter("mine")
    with pm.disable_adapter():
        assert np.array_equal(logits_of(pm, idx), ref)
    assert np.array_equal(logits_of(pm, idx), out_saved)
    assert np.array_equal(logits_of(pm.unload(), idx), ref)
