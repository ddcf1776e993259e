"""Shared fixtures of the PEFT suites: a small base, token batches, one config per method.

Every method of :mod:`minipeft.peft` appears in :data:`CASES` under a short
name, built for the small model (2 blocks of width 16, vocabulary 11, 16
positions) so that whole-model checks stay fast. Soft prompts use P = 3
virtual tokens; ladder side-tuning a side network of width 4 (k = 4), 2 heads.
"""

from __future__ import annotations

import numpy as np

from minipeft import GPT, GPTConfig, backend
from minipeft.peft import (
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    IA3Config,
    LayerSelectConfig,
    LoraConfig,
    LSTConfig,
    MaskConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

SMALL = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=11, n_positions=16)
B, T = 2, 5
P = 3  # virtual tokens of the soft-prompt cases


def small_base(device="cpu", dtype=np.float32, seed=0, **over) -> GPT:
    return GPT(GPTConfig(**{**SMALL, **over}), seed=seed).to(device, dtype=dtype)


def tokens(shape=(B, T), vocab=SMALL["vocab_size"], seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def batch(seed=0):
    """(idx, targets), targets shifted by one as a language-model batch would be."""
    seq = tokens((B, T + 1), seed=seed)
    return seq[:, :-1], seq[:, 1:]


def host(a) -> np.ndarray:
    """A host copy of an array or a Tensor's data."""
    return backend.asnumpy(getattr(a, "data", a)).copy()


ALL_TARGETS = ["c_attn", "c_proj", "c_fc"]

#: name -> (config factory, keyword arguments for get_peft_model)
CASES = {
    "lora": (lambda: LoraConfig(r=2, lora_alpha=4.0, target_modules=ALL_TARGETS), {}),
    "lora_fa": (lambda: LoraConfig(r=2, lora_alpha=4.0, target_modules=ALL_TARGETS,
                                   freeze_A=True), {}),
    "dora": (lambda: LoraConfig(r=2, lora_alpha=4.0, target_modules=ALL_TARGETS,
                                use_dora=True), {}),
    "adapter_houlsby": (lambda: AdapterConfig(bottleneck=4), {}),
    "adapter_pfeiffer": (lambda: AdapterConfig(bottleneck=4, placement="pfeiffer",
                                               nonlinearity="gelu"), {}),
    "ia3": (lambda: IA3Config(), {}),
    "ia3_queries": (lambda: IA3Config(scale_queries=True), {}),
    "prompt": (lambda: PromptTuningConfig(num_virtual_tokens=P), {}),
    "prefix": (lambda: PrefixTuningConfig(num_virtual_tokens=P), {}),
    "prefix_projection": (lambda: PrefixTuningConfig(num_virtual_tokens=P,
                                                     prefix_projection=True,
                                                     encoder_hidden_size=8), {}),
    "bitfit": (lambda: BitFitConfig(), {}),
    "bitfit_attn": (lambda: BitFitConfig(target_modules=["c_attn"]), {}),
    "layers": (lambda: LayerSelectConfig(layers=[-1], components=["attn", "ln"]), {}),
    "mask_random": (lambda: MaskConfig(density=0.1), {}),
    "mask_magnitude": (lambda: MaskConfig(density=0.1, selection="magnitude",
                                          target_modules=["c_fc"]), {}),
    "mask_gradient": (lambda: MaskConfig(density=0.1, selection="gradient",
                                         target_modules=["attn.c_proj"]),
                      {"calibration_batch": batch(seed=7)}),
    "lst": (lambda: LSTConfig(reduction_factor=4, side_num_heads=2), {}),
    "full": (lambda: FullFinetuneConfig(), {}),
}

#: methods that leave the base's function unchanged at initialisation, bit for bit
IDENTITY_AT_INIT = [n for n in CASES if n not in ("dora", "prompt", "prefix",
                                                  "prefix_projection")]
#: methods that may share a base with others (all but full fine-tuning)
SHAREABLE = [n for n in CASES if n != "full"]
MERGEABLE = ["lora", "lora_fa", "dora", "ia3", "ia3_queries"]
MASKS = ["mask_random", "mask_magnitude", "mask_gradient"]
SOFT_PROMPTS = ["prompt", "prefix", "prefix_projection"]


def config_of(name):
    make, kwargs = CASES[name]
    return make(), kwargs


def wrap(name, base=None, adapter_name="default", device="cpu", dtype=np.float32):
    """get_peft_model for the named case, on a fresh small base unless one is given."""
    base = small_base(device, dtype) if base is None else base
    config, kwargs = config_of(name)
    return get_peft_model(base, config, adapter_name, **kwargs)


def perturb(model, scale=0.1, seed=3) -> None:
    """Add noise to every trainable parameter, so zero-initialised ones (LoRA B,
    adapter up-projections) stop hiding the gradients of the others."""
    rng = np.random.default_rng(seed)
    for p in model.trainable_parameters():
        noise = rng.standard_normal(p.shape) * scale
        p.data = backend.to_device(host(p) + noise.astype(p.dtype), p.device)


def snapshot(model) -> dict:
    """name -> host copy of every parameter (base and adapters)."""
    return {n: host(p) for n, p in model.named_parameters()}


def logits_of(model, idx) -> np.ndarray:
    return host(model(idx))
