r"""Neural-network building blocks: Module, Parameter, layers, the GPT and quantized storage."""

from .checkpoint import checkpoint
from .gpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig, KVCache, sample_next_token
from .layers import (
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    record_dropout_masks,
    replay_dropout_masks,
)
from .module import Module, ModuleList, Parameter
from .quant import QuantLinear, dequantize_model, quantize_model, requantize

__all__ = [
    "GPT", "MLP", "Block", "CausalSelfAttention", "Dropout", "Embedding", "GPTConfig", "KVCache",
    "LayerNorm", "Linear", "Module", "ModuleList", "Parameter", "QuantLinear", "checkpoint",
    "dequantize_model", "quantize_model", "record_dropout_masks", "replay_dropout_masks",
    "requantize", "sample_next_token",
]
