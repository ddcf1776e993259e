r"""One configuration dataclass per method, named as Hugging Face peft names them.

A config says *what* a method trains and how big it is; the method's module
says *how*. Configs round-trip through JSON (``to_dict`` / ``config_from_dict``)
because an adapter folder stores its config beside its weights.

Every field declares its rule beside its default (``r: int = knob(8,
Int(low=1))``, rules in :mod:`minipeft.validate`), and one walk over the
fields checks them: at creation, when a config is read back from a file,
and when a model is given it. A bad knob fails at once with a message that
names it and says what it may be. What needs the model (a rank above
``min(in, out)`` of a targeted layer, a layer index beyond the last block)
is checked when the method is injected, before anything is changed.

A saved dict carries ``format`` (:data:`CONFIG_FORMAT`), which says which
fields the file must hold; a dict without it is format 1.

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
from dataclasses import dataclass
from typing import ClassVar

from ..nn.gpt import GPTConfig
from ..validate import Bool, Choice, Float, Int, Ints, KnobTypeError, Names, Text, check_fields, knob

CONFIGS: dict[str, type] = {}

#: The version of the saved config dict (``to_dict()["format"]``). A dict
#: without the key is version 1: every field of today's classes, all present.
#: A field added later declares ``knob(..., since=N)``; a file of an older
#: version lacks it and gets its default, so older adapters stay loadable.
#: Version 2 added ``LoraConfig.freeze_A`` (LoRA-FA), ``LoraConfig.use_rslora``
#: and :class:`LSTConfig`.
CONFIG_FORMAT = 2


def _register(cls):
    CONFIGS[cls.peft_type] = cls
    return cls


@dataclass
class PeftConfig:
    """Base of every method's config: a type tag, validation and JSON round trip.

    Every field declares its rule beside its default (``knob(8, Int(low=1))``,
    see :mod:`minipeft.validate`); :meth:`validate` checks them all, at
    construction and again when a config is read from a file or handed to a
    model. A subclass adds only rules that tie fields together
    (:meth:`check_together`).
    """

    peft_type: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (KnobTypeError for a wrong type) naming the first bad knob."""
        check_fields(self)
        self.check_together()

    def check_together(self) -> None:
        """Rules between fields (a subclass's; none by default)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        d["format"] = CONFIG_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PeftConfig:
        """This class's config from a saved dict (without ``peft_type``), checked like a new one.

        The dict's ``format`` (1 when absent) says which fields it must hold:
        those that version had. A field added by a later version takes its
        default. An unknown key is refused, not dropped: it is most often a
        misspelt knob (``lora_aplha``), and dropping it would train or load
        with the default in its place, silently.
        """
        d = dict(d)
        fmt = d.pop("format", 1)
        if not (isinstance(fmt, int) and not isinstance(fmt, bool)) or fmt < 1:
            raise ValueError(f"{cls.__name__}: format must be a positive integer (the version of "
                             f"the saved config; 1 when absent), got {fmt!r}")
        if fmt > CONFIG_FORMAT:
            raise ValueError(
                f"{cls.__name__}: the config is of format {fmt}, newer than this minipeft reads "
                f"(up to {CONFIG_FORMAT}): upgrade minipeft to load it"
            )
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}; known fields: "
                             f"{sorted(names)}. Remove or rename them in the file")
        missing = [f.name for f in fields if f.metadata.get("since", 1) <= fmt and f.name not in d]
        if missing:
            defaults = {f.name: _default(f) for f in fields if f.name in missing}
            raise ValueError(
                f"{cls.__name__}: the saved config (format {fmt}) lacks the required field(s) "
                f"{missing}; add them to the file (the defaults are {defaults}) or save the "
                "adapter again"
            )
        try:
            return cls(**d)
        except ValueError as exc:      # KnobTypeError is one too
            raise type(exc)(f"{cls.__name__} in the saved config: {exc}") from None

    @property
    def method(self) -> str:
        """The short method name used by the CLI (``lora``, ``bitfit``, ...)."""
        return METHOD_OF_TYPE[self.peft_type]


def _default(f):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


#: The rule of a list of Linear names (peft's ``target_modules``).
TARGETS = Names()


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

    target_modules: list[str] | None = knob(None, Names(optional=True))
    peft_type: ClassVar[str] = "BITFIT"
    family: ClassVar[str] = "selective"


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

    layers: list[int] | None = knob(None, Ints(optional=True, what="block indices (e.g. [-1])"))
    components: list[str] | None = knob(
        None, Names(optional=True, choices=COMPONENTS, of="components", example="['attn']"))
    param_types: list[str] | None = knob(
        None, Names(optional=True, choices=("weight", "bias"), of="parameter types",
                    example="['bias']"))
    patterns: list[str] | None = knob(
        None, Names(optional=True, regex=True, of="regular expressions", example="['ln_']"))
    peft_type: ClassVar[str] = "SELECTIVE"
    family: ClassVar[str] = "selective"

    def check_together(self):
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

    target_modules: list[str] = knob(["c_attn", "c_proj", "c_fc"], TARGETS)
    density: float = knob(0.01, Float(low=0.0, high=1.0, low_open=True))
    selection: str = knob("random", Choice(choices=("random", "magnitude", "gradient")))
    seed: int = knob(0, Int(low=0))
    peft_type: ClassVar[str] = "MASK"
    family: ClassVar[str] = "selective"


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

    r: int = knob(8, Int(low=1))
    lora_alpha: float = knob(8.0, Float(low=0.0, low_open=True,
                                        expect="positive (a finite number > 0)"))
    lora_dropout: float = knob(0.0, Float(low=0.0, high=1.0, high_open=True))
    target_modules: list[str] = knob(["c_attn"], TARGETS)
    use_dora: bool = knob(False, Bool())
    init_seed: int = knob(0, Int(low=0))
    freeze_A: bool = knob(False, Bool(), since=2)
    use_rslora: bool = knob(False, Bool(), since=2)
    peft_type: ClassVar[str] = "LORA"
    family: ClassVar[str] = "reparameterization"

    @property
    def scaling(self) -> float:
        r""":math:`\alpha / r`, or :math:`\alpha / \sqrt r` with ``use_rslora``."""
        return float(self.lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def method(self) -> str:
        return "lora_fa" if self.freeze_A else "lora"


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

    bottleneck: int = knob(16, Int(low=1))
    placement: str = knob("houlsby", Choice(choices=("houlsby", "pfeiffer")))
    nonlinearity: str = knob("relu", Choice(choices=("relu", "gelu", "tanh")))
    init_seed: int = knob(0, Int(low=0))
    peft_type: ClassVar[str] = "ADAPTER"
    family: ClassVar[str] = "additive"

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

    num_virtual_tokens: int = knob(20, Int(low=0))
    prompt_tuning_init: str = knob("VOCAB", Choice(choices=("VOCAB", "TEXT", "RANDOM")))
    prompt_tuning_init_text: str | None = knob(None, Text(optional=True))
    init_seed: int = knob(0, Int(low=0))
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    family: ClassVar[str] = "additive"

    def check_together(self):
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text "
                             "(the text whose embeddings start the prompt)")
        if self.prompt_tuning_init != "TEXT" and self.prompt_tuning_init_text is not None:
            raise ValueError(
                f"prompt_tuning_init_text is used only with prompt_tuning_init='TEXT' (here "
                f"{self.prompt_tuning_init!r}): set prompt_tuning_init='TEXT' or drop the text"
            )


@_register
@dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning: P trainable key and value vectors in every layer.

    With ``prefix_projection`` the prefixes are produced during training by a
    two-layer MLP from P embeddings (Li and Liang's reparameterisation);
    the adapter file stores the P x n_layer x 2 x n_embd prefixes it produces,
    as peft does, not the MLP.
    """

    num_virtual_tokens: int = knob(20, Int(low=0))
    prefix_projection: bool = knob(False, Bool())
    encoder_hidden_size: int = knob(128, Int(low=1))
    init_seed: int = knob(0, Int(low=0))
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    family: ClassVar[str] = "additive"


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

    target_modules: list[str] = knob(["c_attn", "mlp.c_proj"], TARGETS)
    feedforward_modules: list[str] = knob(["mlp.c_proj"], Names(non_empty=False,
                                                                example="['mlp.c_proj']"))
    scale_queries: bool = knob(False, Bool())
    peft_type: ClassVar[str] = "IA3"
    family: ClassVar[str] = "additive"


