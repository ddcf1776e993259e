"""Interop with Hugging Face, checked against transformers and peft themselves.

Both directions, for the model and for every adapter minipeft shares with
peft: a minipeft GPT saved as a GPT-2 folder gives ``GPT2LMHeadModel`` the
same logits, loss and gradients; a GPT-2 made by transformers loads into
minipeft with the same logits; an adapter trained here loads in peft, and one
trained in peft loads here, with the same logits; trainable counts agree with
peft's. Bad input fails clearly, and a failed write leaves nothing behind.

Needs the ``hf`` extra (torch, transformers, peft, tokenizers); without it
the whole file is reported as skipped.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from minipeft import GPT, GPTConfig, io  # noqa: E402
from minipeft.optim import AdamW  # noqa: E402
from minipeft.peft import (  # noqa: E402
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    IA3Config,
    LayerSelectConfig,
    LoraConfig,
    MaskConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from minipeft.tools.cli import main  # noqa: E402
from minipeft.tools.interop import (  # noqa: E402
    InteropError,
    export_peft_adapter,
    import_peft_adapter,
    load_hf_gpt2,
    load_hf_tokenizer,
    save_hf_gpt2,
)
from minipeft.workflows.base import BASE_PATH, load_base  # noqa: E402

# third-party deprecation notices (peft calling transformers) are not this file's business
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
transformers.logging.set_verbosity_error()
if hasattr(transformers.utils.logging, "disable_progress_bar"):
    transformers.utils.logging.disable_progress_bar()

RTOL_LOGITS = 1e-5   # of the logits' scale (their largest magnitude)
RTOL_GRAD = 1e-4     # of each gradient's norm
P = 5                # virtual tokens of the soft prompts
V = 96

#: the largest relative logit difference seen, per direction
LARGEST = {"minipeft -> Hugging Face": 0.0, "Hugging Face -> minipeft": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _report_largest(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for direction, value in LARGEST.items():
            reporter.write_line(f"interop: largest relative logit difference {direction}: {value:.2e}")


def rel_diff(ours, theirs, direction) -> float:
    """max |ours - theirs| / max |theirs|, recorded for the closing report."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    d = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    LARGEST[direction] = max(LARGEST[direction], d)
    return d


def tokens(shape, vocab=V, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def load_hf(directory):
    model = transformers.GPT2LMHeadModel.from_pretrained(str(directory))
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The reference configuration, freshly initialised, saved as a GPT-2 folder."""
    d = tmp_path_factory.mktemp("base") / "gpt2"
    save_hf_gpt2(GPT(GPTConfig(), seed=0), d)
    return d


def mp_base():
    """The same base as ``base_dir`` holds (same seed: the same fingerprint)."""
    return GPT(GPTConfig(), seed=0)


# ---------------------------------------------------------------------------
# Models, minipeft -> transformers
# ---------------------------------------------------------------------------


def test_saved_gpt_gives_transformers_the_same_logits_loss_and_gradients(tmp_path):
    model = GPT(GPTConfig(), seed=3)
    save_hf_gpt2(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "m"),
                                                            output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()   # tied
    hf.eval()

    seq = tokens((3, 33), seed=1)
    ids = seq[:, :-1]
    # minipeft's targets come shifted; transformers shifts its labels inside and
    # never scores the last position, so that one is ignored here.
    targets = seq[:, 1:].copy()
    targets[:, -1] = -100
    logits, loss = model(ids, targets)
    loss.backward()
    out = hf(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids))
    out.loss.backward()

    assert rel_diff(logits.data, out.logits.detach().numpy(), "minipeft -> Hugging Face") \
        <= RTOL_LOGITS
    assert abs(float(loss.data) - out.loss.item()) <= RTOL_LOGITS * out.loss.item()
    theirs = {n.removeprefix("transformer."): p.grad.numpy() for n, p in hf.named_parameters()}
    ours = dict(model.named_parameters())
    assert sorted(theirs) == sorted(ours)
    for name, g in theirs.items():
        err = np.linalg.norm(ours[name].grad.astype(np.float64) - g) / np.linalg.norm(g)
        assert err <= RTOL_GRAD, (name, err)


def test_saved_config_holds_gpt2_fields(tmp_path):
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, dropout=0.1))
    save_hf_gpt2(model, tmp_path / "m")
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "m"))
    assert cfg.model_type == "gpt2"
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (2, 4, 32, 64, V)
    assert cfg.activation_function == "gelu_new" and cfg.tie_word_embeddings
    assert cfg.resid_pdrop == cfg.attn_pdrop == cfg.embd_pdrop == 0.1
    again = load_hf_gpt2(tmp_path / "m")
    assert again.config == model.config
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert np.array_equal(p.data, q.data), n


# ---------------------------------------------------------------------------
# Models, transformers -> minipeft
# ---------------------------------------------------------------------------


def _perturbed_gpt2(**config):
    """A transformers GPT-2 with random weights, biases and LayerNorms moved off 0 and 1."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.02 * torch.randn_like(p))
    return model


def test_realistic_gpt2_from_transformers_loads_with_the_same_logits(tmp_path):
    hf = _perturbed_gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=V, n_positions=64)
    hf.save_pretrained(str(tmp_path / "gpt2"))
    model = load_hf_gpt2(tmp_path / "gpt2")
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (12, 768, 12)
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = tokens((2, 24), seed=2)
    assert rel_diff(model(ids).data, hf_logits(hf, ids), "Hugging Face -> minipeft") <= RTOL_LOGITS


