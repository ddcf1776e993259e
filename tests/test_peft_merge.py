r"""Merging: LoRA, DoRA and (IA)^3 fold into the base weights; nothing else does.

Merged outputs equal unmerged ones within float32 tolerance; unmerging restores
the base weights within float32 rounding (:math:`(W + \Delta W) - \Delta W` is
not W bit for bit), and exactly where a copy was kept (``keep_copy``, and
always for DoRA); ``merge_and_unload`` hands back a plain GPT.
"""

from __future__ import annotations

import numpy as np
import pytest
from peft_cases import (
    CASES,
    MERGEABLE,
    SMALL,
    host,
    logits_of,
    perturb,
    small_base,
    tokens,
    wrap,
)

from minipeft import GPT, Tensor
from minipeft.peft import LoraConfig
from minipeft.peft.tuner import Wrapper

TOL = dict(rtol=1e-5, atol=1e-5)
NOT_MERGEABLE = [n for n in CASES if n not in MERGEABLE]


def _base_weights(pm):
    from minipeft.nn.module import base_name
    from minipeft.peft.model import _base_params
    return {base_name(n): host(p) for n, p in _base_params(pm.base_model)}


def _trained(name, device="cpu"):
    base = small_base(device)
    pristine = {n: host(p) for n, p in base.named_parameters()}
    pm = wrap(name, base=base)
    perturb(pm, scale=0.2)
    return pm, pristine


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores(name, device):
    pm, pristine = _trained(name, device)
    idx = tokens()
    unmerged = logits_of(pm, idx)
    assert not np.allclose(unmerged, logits_of(small_base(device), idx), **TOL)
    method = pm.adapters["default"]
    assert method.extra_flops_per_token(pm) > 0
    pm.merge_adapter()
    assert method.merged
    merged_weights = _base_weights(pm)
    changed = [n for n in pristine if not np.array_equal(merged_weights[n], pristine[n])]
    # only the blocks' weights (and, for output scaling, biases) change
    assert changed and all(n.startswith("h.") for n in changed)
    np.testing.assert_allclose(logits_of(pm, idx), unmerged, **TOL)
    # merged: the branches are skipped, inference costs what the base costs
    assert method.extra_flops_per_token(pm) == 0
    pm.unmerge_adapter()
    assert not method.merged
    restored = _base_weights(pm)
    for n in pristine:
        np.testing.assert_allclose(restored[n], pristine[n], rtol=1e-5, atol=1e-6)
    if name == "dora":                 # DoRA keeps a copy: exact
        for n in pristine:
            assert np.array_equal(restored[n], pristine[n]), n
    np.testing.assert_allclose(logits_of(pm, idx), unmerged, **TOL)


@pytest.mark.parametrize("name", MERGEABLE)
def test_unmerge_is_exact_with_keep_copy(name):
    pm, pristine = _trained(name)
    method = pm.adapters["default"]
    method.keep_copy = True
    pm.merge_adapter()
    pm.unmerge_adapter()
    restored = _base_weights(pm)
    for n in pristine:
        assert np.array_equal(restored[n], pristine[n]), n
    # merging again after an exact unmerge gives the same bits as the first merge
    pm.merge_adapter()
    first = _base_weights(pm)
    pm.unmerge_adapter()
    pm.merge_adapter()
    assert all(np.array_equal(_base_weights(pm)[n], first[n]) for n in first)


@pytest.mark.parametrize("keep_copy", [False, True], ids=["divide", "copy"])
@pytest.mark.parametrize("op", ["merge", "unmerge"])
def test_ia3_counts_each_base_array_it_changes(op, keep_copy):
    """A graph that saved a base weight or bias before (IA)^3 (un)merges refuses backward after.

    Output scaling (``c_attn``) changes the weight and the bias; input scaling
    (``mlp.c_proj``) the weight only, so a graph that saved its bias still runs.
    """
    pm, _ = _trained("ia3")
    pm.adapters["default"].keep_copy = keep_copy
    if op == "unmerge":
        pm.merge_adapter()
    attn, proj = pm.base_model.h[0].attn.c_attn, pm.base_model.h[0].mlp.c_proj
    arrays = {"c_attn.weight": attn.base_layer.weight, "c_attn.bias": attn.base_layer.bias,
              "c_proj.weight": proj.base_layer.weight, "c_proj.bias": proj.base_layer.bias}
    # x * t saves t for dL/dx: each graph holds one base array as it was before the op
    xs = {k: Tensor(np.ones(t.shape, dtype=t.dtype), requires_grad=True) for k, t in arrays.items()}
    losses = {k: (xs[k] * t).sum() for k, t in arrays.items()}
    getattr(pm, f"{op}_adapter")()
    for k in ("c_attn.weight", "c_attn.bias", "c_proj.weight"):
        with pytest.raises(RuntimeError, match=rf"Mul\.backward: input 1.*`IA3Linear\.{op}`"):
            losses[k].backward()
    losses["c_proj.bias"].backward()              # untouched: its gradient is still right
    np.testing.assert_array_equal(host(xs["c_proj.bias"].grad), host(arrays["c_proj.bias"]))