# ---------------------------------------------------------------------------
# Names and JSON
# ---------------------------------------------------------------------------

METHOD_OF_TYPE = {
    "FULL": "full", "BITFIT": "bitfit", "SELECTIVE": "layers", "MASK": "mask", "LORA": "lora",
    "ADAPTER": "adapter", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix", "IA3": "ia3",
    "LST": "lst",
}
TYPE_OF_METHOD = {v: k for k, v in METHOD_OF_TYPE.items()}
#: method names that are another type's config with knobs set (peft has no LoRA-FA
#: type: it is ``LoraConfig(freeze_A=True)``, and its files are plain LoRA adapters)
VARIANTS = {"lora_fa": ("LORA", {"freeze_A": True})}
METHODS = tuple(m for v in METHOD_OF_TYPE.values()
                for m in (v, *(n for n, (t, _) in VARIANTS.items() if METHOD_OF_TYPE[t] == v)))


def config_class(method: str) -> type:
    """The config class for a method name (``lora``, ``lora_fa``) or peft type (``LORA``)."""
    key = VARIANTS[method][0] if method in VARIANTS else TYPE_OF_METHOD.get(method, method)
    if key not in CONFIGS:
        raise ValueError(
            f"unknown method {method!r}: choose from {', '.join(METHODS)}"
        )
    return CONFIGS[key]