def test_old_layout_keys_without_prefix_mask_buffers_and_stored_head(tmp_path):
    from safetensors.torch import save_file

    hf = _perturbed_gpt2(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)
    hf.save_pretrained(str(tmp_path / "m"))
    # the layout of the original GPT-2 files: no prefix, the causal mask stored
    state = {k.removeprefix("transformer."): v.contiguous()
             for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    ids = tokens((2, 16), seed=3)
    assert rel_diff(load_hf_gpt2(tmp_path / "m")(ids).data, hf_logits(hf, ids),
                    "Hugging Face -> minipeft") <= RTOL_LOGITS


def test_bfloat16_checkpoint_is_upcast_exactly(tmp_path):
    hf = _perturbed_gpt2(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "m"))
    model = load_hf_gpt2(tmp_path / "m")
    assert model.dtype == np.float32
    for name, p in hf.named_parameters():
        ours = model.get_submodule(name.removeprefix("transformer.").rpartition(".")[0])
        want = p.detach().float().numpy()
        assert np.array_equal(getattr(ours, name.rpartition(".")[2]).data, want), name


def test_tokenizer_json_and_vocab_merges_give_generation_text(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the red fox jumps over the lazy dog"] * 20, vocab_size=300,
                            min_frequency=1, show_progress=False)
    folder = tmp_path / "m"
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                          vocab_size=bpe.get_vocab_size()))
    save_hf_gpt2(model, folder)
    bpe.save(str(folder / "tokenizer.json"))
    tok = load_hf_tokenizer(folder)
    ids = tok.encode("the red fox")
    assert ids.dtype == np.int64 and tok.decode(ids) == "the red fox"
    out = load_hf_gpt2(folder).generate(ids[None], 5, temperature=0)
    assert out.shape == (1, len(ids) + 5) and tok.decode(out[0]).startswith("the red fox")

    os.remove(folder / "tokenizer.json")
    bpe.save_model(str(folder))                               # vocab.json + merges.txt
    assert load_hf_tokenizer(folder).decode(ids) == "the red fox"
    os.remove(folder / "vocab.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_hf_tokenizer(folder)


# ---------------------------------------------------------------------------
# Adapters, minipeft -> peft
# ---------------------------------------------------------------------------

#: name -> (minipeft config, the peft config of the same adapter)
CASES = {
    "lora": (lambda: LoraConfig(r=4, lora_alpha=8.0, target_modules=["c_attn", "mlp.c_proj"]),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"],
                                     fan_in_fan_out=True, task_type="CAUSAL_LM")),
    # rsLoRA: the exported config must say use_rslora, or peft scales by alpha / r
    "rslora": (lambda: LoraConfig(r=4, lora_alpha=8.0, target_modules=["c_attn"], use_rslora=True),
               lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                       fan_in_fan_out=True, use_rslora=True,
                                       task_type="CAUSAL_LM")),
    "dora": (lambda: LoraConfig(r=4, lora_alpha=8.0, target_modules=["c_attn", "c_fc"],
                                use_dora=True),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                     fan_in_fan_out=True, use_dora=True, task_type="CAUSAL_LM")),
    "ia3": (lambda: IA3Config(scale_queries=True),
            lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                   feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True,
                                   task_type="CAUSAL_LM")),
    "prompt": (lambda: PromptTuningConfig(num_virtual_tokens=P),
               lambda: peft.PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")),
    "prefix": (lambda: PrefixTuningConfig(num_virtual_tokens=P),
               lambda: peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")),
    "prefix_projection": (
        lambda: PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                   encoder_hidden_size=16),
        lambda: peft.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                        encoder_hidden_size=16, task_type="CAUSAL_LM")),
}


