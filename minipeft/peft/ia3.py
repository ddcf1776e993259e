r"""(IA)^3 (additive): learned vectors that rescale activations.

"Infused Adapter by Inhibiting and Amplifying Inner Activations" learns three
vectors per block, all initialised to one (the identity):

.. math::
    k' = l_k \odot k,\qquad v' = l_v \odot v,\qquad
    \text{MLP}(x) = \big(l_{ff} \odot f(x W_{fc})\big) W_{proj}

GPT-2 computes q, k and v with one fused ``c_attn`` Linear (output 3C), so
scaling k and v means scaling the last two thirds of that output; the first
third (q) is multiplied by a constant one. ``scale_queries=True`` scales all
3C outputs, which is what a library that scales the fused output as a whole
does (Hugging Face peft; the trainable count then matches its count).

The feed-forward vector scales the *input* of ``mlp.c_proj`` (the MLP's inner
activation). Both forms fold into the weights, so (IA)^3 merges:

* output scaling: :math:`(xW + b)\odot l = x\,(W \operatorname{diag} l) + b \odot l`;
* input scaling: :math:`(x \odot l) W = x\,(\operatorname{diag}(l) W)`.

Weights are stored (in, out), as GPT-2's ``Conv1D`` stores them (and
:class:`~minipeft.nn.layers.Linear` here), not (out, in) as in PyTorch's
``nn.Linear``. So an output feature is a *column* of W: output scaling
multiplies column j by :math:`l_j` (``W * l[None, :]``), and input scaling
multiplies row i by :math:`l_i` (``W * l[:, None]``). With PyTorch's layout
the two would swap.
"""

from __future__ import annotations

import numpy as np

from ..autograd import no_grad, ops
from ..autograd.tensor import Tensor
from ..nn.module import Parameter
from ..nn.quant import dequantize_for_merge
from .model import register_method
from .tuner import AdapterParams, MergeableWrapperMethod, Wrapper, find_targets, matches


