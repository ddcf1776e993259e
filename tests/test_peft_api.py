"""The peft-style API: trainable counts against Hugging Face peft's at the reference
configuration, configs and their JSON round trip, clear errors on bad input, and
several named adapters sharing one base."""

from __future__ import annotations

import numpy as np
import pytest
from peft_cases import (
    CASES,
    SHAREABLE,
    batch,
    config_of,
    host,
    logits_of,
    small_base,
    tokens,
    wrap,
)

from minipeft import GPT, GPTConfig
from minipeft.optim import AdamW
from minipeft.peft import (
    METHODS,
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    IA3Config,
    LayerSelectConfig,
    LoraConfig,
    MaskConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    config_class,
    config_from_dict,
    get_peft_model,
    method_config,
)
from minipeft.peft.tuner import Wrapper

# ---------------------------------------------------------------------------
# Trainable counts at the reference configuration
# ---------------------------------------------------------------------------

BASE_PARAMS = 822_016
C, L = 128, 4                    # the reference model's width and depth


@pytest.fixture(scope="module")
def reference_base_state():
    """The reference GPT's parameters, built once; each test gets a fresh copy."""
    return {n: host(p) for n, p in GPT(GPTConfig(), seed=0).named_parameters()}


@pytest.fixture
def reference_base(reference_base_state):
    model = GPT(GPTConfig(), seed=0)
    model.load_state_dict(reference_base_state)
    return model


def test_the_reference_base_has_822016_parameters(reference_base):
    assert reference_base.num_parameters() == BASE_PARAMS


# Hugging Face peft's numbers for the same choices (GPT-2 shapes, reference config)
PEFT_COUNTS = [
    ("lora_c_attn", LoraConfig(r=8, target_modules=["c_attn"]), 16_384),
    ("lora_all", LoraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"]), 65_536),
    ("prompt", PromptTuningConfig(num_virtual_tokens=20), 2_560),
    ("prefix", PrefixTuningConfig(num_virtual_tokens=20), 20_480),
    ("ia3_queries", IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                              feedforward_modules=["mlp.c_proj"], scale_queries=True), 3_584),
    ("ia3_paper", IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                            feedforward_modules=["mlp.c_proj"]), 3_072),
]


@pytest.mark.parametrize("config, expected", [c[1:] for c in PEFT_COUNTS],
                         ids=[c[0] for c in PEFT_COUNTS])
def test_trainable_counts_match_hugging_face_peft(config, expected, reference_base):
    pm = get_peft_model(reference_base, config)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == expected
    # the new parameters add to the total; the base's stay as they were
    assert total == BASE_PARAMS + expected
    assert pm.adapters["default"].trainable_count(pm) == expected
    assert sum(p.size for p in pm.trainable_parameters()) == expected


def test_print_trainable_parameters_is_pefts_line(reference_base, capsys):
    pm = get_peft_model(reference_base, LoraConfig(r=8, target_modules=["c_attn"]))
    pm.print_trainable_parameters()
    assert capsys.readouterr().out == \
        "trainable params: 16,384 || all params: 838,400 || trainable%: 1.9542\n"


def _per_block_biases():
    # ln_1 C, c_attn 3C, attn.c_proj C, ln_2 C, c_fc 4C, mlp.c_proj C
    return 11 * C


HAND_COUNTS = [
    # BitFit: every bias (LayerNorm biases included) and ln_f's
    ("bitfit", BitFitConfig(), L * _per_block_biases() + C, 0),
    ("bitfit_c_attn", BitFitConfig(target_modules=["c_attn"]), L * 3 * C, 0),
    # last block, attention only: c_attn (C x 3C + 3C) and c_proj (C x C + C)
    ("layers_last_attn", LayerSelectConfig(layers=[-1], components=["attn"]),
     (C * 3 * C + 3 * C) + (C * C + C), 0),
    # the last two blocks' LayerNorms: 2 blocks x 2 norms x (weight C + bias C)
    ("layers_ln", LayerSelectConfig(layers=[-2, -1], components=["ln"]), 2 * 2 * 2 * C, 0),
    # weights (no biases) of every MLP
    ("layers_mlp_weights", LayerSelectConfig(components=["mlp"], param_types=["weight"]),
     L * (C * 4 * C + 4 * C * C), 0),
    # embeddings: wte (96 x C, also the head) and wpe (128 x C)
    ("layers_embeddings", LayerSelectConfig(components=["embeddings"]), 96 * C + 128 * C, 0),
    # masks: k = round(0.01 n) of each weight: c_attn 49,152 -> 492, attn.c_proj
    # 16,384 -> 164, c_fc 65,536 -> 655, mlp.c_proj 65,536 -> 655
    ("mask_1pct", MaskConfig(density=0.01), L * (492 + 164 + 655 + 655), 0),
    ("mask_c_fc_10pct", MaskConfig(density=0.1, target_modules=["c_fc"]), L * 6554, 0),
    # adapters: down C x m + m, up m x C + C, one (Pfeiffer) or two (Houlsby) a block
    ("houlsby_16", AdapterConfig(bottleneck=16), L * 2 * (C * 16 + 16 + 16 * C + C), None),
    ("pfeiffer_8", AdapterConfig(bottleneck=8, placement="pfeiffer"),
     L * (C * 8 + 8 + 8 * C + C), None),
    # DoRA: LoRA's A and B plus a magnitude per output column (3C for c_attn)
    ("dora_c_attn", LoraConfig(r=8, target_modules=["c_attn"], use_dora=True),
     L * (8 * (C + 3 * C) + 3 * C), None),
    # prefix tuning with the reparameterising MLP trains E (P x C), W1, b1, W2, b2
    ("prefix_projection", PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True,
                                             encoder_hidden_size=64),
     20 * C + (C * 64 + 64) + (64 * L * 2 * C + L * 2 * C), None),
    ("full", FullFinetuneConfig(), BASE_PARAMS, 0),
]