def train_minipeft(pm, steps=3, lr=3e-2):
    """A few AdamW steps on random tokens, so that every adapter is away from its start."""
    opt = AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        seq = tokens((4, 17), seed=10 + step)
        _, loss = pm(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


def peft_logits(pm, ids, soft_prompt: bool):
    logits = hf_logits(pm, ids)
    return logits[:, P:] if soft_prompt else logits   # prompt tuning returns the virtual positions


@pytest.mark.parametrize("case", list(CASES) + ["ia3_paper_form"])
def test_adapter_trained_here_loads_in_peft_with_the_same_logits(case, base_dir, tmp_path):
    config = IA3Config() if case == "ia3_paper_form" else CASES[case][0]()
    pm = train_minipeft(get_peft_model(mp_base(), config))
    export_peft_adapter(pm, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    theirs = peft.PeftModel.from_pretrained(load_hf(base_dir), str(tmp_path / "adapter")).eval()
    ids = tokens((2, 20), seed=4)
    ours = pm(ids).data
    d = rel_diff(ours, peft_logits(theirs, ids, case == "prompt"), "minipeft -> Hugging Face")
    assert d <= RTOL_LOGITS
    # the adapter really changed the model, so the comparison means something
    with pm.disable_adapter():
        assert np.abs(pm(ids).data - ours).max() > 1e-3


def test_a_qlora_adapter_exports_as_a_plain_lora_whose_logits_differ_by_the_quantization(
        base_dir, tmp_path):
    """QLoRA adapters ship as plain LoRA: peft puts them on the float32 base, so its
    logits are minipeft's float-base logits, and differ from minipeft's NF4 logits by
    what quantizing the base changes, nothing else."""
    from minipeft.nn.quant import QuantLinear, quantize_model

    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=["c_attn", "mlp.c_proj"])
    qlora = get_peft_model(mp_base(), config)
    quantize_model(qlora, "nf4", 64, True)
    assert sum(isinstance(m, QuantLinear) for m in qlora.modules()) == 16
    train_minipeft(qlora)
    export_peft_adapter(qlora, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"          # a plain LoRA adapter: no quantization in it
    theirs = peft.PeftModel.from_pretrained(load_hf(base_dir), str(tmp_path / "adapter")).eval()
    # the same adapter on minipeft's float32 base
    flt = get_peft_model(mp_base(), config)
    flt.adapters["default"].load_state_dict(flt, qlora.adapters["default"].state_dict(qlora))
    flt.eval()
    ids = tokens((2, 20), seed=4)
    ours_nf4, ours_float = qlora(ids).data, flt(ids).data
    peft_float = hf_logits(theirs, ids)
    assert rel_diff(ours_float, peft_float, "minipeft -> Hugging Face") <= RTOL_LOGITS
    quant_err = np.abs(ours_nf4 - ours_float)
    assert quant_err.max() > 1e3 * RTOL_LOGITS * np.abs(peft_float).max()   # it is there...
    # ...and it is all there is between peft's logits and minipeft's NF4 ones
    np.testing.assert_allclose(np.abs(ours_nf4 - peft_float), quant_err,
                               atol=2 * RTOL_LOGITS * np.abs(peft_float).max())


def test_exported_lora_keys_and_shapes_are_peft_s(base_dir, tmp_path):
    from safetensors.numpy import load_file

    pm = get_peft_model(mp_base(), LoraConfig(r=4, target_modules=["c_attn"]))
    export_peft_adapter(pm, tmp_path / "a")
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 128)
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (384, 4)
    assert len(state) == 2 * 4
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM"


# ---------------------------------------------------------------------------
# Adapters, peft -> minipeft
# ---------------------------------------------------------------------------


def train_peft(pm, steps=3, lr=3e-2):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    pm.train()
    for step in range(steps):
        ids = torch.from_numpy(tokens((4, 16), seed=20 + step))
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "prompt", "prefix"])
def test_adapter_trained_in_peft_imports_with_the_same_logits(case, base_dir, tmp_path):
    torch.manual_seed(0)
    theirs = train_peft(peft.get_peft_model(load_hf(base_dir), CASES[case][1]()))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    pm = import_peft_adapter(load_hf_gpt2(base_dir), tmp_path / "adapter")
    assert pm.trainable_parameters() == []                   # inference unless asked
    ids = tokens((2, 20), seed=5)
    d = rel_diff(pm(ids).data, peft_logits(theirs, ids, case == "prompt"), "Hugging Face -> minipeft")
    assert d <= RTOL_LOGITS
    # and back: minipeft's export of the import is peft's file, value for value
    export_peft_adapter(pm, tmp_path / "again")
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_import_as_trainable_and_as_a_second_adapter(base_dir, tmp_path):
    theirs = peft.get_peft_model(load_hf(base_dir), CASES["ia3"][1]())
    theirs.save_pretrained(str(tmp_path / "ia3"))
    pm = get_peft_model(mp_base(), LoraConfig(r=2))
    out = import_peft_adapter(pm, tmp_path / "ia3", adapter_name="scales", is_trainable=True)
    assert out is pm and pm.active_adapter == "scales" and sorted(pm.adapters) == ["default", "scales"]
    assert sum(p.size for p in pm.trainable_parameters()) == 4 * (384 + 512)