def method_config(method: str, **knobs) -> PeftConfig:
    """The config of a method name with ``knobs`` (a variant's own knobs first:
    ``method_config("lora_fa", r=4)`` is ``LoraConfig(freeze_A=True, r=4)``)."""
    preset = VARIANTS[method][1] if method in VARIANTS else {}
    return config_class(method)(**{**preset, **knobs})


# ---------------------------------------------------------------------------
# The learning-rate grids
# ---------------------------------------------------------------------------
#
# Each method wants its own scale: a soft prompt moves 20 vectors and needs a
# large step; full fine-tuning moves every weight and needs a small one. Each
# grid spans about ten-fold around the rate that worked best on this base
# (sentiment, 150 steps of 16, scored on the validation split); the middle
# value is that rate: ``minipeft finetune``'s default and the one rate of
# ``minipeft compare --quick``. A method's row lives here, with the methods,
# so one run never depends on the comparison job. A rate chosen at either
# end of its grid is flagged in compare's table: the best one may lie beyond
# it (BitFit, layer selection and masks first chose the top of grids a step
# lower than these).

#: method -> learning rates tried on the validation split (middle: the best known).
#: LoRA-FA's and LST's middles are the best score on the whole validation split
#: (seed 0, sentiment, 150 steps of 16) of sweeps in steps of about 3x: LoRA-FA
#: over 3e-3 .. 3e-1 scored 0.70, 0.81, 0.78, 0.89, 0.63; LST over 1e-3 .. 1
#: scored 0.24, 0.40, 0.65, 0.66, 0.72, 0.79, 0.59. B alone carries LoRA-FA's
#: update and LST's side network starts from random weights: both want larger
#: steps than LoRA.
LR_GRID: dict[str, tuple[float, ...]] = {
    "full": (1e-4, 3e-4, 1e-3),
    "bitfit": (1e-2, 3e-2, 1e-1),
    "layers": (1e-3, 3e-3, 1e-2),
    "mask": (1e-2, 3e-2, 1e-1),
    "lora": (3e-3, 1e-2, 3e-2),
    "adapter": (3e-3, 1e-2, 3e-2),
    "prompt": (1e-1, 3e-1, 1.0),
    "prefix": (3e-2, 1e-1, 3e-1),
    "ia3": (3e-2, 1e-1, 3e-1),
    "lora_fa": (3e-2, 1e-1, 3e-1),
    "lst": (1e-1, 3e-1, 1.0),
    # QLoRA (LoRA on an NF4 base, :mod:`minipeft.peft.qlora`): LoRA's grid, only the
    # base's storage differs
    "qlora": (3e-3, 1e-2, 3e-2),
}


def best_known_lr(method: str) -> float:
    """The middle of a method's grid: the rate known to work best on the shipped base."""
    grid = LR_GRID[method]
    return grid[len(grid) // 2]


def config_from_dict(d: dict) -> PeftConfig:
    """Rebuild a config from ``to_dict()`` output (e.g. a hand-edited file), checked in full.

    Refuses an unknown ``peft_type``, an unknown field, a field the dict's
    ``format`` requires and it lacks, a format newer than this code, and
    every bad knob a new config would refuse (see :meth:`PeftConfig.from_dict`).
    """
    if not isinstance(d, dict):
        raise KnobTypeError(f"a saved config must be a JSON object (a dict), got "
                            f"{type(d).__name__}")
    d = dict(d)
    peft_type = d.pop("peft_type", None)
    if not isinstance(peft_type, str) or peft_type not in CONFIGS:
        raise ValueError(f"unknown peft_type {peft_type!r}: known types are {sorted(CONFIGS)}")
    return CONFIGS[peft_type].from_dict(d)


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

    reduction_factor: int = knob(8, Int(low=1), since=2)
    side_num_heads: int = knob(2, Int(low=1), since=2)
    gate_temperature: float = knob(0.1, Float(low=0.0, low_open=True), since=2)
    init_seed: int = knob(0, Int(low=0), since=2)
    peft_type: ClassVar[str] = "LST"
    family: ClassVar[str] = "additive"

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
