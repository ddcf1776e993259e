r"""Bottleneck adapters (additive): a small residual MLP after a sublayer's output.

Houlsby et al. insert an adapter after the attention's output projection and
after the MLP; Pfeiffer et al. keep only the one after the MLP. Each adapter
maps the sublayer output :math:`y \in \mathbb R^{C}` through a bottleneck of
width :math:`m \ll C` and adds it back:

.. math:: y' = y + f(y\,W_{down} + b_{down})\,W_{up} + b_{up}

with :math:`W_{down} \in \mathbb R^{C\times m}`, :math:`W_{up} \in \mathbb R^{m\times C}`.
:math:`W_{up}` and :math:`b_{up}` start at zero, so the adapter starts as the
identity and the wrapped model equals the base bit for bit.

Unlike LoRA, the adapter sits *in series* after a nonlinearity: it cannot be
folded into the base weights, so it adds :math:`2Cm` multiply-adds per token
per adapter at inference, forever.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from ..autograd import ops
from ..nn.module import Parameter
from .model import register_method
from .tuner import AdapterParams, Wrapper, WrapperMethod

_ACTS = {"relu": ops.relu, "gelu": ops.gelu, "tanh": ops.tanh}


class BottleneckAdapter(Wrapper):
    """A Linear (``attn.c_proj`` or ``mlp.c_proj``) followed by a bottleneck adapter."""

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.adapter_down = AdapterParams()
        self.adapter_down_bias = AdapterParams()
        self.adapter_up = AdapterParams()
        self.adapter_up_bias = AdapterParams()
        self.configs = {}

    def add(self, name: str, config, module_name: str) -> None:
        W = self.base_layer.weight
        C, m = self.out_features, config.bottleneck
        rng = np.random.default_rng([config.init_seed, zlib.crc32(module_name.encode())])
        # down: Kaiming-uniform like a fresh Linear; up: zeros (identity at start)
        bound = 1.0 / math.sqrt(C)
        dev = W.device
        setattr(self.adapter_down, name,
                Parameter(rng.uniform(-bound, bound, (C, m)).astype(W.dtype), device=dev))
        setattr(self.adapter_down_bias, name, Parameter(np.zeros(m, W.dtype), device=dev))
        setattr(self.adapter_up, name, Parameter(np.zeros((m, C), W.dtype), device=dev))
        setattr(self.adapter_up_bias, name, Parameter(np.zeros(C, W.dtype), device=dev))
        self.configs[name] = config
        self.adapter_names.append(name)

    def remove(self, name: str) -> None:
        super().remove(name)
        self.configs.pop(name, None)

    def forward(self, x):
        y = self.base_layer(x)
        name = self.active()
        if name is None:
            return y
        act = _ACTS[self.configs[name].nonlinearity]
        h = act(ops.matmul(y, self.adapter_down._parameters[name])
                + self.adapter_down_bias._parameters[name])            # (B, T, m)
        return y + ops.matmul(h, self.adapter_up._parameters[name]) \
            + self.adapter_up_bias._parameters[name]                    # (B, T, C)


@register_method("ADAPTER")
class AdapterMethod(WrapperMethod):
    """Bottleneck adapters after ``attn.c_proj`` and ``mlp.c_proj`` (Houlsby) or the MLP only."""

    wrapper_cls = BottleneckAdapter

    def extra_flops_per_token(self, pm) -> int:
        """FLOPs (2 per multiply-add) that the adapters add to each token's forward pass."""
        m = self.config.bottleneck
        return sum(2 * 2 * w.out_features * m for _, w in self.wrappers(pm))