@pytest.mark.parametrize("config, expected, added", [c[1:] for c in HAND_COUNTS],
                         ids=[c[0] for c in HAND_COUNTS])
def test_trainable_counts_by_hand(config, expected, added, reference_base):
    pm = get_peft_model(reference_base, config)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == expected
    # selective methods add nothing; additive ones add what they train
    assert total == BASE_PARAMS + (expected if added is None else added)


def test_prefix_projection_saves_only_the_prefixes(reference_base):
    pm = get_peft_model(reference_base, PrefixTuningConfig(num_virtual_tokens=20,
                                                           prefix_projection=True))
    assert pm.adapters["default"].trainable_count(pm) == 20 * L * 2 * C


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_configs_round_trip_through_json(name):
    import json
    config, _ = config_of(name)
    d = json.loads(json.dumps(config.to_dict()))
    again = config_from_dict(d)
    assert type(again) is type(config) and again == config


def test_method_names_and_config_classes():
    assert set(METHODS) == {"full", "bitfit", "layers", "mask", "lora", "lora_fa", "adapter",
                            "prompt", "prefix", "ia3", "lst"}
    assert config_class("lora") is LoraConfig and config_class("LORA") is LoraConfig
    assert config_class("prompt") is PromptTuningConfig
    assert config_class("lora_fa") is LoraConfig           # LoRA-FA is LoraConfig(freeze_A=True)
    for m in METHODS:
        if m != "layers":                      # LayerSelectConfig() selects nothing
            assert method_config(m).method == m
    assert LayerSelectConfig(layers=[0]).method == "layers"


def test_unknown_method_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown method 'nope': choose from full, bitfit"):
        config_class("nope")


def test_unknown_peft_type_and_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown peft_type 'NOPE'.*'LORA'"):
        config_from_dict({"peft_type": "NOPE", "r": 8})
    with pytest.raises(ValueError, match=r"unknown peft_type None"):
        config_from_dict({"r": 8})
    with pytest.raises(ValueError, match=r"LoraConfig has no fields \['rank'\]"):
        config_from_dict({"peft_type": "LORA", "rank": 8})


