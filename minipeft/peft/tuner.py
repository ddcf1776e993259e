r"""The shared injector: find modules by name pattern, wrap them, and the Method protocol.

Every PEFT method here is added to a frozen base *from outside*: the base
model's code never mentions LoRA, adapters or prompts. Three mechanisms cover
all methods:

1. **Wrapping a Linear** (LoRA, bottleneck adapters, (IA)^3): the module at a
   matching name is replaced by a :class:`Wrapper` that holds the original as
   ``base_layer`` and adds its own parameters around it. The parameter names
   follow peft's (``h.0.attn.c_attn.base_layer.weight``,
   ``h.0.attn.c_attn.lora_A.default``).
2. **Feeding the base extra inputs** (prompt and prefix tuning): the base
   GPT accepts ``inputs_embeds`` and a key/value cache, as Hugging Face's GPT-2
   does; the method builds them from its own parameters.
3. **Choosing which existing parameters train** (the selective methods): only
   ``requires_grad`` flags and gradient masks change.

:func:`find_targets` implements peft's ``target_modules`` rule: an entry
matches a module whose dotted name *equals* it or *ends with* ``"." + entry``,
so ``c_proj`` matches both ``attn.c_proj`` and ``mlp.c_proj``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .. import backend
from ..autograd import LEDGER
from ..nn.layers import shaped
from ..nn.module import Module, Parameter, replace_module
from ..nn.quant import dequantize_model


def matches(name: str, entry: str) -> bool:
    """peft's rule: the dotted ``name`` equals ``entry`` or ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def is_linear_like(module) -> bool:
    """A Linear, or a wrapper around one (anything with in/out features and a forward)."""
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def find_targets(model: Module, target_modules, what: str = "target_modules") -> list[str]:
    """Dotted names of the Linear(-like) modules that ``target_modules`` selects.

    Every entry must match at least one module; otherwise the error lists the
    Linear modules that do exist, so a typo is easy to fix.
    """
    linear = [n for n, m in model.named_modules() if n and is_linear_like(m)
              and not n.endswith(".base_layer") and ".base_layer." not in n]
    unmatched = [t for t in target_modules if not any(matches(n, t) for n in linear)]
    if unmatched:
        suffixes = sorted({n.split(".", 2)[-1] if n.startswith("h.") else n for n in linear})
        raise ValueError(
            f"{what} {unmatched} matched no Linear module. Linear modules here are "
            f"{linear[:6]}{' ...' if len(linear) > 6 else ''}; within each block: {suffixes}. "
            "An entry matches a name that equals it or ends with '.' + entry."
        )
    return [n for n in linear if any(matches(n, t) for t in target_modules)]


def find_wrapper(module: Module, cls: type):
    """The wrapper of class ``cls`` in the chain ``module``, ``module.base_layer``, ...

    Methods of different kinds may wrap one Linear (an (IA)^3 adapter and a
    bottleneck adapter on ``mlp.c_proj``): the second wraps the first, and
    each method finds its own wrapper by walking down the chain.
    """
    while isinstance(module, Wrapper):
        if isinstance(module, cls):
            return module
        module = module.base_layer
    return None


def unwrap(model: Module, dotted: str, wrapper: Module) -> None:
    """Take ``wrapper`` out of the chain at ``dotted``, putting its base_layer in its place."""
    top = model.get_submodule(dotted)
    if top is wrapper:
        replace_module(model, dotted, wrapper.base_layer)
        return
    outer = top
    while outer.base_layer is not wrapper:
        outer = outer.base_layer
    outer._modules["base_layer"] = wrapper.base_layer
    object.__setattr__(outer, "base_layer", wrapper.base_layer)