def test_merged_lora_weight_is_w_plus_scaled_ab():
    pm = wrap("lora", dtype=np.float64)
    perturb(pm)
    layer = pm.base_model.h[1].mlp.c_fc
    W = host(layer.base_layer.weight)
    A, B = host(layer.lora_A.default), host(layer.lora_B.default)
    pm.merge_adapter()
    np.testing.assert_allclose(host(layer.base_layer.weight), W + A @ B * (4.0 / 2), rtol=1e-12)


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_and_unload_returns_a_plain_gpt(name):
    pm, pristine = _trained(name)
    idx = tokens()
    unmerged = logits_of(pm, idx)
    pm.merge_adapter()
    merged = logits_of(pm, idx)
    pm.unmerge_adapter()
    plain = pm.merge_and_unload()
    assert type(plain) is GPT
    assert not any(isinstance(m, Wrapper) for m in plain.modules())
    # GPT-2's names again, in GPT-2's order
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in small_base().named_parameters()]
    assert all(not p.requires_grad for p in plain.parameters())
    out = logits_of(plain, idx)
    np.testing.assert_allclose(out, unmerged, **TOL)
    assert np.array_equal(out, merged)


def test_merge_and_unload_of_an_already_merged_adapter():
    pm, _ = _trained("lora")
    idx = tokens()
    pm.merge_adapter()
    merged = logits_of(pm, idx)
    assert np.array_equal(logits_of(pm.merge_and_unload(), idx), merged)


@pytest.mark.parametrize("name", MERGEABLE)
def test_merging_twice_and_unmerging_nothing_are_refused(name):
    pm, _ = _trained(name)
    pm.merge_adapter()
    before = _base_weights(pm)
    with pytest.raises(ValueError, match="'default' is already merged"):
        pm.merge_adapter()
    assert all(np.array_equal(_base_weights(pm)[n], before[n]) for n in before)
    pm.unmerge_adapter()
    with pytest.raises(ValueError, match="'default' is not merged"):
        pm.unmerge_adapter()


@pytest.mark.parametrize("name", NOT_MERGEABLE)
def test_merging_a_method_that_cannot_merge_is_refused(name):
    pm = wrap(name)
    before = _base_weights(pm)
    cls = type(pm.peft_config["default"]).__name__
    with pytest.raises(ValueError, match=f"{cls} cannot be merged into the base weights"):
        pm.merge_adapter()
    with pytest.raises(ValueError, match=f"{cls} cannot be merged"):
        pm.merge_and_unload()
    assert not pm.adapters["default"].merged
    assert all(np.array_equal(_base_weights(pm)[n], before[n]) for n in before)


def test_disabling_a_merged_adapter_runs_the_base_and_merges_it_back():
    base = small_base()
    idx = tokens()
    ref = logits_of(base, idx)
    pm = wrap("lora", base=base)
    perturb(pm)
    pm.adapters["default"].keep_copy = True
    pm.merge_adapter()
    merged = logits_of(pm, idx)
    merged_weights = _base_weights(pm)
    with pm.disable_adapter():
        assert np.array_equal(logits_of(pm, idx), ref)
    assert pm.adapters["default"].merged
    assert np.array_equal(logits_of(pm, idx), merged)
    assert all(np.array_equal(_base_weights(pm)[n], merged_weights[n]) for n in merged_weights)


def test_switching_away_from_a_merged_adapter_unmerges_it():
    base = small_base()
    idx = tokens()
    ref = logits_of(base, idx)
    pm = wrap("lora", base=base, adapter_name="a")
    perturb(pm)
    unmerged = logits_of(pm, idx)
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn"]))
    pm.merge_adapter()
    with pytest.warns(UserWarning, match="adapter 'a' is merged; unmerging it"):
        pm.set_adapter("b")
    assert not pm.adapters["a"].merged
    np.testing.assert_allclose(logits_of(pm, idx), ref, **TOL)      # b's B is zero
    pm.set_adapter("a")
    np.testing.assert_allclose(logits_of(pm, idx), unmerged, **TOL)


def test_merged_dora_and_ia3_weights_match_their_formulas():
    pm = wrap("dora", dtype=np.float64)
    perturb(pm)
    layer = pm.base_model.h[0].attn.c_attn
    W = host(layer.base_layer.weight)
    A, B = host(layer.lora_A.default), host(layer.lora_B.default)
    m = host(layer.lora_magnitude.default)
    Wp = W + A @ B * 2.0
    pm.merge_adapter()
    np.testing.assert_allclose(host(layer.base_layer.weight),
                               Wp * (m / np.linalg.norm(Wp, axis=0)), rtol=1e-12)

    pm = wrap("ia3", dtype=np.float64)
    perturb(pm)
    attn, proj = pm.base_model.h[0].attn.c_attn, pm.base_model.h[0].mlp.c_proj
    Wa, ba, Wp = (host(attn.base_layer.weight), host(attn.base_layer.bias),
                  host(proj.base_layer.weight))
    la = np.concatenate([np.ones(SMALL["n_embd"]), host(attn.ia3_l.default)])
    lp = host(proj.ia3_l.default)
    pm.merge_adapter()
    np.testing.assert_allclose(host(attn.base_layer.weight), Wa * la[None, :], rtol=1e-12)
    np.testing.assert_allclose(host(attn.base_layer.bias), ba * la, rtol=1e-12)
    np.testing.assert_allclose(host(proj.base_layer.weight), Wp * lp[:, None], rtol=1e-12)