@pytest.mark.parametrize("make, message", [
    (lambda: LoraConfig(r=0), "r must be a positive integer, got 0"),
    (lambda: LoraConfig(r=-2), "r must be a positive integer, got -2"),
    (lambda: LoraConfig(r=2.5), "r must be a positive integer"),
    (lambda: LoraConfig(target_modules="c_attn"), "must be a list of module names"),
    (lambda: LoraConfig(target_modules=[]), "target_modules is empty"),
    (lambda: LoraConfig(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (lambda: LoraConfig(lora_alpha=0), "lora_alpha must be positive"),
    (lambda: AdapterConfig(bottleneck=0), "bottleneck must be a positive integer"),
    (lambda: AdapterConfig(placement="middle"), "placement must be 'houlsby' or 'pfeiffer'"),
    (lambda: AdapterConfig(nonlinearity="swish"), "nonlinearity must be"),
    (lambda: PromptTuningConfig(num_virtual_tokens=-1), "num_virtual_tokens must be"),
    (lambda: PromptTuningConfig(prompt_tuning_init="ZEROS"), "prompt_tuning_init must be"),
    (lambda: PromptTuningConfig(prompt_tuning_init="TEXT"), "needs prompt_tuning_init_text"),
    (lambda: PrefixTuningConfig(encoder_hidden_size=0), "encoder_hidden_size must be"),
    (lambda: MaskConfig(density=0.0), r"density must be in \(0, 1\]"),
    (lambda: MaskConfig(density=1.5), r"density must be in \(0, 1\]"),
    (lambda: MaskConfig(selection="best"), "selection must be"),
    (lambda: LayerSelectConfig(), "selects nothing"),
    (lambda: LayerSelectConfig(components=["head"]), r"unknown components \['head'\]"),
    (lambda: LayerSelectConfig(param_types=["gain"]), r"unknown param_types \['gain'\]"),
    (lambda: IA3Config(target_modules=[]), "target_modules is empty"),
])
def test_bad_knobs_are_refused_at_once(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------------
# Bad input to get_peft_model and the model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    LoraConfig(target_modules=["q_proj"]),
    IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
    BitFitConfig(target_modules=["q_proj"]),
    MaskConfig(target_modules=["q_proj"]),
], ids=["lora", "ia3", "bitfit", "mask"])
def test_target_modules_matching_nothing_lists_the_modules_that_exist(config):
    base = small_base()
    before = {n: host(p) for n, p in base.named_parameters()}
    with pytest.raises(ValueError) as info:
        get_peft_model(base, config)
    msg = str(info.value)
    assert "['q_proj'] matched no Linear module" in msg
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "h.0.attn.c_attn"):
        assert name in msg
    # nothing was wrapped, nothing frozen
    assert not any(isinstance(m, Wrapper) for m in base.modules())
    assert {n for n, _ in base.named_parameters()} == set(before)
    assert all(p.requires_grad for p in base.parameters())


def test_target_modules_follow_pefts_suffix_rule():
    pm = get_peft_model(small_base(), LoraConfig(r=2, target_modules=["c_proj"]))
    wrapped = sorted(n for n, m in pm.base_model.named_modules() if isinstance(m, Wrapper))
    assert wrapped == ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"]
    pm = get_peft_model(small_base(), LoraConfig(r=2, target_modules=["h.1.mlp.c_proj"]))
    wrapped = [n for n, m in pm.base_model.named_modules() if isinstance(m, Wrapper)]
    assert wrapped == ["h.1.mlp.c_proj"]
    # a partial name is not a match: "proj" is neither equal to nor a dotted suffix
    with pytest.raises(ValueError, match="matched no Linear"):
        get_peft_model(small_base(), LoraConfig(r=2, target_modules=["proj"]))


def test_prompt_text_beyond_the_vocabulary_is_refused():
    # the small base knows 11 token ids; "z" is id 91 of the reference vocabulary
    with pytest.raises(ValueError, match="beyond this model's vocabulary of 11"):
        get_peft_model(small_base(), PromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="z"))


def test_layer_selection_never_selects_another_adapters_parameters():
    pm = wrap("lora", adapter_name="a")
    pm.add_adapter("b", LayerSelectConfig(layers=[1], components=["attn"]))
    pm.set_adapter("b")
    trainable = {n for n, p in pm.base_model.named_parameters() if p.requires_grad}
    assert trainable and not any("lora_" in n for n in trainable)
    assert {n.replace(".base_layer", "") for n in trainable} == {
        f"h.1.attn.{m}.{t}" for m in ("c_attn", "c_proj") for t in ("weight", "bias")}


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(ValueError, match="feedforward_modules must be among target_modules"):
        get_peft_model(small_base(), IA3Config(target_modules=["c_attn"],
                                               feedforward_modules=["mlp.c_proj"]))


def test_layer_indices_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"layers \[2\] out of range for a model with 2 blocks"):
        get_peft_model(small_base(), LayerSelectConfig(layers=[2]))


def test_gradient_masks_need_a_calibration_batch():
    with pytest.raises(ValueError, match="selection='gradient' needs a calibration batch"):
        get_peft_model(small_base(), MaskConfig(selection="gradient"))


def test_soft_prompts_longer_than_the_context_are_refused():
    with pytest.raises(ValueError, match="exceed n_positions=16"):
        get_peft_model(small_base(), PromptTuningConfig(num_virtual_tokens=16))
    with pytest.raises(ValueError, match="exceed n_positions=16"):
        get_peft_model(small_base(), PrefixTuningConfig(num_virtual_tokens=16))


def test_wrapping_twice_and_wrong_configs_are_refused():
    pm = wrap("lora")
    with pytest.raises(TypeError, match="already a PeftModel: use add_adapter"):
        get_peft_model(pm, LoraConfig())
    with pytest.raises(TypeError, match="expected a PEFT config"):
        pm.add_adapter("other", {"r": 8})
    with pytest.raises(ValueError, match="must be an identifier"):
        pm.add_adapter("my adapter", LoraConfig(r=2))


