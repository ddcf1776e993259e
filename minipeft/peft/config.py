r"""One configuration dataclass per method, named as Hugging Face peft names them.

A config says *what* a method trains and how big it is; the method's module
says *how*. Configs round-trip through JSON (``to_dict`` / ``config_from_dict``)
because an adapter folder stores its config beside its weights, and they
validate themselves on creation so a bad knob fails at once with a message
that says what was expected.

The families of the story:

* selective (train a subset of existing weights): :class:`FullFinetuneConfig`
  (the baseline: everything), :class:`BitFitConfig`, :class:`LayerSelectConfig`,
  :class:`MaskConfig`;
* reparameterization: :class:`LoraConfig` (DoRA as an option);
* additive: :class:`AdapterConfig`, :class:`PromptTuningConfig`,
  :class:`PrefixTuningConfig`, :class:`IA3Config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

CONFIGS: dict[str, type] = {}


def _register(cls):
    CONFIGS[cls.peft_type] = cls
    return cls


@dataclass
class PeftConfig:
    """Base of every method's config: a type tag, validation and JSON round trip."""

    peft_type: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on a knob out of range (subclasses extend)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d

    @property
    def method(self) -> str:
        """The short method name used by the CLI (``lora``, ``bitfit``, ...)."""
        return METHOD_OF_TYPE[self.peft_type]


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_targets(name, value):
    if value is None:
        return
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"{name} must be a list of module names (e.g. ['c_attn']), got {value!r}"
        )


# ---------------------------------------------------------------------------
# Selective
# ---------------------------------------------------------------------------


@_register
@dataclass
class FullFinetuneConfig(PeftConfig):
    """Full fine-tuning through the same entry point: every parameter trains."""

    peft_type: ClassVar[str] = "FULL"
    family: ClassVar[str] = "baseline"


@_register
@dataclass
class BitFitConfig(PeftConfig):
    """BitFit: train only bias terms (all of them, or those of chosen modules).

    ``target_modules`` restricts to the biases of matching modules
    (e.g. ``["c_attn"]`` or ``["mlp.c_fc"]``); ``None`` means every bias,
    LayerNorm biases included.
    """

    target_modules: list[str] | None = None
    peft_type: ClassVar[str] = "BITFIT"
    family: ClassVar[str] = "selective"

    def validate(self):
        _check_targets("target_modules", self.target_modules)


COMPONENTS = ("attn", "mlp", "ln", "embeddings", "ln_f")


@_register
@dataclass
class LayerSelectConfig(PeftConfig):
    """Train chosen layers, components and parameter types of the base.

    A parameter trains when it passes every filter that is set:

    * ``layers``: block indices (negative counts from the end: ``[-2, -1]``
      are the last two blocks); parameters outside blocks pass only if no
      layer filter is set, or if ``components`` names them (``embeddings``,
      ``ln_f``);
    * ``components``: any of ``attn``, ``mlp``, ``ln`` (the blocks'
      LayerNorms), ``embeddings`` (``wte``, ``wpe``), ``ln_f``;
    * ``param_types``: ``weight`` and/or ``bias``;
    * ``patterns``: regular expressions searched in the parameter's name.
    """

    layers: list[int] | None = None
    components: list[str] | None = None
    param_types: list[str] | None = None
    patterns: list[str] | None = None
    peft_type: ClassVar[str] = "SELECTIVE"
    family: ClassVar[str] = "selective"

    def validate(self):
        if self.components is not None:
            bad = [c for c in self.components if c not in COMPONENTS]
            if bad:
                raise ValueError(f"unknown components {bad}: choose from {list(COMPONENTS)}")
        if self.param_types is not None:
            bad = [t for t in self.param_types if t not in ("weight", "bias")]
            if bad:
                raise ValueError(f"unknown param_types {bad}: choose from ['weight', 'bias']")
        if self.layers is not None and not all(isinstance(i, int) for i in self.layers):
            raise ValueError(f"layers must be a list of block indices, got {self.layers!r}")
        if all(v is None for v in (self.layers, self.components, self.param_types, self.patterns)):
            raise ValueError(
                "LayerSelectConfig selects nothing: set layers, components, param_types "
                "or patterns (use FullFinetuneConfig to train everything)"
            )