class IA3Linear(Wrapper):
    """A Linear whose output (or, for feed-forward targets, input) is rescaled."""

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.ia3_l = AdapterParams()
        self.modes = {}             # adapter -> ("out", n_fixed_ones) or ("in", 0)
        self.merged_adapter = None
        self._copies = {}

    @staticmethod
    def scaling(config, module_name: str, in_features: int, out_features: int):
        """``(mode, fixed, size)``: scale the input ("in", feed-forward targets) or the output
        ("out"), the first ``fixed`` outputs by a constant one, the other ``size`` learned."""
        if any(matches(module_name, f) for f in config.feedforward_modules):
            return "in", 0, in_features
        # fused q,k,v: leave q unscaled in the paper's form
        fused = module_name.endswith("c_attn") and out_features % 3 == 0
        fixed = out_features // 3 if fused and not config.scale_queries else 0
        return "out", fixed, out_features - fixed

    @classmethod
    def parameter_shapes(cls, config, in_features: int, out_features: int, module_name) -> dict:
        """One adapter's learned vector l (size,)."""
        return {"ia3_l": (cls.scaling(config, module_name, in_features, out_features)[2],)}

    def add(self, name: str, config, module_name: str) -> None:
        W = self.base_layer.weight
        mode, fixed, size = self.scaling(config, module_name, self.in_features, self.out_features)
        setattr(self.ia3_l, name, Parameter(np.ones(size, dtype=W.dtype), device=W.device))
        self.modes[name] = (mode, fixed)
        self.adapter_names.append(name)

    def remove(self, name: str) -> None:
        super().remove(name)
        self.modes.pop(name, None)

    def _full_vector(self, name):
        """The scaling vector over all features: constant ones for q, then the learned part."""
        mode, fixed = self.modes[name]
        l = self.ia3_l._parameters[name]
        if fixed == 0:
            return l
        ones = Tensor(l.xp.ones(fixed, dtype=l.dtype))
        return ops.concatenate([ones, l], axis=0)                      # (3C,)

    def forward(self, x):
        r"""The base Linear with the active vector applied: :math:`(x \odot l)W + b` for a
        feed-forward target, :math:`(xW + b) \odot l` otherwise; the base alone when no
        adapter is active or one is merged (it is in the weights already)."""
        name = self.active()
        if name is None or self.merged_adapter is not None:
            return self.base_layer(x)
        mode, _ = self.modes[name]
        l = self._full_vector(name)
        if mode == "in":
            return self.base_layer(x * l)           # (B, T, in) * (in,): l broadcast over B, T
        return self.base_layer(x) * l               # (B, T, out) * (out,)

    @classmethod
    def trace(cls, walk, base, x, config, params, name):
        """:meth:`forward` over shapes, for the memory estimate."""
        mode, fixed, _ = cls.scaling(config, name, base.in_features, base.out_features)
        l = walk.param(params["ia3_l"])
        if fixed:                                    # _full_vector: [ones; l], (3C,)
            l = walk.concatenate([walk.new((fixed,)), l], axis=0)
        if mode == "in":
            return base.trace(walk, walk.mul(x, l, name + " ia3 scale"))
        return walk.mul(base.trace(walk, x), l, name + " ia3 scale")

    def merge(self, name: str, keep_copy: bool = False) -> None:
        r"""Fold adapter ``name``'s vector into the base Linear's weight (and bias).

        With W stored (in, out) (see the module docstring):

        * output scaling: :math:`W \leftarrow W \operatorname{diag}(l)`, each
          column j times :math:`l_j`, and :math:`b \leftarrow b \odot l`;
        * input scaling: :math:`W \leftarrow \operatorname{diag}(l)\,W`, each
          row i times :math:`l_i`; the bias is untouched (it is added after W).

        The layer then computes what the unmerged forward computed, at the
        base's cost. ``keep_copy`` keeps W and b as they were, so that
        :meth:`unmerge` restores them bit for bit.
        """
        if self.merged_adapter is not None:
            raise ValueError(f"{self.merged_adapter!r} is already merged into this layer")
        dequantize_for_merge(self)      # a quantized base becomes float here, and says so
        mode, _ = self.modes[name]
        with no_grad():
            l = self._full_vector(name).data
        W, b = self.base_layer.weight, self.base_layer.bias
        scales_bias = mode == "out" and b is not None   # input scaling leaves the bias alone
        if keep_copy:
            self._copies[name] = (W.data.copy(), b.data.copy() if scales_bias else None)
        if mode == "in":
            W.data = W.data * l[:, None]            # (in, out) * (in, 1): diag(l) W, rows scaled
        else:
            W.data = W.data * l[None, :]            # (in, out) * (1, out): W diag(l), columns scaled
        # a graph that saved W (or b) before the merge would now be stale: count each change,
        # so its backward raises instead of giving a gradient of the old weights
        W._bump("IA3Linear.merge")
        if scales_bias:
            b.data = b.data * l
            b._bump("IA3Linear.merge")
        self.merged_adapter = name

    def unmerge(self) -> None:
        r"""Take the merged vector out of the base weight again.

        From the copy kept at merge when there is one (exact); otherwise by
        dividing: :math:`W \leftarrow W \operatorname{diag}(l)^{-1}` and
        :math:`b \leftarrow b \oslash l` for output scaling,
        :math:`W \leftarrow \operatorname{diag}(l)^{-1} W` for input scaling.
        :math:`(w\,l)/l` equals w only within float32 rounding, and an entry
        of l trained to exactly zero cannot be divided out (its column or row
        of W was zeroed): keep a copy when that matters.
        """
        name = self.merged_adapter
        if name is None:
            raise ValueError("nothing is merged into this layer")
        mode, _ = self.modes[name]
        W, b = self.base_layer.weight, self.base_layer.bias
        scales_bias = mode == "out" and b is not None   # what merge changed, and only that
        if name in self._copies:
            w0, b0 = self._copies.pop(name)
            W.data = w0
            if scales_bias:
                b.data = b0
        else:
            with no_grad():
                l = self._full_vector(name).data
            if mode == "in":
                W.data = W.data / l[:, None]        # (in, out) / (in, 1): rows
            else:
                W.data = W.data / l[None, :]        # (in, out) / (1, out): columns
            if scales_bias:
                b.data = b.data / l
        # as in merge: each array that changed is counted, so a graph built before fails loudly
        W._bump("IA3Linear.unmerge")
        if scales_bias:
            b._bump("IA3Linear.unmerge")
        self.merged_adapter = None


@register_method("IA3")
class IA3Method(MergeableWrapperMethod):
    """(IA)^3 on ``target_modules``; ``feedforward_modules`` are scaled at their input."""

    wrapper_cls = IA3Linear

    def target_names(self, base):
        names = find_targets(base, self.config.target_modules)
        ff = set(find_targets(base, self.config.feedforward_modules, "feedforward_modules"))
        stray = sorted(ff - set(names))
        if stray:
            raise ValueError(
                f"feedforward_modules must be among target_modules; {stray} are not"
            )
        return names

    def extra_flops_per_token(self, pm) -> int:
        """One multiply per scaled feature per token (0 once merged)."""
        if self.merged:
            return 0
        return int(sum(p.size for p in self.named_parameters(pm).values()))
