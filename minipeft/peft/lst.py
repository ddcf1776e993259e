r"""Ladder side-tuning (LST, Sung et al. 2022): train a small network *beside* a frozen backbone.

Every other method here puts its trainable parts inside the backbone (or in
front of it), so the gradient has to travel back through every block above
the lowest trainable part, and those blocks keep what their backward needs:
LayerNorm inputs, GELU inputs, attention probabilities. LST moves all the
training into a separate *side network* that only reads the backbone:

* the backbone runs its forward under :func:`~minipeft.autograd.no_grad`: it
  records no graph and saves nothing, and no gradient can reach it;
* a stack of narrow GPT-2 blocks of width :math:`d = D / k` reads the
  backbone's hidden states through trainable down-projections (the
  "ladders"), one for the embeddings and one after every block, mixed into
  the side stream by learned gates;
* the side output is projected up to D and added to the backbone's last
  hidden state before the backbone's frozen final LayerNorm and tied head.

.. math::
    s_0 = \mathrm{down}_0(h_0), \qquad
    s_i = g_i\,\mathrm{down}_i(h_i) + (1 - g_i)\,f_i(s_{i-1}), \quad
    g_i = \sigma(\alpha_i / T), \qquad
    \text{logits} = \mathrm{ln\_f}\big(h_L + \mathrm{up}(s_L)\big)\,W_{te}^\top

(:class:`~minipeft.peft.config.LSTConfig` has the details and the
initialisation: with the up-projection at zero the model starts as the base.)

What it keeps for backward: the inputs of the ladders (the L + 1 hidden
states :math:`h_i`, N·D floats each, which the down-projections' weight
gradients need), the side blocks' own activations (width d, and the side
attention's (B, heads, T, T) probabilities) and the head's (the final
LayerNorm and the cross-entropy). Nothing of the backbone's blocks.

What it costs: it cannot be merged (inference runs both networks; see
:meth:`LSTMethod.extra_flops_per_token`), and the side network starts from
random weights rather than from the backbone's knowledge.

How it attaches, without changing the base's code: each block and ``ln_f`` is
replaced by a *tap* (:class:`LadderBlock`, :class:`LadderHead`) that runs the
original module and feeds the side network as the base's own forward passes
through. A tap shows the wrapped module's parameters and children under
their own names, so ``h.0.attn.c_attn.weight`` stays ``h.0.attn.c_attn.weight``
and other methods still find their targets. Generation keeps a second
key/value cache for the side blocks beside the backbone's.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..autograd import LEDGER, no_grad, ops
from ..nn.gpt import Block, KVCache
from ..nn.layers import Linear, shapes_only
from ..nn.module import Module, ModuleList, Parameter
from .model import register_method
from .tuner import AdapterParams, Method, MethodPlan, replace_module

# ---------------------------------------------------------------------------
# The side network
# ---------------------------------------------------------------------------


class SideLayer(Module):
    r"""Rung i + 1 (after backbone block i, counted from 0): a ladder D -> d, a gate logit, a block.

    In the formula's numbering (blocks from 1) these are :math:`\mathrm{down}_{i+1}`,
    :math:`\alpha_{i+1}` and :math:`f_{i+1}`.
    """

    def __init__(self, side_config, D: int, index: int, rng):
        super().__init__()
        d = side_config.n_embd
        self.ladder = Linear(D, d, rng=rng)                    # reads h_i, block i's output
        self.alpha = Parameter(np.zeros(1, np.float32))       # sigma(0) = 0.5 at the start
        self.block = Block(side_config, index, rng)


class SideNetwork(Module):
    """The trainable part of LST (see the module docstring): ladders, gates, side blocks, up-projection."""

    def __init__(self, config, base_config):
        super().__init__()
        side_config = config.side_config(base_config)
        D, d = base_config.n_embd, side_config.n_embd
        self.side_config = side_config
        self.temperature = float(config.gate_temperature)
        rng = np.random.default_rng([config.init_seed, 0x157])
        self.embed_ladder = Linear(D, d, rng=rng)              # reads h_0, the embeddings
        self.layers = ModuleList(SideLayer(side_config, D, i, rng)
                                 for i in range(side_config.n_layer))
        self.up = Linear(d, D, rng=rng)
        if self.up.weight.data.flags.writeable:                # (not in a shape-only build)
            self.up.weight.data[...] = 0                       # the base's function at the start

    def gate(self, i: int):
        r""":math:`g_i = \sigma(\alpha_i / T)`, shape (1,)."""
        return ops.sigmoid(self.layers[i].alpha * (1.0 / self.temperature))

    def start(self, h0):
        """The side stream's first state: the embeddings, projected down. (B, T, D) -> (B, T, d)."""
        return self.embed_ladder(h0)

    def step(self, i: int, s, h, cache=None):
        r"""The next side state from the last one, ``s`` (B, T, d), and block i's output ``h`` (B, T, D).

        :math:`s_{i+1} = g\,\mathrm{down}(h) + (1 - g)\,f(s)` with rung i's ladder,
        gate and block: :math:`s_i = g_i\,\mathrm{down}_i(h_i) + (1 - g_i)\,f_i(s_{i-1})`
        in the formula's numbering.
        """
        layer = self.layers[i]
        z = layer.block(s, kv_cache=cache)                     # (B, T, d)
        g = self.gate(i)                                       # (1,)
        return g * layer.ladder(h) + (1.0 - g) * z

    def finish(self, s):
        """The side output, projected up to the backbone's width: (B, T, d) -> (B, T, D)."""
        return self.up(s)

    # -- the same over shapes, for the memory estimate (see minipeft.memory.trace) -------
    def trace_start(self, walk, h0):
        """:meth:`start` over shapes: the ladder keeps h_0 (N D floats) for its weight's gradient."""
        return self.embed_ladder.trace(walk, walk.detach(h0))

    def trace_step(self, walk, i: int, s, h):
        """:meth:`step` over shapes: the side block's own saves, then the gate's mix, which keeps
        down(h) and f(s) (N d floats each) and three single numbers (1/T, g, 1 - g)."""
        layer = self.layers[i]
        label = walk.label(layer, " gate")
        z = layer.block.trace(walk, s)                                          # (B, T, d)
        g = walk.sigmoid(walk.mul(walk.param(layer.alpha), walk.scalar(), label), label)   # (1,)
        mixed = walk.mul(g, layer.ladder.trace(walk, walk.detach(h)), label)
        return walk.add(mixed, walk.mul(walk.sub(walk.scalar(), g), z, label))

    def trace_finish(self, walk, s):
        return self.up.trace(walk, s)