@_register
@dataclass
class MaskConfig(PeftConfig):
    r"""Element masks: train a fraction ``density`` of the entries of chosen weights.

    ``selection`` picks the entries: ``random``, ``magnitude`` (largest
    :math:`|w|`) or ``gradient`` (largest :math:`|\partial L/\partial w|` on a
    calibration batch). The gradient is computed in full and masked; the
    optimizer keeps state only for the selected entries.
    """

    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    density: float = 0.01
    selection: str = "random"
    seed: int = 0
    peft_type: ClassVar[str] = "MASK"
    family: ClassVar[str] = "selective"

    def validate(self):
        _check_targets("target_modules", self.target_modules)
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if self.selection not in ("random", "magnitude", "gradient"):
            raise ValueError(
                f"selection must be 'random', 'magnitude' or 'gradient', got {self.selection!r}"
            )


# ---------------------------------------------------------------------------
# Reparameterization
# ---------------------------------------------------------------------------


@_register
@dataclass
class LoraConfig(PeftConfig):
    r"""LoRA: :math:`y = xW + b + \frac{\alpha}{r}\,(x A) B` on every matching Linear.

    ``r`` is the rank, ``lora_alpha`` the numerator of the scaling
    :math:`\alpha / r`, ``lora_dropout`` the dropout applied to x on the LoRA
    branch only. ``use_dora`` adds DoRA's learned magnitude. ``use_rslora``
    is rank-stabilised LoRA (Kalajdzievski 2023): the scaling becomes
    :math:`\alpha / \sqrt r`, so that the update's size does not shrink as r
    grows (peft's option of the same name).

    ``freeze_A`` is LoRA-FA (Zhang et al. 2023): A stays at its random
    initialisation and only B trains. B's gradient
    :math:`(xA)^\top g` needs only the r-wide product xA, so the branch keeps
    N·r saved floats instead of N·(in + r): the engine already saves nothing
    for a weight that needs no gradient. The adapter file still holds A (an
    ordinary LoRA adapter: peft loads it as one).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])
    use_dora: bool = False
    init_seed: int = 0
    freeze_A: bool = False
    use_rslora: bool = False
    peft_type: ClassVar[str] = "LORA"
    family: ClassVar[str] = "reparameterization"

    def validate(self):
        _check_positive_int("r", self.r)
        _check_targets("target_modules", self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one Linear (e.g. 'c_attn')")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if float(self.lora_alpha) <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not isinstance(self.freeze_A, bool):
            raise ValueError(f"freeze_A must be True or False, got {self.freeze_A!r}")

    @property
    def scaling(self) -> float:
        r""":math:`\alpha / r`, or :math:`\alpha / \sqrt r` with ``use_rslora``."""
        return float(self.lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)


# ---------------------------------------------------------------------------
# Additive
# ---------------------------------------------------------------------------


@_register
@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapters: x + up(f(down(x))) after attention and/or the MLP.

    ``placement`` ``houlsby`` puts one after the attention output projection
    and one after the MLP; ``pfeiffer`` only after the MLP. ``bottleneck`` is
    the inner width; the up-projection starts at zero so the adapter starts as
    the identity.
    """

    bottleneck: int = 16
    placement: str = "houlsby"
    nonlinearity: str = "relu"
    init_seed: int = 0
    peft_type: ClassVar[str] = "ADAPTER"
    family: ClassVar[str] = "additive"

    def validate(self):
        _check_positive_int("bottleneck", self.bottleneck)
        if self.placement not in ("houlsby", "pfeiffer"):
            raise ValueError(f"placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        if self.nonlinearity not in ("relu", "gelu", "tanh"):
            raise ValueError(
                f"nonlinearity must be 'relu', 'gelu' or 'tanh', got {self.nonlinearity!r}"
            )

    @property
    def target_modules(self) -> list[str]:
        return ["attn.c_proj", "mlp.c_proj"] if self.placement == "houlsby" else ["mlp.c_proj"]


@_register
@dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning: P trainable virtual-token embeddings prepended to the input.

    ``prompt_tuning_init``: ``VOCAB`` (rows of the token embedding ``wte``
    at randomly drawn token ids), ``TEXT`` (the embeddings of
    ``prompt_tuning_init_text``, repeated to length P) or ``RANDOM``
    (N(0, 0.02^2), the scale of GPT-2's embeddings). Real tokens take
    positions P..P+T-1, so P + T may not exceed ``n_positions``.
    """

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "VOCAB"
    prompt_tuning_init_text: str | None = None
    init_seed: int = 0
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    family: ClassVar[str] = "additive"

    def validate(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 0:
            raise ValueError(
                f"num_virtual_tokens must be a non-negative integer, got {self.num_virtual_tokens!r}"
            )
        if self.prompt_tuning_init not in ("VOCAB", "TEXT", "RANDOM"):
            raise ValueError(
                "prompt_tuning_init must be 'VOCAB', 'TEXT' or 'RANDOM', "
                f"got {self.prompt_tuning_init!r}"
            )
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")


@_register
@dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning: P trainable key and value vectors in every layer.

    With ``prefix_projection`` the prefixes are produced during training by a
    two-layer MLP from P embeddings (Li and Liang's reparameterisation);
    the adapter file stores the P x n_layer x 2 x n_embd prefixes it produces,
    as peft does, not the MLP.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int = 128
    init_seed: int = 0
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    family: ClassVar[str] = "additive"

    def validate(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 0:
            raise ValueError(
                f"num_virtual_tokens must be a non-negative integer, got {self.num_virtual_tokens!r}"
            )
        _check_positive_int("encoder_hidden_size", self.encoder_hidden_size)


@_register
@dataclass
class IA3Config(PeftConfig):
    r"""(IA)^3: learned vectors that rescale keys, values and the MLP's inner activation.

    The paper's form scales k and v (the fused ``c_attn`` output's last two
    thirds) and the input of ``mlp.c_proj``. ``scale_queries`` also scales q,
    which is what a library that scales GPT-2's whole fused ``c_attn``
    output does (Hugging Face peft's count). Vectors start at one: the
    identity.
    """

    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "mlp.c_proj"])
    feedforward_modules: list[str] = field(default_factory=lambda: ["mlp.c_proj"])
    scale_queries: bool = False
    peft_type: ClassVar[str] = "IA3"
    family: ClassVar[str] = "additive"

    def validate(self):
        _check_targets("target_modules", self.target_modules)
        _check_targets("feedforward_modules", self.feedforward_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty")


# ---------------------------------------------------------------------------
# Names and JSON
# ---------------------------------------------------------------------------

METHOD_OF_TYPE = {
    "FULL": "full", "BITFIT": "bitfit", "SELECTIVE": "layers", "MASK": "mask", "LORA": "lora",
    "ADAPTER": "adapter", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix", "IA3": "ia3",
}
TYPE_OF_METHOD = {v: k for k, v in METHOD_OF_TYPE.items()}
METHODS = tuple(METHOD_OF_TYPE.values())


def config_class(method: str) -> type:
    """The config class for a method name (``lora``) or peft type (``LORA``)."""
    key = TYPE_OF_METHOD.get(method, method)
    if key not in CONFIGS:
        raise ValueError(
            f"unknown method {method!r}: choose from {', '.join(METHODS)}"
        )
    return CONFIGS[key]


def config_from_dict(d: dict) -> PeftConfig:
    """Rebuild a config from ``to_dict()`` output, refusing unknown types and fields."""
    d = dict(d)
    peft_type = d.pop("peft_type", None)
    if peft_type not in CONFIGS:
        raise ValueError(f"unknown peft_type {peft_type!r}: known types are {sorted(CONFIGS)}")
    cls = CONFIGS[peft_type]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; known fields: {sorted(names)}")
    return cls(**d)


# ---------------------------------------------------------------------------
# Additive, beside the backbone
# ---------------------------------------------------------------------------


@_register
@dataclass
class LSTConfig(PeftConfig):
    r"""Ladder side-tuning (Sung et al. 2022): a narrow side network beside a frozen backbone.

    The backbone (width D, L blocks) runs under ``no_grad``; a side network of
    width :math:`d = D / k` (``k = reduction_factor``) reads its hidden states
    :math:`h_0` (the embeddings) and :math:`h_i` (block i's output) through
    trainable down-projections ("ladders") and writes its output back before
    the backbone's frozen final LayerNorm and tied head:

    .. math::
        s_0 = h_0 W^{\downarrow}_0 + b^{\downarrow}_0, \qquad
        s_i = g_i\,(h_i W^{\downarrow}_i + b^{\downarrow}_i) + (1 - g_i)\,f_i(s_{i-1}),
        \quad g_i = \sigma(\alpha_i / T),

        \text{logits} = \mathrm{ln\_f}\big(h_L + s_L W^{\uparrow} + b^{\uparrow}\big)\,
        W_{te}^\top

    with :math:`f_i` a pre-norm GPT-2 block of width d (``side_num_heads``
    heads of d / ``side_num_heads`` channels, MLP 4d wide, no dropout), one
    per backbone block: depth L. ``gate_temperature`` is T (0.1, the
    paper's).

    Zero-initialised parts: the gate logits :math:`\alpha_i` (so every gate
    starts at :math:`\sigma(0) = 0.5`, as in the paper), the up-projection
    :math:`W^{\uparrow}, b^{\uparrow}` and the biases of the ladders. With
    :math:`W^{\uparrow} = 0` the wrapped model at initialisation *is* the base:
    logits :math:`= \mathrm{ln\_f}(h_L)\,W_{te}^\top`, bit for bit.

    The side blocks are initialised at random (GPT-2's N(0, 0.02^2), residual
    projections scaled by :math:`1/\sqrt{2L}`, drawn from ``init_seed``), not
    by the paper's structured pruning of the backbone's blocks: pruning needs
    a ranking of the backbone's channels (the paper ranks them by Fisher
    information on task data), so the adapter would depend on a calibration
    batch; at the reference size (d = 16) the side network is small enough to
    learn from scratch, and a random start keeps the method data-free and
    reproducible from its seed.
    """

    reduction_factor: int = 8
    side_num_heads: int = 2
    gate_temperature: float = 0.1
    init_seed: int = 0
    peft_type: ClassVar[str] = "LST"
    family: ClassVar[str] = "additive"

    def validate(self):
        _check_positive_int("reduction_factor", self.reduction_factor)
        _check_positive_int("side_num_heads", self.side_num_heads)
        t = self.gate_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"gate_temperature must be a positive number, got {t!r}")

    @property
    def method(self) -> str:
        return "lst"

    def side_config(self, base_config):
        r"""The side network's shape for a backbone of ``base_config`` (a GPTConfig).

        A GPTConfig of width :math:`d = D / k`, ``side_num_heads`` heads and the
        backbone's depth, positions and vocabulary; every side block is a
        :class:`~minipeft.nn.gpt.Block` of this config. Raises ValueError
        when k does not divide D or the heads do not divide d.
        """
        from ..nn.gpt import GPTConfig

        D, k, nh = base_config.n_embd, self.reduction_factor, self.side_num_heads
        if D % k:
            raise ValueError(
                f"reduction_factor={k} does not divide the backbone's width n_embd={D}: "
                f"choose a divisor of {D} (the side width is n_embd // reduction_factor)"
            )
        if (D // k) % nh:
            raise ValueError(
                f"side_num_heads={nh} does not divide the side width {D // k} "
                f"(n_embd {D} / reduction_factor {k}): choose a divisor of {D // k}"
            )
        return GPTConfig(n_layer=base_config.n_layer, n_head=nh, n_embd=D // k,
                         vocab_size=base_config.vocab_size,
                         n_positions=base_config.n_positions, dropout=0.0,
                         layer_norm_epsilon=base_config.layer_norm_epsilon)
