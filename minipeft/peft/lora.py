r"""LoRA (reparameterization): a trainable low-rank update beside a frozen weight.

A Linear computes :math:`y = xW + b` with W stored (in, out), as GPT-2 does.
LoRA freezes W and learns :math:`\Delta W = \frac{\alpha}{r} A B` with
:math:`A \in \mathbb R^{in \times r}`, :math:`B \in \mathbb R^{r \times out}`,
:math:`r \ll \min(in, out)`:

.. math::  y = xW + b + \frac{\alpha}{r}\,(x A)\,B

* **Never form AB in the forward pass.** :math:`(xA)B` costs
  :math:`N r (in + out)` multiply-adds; forming AB first would cost
  :math:`in \cdot r \cdot out` and an (in, out) temporary.
* **Identity at initialisation.** A is Kaiming-uniform, B is zero, so
  :math:`\Delta W = 0` and the wrapped model equals the base bit for bit.
* **Frozen means not computed.** W's gradient :math:`x^\top g` is never
  formed; the input x is saved once (for A's gradient), and the matmul with
  the frozen W saves nothing of its own.
* **Merging.** :math:`W \leftarrow W + \frac{\alpha}{r}AB` folds the update in,
  and inference costs what the base costs. Unmerging subtracts it again:
  :math:`(W + \Delta W) - \Delta W` equals W only within float32 rounding, not
  bit for bit, unless a copy of W was kept (``keep_copy=True``), which
  restores it exactly.

DoRA (``use_dora``) splits the merged weight into a direction and a learned
per-output magnitude m (initialised to the column norms of W):

.. math::  W' = m \odot \frac{W + \frac{\alpha}{r} A B}{\lVert W + \frac{\alpha}{r} A B \rVert_c}

with :math:`\lVert\cdot\rVert_c` the norm of each output column (over the in
axis). The paper (and Hugging Face peft) treat the norm as a constant in
backward to save memory; here the norm is differentiated like everything
else, so its gradients are the true ones and pass the float64 checks. DoRA
forms :math:`AB` (in, out) because the norm needs the whole column.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from .. import backend
from ..autograd import no_grad, ops
from ..nn.layers import Dropout
from ..nn.module import Parameter
from ..nn.quant import dequantize_for_merge
from .model import register_method
from .tuner import AdapterParams, MergeableWrapperMethod, Wrapper


class LoraLinear(Wrapper):
    """A Linear with one low-rank branch per adapter name (see the module docstring)."""

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.lora_A = AdapterParams()
        self.lora_B = AdapterParams()
        self.lora_magnitude = AdapterParams()   # DoRA only
        self.lora_dropout = AdapterParams()     # a Dropout module per adapter
        self.configs = {}
        self.merged_adapter: str | None = None
        self._copies = {}                # adapter -> W kept at merge (exact unmerge)

    @staticmethod
    def parameter_shapes(config, in_features: int, out_features: int, module_name=None) -> dict:
        """One adapter's parameters here: A (in, r), B (r, out), and DoRA's magnitude m (out,)."""
        shapes = {"lora_A": (in_features, config.r), "lora_B": (config.r, out_features)}
        if config.use_dora:
            shapes["lora_magnitude"] = (out_features,)
        return shapes

    def add(self, name: str, config, module_name: str) -> None:
        W = self.base_layer.weight
        shapes = self.parameter_shapes(config, self.in_features, self.out_features)
        rng = np.random.default_rng([config.init_seed, zlib.crc32(module_name.encode())])
        # Kaiming-uniform as torch's kaiming_uniform_(a=sqrt(5)) on A: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(self.in_features)
        A = rng.uniform(-bound, bound, size=shapes["lora_A"]).astype(W.dtype)
        B = np.zeros(shapes["lora_B"], dtype=W.dtype)
        setattr(self.lora_A, name, Parameter(A, device=W.device))
        setattr(self.lora_B, name, Parameter(B, device=W.device))
        if config.use_dora:
            # m starts at W's column norms, so W' = W at initialisation
            xp = backend.xp(W.data)
            norm = xp.sqrt((W.data * W.data).sum(axis=0))                # (out,)
            setattr(self.lora_magnitude, name, Parameter(norm.copy()))
        # Dropout on the branch's input: an nn Dropout, so gradient
        # checkpointing records and replays its masks like the model's own,
        # seeded per module so that no two layers draw the same masks
        seed = np.random.SeedSequence([config.init_seed, zlib.crc32(module_name.encode()), 1])
        setattr(self.lora_dropout, name,
                Dropout(config.lora_dropout, seed=int(seed.generate_state(1)[0])))
        self.configs[name] = config
        self.adapter_names.append(name)

    def remove(self, name: str) -> None:
        super().remove(name)
        if name in self.lora_dropout._modules:
            delattr(self.lora_dropout, name)
        self.configs.pop(name, None)

    # -- forward ---------------------------------------------------------------
    def forward(self, x):
        r"""The base Linear plus the active adapter's low-rank branch:

        .. math:: y = xW + b + \frac{\alpha}{r}\,(\operatorname{dropout}(x)\,A)\,B

        Dropout acts on the branch's input only, so the base sees x as it
        is. With DoRA, the sum is rescaled column by column (see
        :meth:`_dora`). No adapter active, or one merged into W: the base
        alone.
        """
        name = self.active()
        if name is None or self.merged_adapter is not None:
            return self.base_layer(x)
        cfg = self.configs[name]
        A = self.lora_A._parameters[name]                               # (in, r)
        B = self.lora_B._parameters[name]                               # (r, out)
        h = self.lora_dropout._modules[name](x)                          # dropout, branch only
        # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out): (x A) B, never AB
        delta = ops.matmul(ops.matmul(h, A), B) * cfg.scaling
        if not cfg.use_dora:
            return self.base_layer(x) + delta
        return self._dora(x, delta, A, B, cfg, self.lora_magnitude._parameters[name])

    def _dora(self, x, delta, A, B, cfg, m):
        r"""DoRA: :math:`y = (xW + \Delta)\,\frac{m}{n} + b`, :math:`n = \lVert W + sAB\rVert_c`."""
        W = self.base_layer.weight
        Wp = W + ops.matmul(A, B) * cfg.scaling                         # (in, out)
        n = ops.sqrt(ops.sum(Wp * Wp, axis=0))                          # (out,)
        y = (ops.matmul(x, W) + delta) * (m / n)                        # (..., out) * (out,)
        b = self.base_layer.bias
        return y if b is None else y + b

    @staticmethod
    def trace(walk, base, x, config, params, name):
        """:meth:`forward` (and :meth:`_dora`) over shapes, for the memory estimate."""
        A, B = walk.param(params["lora_A"]), walk.param(params["lora_B"])      # (in, r), (r, out)
        h = walk.dropout(x, config.lora_dropout, name + " lora dropout")
        xa = walk.matmul(h, A, name + " lora x@A")                             # (..., r)
        delta = walk.mul(walk.matmul(xa, B, name + " lora (xA)@B"), walk.scalar(),
                         name + " lora scale")                                  # (..., out)
        if not config.use_dora:
            return walk.add(base.trace(walk, x), delta)
        W, b = walk.param(base.weight), walk.param(base.bias)
        Wp = walk.add(W, walk.mul(walk.matmul(A, B, name + " dora AB"), walk.scalar(),
                                  name + " dora scale"))                        # (in, out)
        n = walk.sqrt(walk.sum(walk.mul(Wp, Wp, name + " dora W'*W'"), axis=0),
                      name + " dora norm")                                      # (out,)
        scale = walk.div(walk.param(params["lora_magnitude"]), n, name + " dora m/n")
        y = walk.mul(walk.add(walk.matmul(x, W, name), delta), scale, name + " dora y")
        return y if b is None else walk.add(y, b)

    # -- merging -----------------------------------------------------------------
    def delta_weight(self, name: str):
        r""":math:`\Delta W = \frac{\alpha}{r} A B` as an array (in, out)."""
        cfg = self.configs[name]
        A = self.lora_A._parameters[name].data
        B = self.lora_B._parameters[name].data
        return (A @ B) * cfg.scaling

    def merge(self, name: str, keep_copy: bool = False) -> None:
        r"""Fold adapter ``name`` into the base weight, so inference costs what the base costs.

        LoRA: :math:`W \leftarrow W + \frac{\alpha}{r} A B`, then
        :math:`xW + b` is the unmerged forward (the bias is untouched).
        DoRA: :math:`W \leftarrow m \odot \frac{W + \frac{\alpha}{r} A B}
        {\lVert W + \frac{\alpha}{r} A B\rVert_c}`. DoRA always keeps a copy of
        W: the merged columns have norm m, and the norm they had before the
        rescaling, which undoing it would need, is gone. ``keep_copy`` keeps
        one for LoRA too, for a bit-exact :meth:`unmerge`.
        """
        if self.merged_adapter is not None:
            raise ValueError(f"{self.merged_adapter!r} is already merged into this layer")
        dequantize_for_merge(self)      # a quantized base becomes float here, and says so
        W = self.base_layer.weight
        cfg = self.configs[name]
        with no_grad():
            if keep_copy or cfg.use_dora:
                self._copies[name] = W.data.copy()
            if cfg.use_dora:
                Wp = W.data + self.delta_weight(name)                      # (in, out)
                xp = backend.xp(Wp)
                n = xp.sqrt((Wp * Wp).sum(axis=0))                          # (out,): column norms
                W.data = Wp * (self.lora_magnitude._parameters[name].data / n)  # column j to norm m_j
            else:
                W.data += self.delta_weight(name)
        W._bump()
        self.merged_adapter = name

    def unmerge(self) -> None:
        r"""Take the merged adapter out of the base weight again.

        From the copy kept at merge when there is one (always for DoRA):
        exact. Otherwise :math:`W \leftarrow W - \frac{\alpha}{r} A B`, which gives
        back W within float32 rounding, not bit for bit.
        """
        name = self.merged_adapter
        if name is None:
            raise ValueError("nothing is merged into this layer")
        W = self.base_layer.weight
        if name in self._copies:
            W.data = self._copies.pop(name)      # exact: the kept copy
        else:
            W.data -= self.delta_weight(name)           # within float32 rounding
        W._bump()
        self.merged_adapter = None


@register_method("LORA")
class LoraMethod(MergeableWrapperMethod):
    """LoRA on every Linear that ``config.target_modules`` matches."""

    wrapper_cls = LoraLinear

    def activate(self, pm) -> None:
        r"""Train the active adapter's parameters; with ``freeze_A`` (LoRA-FA) all but A.

        Nothing else is needed for LoRA-FA's memory saving: with A frozen, the
        product :math:`xA` has no weight gradient to compute, so it saves
        nothing of x (see ``MatMul``), and :math:`(xA)B` saves the r-wide
        :math:`xA` for B's gradient :math:`(xA)^\top g`.
        """
        super().activate(pm)
        if self.config.freeze_A:
            for name, p in self.named_parameters(pm).items():
                if name.endswith(".lora_A"):
                    p.requires_grad = False

    def plan(self, base):
        """As :meth:`WrapperMethod.plan`; with ``freeze_A`` each A is added frozen, as
        :meth:`activate` leaves it (a weight: no gradient, no optimizer state)."""
        plan = super().plan(base)
        if self.config.freeze_A:
            for name, p in plan.added.items():
                if name.endswith(".lora_A"):
                    p.requires_grad = False
        return plan

    def trainable_count(self, pm) -> int:
        """Trainable scalars (LoRA-FA: B, and DoRA's magnitude; A is stored but frozen)."""
        return sum(p.size for name, p in self.named_parameters(pm).items()
                   if not (self.config.freeze_A and name.endswith(".lora_A")))

    def branch_saved_floats(self, pm, n_tokens: int) -> dict[str, int]:
        r"""Floats each target's branch keeps for backward over ``n_tokens`` tokens.

        :math:`N\,(in + r)`: x for A's gradient :math:`x^\top (gB^\top)` and xA
        for B's :math:`(xA)^\top g`; with ``freeze_A`` only :math:`N r`. (What
        the frozen base around the branch keeps is the same either way.)
        """
        r = self.config.r
        return {n: n_tokens * (r if self.config.freeze_A else w.in_features + r)
                for n, w in self.wrappers(pm)}

    def inject(self, pm) -> None:
        # A rank above min(in, out) adds parameters but no expressive power
        # (A B has rank <= min(in, out) whatever r is): refuse it before any
        # module is wrapped, naming the layer that cannot take it.
        r = self.config.r
        shapes = {n: (m.in_features, m.out_features) for n, m in
                  ((n, pm.base_model.get_submodule(n)) for n in self.target_names(pm.base_model))}
        largest = min(min(s) for s in shapes.values())
        for name, (fan_in, fan_out) in shapes.items():
            if r > min(fan_in, fan_out):
                raise ValueError(
                    f"r={r} is too large for {name} (in {fan_in}, out {fan_out}): its update "
                    f"A B has rank at most min(in, out) = {min(fan_in, fan_out)}; the largest "
                    f"allowed r for these target_modules is {largest}"
                )
        super().inject(pm)

    def extra_flops_per_token(self, pm) -> int:
        """FLOPs the unmerged branches add per token: 2 r (in + out) per target (0 once merged)."""
        if self.merged:
            return 0
        r = self.config.r
        return sum(2 * r * (w.in_features + w.out_features) for _, w in self.wrappers(pm))