class Wrapper(Module):
    """A module that stands where a Linear stood, holding it as ``base_layer``.

    Subclasses keep one set of parameters per adapter name and apply the
    active one (``active_adapter``), or none while ``disabled``. Several
    adapters of one method can live in one wrapper; switching between them
    never touches ``base_layer``.
    """

    #: the child this module wraps: its other children are what it added
    #: (:func:`~minipeft.nn.module.base_parameters` leaves them out of the base)
    wrapped_child = "base_layer"

    def __init__(self, base_layer: Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.active_adapter: str | None = None
        self.disabled = False
        self.adapter_names: list[str] = []

    # The wrapped Linear's weight and bias, seen through any wrapper in the
    # chain (a LoRA wrapper around an (IA)^3 wrapper reads the Linear's W).
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def __call__(self, *args, **kwargs):
        # what the wrapper's forward saves is the method's (the frozen Linear
        # inside saves no activation of its own: only its weight, for x's gradient)
        with LEDGER.owned_by("method"):
            return self.forward(*args, **kwargs)

    def active(self) -> str | None:
        """The adapter to apply now, or None (disabled, or none set)."""
        return None if self.disabled else self.active_adapter

    def add(self, name: str, config) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Drop one adapter's parameters from this wrapper."""
        for holder in self._holders():
            if name in holder._parameters:
                delattr(holder, name)
        if name in self.adapter_names:
            self.adapter_names.remove(name)
        if self.active_adapter == name:
            self.active_adapter = None

    def _holders(self) -> list[Module]:
        """Child modules that keep per-adapter parameters by adapter name."""
        return [m for n, m in self._modules.items() if n != "base_layer"]

    def adapter_parameters(self, name: str) -> dict[str, Parameter]:
        """This adapter's parameters keyed by ``holder`` (e.g. ``lora_A``)."""
        out = {}
        for hname, holder in self._modules.items():
            if hname != "base_layer" and name in holder._parameters:
                out[hname] = holder._parameters[name]
        return out

    def extra_repr(self):
        return f"adapters={self.adapter_names}, active={self.active_adapter!r}"


class AdapterParams(Module):
    """A holder of parameters keyed by adapter name (``lora_A.default``)."""


@dataclass
class MethodPlan:
    r"""What a method trains, keeps and adds, as the method states it for the memory estimate.

    :meth:`Method.plan` writes the rest into the shape-only base it is given:
    which base parameters have ``requires_grad``, and the
    :class:`PlannedWrapper` standing at each target. Here:

    * ``added``: the method's new trainable parameters (shape-only), by name;
    * ``masked``: base weight -> the k entries the optimizer updates;
    * ``copies``: ``(entries, "float" | "int32")`` arrays kept to switch adapters exactly;
    * ``prompt_tokens``, ``prefix_tokens``: virtual tokens before the input, or in the cache;
    * ``inputs``: ``inputs(walk, idx)`` -> the keyword arguments the method hands
      ``GPT.trace`` (``forward_inputs`` over shapes).
    """

    added: dict = field(default_factory=dict)
    masked: dict = field(default_factory=dict)
    copies: list = field(default_factory=list)
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    inputs: Callable | None = None


class PlannedWrapper(Module):
    """A wrapper's stand-in in a shape-only base (the memory estimate).

    It stands where :meth:`WrapperMethod.inject` would put a ``wrapper_cls``,
    holding the Linear as ``base_layer``, the parameters
    ``wrapper_cls.parameter_shapes`` names (shape-only, trainable), and it
    traces ``wrapper_cls.trace``: the wrapper's own statement of what its
    forward saves.
    """

    def __init__(self, base_layer: Module, wrapper_cls: type, config, module_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.wrapper_cls, self.config, self.module_name = wrapper_cls, config, module_name
        shapes = wrapper_cls.parameter_shapes(config, self.in_features, self.out_features,
                                              module_name)
        for holder, shape in shapes.items():
            setattr(self, holder, Parameter(shaped(shape, base_layer.weight.dtype)))

    def trace(self, walk, x):
        with walk.owned_by("method"):           # as Wrapper.__call__ books it
            return self.wrapper_cls.trace(walk, self.base_layer, x, self.config,
                                          self._parameters, self.module_name)


class Method:
    """One adapter of one method on a :class:`~minipeft.peft.model.PeftModel`.

    The PeftModel calls these hooks; each method family implements them:

    * :meth:`inject`: add this adapter to the base (wrap modules, make
      parameters, pick which base parameters train);
    * :meth:`named_parameters`: the adapter's trainable parameters, under
      the names its file stores;
    * :meth:`activate` / :meth:`deactivate`: make it the one that applies
      and trains, or stop it (switching adapters, ``disable_adapter``);
    * :meth:`forward_inputs`: extra inputs for the base forward (soft
      prompts); :meth:`merge` / :meth:`unmerge` where the maths allows;
    * :meth:`state_dict` / :meth:`load_state_dict`: what the adapter file holds.
    """

    mergeable = False
    #: virtual tokens prepended by this method (prompt tuning) or cached (prefix)
    num_virtual_tokens = 0

    def __init__(self, config, name: str):
        # a config's fields can be reassigned after construction: check them again here
        config.validate()
        self.config = config
        self.name = name
        self.merged = False
        #: False once loaded for inference (``is_trainable=False``): switching
        #: the adapter off and on again must not make it trainable
        self.trainable = True

    # -- what it costs (the memory estimate) ----------------------------------
    def plan(self, base) -> MethodPlan:  # pragma: no cover - abstract
        """Plan this adapter into ``base``, a shape-only GPT with every parameter frozen
        (:func:`minipeft.nn.layers.shapes_only`), by the same selection as :meth:`inject`:
        set ``requires_grad`` where the method trains base parameters, stand a
        :class:`PlannedWrapper` where it wraps; return the rest as a :class:`MethodPlan`."""
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------
    @classmethod
    def loading_kwargs(cls, state: dict) -> dict:
        """Constructor keywords for an adapter about to be loaded from ``state`` (default none)."""
        return {}

    def inject(self, pm) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self, pm) -> None:
        """Take this adapter out of the base (used by ``delete_adapter`` and ``unload``)."""

    def named_parameters(self, pm) -> dict[str, Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    def activate(self, pm) -> None:
        for p in self.named_parameters(pm).values():
            p.requires_grad = self.trainable

    def deactivate(self, pm) -> None:
        for p in self.named_parameters(pm).values():
            p.requires_grad = False
            p.grad = None

    def deactivate_training(self, pm) -> None:
        """Keep applying the adapter but stop training it (inference after loading)."""
        self.trainable = False
        for p in self.named_parameters(pm).values():
            p.requires_grad = False
            p.grad = None

    def detach_keep(self, pm) -> None:
        """Leave the base holding this adapter's effect (merged weights) and drop the rest."""
        self.remove(pm)

    def to(self, pm, device, dtype) -> None:
        """Move the arrays the method keeps outside parameters (copies of weights)."""

    # -- forward ---------------------------------------------------------------
    def forward_inputs(self, pm, idx, targets):
        """Keyword arguments for the base forward and the targets to use (default: none)."""
        return {}, targets

    def trim_logits(self, logits):
        return logits

    def generate_inputs(self, pm, idx) -> dict:
        """Keyword arguments for the base's ``generate`` (soft prompts; default none)."""
        return {}

    # -- merging -----------------------------------------------------------------
    def merge(self, pm) -> None:
        raise ValueError(
            f"{type(self.config).__name__} cannot be merged into the base weights: "
            "only LoRA and (IA)^3 change weights in a mergeable way"
        )

    def unmerge(self, pm) -> None:
        self.merge(pm)

    # -- files ---------------------------------------------------------------------
    def state_dict(self, pm) -> dict:
        """Arrays the adapter file stores (default: the trainable parameters)."""
        return {k: p.data for k, p in self.named_parameters(pm).items()}

    def load_state_dict(self, pm, state: dict) -> None:
        own = self.named_parameters(pm)
        _check_names_shapes(type(self.config).__name__, own, state)
        for k, p in own.items():
            p.data = backend.to_device(backend.asnumpy(state[k]).astype(p.dtype), p.device)
            p._bump()

    def trainable_count(self, pm) -> int:
        return sum(p.size for p in self.named_parameters(pm).values())


def _check_names_shapes(what, own: dict, state: dict) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped entry."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{what} adapter weights do not fit this model: " + " | ".join(problems))


class WrapperMethod(Method):
    """A method that wraps every target Linear in a :class:`Wrapper` subclass.

    Subclasses set ``wrapper_cls``; one wrapper per target module serves every
    adapter of that method, keyed by adapter name.
    """

    wrapper_cls: type[Wrapper] = Wrapper

    def target_names(self, base: Module) -> list[str]:
        """The Linear modules of ``base`` this method wraps."""
        return find_targets(base, self.config.target_modules)

    def plan(self, base) -> MethodPlan:
        """A :class:`PlannedWrapper` at each target, as :meth:`inject` puts a wrapper there."""
        plan = MethodPlan()
        for name in self.target_names(base):
            stand_in = PlannedWrapper(base.get_submodule(name), self.wrapper_cls, self.config, name)
            replace_module(base, name, stand_in)
            plan.added.update({f"{name}.{k}": p for k, p in stand_in._parameters.items()})
        return plan

    def inject(self, pm) -> None:
        base = pm.base_model
        self.targets = self.target_names(base)
        for name in self.targets:
            top = base.get_submodule(name)
            module = find_wrapper(top, self.wrapper_cls)
            if module is None:
                # the first adapter of this kind here: wrap whatever stands
                # at the name (the Linear, or another method's wrapper)
                module = self.wrapper_cls(top)
                replace_module(base, name, module)
            module.add(self.name, self.config, name)

    def wrappers(self, pm) -> list[tuple[str, Wrapper]]:
        return [(n, find_wrapper(pm.base_model.get_submodule(n), self.wrapper_cls))
                for n in self.targets]

    def named_parameters(self, pm):
        out = {}
        for n, w in self.wrappers(pm):
            for holder, p in w.adapter_parameters(self.name).items():
                out[f"{n}.{holder}"] = p
        return out

    def activate(self, pm) -> None:
        for _, w in self.wrappers(pm):
            w.active_adapter = self.name
        super().activate(pm)

    def deactivate(self, pm) -> None:
        for _, w in self.wrappers(pm):
            if w.active_adapter == self.name:
                w.active_adapter = None
        super().deactivate(pm)

    def remove(self, pm) -> None:
        for n, w in self.wrappers(pm):
            w.remove(self.name)
            if not w.adapter_names:
                unwrap(pm.base_model, n, w)


def move_array(a, device=None, dtype=None):
    """``a`` cast to ``dtype`` and moved to ``device`` (either may be None: unchanged)."""
    if a is None:
        return None
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return a if device is None else backend.to_device(a, device)


class MergeableWrapperMethod(WrapperMethod):
    """A wrapper method whose update folds into the base weights (LoRA, (IA)^3).

    Its wrappers implement ``merge(name, keep_copy)`` and ``unmerge()`` and
    keep ``merged_adapter`` and, when asked, ``_copies`` of the weights they
    changed (so unmerge can restore them exactly).
    """

    mergeable = True
    #: keep a copy of each changed weight at merge so unmerge restores it bit for bit
    keep_copy = False

    def merge(self, pm) -> None:
        for _, w in self.wrappers(pm):
            w.merge(self.name, keep_copy=self.keep_copy)

    def unmerge(self, pm) -> None:
        for _, w in self.wrappers(pm):
            w.unmerge()

    def remove(self, pm) -> None:
        for _, w in self.wrappers(pm):
            if w.merged_adapter == self.name:
                w.unmerge()
        super().remove(pm)

    def to(self, pm, device, dtype) -> None:
        # copies kept at merge (for an exact unmerge) move with the weights
        for _, w in self.wrappers(pm):
            for name, kept in w._copies.items():
                w._copies[name] = (tuple(move_array(a, device, dtype) for a in kept)
                                   if isinstance(kept, tuple) else move_array(kept, device, dtype))

    def detach_keep(self, pm) -> None:
        # the merged weights stay in base_layer; drop the wrappers around them
        for _, w in self.wrappers(pm):
            w.merged_adapter = None
            w._copies.clear()
        super().remove(pm)
        # merge_and_unload hands back one float model: the merged layers were
        # dequantized at the merge, the others are now
        dequantize_model(pm.base_model)
