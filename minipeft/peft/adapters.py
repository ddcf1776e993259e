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

    @staticmethod
    def parameter_shapes(config, in_features: int, out_features: int, module_name=None) -> dict:
        """One adapter's parameters: down (C, m) and its bias (m,), up (m, C) and its bias (C,)."""
        C, m = out_features, config.bottleneck
        return {"adapter_down": (C, m), "adapter_down_bias": (m,), "adapter_up": (m, C),
                "adapter_up_bias": (C,)}

    def add(self, name: str, config, module_name: str) -> None:
        W = self.base_layer.weight
        shapes = self.parameter_shapes(config, self.in_features, self.out_features)
        rng = np.random.default_rng([config.init_seed, zlib.crc32(module_name.encode())])
        # down: Kaiming-uniform like a fresh Linear; up: zeros (identity at start)
        bound = 1.0 / math.sqrt(self.out_features)
        dev = W.device
        setattr(self.adapter_down, name,
                Parameter(rng.uniform(-bound, bound, shapes["adapter_down"]).astype(W.dtype),
                          device=dev))
        for holder in ("adapter_down_bias", "adapter_up", "adapter_up_bias"):
            setattr(getattr(self, holder), name,
                    Parameter(np.zeros(shapes[holder], W.dtype), device=dev))
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

    @staticmethod
    def trace(walk, base, x, config, params, name):
        """:meth:`forward` over shapes, for the memory estimate."""
        p = {k: walk.param(v) for k, v in params.items()}
        y = base.trace(walk, x)
        h = walk.add(walk.matmul(y, p["adapter_down"], name + " adapter down"),
                     p["adapter_down_bias"])                             # (B, T, m)
        h = getattr(walk, config.nonlinearity)(h, name + " adapter act")  # relu, gelu or tanh
        up = walk.matmul(h, p["adapter_up"], name + " adapter up")       # (B, T, C)
        return walk.add(walk.add(y, up), p["adapter_up_bias"])


@register_method("ADAPTER")
class AdapterMethod(WrapperMethod):
    """Bottleneck adapters after ``attn.c_proj`` and ``mlp.c_proj`` (Houlsby) or the MLP only."""

    wrapper_cls = BottleneckAdapter

    def extra_flops_per_token(self, pm) -> int:
        """FLOPs (2 per multiply-add) that the adapters add to each token's forward pass."""
        m = self.config.bottleneck
        return sum(2 * 2 * w.out_features * m for _, w in self.wrappers(pm))