# ---------------------------------------------------------------------------
# The taps in the backbone
# ---------------------------------------------------------------------------


class Ladder:
    """What the taps of one base share: the side networks, the active one, and the side
    stream of the forward pass that is running (plus the side blocks' generation cache)."""

    def __init__(self, base):
        self.base = base
        self.sides: dict[str, SideNetwork] = {}
        self.active: str | None = None
        self.stream = None
        self.cache: KVCache | None = None
        self._owner = None                          # the backbone cache self.cache goes with

    def side(self) -> SideNetwork | None:
        return None if self.active is None else self.sides[self.active]

    def begin(self, h0, kv_cache) -> None:
        """Start the side stream from the embeddings (called before block 0 runs)."""
        cfg = self.base.config
        if cfg.gradient_checkpointing and self.base.training:
            raise ValueError(
                "LST with gradient_checkpointing=True: the checkpointed blocks would run the "
                "side network without recording its graph. LST's backbone already saves "
                "nothing (it runs under no_grad); set gradient_checkpointing=False"
            )
        side = self.side()
        if kv_cache is None:
            self.cache, self._owner = None, None
        elif not kv_cache.append:
            raise ValueError(
                "LST cannot run on a read-only key/value cache (a prefix): its side network "
                "has no states for the cached positions"
            )
        elif kv_cache.length == 0:                  # a new generation: a new side cache
            self.cache = KVCache(side.side_config.n_layer)
            self._owner = weakref.ref(kv_cache)
        elif self._owner is None or self._owner() is not kv_cache \
                or self.cache.length != kv_cache.length:
            raise ValueError(
                f"LST: this key/value cache holds {kv_cache.length} positions the side "
                "network did not see; start generation from an empty cache"
            )
        with LEDGER.owned_by("method"):                 # the side network's saves are LST's
            self.stream = side.start(h0.detach())

    def step(self, i: int, h) -> None:
        if self.stream is None:
            raise RuntimeError(f"LST: block {i} ran without block 0 before it; run the whole model")
        with LEDGER.owned_by("method"):
            self.stream = self.side().step(i, self.stream, h.detach(), self.cache)

    def finish(self):
        if self.stream is None:
            raise RuntimeError("LST: ln_f was called without the blocks before it; "
                               "run the whole model")
        s, self.stream = self.stream, None
        with LEDGER.owned_by("method"):
            return self.side().finish(s)