# ---------------------------------------------------------------------------
# Trainable counts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_counts_agree_with_peft(case, base_dir, capsys):
    ours = get_peft_model(mp_base(), CASES[case][0]())
    theirs = peft.get_peft_model(load_hf(base_dir), CASES[case][1]())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    line_ours, line_theirs = capsys.readouterr().out.strip().splitlines()
    assert line_ours == line_theirs


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli_export_base_and_adapter_then_import(tmp_path, capsys, base_dir):
    ckpt = tmp_path / "base.safetensors"
    io.save_checkpoint(mp_base(), ckpt, metadata={"config": json.dumps(vars(GPTConfig()))})
    assert main(["export", "--format", "hf", "--base", "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "hf_base")]) == 0
    hf = load_hf(tmp_path / "hf_base")

    pm = train_minipeft(get_peft_model(mp_base(), LoraConfig(r=4)))
    pm.save_pretrained(str(tmp_path / "ours"))
    assert main(["export", "--format", "hf", "--adapter", str(tmp_path / "ours"),
                 "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf_adapter")]) == 0
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "hf_adapter")).eval()
    ids = tokens((2, 12), seed=6)
    assert rel_diff(pm(ids).data, hf_logits(theirs, ids), "minipeft -> Hugging Face") <= RTOL_LOGITS

    assert main(["import", "--adapter", str(tmp_path / "hf_adapter"), "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "back")]) == 0
    back = PeftModel.from_pretrained(mp_base(), str(tmp_path / "back"))
    assert np.array_equal(back(ids).data, pm(ids).data)
    out = capsys.readouterr().out
    assert "hf_base" in out and "hf_adapter" in out and "back" in out

    # an adapter made for another base is refused, with exit code 2
    other = tmp_path / "other.safetensors"
    io.save_checkpoint(GPT(GPTConfig(), seed=1), other,
                       metadata={"config": json.dumps(vars(GPTConfig()))})
    assert main(["import", "--adapter", str(tmp_path / "hf_adapter"), "--checkpoint", str(other),
                 "--out", str(tmp_path / "nope")]) == 2
    assert "another base" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


@pytest.mark.skipif(not os.path.isfile(BASE_PATH), reason="the shipped base is not built yet")
def test_cli_shipped_base_and_a_full_fine_tuning_export_as_gpt2_models(tmp_path, capsys):
    assert main(["export", "--format", "hf", "--base", "--out", str(tmp_path / "base")]) == 0
    ids = tokens((2, 12), seed=7)
    base = load_base()
    assert rel_diff(base(ids).data, hf_logits(load_hf(tmp_path / "base"), ids),
                    "minipeft -> Hugging Face") <= RTOL_LOGITS

    # full fine-tuning is no adapter: the export is the whole fine-tuned model
    pm = train_minipeft(get_peft_model(base, FullFinetuneConfig()), steps=1, lr=1e-3)
    pm.save_pretrained(str(tmp_path / "full"))
    assert main(["export", "--format", "hf", "--adapter", str(tmp_path / "full"),
                 "--out", str(tmp_path / "full_hf")]) == 0
    assert "whole fine-tuned model" in capsys.readouterr().out
    assert rel_diff(pm(ids).data, hf_logits(load_hf(tmp_path / "full_hf"), ids),
                    "minipeft -> Hugging Face") <= RTOL_LOGITS


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _write_config(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))


def test_a_folder_that_is_not_gpt2(tmp_path):
    _write_config(tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(InteropError, match="'llama' model, not GPT-2"):
        load_hf_gpt2(tmp_path / "llama")
    _write_config(tmp_path / "relu", model_type="gpt2", activation_function="relu")
    with pytest.raises(InteropError, match="activation_function is 'relu'"):
        load_hf_gpt2(tmp_path / "relu")


def test_missing_files(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_hf_gpt2(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_gpt2(tmp_path / "empty")
    _write_config(tmp_path / "noweights", model_type="gpt2")
    (tmp_path / "noweights" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*pytorch_model.bin"):
        load_hf_gpt2(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hf_gpt2(tmp_path / "noweights")

    pm = get_peft_model(mp_base(), LoraConfig(r=2))
    export_peft_adapter(pm, tmp_path / "adapter")
    os.remove(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter weights not found"):
        import_peft_adapter(mp_base(), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft_adapter(mp_base(), base_dir)


def test_shapes_that_do_not_match(tmp_path, base_dir):
    # a config.json that says 64 wide beside 128-wide weights
    folder = tmp_path / "m"
    save_hf_gpt2(mp_base(), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(InteropError, match=r"do not fit.*wte.weight: file \(96, 128\) vs config \(96, 64\)"):
        load_hf_gpt2(folder)

    # an adapter of the 128-wide base onto a 64-wide one: the fingerprint tells
    pm = get_peft_model(mp_base(), LoraConfig(r=2))
    export_peft_adapter(pm, tmp_path / "adapter")
    small = GPT(GPTConfig(n_embd=64))
    with pytest.raises(InteropError, match="made for another base model"):
        import_peft_adapter(small, tmp_path / "adapter")
    # and without one (as peft saves it), the shapes do
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    state, _ = io.load_tensors(weights)
    io.save_tensors(state, weights, metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"lora_A.weight has shape \(2, 128\), this base needs "
                                           r"\(2, 64\): the adapter was made for another base"):
        import_peft_adapter(small, tmp_path / "adapter")
    assert all(p.requires_grad for p in small.parameters())     # untouched
    assert type(small.h[0].attn.c_attn) is type(small.h[0].attn.c_proj)


@pytest.mark.parametrize("config", [
    AdapterConfig(bottleneck=4), MaskConfig(density=0.1), LayerSelectConfig(layers=[-1]),
    BitFitConfig(), FullFinetuneConfig(),
], ids=lambda c: type(c).__name__)
def test_methods_peft_lacks_are_refused_clearly(config, tmp_path):
    pm = get_peft_model(mp_base(), config)
    with pytest.raises(InteropError, match="peft has no such method"):
        export_peft_adapter(pm, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_peft_features_minipeft_lacks_are_refused_clearly(base_dir, tmp_path):
    theirs = peft.get_peft_model(load_hf(base_dir), peft.LoraConfig(
        r=2, target_modules=["c_attn"], fan_in_fan_out=True, bias="all", task_type="CAUSAL_LM"))
    theirs.save_pretrained(str(tmp_path / "bias"))
    with pytest.raises(InteropError, match="trained biases"):
        import_peft_adapter(mp_base(), tmp_path / "bias")
    # LoHa (peft has it, minipeft does not; peft's LoHa cannot wrap GPT-2's Conv1D, so
    # the folder is written by hand)
    (tmp_path / "loha").mkdir()
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": 2, "target_modules": ["c_attn"]}))
    io.save_tensors({"base_model.model.transformer.h.0.attn.c_attn.hada_w1_a": np.ones((2, 128))},
                    tmp_path / "loha" / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InteropError, match="LOHA adapter; minipeft imports IA3, LORA"):
        import_peft_adapter(mp_base(), tmp_path / "loha")
    pm = get_peft_model(mp_base(), LoraConfig(r=2))
    pm.merge_adapter()
    with pytest.raises(InteropError, match="unmerge"):
        export_peft_adapter(pm, tmp_path / "merged")


def _fail_writing(monkeypatch):
    import safetensors.numpy

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)


def test_nothing_half_written_on_failure(tmp_path, monkeypatch):
    model = mp_base()
    pm = get_peft_model(GPT(GPTConfig(), seed=0), LoraConfig(r=2))
    save_hf_gpt2(model, tmp_path / "kept")
    export_peft_adapter(pm, tmp_path / "kept_adapter")
    before = {p: p.read_bytes() for d in ("kept", "kept_adapter") for p in (tmp_path / d).iterdir()}

    _fail_writing(monkeypatch)
    for write in (lambda d: save_hf_gpt2(model, d), lambda d: export_peft_adapter(pm, d)):
        with pytest.raises(OSError, match="No space"):
            write(tmp_path / "new")
        assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="No space"):
        save_hf_gpt2(model, tmp_path / "kept")
    with pytest.raises(OSError, match="No space"):
        export_peft_adapter(pm, tmp_path / "kept_adapter")
    after = {p: p.read_bytes() for d in ("kept", "kept_adapter") for p in (tmp_path / d).iterdir()}
    assert after == before                                  # old files intact, no temporaries
    assert sorted(os.listdir(tmp_path)) == ["kept", "kept_adapter"]


def test_the_package_never_imports_torch_or_transformers():
    """Every module, interop included, imports without them (the tokenizer loads lazily)."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, minipeft\n"
            "for m in pkgutil.walk_packages(minipeft.__path__, 'minipeft.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "print(sorted(k for k in ('torch', 'transformers', 'peft', 'tokenizers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
