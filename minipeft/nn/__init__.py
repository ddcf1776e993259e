r"""Neural-network building blocks: Module, Parameter, layers and the GPT."""

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

__all__ = [
    "GPT", "MLP", "Block", "CausalSelfAttention", "Dropout", "Embedding", "GPTConfig", "KVCache",
    "LayerNorm", "Linear", "Module", "ModuleList", "Parameter", "checkpoint",
    "record_dropout_masks", "replay_dropout_masks", "sample_next_token",
]
