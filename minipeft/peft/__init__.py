r"""Parameter-efficient fine-tuning, one family a file, around a frozen base.

* :mod:`.config`: one dataclass per method (peft's names);
* :mod:`.tuner`: the shared injector (``target_modules`` matching, wrappers);
* :mod:`.model`: :class:`PeftModel` and :func:`get_peft_model`;
* :mod:`.selective`: full fine-tuning, BitFit, layer selection, element masks;
* :mod:`.lora`: LoRA and DoRA;
* :mod:`.adapters`, :mod:`.soft_prompts`, :mod:`.ia3`: the additive methods;
* :mod:`.lst`: ladder side-tuning, a side network beside the frozen backbone.
"""

from . import adapters, ia3, lora, lst, selective, soft_prompts  # noqa: F401  (register the methods)
from .config import (
    METHODS,
    AdapterConfig,
    BitFitConfig,
    FullFinetuneConfig,
    IA3Config,
    LayerSelectConfig,
    LoraConfig,
    LSTConfig,
    MaskConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    config_class,
    config_from_dict,
    method_config,
)
from .model import PeftModel, get_peft_model

__all__ = [
    "METHODS", "AdapterConfig", "BitFitConfig", "FullFinetuneConfig", "IA3Config",
    "LayerSelectConfig", "LoraConfig", "LSTConfig", "MaskConfig", "PeftConfig", "PeftModel",
    "PrefixTuningConfig", "PromptTuningConfig", "config_class", "config_from_dict",
    "get_peft_model", "method_config",
]