# ---------------------------------------------------------------------------
# Several named adapters on one base
# ---------------------------------------------------------------------------


def _base_arrays(pm):
    """Host copies of the base's own parameters (adapter parameters left out)."""
    from minipeft.nn.module import base_name
    from minipeft.peft.model import _base_params
    return {base_name(n): host(p) for n, p in _base_params(pm.base_model)}


def _train_active(pm, steps=2, seed=0):
    opt = AdamW(pm.trainable_parameters(), lr=2e-2)
    for s in range(steps):
        idx, targets = batch(seed=seed + s)
        _, loss = pm(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()


PAIRS = [
    ("lora", "lora"), ("lora", "bitfit"), ("bitfit", "layers"), ("mask_random", "bitfit"),
    ("layers", "mask_magnitude"), ("ia3", "adapter_houlsby"), ("prompt", "prefix"),
    ("prefix_projection", "dora"), ("bitfit_attn", "ia3_queries"), ("mask_gradient", "lora"),
    # two kinds of wrapper around one Linear: the second wraps the first
    ("lora", "ia3"), ("adapter_pfeiffer", "dora"),
]


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_switching_adapters_never_modifies_the_shared_base(first, second, device):
    base = small_base(device)
    pristine = {n: host(p) for n, p in base.named_parameters()}
    idx = tokens()
    ref = logits_of(base, idx)

    pm = wrap(first, base=base, adapter_name="a")
    _train_active(pm, seed=0)
    out_a = logits_of(pm, idx)
    assert not np.array_equal(out_a, ref)

    # the second adapter is added while the first is active and trained
    config, kwargs = config_of(second)
    pm.add_adapter("b", config, **kwargs)
    assert pm.active_adapter == "a"
    assert np.array_equal(logits_of(pm, idx), out_a)       # adding does not disturb "a"
    pm.set_adapter("b")
    if second not in ("dora", "prompt", "prefix", "prefix_projection"):
        assert np.array_equal(logits_of(pm, idx), ref)     # b starts as the identity
    _train_active(pm, seed=5)
    out_b = logits_of(pm, idx)
    assert not np.array_equal(out_b, out_a)

    for _ in range(2):
        with pm.disable_adapter():
            now = _base_arrays(pm)
            assert set(now) == set(pristine)
            for n in pristine:
                assert np.array_equal(now[n], pristine[n]), n
            assert np.array_equal(logits_of(pm, idx), ref)
        assert np.array_equal(logits_of(pm, idx), out_b)
        pm.set_adapter("a")
        assert np.array_equal(logits_of(pm, idx), out_a)
        pm.set_adapter("b")
        assert np.array_equal(logits_of(pm, idx), out_b)

    # taking both adapters out leaves exactly the base
    pm.delete_adapter("a")
    assert np.array_equal(logits_of(pm, idx), out_b)
    plain = pm.unload()
    assert plain is base
    assert {n for n, _ in plain.named_parameters()} == set(pristine)
    for n, p in plain.named_parameters():
        assert np.array_equal(host(p), pristine[n]), n
    assert np.array_equal(logits_of(plain, idx), ref)


@pytest.mark.parametrize("name", SHAREABLE)
def test_disable_adapter_runs_the_bare_base_and_restores_the_adapter(name):
    idx = tokens()
    base = small_base()
    ref = logits_of(base, idx)
    pm = wrap(name, base=base)
    _train_active(pm)
    out = logits_of(pm, idx)
    trainable = pm.get_nb_trainable_parameters()
    with pm.disable_adapter():
        assert np.array_equal(logits_of(pm, idx), ref)
        assert pm.get_nb_trainable_parameters()[0] == 0
    assert np.array_equal(logits_of(pm, idx), out)
    assert pm.get_nb_trainable_parameters() == trainable
    # also when the body raises
    with pytest.raises(RuntimeError, match="inside"):
        with pm.disable_adapter():
            raise RuntimeError("inside")
    assert np.array_equal(logits_of(pm, idx), out)


def test_full_finetuning_cannot_share_or_disable():
    pm = wrap("full")
    with pytest.raises(ValueError, match="cannot share it with other adapters"):
        pm.add_adapter("b", LoraConfig(r=2))
    with pytest.raises(ValueError, match="full fine-tuning has no adapter to disable"):
        with pm.disable_adapter():
            pass
    pm = wrap("lora")
    with pytest.raises(ValueError, match="cannot share it with other adapters"):
        pm.add_adapter("b", FullFinetuneConfig())


def test_adapter_names_are_checked():
    pm = wrap("lora")
    with pytest.raises(ValueError, match="an adapter named 'default' already exists"):
        pm.add_adapter("default", BitFitConfig())
    with pytest.raises(ValueError, match=r"no adapter named 'other'; adapters here: \['default'\]"):
        pm.set_adapter("other")
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        pm.delete_adapter("other")
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        pm.save_pretrained("/nonexistent", adapter_name="other")
    assert pm.active_adapter == "default" and list(pm.adapters) == ["default"]


def test_only_the_active_adapter_trains():
    pm = wrap("lora", adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=3, target_modules=["c_fc"]))
    def trainable():
        return {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable() and all(n.endswith(".a") for n in trainable())
    pm.set_adapter("b")
    assert trainable() == {f"base_model.h.{i}.mlp.c_fc.lora_{m}.b" for i in (0, 1) for m in "AB"}
    assert pm.get_nb_trainable_parameters()[0] == 2 * 3 * (16 + 64)


def test_wrappers_of_different_methods_nest_and_unnest():
    base = small_base()
    names = [n for n, _ in base.named_parameters()]
    pm = get_peft_model(base, IA3Config(), "ia3")
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["c_attn", "mlp.c_proj"]))
    pm.add_adapter("adapter", AdapterConfig(bottleneck=2, placement="pfeiffer"))
    chain = []
    m = base.h[0].mlp.c_proj
    while isinstance(m, Wrapper):
        chain.append(type(m).__name__)
        m = m.base_layer
    assert chain == ["BottleneckAdapter", "LoraLinear", "IA3Linear"]
    assert "h.0.mlp.c_proj.base_layer.base_layer.base_layer.weight" in dict(
        base.named_parameters())
    # the middle one goes first, then the others; the Linear comes back in place
    pm.delete_adapter("lora")
    assert type(base.h[0].mlp.c_proj.base_layer).__name__ == "IA3Linear"
    assert type(base.h[0].attn.c_attn).__name__ == "IA3Linear"
    pm.delete_adapter("ia3")
    assert type(base.h[0].mlp.c_proj).__name__ == "BottleneckAdapter"
    pm.delete_adapter("adapter")
    assert [n for n, _ in base.named_parameters()] == names


