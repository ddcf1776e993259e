"""LoRA-FA (``LoraConfig(freeze_A=True)``): A stays at its random start, only B trains, and the
ledger shows the branch keeping xA (N·r floats) instead of x (N·in floats) for backward.

The shared suites (peft_cases ``lora_fa``) cover the identity at initialisation,
save/load, merging and the projection check of B's gradient; these tests hold
what is particular to LoRA-FA."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
from peft_cases import B, T, batch, host, perturb, small_base, tokens

from minipeft import backend
from minipeft.autograd import vjp_check
from minipeft.autograd.function import LEDGER
from minipeft.optim import AdamW
from minipeft.peft import LoraConfig, PeftModel, config_from_dict, get_peft_model

ALL = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
#: in_features of each target in the small model (C = 16, the MLP 4C wide)
IN = {"c_attn": 16, "attn.c_proj": 16, "c_fc": 16, "mlp.c_proj": 64}


def _lora(device="cpu", dtype=np.float32, freeze_A=True, targets=ALL, r=2):
    return get_peft_model(small_base(device, dtype),
                          LoraConfig(r=r, lora_alpha=4.0, target_modules=targets,
                                     freeze_A=freeze_A))


def _saved_activation_floats(pm) -> float:
    """Bytes the graph of one forward pass with loss keeps for backward, parameters left out
    (as the memory accountant counts activations), over 4: read from the activation ledger.
    (Integer targets and boolean masks are in it too, the same in every variant.)"""
    gc.collect()                 # graphs of earlier tests out of the books first
    params = {backend.buffer_id(p.data) for p in pm.parameters()}
    before = set(LEDGER.buffer_ids())
    idx, targets = batch()
    _, loss = pm(idx, targets)
    new = [b for b in LEDGER.buffer_ids() if b not in before and b not in params]
    saved = sum(nbytes for _, nbytes in new)
    del loss
    return saved / 4


def test_only_B_trains_and_A_is_kept_in_the_adapter(device):
    pm = _lora(device)
    method = pm.adapters["default"]
    params = method.named_parameters(pm)
    assert {n.rsplit(".", 1)[1] for n in params} == {"lora_A", "lora_B"}
    for n, p in params.items():
        assert p.requires_grad == n.endswith(".lora_B"), n
    # trainable: B only, 2 blocks x (r x out) over the four targets
    r = 2
    expected = 2 * r * (3 * 16 + 16 + 64 + 16)
    assert pm.get_nb_trainable_parameters()[0] == expected == method.trainable_count(pm)
    # plain LoRA of the same shape trains A as well
    plain = _lora(device, freeze_A=False)
    assert plain.get_nb_trainable_parameters()[0] == expected + 2 * r * (16 + 16 + 16 + 64)


def test_A_is_bit_identical_after_training_and_B_moves(device):
    pm = _lora(device)
    params = pm.adapters["default"].named_parameters(pm)
    A0 = {n: host(p) for n, p in params.items() if n.endswith(".lora_A")}
    B0 = {n: host(p) for n, p in params.items() if n.endswith(".lora_B")}
    opt = AdamW(pm.trainable_parameters(), lr=1e-2)
    for step in range(3):
        idx, targets = batch(seed=step)
        _, loss = pm(idx, targets)
        loss.backward()
        for n in A0:
            assert params[n].grad is None, f"{n} is frozen but got a gradient buffer"
        opt.step()
        opt.zero_grad()
    for n, a in A0.items():
        assert np.array_equal(host(params[n]), a), n
    for n, b in B0.items():
        assert not np.array_equal(host(params[n]), b), f"{n} did not train"
    assert all(id(p) not in opt.state for n, p in params.items() if n in A0)


def test_B_gradients_pass_the_float64_projection_check(device):
    pm = _lora(device, np.float64)
    perturb(pm, scale=0.1)             # B away from zero: the check then sees the whole branch
    idx, targets = batch()
    params = pm.trainable_parameters()
    assert params and all(".lora_B." in n for n, p in pm.named_parameters() if p.requires_grad)
    assert vjp_check(lambda *_: pm(idx, targets)[1], params, trials=2)


def test_B_gets_the_gradient_plain_lora_gives_it(device):
    # the same A, the same B: freezing A changes what is computed, not B's gradient
    fa, plain = _lora(device, np.float64), _lora(device, np.float64, freeze_A=False)
    perturb(fa, scale=0.1)
    for (n, p), (m, q) in zip(fa.named_parameters(), plain.named_parameters()):
        assert n == m
        q.data = p.data.copy()
    idx, targets = batch()
    for pm in (fa, plain):
        pm(idx, targets)[1].backward()
    grads = {n: host(p.grad) for n, p in plain.named_parameters() if n.endswith(".lora_B.default")}
    assert grads
    for n, p in fa.named_parameters():
        if n in grads:
            np.testing.assert_allclose(host(p.grad), grads[n], rtol=1e-12, atol=1e-14, err_msg=n)


@pytest.mark.parametrize("targets", [[t] for t in ALL] + [ALL], ids=ALL + ["all"])
def test_the_ledger_keeps_xA_not_x_exactly_N_in_fewer_floats_per_target(targets, device):
    # LoRA's branch (x A) B keeps x (N·in) for A's gradient and xA (N·r) for B's;
    # with A frozen only xA stays. Nothing else in the graph changes.
    N = B * T
    fa_model, plain_model = _lora(device, targets=targets), _lora(device, targets=targets,
                                                                   freeze_A=False)
    fa, plain = _saved_activation_floats(fa_model), _saved_activation_floats(plain_model)
    assert plain - fa == N * sum(IN[t] for t in targets) * 2     # two blocks
    # as the method states it: N·(in + r) per branch, N·r with A frozen
    stated_fa = fa_model.adapters["default"].branch_saved_floats(fa_model, N)
    stated = plain_model.adapters["default"].branch_saved_floats(plain_model, N)
    assert set(stated_fa.values()) == {N * 2}
    assert sum(stated.values()) - sum(stated_fa.values()) == plain - fa


def test_the_ledger_holds_the_r_wide_product_for_each_branch(device):
    # one target in the lowest block: the whole graph below the branch is frozen, so
    # what LoRA-FA saves there is xA (N·r floats) and nothing of x
    r, N = 3, B * T
    pm = get_peft_model(small_base(device), LoraConfig(r=r, target_modules=["h.0.attn.c_attn"],
                                                       freeze_A=True))
    with_branch = _saved_activation_floats(pm)
    plain = get_peft_model(small_base(device), LoraConfig(r=r, target_modules=["h.0.attn.c_attn"]))
    assert _saved_activation_floats(plain) - with_branch == N * 16
    # the saved buffer of exactly N·r floats is there
    params = {backend.buffer_id(p.data) for p in pm.parameters()}
    before = set(LEDGER.buffer_ids())
    idx, targets = batch()
    _, loss = pm(idx, targets)
    sizes = [b[1] for b in LEDGER.buffer_ids() if b not in before and b not in params]
    assert N * r * 4 in sizes
    del loss


def test_freeze_A_round_trips_and_old_configs_without_it_load():
    cfg = LoraConfig(r=4, freeze_A=True)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = LoraConfig(r=4).to_dict()
    del old["freeze_A"]
    old["format"] = 1                                    # an adapter saved before the field
    assert config_from_dict(old).freeze_A is False
    old["format"] = 2                                    # the format that added it requires it
    with pytest.raises(ValueError, match=r"lacks the required field\(s\) \['freeze_A'\]"):
        config_from_dict(old)
    with pytest.raises(ValueError, match="freeze_A must be True or False"):
        LoraConfig(freeze_A="yes")


def test_a_loaded_trainable_adapter_keeps_A_frozen(tmp_path):
    pm = _lora()
    perturb(pm)
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(small_base(), tmp_path, is_trainable=True)
    trains = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trains and all(".lora_B." in n for n in trains)
    idx = tokens()
    assert np.array_equal(host(again(idx)), host(pm(idx)))


def test_export_to_peft_is_a_plain_lora_adapter(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    from minipeft.tools.interop import export_peft_adapter

    pm = _lora(targets=["c_attn"])
    perturb(pm)
    export_peft_adapter(pm, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "freeze_A" not in cfg
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    ours = pm.adapters["default"].named_parameters(pm)
    for i in range(2):
        A = ours[f"h.{i}.attn.c_attn.lora_A"]
        stem = f"base_model.model.transformer.h.{i}.attn.c_attn"
        assert np.array_equal(state[f"{stem}.lora_A.weight"], host(A).T)   # (r, in)
        assert np.array_equal(state[f"{stem}.lora_B.weight"],
                              host(ours[f"h.{i}.attn.c_attn.lora_B"]).T)  # (out, r)


def test_exported_lora_fa_gives_peft_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from minipeft.tools.interop import export_peft_adapter, save_hf_gpt2

    base = small_base(seed=1)
    save_hf_gpt2(base, tmp_path / "gpt2")
    pm = get_peft_model(small_base(seed=1),
                        LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "mlp.c_proj"],
                                   freeze_A=True))
    opt = AdamW(pm.trainable_parameters(), lr=5e-2)
    for step in range(3):
        idx, targets = batch(seed=step)
        pm(idx, targets)[1].backward()
        opt.step()
        opt.zero_grad()
    export_peft_adapter(pm, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "gpt2"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2")).eval()
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    idx = tokens()
    with torch.no_grad():
        want = theirs(input_ids=torch.from_numpy(idx)).logits.float().numpy()
    np.testing.assert_allclose(host(pm(idx)), want, rtol=1e-4, atol=1e-5)
