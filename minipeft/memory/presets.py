r"""Model presets, precisions and optimizers: the inputs every view of memory shares.

The rows of every table (:data:`CATEGORIES`), GPT-style configurations at
the sizes people quote (:data:`PRESETS`), bytes per entry of each kind of
array for one training recipe (:data:`DTYPES`), and how many moments each
optimizer keeps (:data:`OPTIMIZERS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..nn.gpt import GPTConfig

MiB = 2**20
GiB = 2**30

CATEGORIES = (
    "weights_frozen", "weights_trainable", "gradients", "optimizer", "bookkeeping", "batch",
    "activations", "temporaries", "other",
)

LABELS = {
    "weights_frozen": "weights, frozen",
    "weights_trainable": "weights, trainable",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "bookkeeping": "masks and method copies",
    "batch": "batch (ids, targets)",
    "activations": "activations (saved, peak)",
    "temporaries": "temporaries (dequantized W)",
    "other": "other live arrays (peak)",
}

# ---------------------------------------------------------------------------
# Model presets
# ---------------------------------------------------------------------------
#
# GPT-style configurations (GPT-2's architecture: learned positions, a 4x
# GELU MLP, a tied head) at the sizes people quote. 1b, 7b and 65b use
# LLaMA's widths, depths and heads and its 32,000-token vocabulary; with
# GPT-2's 4x MLP (LLaMA's SwiGLU is 8/3 x 3 matrices) the counts come out at
# 1.08e9, 6.58e9 and 64.7e9 parameters.

PRESETS: dict[str, dict] = {
    "reference": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=96, n_positions=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, n_positions=1024),
    "1b": dict(n_layer=20, n_head=16, n_embd=2048, vocab_size=32000, n_positions=2048),
    "7b": dict(n_layer=32, n_head=32, n_embd=4096, vocab_size=32000, n_positions=2048),
    "65b": dict(n_layer=80, n_head=64, n_embd=8192, vocab_size=32000, n_positions=2048),
}


def preset(name: str) -> GPTConfig:
    """The GPTConfig of a named size (``reference``, ``gpt2``... ``1b``, ``7b``, ``65b``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    return GPTConfig(**PRESETS[name])


def _as_config(config) -> GPTConfig:
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, GPTConfig):
        return config
    raise TypeError(f"expected a GPTConfig or a preset name, got {type(config).__name__}")


# ---------------------------------------------------------------------------
# Precision: bytes per entry of each kind of array
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    r"""Bytes per entry for one training recipe.

    ``weight`` and ``grad`` are the copies of a *trained* parameter that the
    forward and backward passes use; ``master`` is an fp32 copy the
    optimizer keeps when those are 16-bit; ``moment`` is the size of one
    optimizer moment; ``frozen`` the bytes of a frozen weight; ``act`` the
    bytes of a floating activation. ZeRO's accounting of mixed-precision Adam
    (Rajbhandari et al., 2020) is :math:`2 + 2 + (4 + 4 + 4) = 16` bytes a
    parameter: fp16 weight and gradient, fp32 master, momentum and variance.
    """

    name: str
    weight: float
    grad: float
    master: float
    moment: float
    frozen: float
    act: int
    note: str


DTYPES: dict[str, Precision] = {
    "fp32": Precision("fp32", 4, 4, 0, 4, 4, 4,
                      "everything float32 (what this engine runs): 4 + 4 + 8 = 16 bytes a trained "
                      "parameter"),
    "mixed": Precision("mixed", 2, 2, 4, 4, 2, 2,
                       "ZeRO's mixed precision: fp16 weights and gradients, fp32 master and moments: "
                       "2 + 2 + 12 = 16 bytes a trained parameter; fp16 activations"),
    "mixed-int8": Precision("mixed-int8", 2, 2, 4, 4, 1, 2,
                            "rule of thumb: every frozen weight at 1 byte (embeddings included, "
                            "constants left out), trained ones as in 'mixed'; for the stored "
                            "format's exact bytes use dtype='mixed', quantize='int8'"),
    "mixed-int4": Precision("mixed-int4", 2, 2, 4, 4, 0.5, 2,
                            "rule of thumb: every frozen weight at half a byte (embeddings "
                            "included, constants left out), trained ones as in 'mixed'; for "
                            "NF4's exact bytes use dtype='mixed', quantize='nf4'"),
    "fp64": Precision("fp64", 8, 8, 0, 8, 8, 8,
                      "everything float64 (the gradient checks' dtype): 8 + 8 + 16 = 32 bytes"),
}

#: optimizer -> number of moments it keeps per trained entry
OPTIMIZERS = {"adamw": 2, "sgd_momentum": 1, "sgd": 0}


#: storage formats of the frozen weights (minipeft.nn.quant): an estimate's ``quantize=``,
#: never a dtype. The recipes that used these names are 'mixed-int8' and 'mixed-int4'.
QUANT_FORMATS = ("nf4", "fp4", "int4", "int8")


def _precision(dtype) -> Precision:
    if isinstance(dtype, Precision):
        return dtype
    key = {"float32": "fp32", "fp16": "mixed", "bf16": "mixed"}.get(str(dtype), str(dtype))
    if key in QUANT_FORMATS:
        raise ValueError(
            f"{dtype!r} is a storage format of the frozen weights, not a training dtype: give "
            f"quantize={key!r} (--quantize {key}) with dtype 'fp32' or 'mixed'; the old "
            f"rule-of-thumb recipes are 'mixed-int8' and 'mixed-int4'")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def _fmt_bytes(n: float, unit: int | None = None) -> str:
    unit = unit or (GiB if n >= GiB else MiB)
    return f"{n / unit:,.2f} {'GiB' if unit == GiB else 'MiB'}"


