r"""QLoRA, and a quantized frozen base under any method that leaves the Linears frozen.

QLoRA (Dettmers et al. 2023) is not a new adapter: it is LoRA trained on a
base whose frozen Linears are stored in 4-bit NormalFloat with double
quantization (:mod:`minipeft.nn.quant`). So here ``qlora`` is a *recipe*,
a method name that ``finetune``, ``compare`` and ``memory`` read as
"LoRA (its default config) on an NF4 base, blocks of 64, double
quantization", and ``--quantize FORMAT`` puts the same base under any
method whose Linear weights stay frozen (BitFit, LoRA, adapters, (IA)^3,
soft prompts, layer selection, whose trained blocks stay float).

Two methods train the Linear weights themselves and are refused: full
fine-tuning (every weight) and element masks (chosen entries of them). A
quantized weight is codes and constants, and codes cannot take a gradient
step.

The order is: wrap with the method first (which freezes the base and takes
its fingerprint from the float weights), then quantize what stayed frozen
(:func:`quantize_base`). The adapter file records the format, and loading
it quantizes the float base the same way
(:meth:`~minipeft.peft.PeftModel.from_pretrained`).
"""

from __future__ import annotations

from ..nn.quant import FORMATS, QuantizationConfig, quantization_config, quantize_model

#: recipe name -> (the method it trains, the storage format of the frozen base)
RECIPES = {"qlora": ("lora", "nf4")}
#: methods that train the Linear weights themselves, so their base cannot be quantized
TRAINS_LINEAR_WEIGHTS = {
    "full": "full fine-tuning trains every Linear weight",
    "mask": "element masks train chosen entries of the Linear weights",
}


def split_method(name: str, quantize: str | None = None) -> tuple[str, str | None]:
    """(method, storage format or None) for a method or recipe name and a ``--quantize`` value.

    ``qlora`` is ``("lora", "nf4")``; any other name is itself with
    ``quantize`` (checked by :func:`check_quantize`).
    """
    if name in RECIPES:
        method, fmt = RECIPES[name]
        if quantize is not None and quantize != fmt:
            raise ValueError(
                f"{name} is {method} on an {fmt} base; for {method} on an {quantize} base use "
                f"--method {method} --quantize {quantize}")
        return method, fmt
    check_quantize(name, quantize)
    return name, quantize


def check_quantize(method: str, fmt: str | None) -> None:
    """Refuse a format that is not one, or a method that trains the weights it would quantize."""
    if fmt is None:
        return
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if method in TRAINS_LINEAR_WEIGHTS:
        raise ValueError(
            f"--quantize {fmt} with {method}: {TRAINS_LINEAR_WEIGHTS[method]}, and a quantized "
            "weight is codes that cannot take a gradient step. Leave --quantize out, or choose a "
            "method that keeps the Linears frozen (lora, qlora, bitfit, adapter, ia3, prompt, "
            "prefix, layers)")


def recipe_name(method: str, fmt: str | None) -> str:
    """The name a run is reported under: ``qlora`` for LoRA on NF4, ``bitfit+int8`` and so on."""
    for name, (m, f) in RECIPES.items():
        if (m, f) == (method, fmt):
            return name
    return method if fmt is None else f"{method}+{fmt}"


def quantize_base(model, fmt: str, blocksize: int = 64, double_quant: bool = True
                  ) -> QuantizationConfig:
    """Quantize the frozen Linears of a wrapped model in place; returns the record it leaves.

    Call it after ``get_peft_model``: the method has frozen what it does not
    train, the wrappers stay and their ``base_layer`` becomes a
    :class:`~minipeft.nn.quant.QuantLinear`, and Linears that train (layer
    selection's blocks) stay float (the record's ``kept_float``).
    """
    quantize_model(model, fmt, blocksize, double_quant)
    return quantization_config(model)