class Tap(Module):
    """Stands where ``module`` stood and shows its parameters and children under their own names.

    The tap shares the wrapped module's dictionaries of parameters, children
    and buffers, so names, state dicts, ``.to()`` and other methods' target
    lookups see the base exactly as before; only the forward changes.
    """

    def __init__(self, module: Module, ladder: Ladder):
        super().__init__()
        for d in ("_parameters", "_modules", "_buffers"):
            object.__setattr__(self, d, getattr(module, d))
        object.__setattr__(self, "wrapped", module)
        object.__setattr__(self, "ladder", ladder)

    def __getattr__(self, name):
        # attributes of the wrapped module (a block's attn, ln_f's eps) read through the tap
        if name == "wrapped":
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def extra_repr(self):
        return f"tap of {type(self.wrapped).__name__}"


class LadderBlock(Tap):
    """Block i of the backbone, run under no_grad, its output handed to the side network."""

    def __init__(self, block: Module, index: int, ladder: Ladder):
        super().__init__(block, ladder)
        object.__setattr__(self, "index", index)

    def forward(self, x, kv_cache=None):
        if self.ladder.side() is None:
            return self.wrapped(x, kv_cache=kv_cache)
        if self.index == 0:
            self.ladder.begin(x, kv_cache)          # h_0: before block 0 updates the cache
        # The backbone: no graph, nothing saved, no gradient can reach it.
        with no_grad():
            y = self.wrapped(x, kv_cache=kv_cache)
        self.ladder.step(self.index, y)
        return y

    def trace(self, walk, x, past=None):
        """:meth:`forward` over shapes: the block runs without recording (no_grad: it saves
        nothing, and its outputs need no gradient), the side network's step records."""
        side = self.ladder.side()
        if self.index == 0:
            with walk.owned_by("method"):
                self.ladder.stream = side.trace_start(walk, x)
        recording, walk.recording = walk.recording, False
        try:
            y = self.wrapped.trace(walk, x, past)
        finally:
            walk.recording = recording
        y = walk.detach(y)
        with walk.owned_by("method"):
            self.ladder.stream = side.trace_step(walk, self.index, self.ladder.stream, y)
        return y


class LadderHead(Tap):
    r"""``ln_f`` with the side output added before it: :math:`\mathrm{ln\_f}(h_L + \mathrm{up}(s_L))`."""

    def forward(self, x):
        if self.ladder.side() is None:
            return self.wrapped(x)
        return self.wrapped(x + self.ladder.finish())

    def trace(self, walk, x):
        """:meth:`forward` over shapes: up(s_L) joins h_L before the frozen ln_f."""
        with walk.owned_by("method"):
            up = self.ladder.side().trace_finish(walk, self.ladder.stream)
        self.ladder.stream = None
        return self.wrapped.trace(walk, walk.add(x, up))


def _ladder(pm, create: bool = True) -> Ladder | None:
    """The base's Ladder, installing the taps (every block and ``ln_f``) the first time."""
    base = pm.base_model
    if isinstance(base.ln_f, LadderHead):
        return base.ln_f.ladder
    if not create:
        return None
    ladder = Ladder(base)
    for i in range(len(base.h)):
        replace_module(base, f"h.{i}", LadderBlock(base.h[i], i, ladder))
    replace_module(base, "ln_f", LadderHead(base.ln_f, ladder))
    return ladder


def _remove_taps(pm) -> None:
    base = pm.base_model
    for i in range(len(base.h)):
        replace_module(base, f"h.{i}", base.h[i].wrapped)
    replace_module(base, "ln_f", base.ln_f.wrapped)


def _holder(pm) -> Module:
    """The PeftModel's ``lst_side`` holder (one side network per adapter name)."""
    if "lst_side" not in pm._modules:
        pm.lst_side = AdapterParams()
    return pm.lst_side


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


