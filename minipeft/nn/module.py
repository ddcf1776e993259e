r"""Module and Parameter: the containers a model is built from.

A :class:`Module` holds :class:`Parameter` tensors and child modules as
attributes; assigning one registers it (as in PyTorch), so
``named_parameters()`` can walk the tree and give every parameter its dotted
name (``h.0.attn.c_attn.weight``). Those names are the model's public
vocabulary: state dicts, checkpoints, PEFT's ``target_modules`` patterns and
the memory report all speak them.

A parameter shared by two modules (GPT-2 ties the LM head to ``wte``) is one
object: listed once, counted once, saved once.

Freezing is ``requires_grad = False``: the engine then allocates no gradient
for it and skips the products that would only serve its gradient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer may train.

    ``requires_grad`` is True unless frozen. Created from host data it is
    float32 unless a dtype is given.
    """

    def __init__(self, data, requires_grad=True, dtype=None, device=None, name=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, device=device,
                         name=name)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


class Module:
    """Base class of every layer and model (see the module docstring)."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "training", True)

    # -- registration ------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        params, modules, buffers = self._parameters, self._modules, self._buffers
        for d in (params, modules, buffers):
            d.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for d in (self._parameters, self._modules, self._buffers):
            d.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array) -> None:
        """Keep a non-trainable array that belongs in the state dict (moves with .to)."""
        object.__setattr__(self, name, array)
        self._buffers[name] = array

    # -- walking the tree --------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Every module in the tree with its dotted name ('' for the root), depth first."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            children = list(mod._modules.items())
            for child_name, child in reversed(children):
                if child is not None:
                    stack.append((f"{name}.{child_name}" if name else child_name, child))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[Module]:
        yield from (m for m in self._modules.values() if m is not None)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its dotted name, each shared parameter once (first name)."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for pname, p in mod._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{pname}" if mod_name else pname), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def trainable_parameters(self) -> list[Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def named_buffers(self) -> Iterator[tuple[str, object]]:
        for mod_name, mod in self.named_modules():
            for bname, b in mod._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{bname}" if mod_name else bname), b

    def get_submodule(self, name: str) -> Module:
        mod = self
        for part in name.split(".") if name else []:
            if part not in mod._modules:
                raise KeyError(f"{type(self).__name__} has no submodule {name!r}")
            mod = mod._modules[part]
        return mod

    # -- counting ------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of scalar parameters (shared ones counted once)."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Name -> array for every parameter and buffer (the live arrays, not copies)."""
        sd = {name: p.data for name, p in self.named_parameters()}
        sd.update(dict(self.named_buffers()))
        return sd

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into this module's parameters and buffers, by name.

        Values move to each parameter's device and dtype. Raises a KeyError
        or ValueError listing every missing, unexpected or mis-shaped name,
        before anything is changed.
        """
        own = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        missing = sorted(set(own) | set(buffers)) if strict else []
        missing = [k for k in missing if k not in state]
        unexpected = sorted(k for k in state if k not in own and k not in buffers)
        shape_errors = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in state if k in own and tuple(state[k].shape) != own[k].shape
        ]
        problems = []
        if missing:
            problems.append("missing: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected: " + ", ".join(unexpected))
        if shape_errors:
            problems.append("shape mismatch: " + "; ".join(shape_errors))
        if problems:
            raise ValueError("state dict does not match the model -- " + " | ".join(problems))
        for k, v in state.items():
            if k in own:
                p = own[k]
                p.data = backend.to_device(backend.asnumpy(v).astype(p.dtype, copy=True),
                                           p.device)
                p._bump()
            elif k in buffers:
                self._assign_buffer(k, v)

    def _assign_buffer(self, dotted: str, value) -> None:
        mod_name, _, bname = dotted.rpartition(".")
        mod = self.get_submodule(mod_name)
        old = mod._buffers[bname]
        dev = backend.device_of(old)
        mod.register_buffer(bname, backend.to_device(backend.asnumpy(value).astype(old.dtype), dev))

    # -- modes and moves ---------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, device: str | None = None, dtype=None) -> Module:
        """Move every parameter and buffer to ``device`` and/or cast to ``dtype`` (in place)."""
        for p in self.parameters():
            if dtype is not None and p.dtype != np.dtype(dtype):
                p.data = p.data.astype(dtype)
                p.grad = None
            if device is not None:
                p.to(device)
        for m in self.modules():
            for bname, b in list(m._buffers.items()):
                if b is None:
                    continue
                if dtype is not None and b.dtype.kind == "f":
                    b = b.astype(dtype)
                if device is not None:
                    b = backend.to_device(b, device)
                m.register_buffer(bname, b)
        return self

    @property
    def device(self) -> str:
        for p in self.parameters():
            return p.device
        return "cpu"

    @property
    def dtype(self):
        for p in self.parameters():
            return p.dtype
        return np.dtype(backend.DEFAULT_DTYPE)

    def freeze(self) -> Module:
        """Stop training every parameter (no gradient buffers, no gradient products)."""
        for p in self.parameters():
            p.requires_grad = False
            p.grad = None
        return self

    def unfreeze(self) -> Module:
        for p in self.parameters():
            p.requires_grad = True
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- calling -------------------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + ("\n)" if len(lines) > 1 else ")")


class ModuleList(Module):
    """A list of modules registered under '0', '1', ... (GPT-2's ``h.0``, ``h.1``)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, i: int) -> Module:
        return self._modules[str(i % len(self._modules))]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


# ---------------------------------------------------------------------------
# Replacing a submodule; names under a wrapper
# ---------------------------------------------------------------------------


def get_parent(model: Module, dotted: str) -> tuple[Module, str]:
    parent_name, _, child = dotted.rpartition(".")
    return model.get_submodule(parent_name), child


def replace_module(model: Module, dotted: str, new: Module) -> None:
    parent, child = get_parent(model, dotted)
    if child in parent._modules:
        # in place, keeping the child's position: a plain setattr would move it
        # to the end, and after unwrapping, parameters would no longer be
        # listed in GPT-2's order (c_attn before c_proj)
        parent._modules[child] = new
        object.__setattr__(parent, child, new)
    else:
        setattr(parent, child, new)


def base_name(name: str) -> str:
    """A parameter's name in the unwrapped base (``.base_layer`` segments removed).

    A wrapper (a PEFT method's, around a Linear) keeps the module it wraps
    as ``base_layer``; the name a weight had before wrapping drops those segments.
    """
    return name.replace(".base_layer", "")


def base_parameters(model: Module) -> list[tuple[str, Parameter]]:
    """(name, parameter) of the model's own parameters, without what a wrapper added.

    A module that wraps another (a PEFT wrapper) names the wrapped child in
    ``wrapped_child``; its other children hold what it added (an adapter's
    parameters), which are not the model's own.
    """
    skip = set()
    for _, m in model.named_modules():
        child = getattr(m, "wrapped_child", None)
        if child is None:
            continue
        for n, sub in m._modules.items():
            if n != child and sub is not None:
                skip.update(id(p) for p in sub.parameters())
    return [(n, p) for n, p in model.named_parameters() if id(p) not in skip]


def digest(named_arrays) -> str:
    """sha256 of ``(name, array)`` pairs: names, shapes, dtypes and values, in name order."""
    h = hashlib.sha256()
    for name, a in sorted(named_arrays, key=lambda item: item[0]):
        arr = np.ascontiguousarray(backend.asnumpy(a))
        h.update(f"{name}|{arr.shape}|{arr.dtype}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def parameters_digest(model: Module) -> str:
    """sha256 of the model's own parameters, named as in the unwrapped model (a base's identity)."""
    return digest((base_name(n), p.data) for n, p in base_parameters(model))