def test_deleting_the_last_adapter_of_a_wrapper_restores_the_linear():
    base = small_base()
    names = [n for n, _ in base.named_parameters()]
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"]), "a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    pm.delete_adapter("b")
    assert not any(isinstance(m, Wrapper) for n, m in base.named_modules() if "c_fc" in n)
    assert any(isinstance(m, Wrapper) for m in base.modules())
    pm.delete_adapter("a")
    assert not any(isinstance(m, Wrapper) for m in base.modules())
    assert [n for n, _ in base.named_parameters()] == names
    assert pm.active_adapter is None
    assert np.array_equal(logits_of(pm, tokens()), logits_of(small_base(), tokens()))


@pytest.mark.parametrize("name", SHAREABLE)
def test_moving_a_peft_model_moves_what_its_methods_keep(name, device):
    # built on the host, then moved: the copies the methods keep aside (original
    # values of selected entries, weights kept at merge) must move too
    from minipeft import backend
    idx = tokens()
    ref = logits_of(small_base(), idx)
    pm = wrap(name)
    _train_active(pm)
    pm.add_adapter("bitfit", BitFitConfig())
    merged = name in ("lora", "dora", "ia3", "ia3_queries")
    if merged:
        pm.adapters["default"].keep_copy = True
        pm.merge_adapter()
    out = logits_of(pm, idx)
    pm.to(device)
    assert all(backend.device_of(p.data) == device for p in pm.parameters())
    np.testing.assert_allclose(logits_of(pm, idx), out, rtol=1e-6, atol=1e-6)
    with pm.disable_adapter():
        np.testing.assert_allclose(logits_of(pm, idx), ref, rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning) if merged else _nothing():
        pm.set_adapter("bitfit")
    np.testing.assert_allclose(logits_of(pm, idx), ref, rtol=1e-6, atol=1e-6)
    pm.set_adapter("default")
    np.testing.assert_allclose(logits_of(pm, idx), out, rtol=1e-5, atol=1e-5)
    pm.to("cpu", dtype=np.float64)
    with pm.disable_adapter():
        np.testing.assert_allclose(logits_of(pm, idx), ref, rtol=1e-6, atol=1e-6)
    assert all(p.dtype == np.float64 for p in pm.parameters())


def _nothing():
    import contextlib
    return contextlib.nullcontext()