_NO_CHECKPOINTING = (
    "LST on a base with gradient_checkpointing=True: LST's backbone runs under no_grad and "
    "saves nothing already, and checkpointed blocks would run the side network without its "
    "graph; set gradient_checkpointing=False")


@register_method("LST")
class LSTMethod(Method):
    """Ladder side-tuning: the side network lives on the PeftModel (``lst_side.<adapter>``)."""

    def inject(self, pm) -> None:
        base = pm.base_model
        if base.config.gradient_checkpointing:
            raise ValueError(_NO_CHECKPOINTING)
        # (SideNetwork refuses widths and heads that do not divide)
        side = SideNetwork(self.config, base.config).to(base.device, dtype=base.dtype)
        setattr(_holder(pm), self.name, side)
        _ladder(pm).sides[self.name] = side

    def plan(self, base) -> MethodPlan:
        """Taps on a shape-only base, as :meth:`inject` installs them, and a shape-only side
        network (``base.lst_side``): it adds every side parameter and trains none of the base's."""
        if base.config.gradient_checkpointing:
            raise ValueError(_NO_CHECKPOINTING)
        with shapes_only():                         # zero-stride weights: no memory
            side = SideNetwork(self.config, base.config)
        base.lst_side = side                        # so the walk names its modules
        ladder = Ladder(base)
        for i in range(len(base.h)):
            replace_module(base, f"h.{i}", LadderBlock(base.h[i], i, ladder))
        replace_module(base, "ln_f", LadderHead(base.ln_f, ladder))
        ladder.sides[self.name], ladder.active = side, self.name
        return MethodPlan(added={f"lst_side.{self.name}.{n}": p
                                 for n, p in side.named_parameters()})

    def side(self, pm) -> SideNetwork:
        return _holder(pm)._modules[self.name]

    def named_parameters(self, pm):
        return dict(self.side(pm).named_parameters())

    def activate(self, pm) -> None:
        _ladder(pm).active = self.name
        super().activate(pm)

    def deactivate(self, pm) -> None:
        ladder = _ladder(pm)
        if ladder.active == self.name:
            ladder.active = None
            ladder.stream = None
        super().deactivate(pm)

    def remove(self, pm) -> None:
        ladder = _ladder(pm, create=False)
        holder = _holder(pm)
        if self.name in holder._modules:
            delattr(holder, self.name)
        if ladder is not None:
            ladder.sides.pop(self.name, None)
            if not ladder.sides:
                _remove_taps(pm)

    def merge(self, pm) -> None:
        raise ValueError(
            "LSTConfig cannot be merged into the base weights: the side network is a second "
            "network beside the backbone, not a change of its weights, so inference runs both"
        )

    # -- what it trains and what it costs ----------------------------------------------
    def trainable_shapes(self, pm) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every trainable array (the adapter file holds exactly these)."""
        return {n: tuple(p.shape) for n, p in self.named_parameters(pm).items()}

    def ladder_saved_floats(self, pm, batch: int, seq: int) -> int:
        r"""Floats of backbone hidden states the ladders keep for backward: :math:`(L+1)\,N\,D`.

        Each down-projection's weight gradient :math:`h_i^\top g` needs its
        input :math:`h_i` (N = batch·seq tokens of width D). Everything else
        LST saves is the side network's own (blocks of :meth:`side_config`
        width) and the head's.
        """
        cfg = pm.base_model.config
        return (cfg.n_layer + 1) * batch * seq * cfg.n_embd

    def side_config(self, pm):
        """The GPTConfig every side block is built from (width, heads, depth)."""
        return self.config.side_config(pm.base_model.config)

    def extra_flops_per_token(self, pm) -> int:
        r"""Forward FLOPs of the side network's weight matrices per token, as the base is counted.

        :math:`2\,\big((L+1)\,D d + 12\,L\,d^2 + d D\big)`: the L + 1 ladders,
        the four Linears of each side block (3d², d², 4d², 4d²) and the
        up-projection. Like :func:`~minipeft.workflows.compare.base_flops_per_token`
        it leaves out the attention scores (the side blocks' grow with the
        context, 4·T·d per block and token), LayerNorms, GELU and gates.
        Nothing merges: this is paid at inference too.
        """
        cfg = pm.base_model.config
        D, L = cfg.n_embd, cfg.n_layer
        d = self.side_config(pm).n_embd
        return 2 * ((L + 1) * D * d + 12 * L * d * d + d * D)
