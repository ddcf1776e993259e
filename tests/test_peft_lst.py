"""Ladder side-tuning: the backbone runs under no_grad and keeps nothing for backward, the
side network is the function LSTConfig documents, its gradients are right in float64, and
the method saves, loads, generates, refuses to merge and unloads to the untouched base.

The shared suites (peft_cases ``lst``) run it through the identity at initialisation,
training only what it trains, save/load, switching and the projection check too."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
from peft_cases import B, T, batch, host, logits_of, perturb, small_base, snapshot, tokens

from minipeft import GPT, GPTConfig, backend
from minipeft.autograd import no_grad, ops, vjp_check
from minipeft.autograd.function import LEDGER
from minipeft.nn.gpt import Block
from minipeft.nn.layers import LayerNorm
from minipeft.peft import LoraConfig, LSTConfig, PeftModel, config_from_dict, get_peft_model

L, D, V = 2, 16, 11          # the small base
K, HEADS = 4, 2              # side width 4, two heads of 2


def _lst(device="cpu", dtype=np.float32, base=None, **over):
    base = small_base(device, dtype) if base is None else base
    return get_peft_model(base, LSTConfig(**{"reduction_factor": K, "side_num_heads": HEADS,
                                              **over}))


def _side(pm):
    return pm.adapters["default"].side(pm)


def _hidden_states(pm, idx):
    """h_0 (embeddings) .. h_L (each block's output) of the backbone, run by hand, no graph."""
    base = pm.base_model
    with no_grad():
        ids = backend.to_device(np.asarray(idx), base.device)
        h = base.wte(ids) + base.wpe(base.wpe.weight.xp.arange(ids.shape[1]))    # (B, T, D)
        hs = [h]
        for i in range(base.config.n_layer):
            h = base.h[i].wrapped(h)
            hs.append(h)
    return hs


def _documented_loss(pm, idx, targets):
    r"""LSTConfig's function written out: s_0 = down_0(h_0), s_i = g_i down_i(h_i) +
    (1 - g_i) f_i(s_{i-1}), logits = ln_f(h_L + up(s_L)) W_te^T, and the mean cross-entropy."""
    base, side = pm.base_model, _side(pm)
    temperature = pm.peft_config["default"].gate_temperature
    hs = _hidden_states(pm, idx)
    s = side.embed_ladder(hs[0])
    for i, layer in enumerate(side.layers):
        g = ops.sigmoid(layer.alpha * (1.0 / temperature))                       # (1,)
        s = g * layer.ladder(hs[i + 1]) + (1.0 - g) * layer.block(s)
    x = base.ln_f.wrapped(hs[-1] + side.up(s))
    logits = x @ base.wte.weight.T                                                 # (B, T, V)
    Bn, Tn = np.shape(idx)
    t = backend.to_device(np.asarray(targets), base.device)
    loss = ops.cross_entropy(logits.reshape(Bn * Tn, V), t.reshape(Bn * Tn), ignore_index=-100)
    return logits, loss, hs


def _new_saved(pm, run):
    """(result of run(), [(buffer id, bytes)] it added to the ledger, parameters left out)."""
    gc.collect()                 # graphs of earlier tests out of the books first
    params = {backend.buffer_id(p.data) for p in pm.parameters()}
    before = set(LEDGER.buffer_ids())
    out = run()
    return out, [(b, b[1]) for b in LEDGER.buffer_ids() if b not in before and b not in params]


# ---------------------------------------------------------------------------
# The function at initialisation and after
# ---------------------------------------------------------------------------


def test_gates_start_at_one_half_and_the_zero_parts_are_zero(device):
    side = _side(_lst(device))
    for i, layer in enumerate(side.layers):
        assert np.array_equal(host(layer.alpha), [0.0])
        assert np.array_equal(host(side.gate(i)), [0.5])
        assert not host(layer.ladder.bias).any()
    assert not host(side.up.weight).any() and not host(side.up.bias).any()
    assert not host(side.embed_ladder.bias).any()
    # the rest is random, not zero: the side network is ready to learn
    assert host(side.embed_ladder.weight).std() > 0.01


def test_at_initialisation_the_logits_are_the_base_s_bit_for_bit(device):
    # up = 0: logits = ln_f(h_L + 0) W_te^T = the base's
    idx, targets = batch()
    ref_logits, ref_loss = small_base(device)(idx, targets)
    logits, loss = _lst(device)(idx, targets)
    assert np.array_equal(host(logits), host(ref_logits))
    assert np.array_equal(host(loss), host(ref_loss))


def test_the_wrapped_model_is_the_documented_function(device):
    pm = _lst(device, np.float64, gate_temperature=0.5)
    perturb(pm, scale=0.3)                       # gates away from 0.5, up away from 0
    idx, targets = batch(seed=2)
    logits, loss = pm(idx, targets)
    want_logits, want_loss, _ = _documented_loss(pm, idx, targets)
    np.testing.assert_allclose(host(logits), host(want_logits), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(loss), host(want_loss), rtol=1e-12)
    side = _side(pm)
    for i, layer in enumerate(side.layers):
        a = host(layer.alpha)
        np.testing.assert_allclose(host(side.gate(i)), 1 / (1 + np.exp(-a / 0.5)), rtol=1e-15)
        assert abs(a[0]) > 1e-3                  # the gate really is away from 0.5
    # and it is no longer the base
    assert np.abs(host(logits) - logits_of(small_base(device, np.float64), idx)).max() > 1e-3


# ---------------------------------------------------------------------------
# Nothing flows into the backbone, and the backbone keeps nothing
# ---------------------------------------------------------------------------


def test_no_backbone_parameter_gets_a_gradient_even_when_unfrozen(device):
    pm = _lst(device)
    perturb(pm)
    # no_grad, not freezing, keeps the blocks out of the graph: unfreeze them all
    for n, p in pm.base_model.named_parameters():
        if n.startswith("h."):
            p.requires_grad = True
    idx, targets = batch()
    _, loss = pm(idx, targets)
    loss.backward()
    for n, p in pm.base_model.named_parameters():
        assert p.grad is None, f"backbone parameter {n} got a gradient"
    for n, p in _side(pm).named_parameters():
        assert p.grad is not None and np.abs(host(p.grad)).max() > 0, n


def test_a_block_s_output_has_no_creator(device):
    pm = _lst(device)
    for p in pm.base_model.parameters():
        p.requires_grad = True
    x = pm.base_model.wte(backend.to_device(tokens(), device))                    # (B, T, D)
    y = pm.base_model.h[0](x)
    assert y._node is None and not y.requires_grad


def test_the_ledger_holds_only_what_the_side_network_and_head_save(device):
    # The whole LST forward keeps exactly what the side network and the head keep when
    # they are run by hand on the backbone's hidden states (computed apart, without a
    # graph): the backbone's blocks add nothing. Of the backbone, the ladders keep their
    # inputs h_0 .. h_L (N·D floats each) for their weight gradients.
    pm = _lst(device)
    perturb(pm)
    idx, targets = batch()
    (_, loss), lst = _new_saved(pm, lambda: pm(idx, targets))
    (_, loss_by_hand, hs), by_hand = _new_saved(pm, lambda: _documented_loss(pm, idx, targets))
    assert sum(n for _, n in lst) == sum(n for _, n in by_hand) > 0
    assert sorted(n for _, n in lst) == sorted(n for _, n in by_hand)
    ids = {b for b, _ in by_hand}
    assert all(backend.buffer_id(h.data) in ids for h in hs)
    method = pm.adapters["default"]
    assert sum(h.data.nbytes for h in hs) == 4 * method.ladder_saved_floats(pm, B, T)
    # unfrozen blocks change nothing of it (they run under no_grad)
    for n, p in pm.base_model.named_parameters():
        p.requires_grad = n.startswith("h.")
    (_, loss_unfrozen), unfrozen = _new_saved(pm, lambda: pm(idx, targets))
    assert sorted(n for _, n in unfrozen) == sorted(n for _, n in lst)
    del loss, loss_by_hand, loss_unfrozen


def test_what_lst_keeps_does_not_depend_on_the_backbone_s_heads(device):
    # the backbone's attention would keep (B, heads, T, T) probabilities; LST's ledger
    # is the same for a backbone of 2 heads and of 4 (LoRA's is not)
    idx, targets = batch()
    saved = {}
    for heads in (2, 4):
        for name, cfg in (("lst", LSTConfig(reduction_factor=K, side_num_heads=HEADS)),
                          ("lora", LoraConfig(r=2, target_modules=["c_attn"]))):
            pm = get_peft_model(small_base(device, n_head=heads), cfg)
            (_, loss), new = _new_saved(pm, lambda: pm(idx, targets))  # noqa: B023
            saved[name, heads] = sum(n for _, n in new)
            del loss
    assert saved["lst", 2] == saved["lst", 4]
    assert saved["lora", 2] != saved["lora", 4]


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer, heads, k", [(2, 2, 4), (3, 1, 2)])
def test_side_network_gradients_pass_the_float64_projection_check(n_layer, heads, k, device):
    base = small_base(device, np.float64, n_layer=n_layer)
    pm = get_peft_model(base, LSTConfig(reduction_factor=k, side_num_heads=heads,
                                        gate_temperature=0.7))
    perturb(pm, scale=0.2)
    params = pm.trainable_parameters()
    assert len(params) == len(list(_side(pm).parameters()))
    idx, targets = batch(seed=1)
    assert vjp_check(lambda *_: pm(idx, targets)[1], params, trials=2)


def test_gate_gradient_matches_its_formula(device):
    # dL/dalpha_i = dL/dg_i * g (1 - g) / T: checked against finite differences of alpha
    pm = _lst(device, np.float64, gate_temperature=0.25)
    perturb(pm, scale=0.2)
    idx, targets = batch()
    _, loss = pm(idx, targets)
    loss.backward()
    alpha = _side(pm).layers[1].alpha
    eps, a0 = 1e-6, host(alpha)

    def at(v):
        alpha.data = backend.to_device(a0 + v, alpha.device)
        with no_grad():
            return float(host(pm(idx, targets)[1]))

    fd = (at(eps) - at(-eps)) / (2 * eps)
    alpha.data = backend.to_device(a0, alpha.device)
    assert abs(float(host(alpha.grad)[0]) - fd) <= 1e-7 * max(1.0, abs(fd))
    assert abs(fd) > 1e-6


# ---------------------------------------------------------------------------
# Counting, files, generation, merging, unloading
# ---------------------------------------------------------------------------


def _side_count(D, d, L):
    block = 12 * d * d + 13 * d                  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj
    return (L + 1) * (D * d + d) + L * (block + 1) + d * D + D


def test_trainable_parameters_are_the_side_network(capsys):
    pm = get_peft_model(GPT(GPTConfig(), seed=0), LSTConfig())       # reference: D=128, k=8
    method = pm.adapters["default"]
    side_cfg = method.side_config(pm)
    assert (side_cfg.n_embd, side_cfg.n_head, side_cfg.n_layer) == (16, 2, 4)
    n = _side_count(128, 16, 4)
    assert pm.get_nb_trainable_parameters()[0] == n == 25_620
    assert sum(int(np.prod(s)) for s in method.trainable_shapes(pm).values()) == n
    pm.print_trainable_parameters()
    total = pm.get_nb_trainable_parameters()[1]
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {n:,d} || all params: {total:,d} || trainable%: {100 * n / total:.4f}")


def test_extra_flops_per_token_are_the_side_network_s_products():
    # every matrix product the side network adds, counted by the engine: the weight
    # products (per token, as stated) plus the side attention's 4·T·d per block and token
    from minipeft.tools.lessons import forward_flops
    pm = _lst()
    idx = tokens()
    extra = pm.adapters["default"].extra_flops_per_token(pm)
    d = D // K
    assert extra == 2 * ((L + 1) * D * d + 12 * L * d * d + d * D)
    diff = forward_flops(pm, idx) - forward_flops(small_base(), idx)
    assert diff == extra * idx.size + L * 4 * B * T * T * d


def test_save_and_load_round_trip_exactly(device, tmp_path):
    pm = _lst(device)
    perturb(pm, scale=0.3)
    idx = tokens()
    out = logits_of(pm, idx)
    pm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config_from_dict(meta["config"]) == pm.peft_config["default"]
    loaded = PeftModel.from_pretrained(small_base(device), tmp_path)
    assert np.array_equal(logits_of(loaded, idx), out)
    ours, theirs = _side(pm).state_dict(), _side(loaded).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(host(ours[k]), host(theirs[k])) for k in ours)
    # a file for another side shape is refused, saying what does not fit
    other = get_peft_model(small_base(device), LSTConfig(reduction_factor=2, side_num_heads=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        other.adapters["default"].load_state_dict(other, _side(pm).state_dict())


def test_generation_runs_the_side_network_with_its_own_cache(device):
    pm = _lst(device, np.float64)
    perturb(pm, scale=0.5)
    prompt = tokens((B, 3), seed=4)
    cached = pm.generate(prompt, 6, temperature=0)
    plain = pm.generate(prompt, 6, temperature=0, use_cache=False)
    assert np.array_equal(cached, plain)
    with pm.disable_adapter():
        assert not np.array_equal(pm.generate(prompt, 6, temperature=0), cached)


def test_merging_is_refused_clearly():
    pm = _lst()
    with pytest.raises(ValueError, match="side network is a second network beside the backbone"):
        pm.merge_adapter()
    with pytest.raises(ValueError, match="LSTConfig cannot be merged"):
        pm.merge_and_unload()


def test_unload_returns_the_untouched_base(device):
    base = small_base(device)
    blocks, ln_f = list(base.h), base.ln_f
    names = [n for n, _ in base.named_parameters()]
    pristine = snapshot(base)
    idx = tokens()
    ref = logits_of(base, idx)
    pm = get_peft_model(base, LSTConfig(reduction_factor=K, side_num_heads=HEADS))
    # while wrapped, the base's parameters keep their names
    assert [n for n, _ in base.named_parameters()] == names
    perturb(pm)
    assert not np.array_equal(logits_of(pm, idx), ref)
    plain = pm.unload()
    assert plain is base
    assert all(a is b for a, b in zip(plain.h, blocks)) and plain.ln_f is ln_f
    assert all(type(b) is Block for b in plain.h) and type(plain.ln_f) is LayerNorm
    assert [n for n, _ in plain.named_parameters()] == names
    assert all(np.array_equal(host(p), pristine[n]) for n, p in plain.named_parameters())
    assert np.array_equal(logits_of(plain, idx), ref)


def test_lst_shares_its_base_with_lora():
    base = small_base()
    idx = tokens()
    ref = logits_of(base, idx)
    pm = get_peft_model(base, LSTConfig(reduction_factor=K, side_num_heads=HEADS), "side")
    perturb(pm)
    side_out = logits_of(pm, idx)
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["c_attn"]))    # inside the taps
    pm.set_adapter("lora")
    assert np.array_equal(logits_of(pm, idx), ref)                         # B = 0
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        f"base_model.h.{i}.attn.c_attn.lora_{m}.lora" for i in range(L) for m in "AB"}
    pm.set_adapter("side")
    assert np.array_equal(logits_of(pm, idx), side_out)
    pm.delete_adapter("side")
    assert all(type(b) is Block for b in base.h) and type(base.ln_f) is LayerNorm
    pm.delete_adapter("lora")
    assert np.array_equal(logits_of(pm, idx), ref)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: LSTConfig(reduction_factor=0), "reduction_factor must be a positive integer, got 0"),
    (lambda: LSTConfig(reduction_factor=2.5), "reduction_factor must be a positive integer"),
    (lambda: LSTConfig(reduction_factor=True), "reduction_factor must be a positive integer"),
    (lambda: LSTConfig(side_num_heads=0), "side_num_heads must be a positive integer"),
    (lambda: LSTConfig(gate_temperature=0), "gate_temperature must be a finite number > 0, got 0"),
    (lambda: LSTConfig(gate_temperature=-1.0), "gate_temperature must be a finite number > 0"),
    (lambda: LSTConfig(gate_temperature="hot"), "gate_temperature must be a finite number > 0"),
])
def test_bad_knobs_are_refused_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("config, message", [
    (LSTConfig(reduction_factor=3), r"reduction_factor=3 does not divide the backbone's width "
                                    r"n_embd=16: choose a divisor of 16"),
    (LSTConfig(reduction_factor=4, side_num_heads=3),
     r"side_num_heads=3 does not divide the side width 4 .*choose a divisor of 4"),
])
def test_shapes_that_do_not_fit_the_base_are_refused_and_the_base_is_left_alone(config, message):
    base = small_base()
    blocks = list(base.h)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, config)
    assert all(p.requires_grad for p in base.parameters())
    assert all(a is b for a, b in zip(base.h, blocks)) and type(base.ln_f) is LayerNorm


def test_gradient_checkpointing_is_refused():
    with pytest.raises(ValueError, match="set gradient_checkpointing=False"):
        _lst(base=small_base(gradient_checkpointing=True))
    pm = _lst()
    pm.base_model.config.gradient_checkpointing = True
    idx, targets = batch()
    with pytest.raises(ValueError, match="set gradient_checkpointing=False"):
        pm(idx, targets)
