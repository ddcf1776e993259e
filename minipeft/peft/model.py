r"""PeftModel: a frozen base with named adapters, in Hugging Face peft's vocabulary.

``get_peft_model(model, config)`` freezes the base (every method but full
fine-tuning), injects the method (see :mod:`.tuner`) and returns a
:class:`PeftModel` that

* trains only what the method says (``requires_grad`` is the single source
  of truth; the optimizer is given ``model.trainable_parameters()``);
* reports it: ``print_trainable_parameters()`` prints peft's line;
* saves and loads only the adapter (``save_pretrained`` / ``from_pretrained``
  / ``load_adapter``), with a fingerprint of the base that refuses a wrong base;
* holds several named adapters over one shared base: ``add_adapter``,
  ``set_adapter``, ``disable_adapter()``; the base is never modified by switching;
* merges where the maths allows (``merge_adapter``, ``merge_and_unload``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import warnings

import numpy as np
import safetensors
import safetensors.numpy

from .. import backend
from ..nn.module import Module
from .config import FullFinetuneConfig, PeftConfig, config_from_dict
from .tuner import Method

#: peft_type -> Method subclass; filled by each method family's module
METHOD_CLASSES: dict[str, type[Method]] = {}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the key, in both files of an adapter, of the digest of its weights (they must agree)
WEIGHTS_DIGEST = "weights_sha256"


def register_method(peft_type: str):
    def deco(cls):
        METHOD_CLASSES[peft_type] = cls
        return cls
    return deco


def base_name(name: str) -> str:
    """A parameter's name in the unwrapped base (``.base_layer`` segments removed)."""
    return name.replace(".base_layer", "")


def fingerprint(model: Module) -> str:
    """sha256 of the base's parameter names, shapes, dtypes and values.

    Names are taken as in the unwrapped base, so a wrapped model and its
    base agree. An adapter file stores this; loading onto a base with
    another fingerprint is refused. A quantized base's weights are codes in
    buffers, not parameters: its fingerprint is the float base's, taken by
    :func:`~minipeft.nn.quant.quantize_model` before it quantized (its record's
    ``float_fingerprint``).
    """
    rec = getattr(getattr(model, "base_model", model), "quantization_config", None)
    if rec is not None and getattr(rec, "float_fingerprint", None):
        return rec.float_fingerprint
    return _digest((base_name(n), p.data) for n, p in _base_params(model))


def _digest(named_arrays) -> str:
    """sha256 of ``(name, array)`` pairs: names, shapes, dtypes and values, in name order."""
    h = hashlib.sha256()
    for name, a in sorted(named_arrays, key=lambda item: item[0]):
        arr = np.ascontiguousarray(backend.asnumpy(a))
        h.update(f"{name}|{arr.shape}|{arr.dtype}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _base_params(model: Module):
    """(name, parameter) of the base's own parameters (adapter parameters excluded)."""
    from .tuner import Wrapper

    skip = set()
    for _, m in model.named_modules():
        if isinstance(m, Wrapper):
            for holder in m._holders():
                skip.update(id(p) for p in holder.parameters())
    return [(n, p) for n, p in model.named_parameters() if id(p) not in skip]


class PeftModel(Module):
    """A base model with one or more named adapters (see the module docstring)."""

    def __init__(self, model: Module, config: PeftConfig, adapter_name: str = "default",
                 **method_kwargs):
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("the model is already a PeftModel: use add_adapter() for another adapter")
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.adapters: dict[str, Method] = {}
        self.active_adapter: str | None = None
        # True inside disable_adapter(): forward and generate skip the method's
        # inputs too (soft prompts change the inputs, not a module)
        self._disabled = False
        self.base_fingerprint = fingerprint(model)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        if not isinstance(config, FullFinetuneConfig):
            model.freeze()
        try:
            self.add_adapter(adapter_name, config, **method_kwargs)
        except Exception:
            # a refused config (no matching module, a bad knob) leaves the
            # caller's model as it was, not frozen
            for p, flag in flags:
                p.requires_grad = flag
            raise
        self.set_adapter(adapter_name)

    @property
    def config(self):
        """The base model's config (a GPTConfig)."""
        return self.base_model.config

    @property
    def active_method(self) -> Method | None:
        return None if self.active_adapter is None else self.adapters[self.active_adapter]

    # -- adapters ----------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig, **method_kwargs) -> None:
        """Inject another adapter (inactive until :meth:`set_adapter`).

        ``method_kwargs`` go to the method (e.g. ``calibration_batch`` for
        element masks chosen by gradient).
        """
        if not isinstance(config, PeftConfig):
            raise TypeError(f"expected a PEFT config (e.g. LoraConfig), got {type(config).__name__}")
        if not adapter_name.isidentifier():
            raise ValueError(
                f"adapter name {adapter_name!r} must be an identifier (letters, digits, _)"
            )
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if isinstance(config, FullFinetuneConfig) and self.adapters or any(
            isinstance(c, FullFinetuneConfig) for c in self.peft_config.values()
        ):
            raise ValueError(
                "full fine-tuning changes the base itself and cannot share it with other adapters"
            )
        if config.peft_type not in METHOD_CLASSES:
            raise ValueError(f"no method registered for {config.peft_type}")
        method = METHOD_CLASSES[config.peft_type](config, adapter_name, **method_kwargs)
        # Build the new adapter on the bare base: an active selective adapter
        # holds its trained values in the base's arrays and a merged one has
        # changed the weights, and neither may leak into the new adapter's
        # "original" values, magnitude norms or calibration pass.
        with self._bare_base():
            method.inject(self)
        self.adapters[adapter_name] = method
        self.peft_config[adapter_name] = config
        method.deactivate(self)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter that applies and trains."""
        if adapter_name not in self.adapters:
            raise ValueError(
                f"no adapter named {adapter_name!r}; adapters here: {sorted(self.adapters)}"
            )
        current = self.active_method
        if current is not None:
            if current.merged and adapter_name != self.active_adapter:
                # A merged adapter lives in the base weights, where switching
                # cannot reach it: take it out first (as peft does).
                warnings.warn(
                    f"adapter {self.active_adapter!r} is merged; unmerging it before "
                    f"switching to {adapter_name!r}", stacklevel=2,
                )
                current.unmerge(self)
                current.merged = False
            current.deactivate(self)
        self.adapters[adapter_name].activate(self)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise ValueError(f"no adapter named {adapter_name!r}")
        method = self.adapters[adapter_name]
        if self.active_adapter == adapter_name:
            method.deactivate(self)
            self.active_adapter = None
        method.remove(self)
        del self.adapters[adapter_name]
        del self.peft_config[adapter_name]

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` runs the bare base; the adapter returns after."""
        method = self.active_method
        if isinstance(getattr(method, "config", None), FullFinetuneConfig):
            raise ValueError(
                "full fine-tuning has no adapter to disable: its changes are the base weights"
            )
        with self._bare_base():
            yield

    @contextlib.contextmanager
    def _bare_base(self):
        """Run the base alone: the active adapter unmerged and switched off, then restored.

        A merged adapter is unmerged first (its change sits in the base
        weights, where switching wrappers off cannot reach it) and merged
        again on the way out: exact where the method keeps a copy of the
        weights, within float32 rounding otherwise.
        """
        method = self.active_method
        if method is None:
            yield
            return
        merged = method.merged
        if merged:
            method.unmerge(self)
            method.merged = False
        method.deactivate(self)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            method.activate(self)
            if merged:
                method.merge(self)
                method.merged = True

    # -- forward -----------------------------------------------------------
    def forward(self, idx=None, targets=None, **kwargs):
        method = None if self._disabled else self.active_method
        if method is None:
            return self.base_model(idx, targets, **kwargs)
        extra, targets = method.forward_inputs(self, idx, targets)
        if "inputs_embeds" in extra:
            idx = None
        out = self.base_model(idx, targets, **kwargs, **extra)
        if targets is None:
            return method.trim_logits(out)
        logits, loss = out
        return method.trim_logits(logits), loss

    def generate(self, idx, max_new_tokens, **kwargs):
        """Generate with the active adapter applied (soft prompts included)."""
        method = None if self._disabled else self.active_method
        extra = {} if method is None else method.generate_inputs(self, idx)
        return self.base_model.generate(idx, max_new_tokens, **kwargs, **extra)

    def to(self, device: str | None = None, dtype=None) -> PeftModel:
        """Move base and adapters (and what the methods keep aside) to ``device`` / ``dtype``."""
        super().to(device, dtype)
        for method in self.adapters.values():
            method.to(self, device, None if dtype is None else np.dtype(dtype))
        return self

    # -- counting ----------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) scalars; a masked parameter counts its selected entries.

        A weight stored quantized (:class:`~minipeft.nn.quant.QuantLinear`: codes
        and constants, buffers rather than parameters) counts as the entries it
        stands for, ``in x out``, as peft counts a 4-bit weight: the model has
        as many parameters quantized as float, only stored in fewer bits.
        """
        from ..nn.quant import QuantLinear  # noqa: PLC0415 - nn.quant imports this module

        trainable = 0
        for p in self.parameters():
            if p.requires_grad:
                trainable += p.size if p.grad_mask is None else int(p.grad_mask.sum())
        quantized = sum(m.in_features * m.out_features for m in self.modules()
                        if isinstance(m, QuantLinear))
        return trainable, self.num_parameters() + quantized

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: 16,384 || all params: 838,400 || trainable%: 1.9542``."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # -- merging -------------------------------------------------------------
    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (LoRA, (IA)^3)."""
        method = self._require_active("merge")
        if method.merged:
            raise ValueError(f"adapter {self.active_adapter!r} is already merged")
        method.merge(self)
        method.merged = True

    def unmerge_adapter(self) -> None:
        method = self._require_active("unmerge")
        if not method.merged:
            raise ValueError(f"adapter {self.active_adapter!r} is not merged")
        method.unmerge(self)
        method.merged = False

    def merge_and_unload(self) -> Module:
        """Merge the active adapter, remove every wrapper, and return the plain base."""
        method = self._require_active("merge")
        if not method.merged:
            method.merge(self)
            method.merged = True
        return self._unload(keep_values=True)

    def unload(self) -> Module:
        """Remove every adapter without merging and return the plain base."""
        return self._unload(keep_values=False)

    def _unload(self, keep_values: bool) -> Module:
        """Take every adapter out of the base and hand the base back, frozen.

        With ``keep_values`` the active adapter leaves its effect in the base
        (merged weights, a selective method's trained values) and drops the
        rest; without, it is switched off first, which puts the base's own
        values back. Every other adapter is removed. The base comes back
        frozen.
        """
        for name, method in list(self.adapters.items()):
            if name == self.active_adapter and keep_values:
                method.detach_keep(self)
            else:
                if name == self.active_adapter:
                    method.deactivate(self)
                method.remove(self)
        self.adapters.clear()
        self.peft_config.clear()
        self.active_adapter = None
        base = self.base_model
        base.freeze()
        return base

    def _require_active(self, what):
        if self.active_method is None:
            raise ValueError(f"no active adapter to {what}")
        return self.active_method

    # -- files -----------------------------------------------------------------
    def save_pretrained(self, directory: str, adapter_name: str | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (only the adapter).

        The two files are one adapter, so they change together. Both are
        written in full, under temporary names in ``directory``, before
        either replaces anything; then the weights replace the old weights
        and the config the old config. If a step fails before the new config
        is in place, the old weights are put back (or the new ones removed,
        where there were none): the folder holds the previous adapter exactly
        as it was, and the error is raised. Only a crash between the two
        renames (a killed process, a power cut) can leave new weights beside
        an old config; both files record the same digest of the weights
        (``weights_sha256``), so loading refuses such a pair and says how to
        recover either adapter (see :func:`read_adapter`).
        """
        from .. import io

        name = adapter_name or self.active_adapter
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; adapters here: {sorted(self.adapters)}")
        method = self.adapters[name]
        io.ensure_writable_dir(directory)
        state = {k: np.ascontiguousarray(backend.asnumpy(v))
                 for k, v in method.state_dict(self).items()}
        digest = _digest(state.items())
        meta = {
            "config": self.peft_config[name].to_dict(),
            "base_fingerprint": self.base_fingerprint,
            "base_config": _config_dict(self.base_model),
            "trainable_count": int(method.trainable_count(self)),
            "format": "minipeft-adapter-1",
            WEIGHTS_DIGEST: digest,
        }
        weights = safetensors.numpy.save(
            state, metadata={"format": "minipeft-adapter-1", WEIGHTS_DIGEST: digest})
        config = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")
        _replace_pair(directory, weights, config)

    def load_adapter(self, directory: str, adapter_name: str = "default",
                     is_trainable: bool = False) -> None:
        """Add the adapter saved in ``directory`` under ``adapter_name`` and activate it."""
        from .. import io

        meta, state = read_adapter(directory)
        if meta["base_fingerprint"] != self.base_fingerprint:
            raise ValueError(
                f"the adapter in {directory} was trained on another base model "
                f"(fingerprint {meta['base_fingerprint'][:12]}..., this base "
                f"{self.base_fingerprint[:12]}...): load it onto the base it was made for"
            )
        config = config_from_dict(meta["config"])
        self.add_adapter(adapter_name, config, **_loading_kwargs(config, state))
        self.adapters[adapter_name].load_state_dict(self, state)
        self.set_adapter(adapter_name)
        if not is_trainable:
            self.adapters[adapter_name].deactivate_training(self)
        del io

    @classmethod
    def from_pretrained(cls, model: Module, directory: str, adapter_name: str = "default",
                        is_trainable: bool = False) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``directory``.

        Refuses (before touching ``model``) an adapter made for another base.
        """
        meta, state = read_adapter(directory)
        fp = fingerprint(model)
        if meta["base_fingerprint"] != fp:
            raise ValueError(
                f"the adapter in {directory} was trained on another base model "
                f"(fingerprint {meta['base_fingerprint'][:12]}..., this base {fp[:12]}...): "
                "load it onto the base it was made for"
            )
        config = config_from_dict(meta["config"])
        _check_recorded_quantization(model, meta, directory)
        pm = cls(model, config, adapter_name, **_loading_kwargs(config, state))
        _quantize_as_recorded(pm, meta)
        pm.adapters[adapter_name].load_state_dict(pm, state)
        pm.set_adapter(adapter_name)
        if not is_trainable:
            pm.adapters[adapter_name].deactivate_training(pm)
        return pm


def _loading_kwargs(config, state) -> dict:
    """What the method needs to be built for the saved ``state`` (a mask's entries)."""
    if config.peft_type not in METHOD_CLASSES:
        raise ValueError(f"no method registered for {config.peft_type}")
    return METHOD_CLASSES[config.peft_type].loading_kwargs(state)


def _replace_pair(directory, weights: bytes, config: bytes) -> None:
    """Put new weights and a new config in ``directory`` together, or leave it as it was.

    1. Both files are written completely, flushed to disk, under names no
       reader opens (``.adapter_model.safetensors.<token>.new``, ...).
    2. The old weights get a second name (``...<token>.old``, a hard link: no
       copy), so that they can be put back.
    3. The new weights replace the old, then the new config the old (each
       ``os.replace``, atomic).
    4. On any failure in 3, the old weights go back (or the new ones are
       removed, where there were none), and the error is raised. The helper
       files are removed in every case but one: when even putting the old
       weights back fails, they are kept, and the error names them.
    """
    from .. import io

    folder = os.fspath(directory)
    token = secrets.token_hex(4)
    w_path, c_path = os.path.join(folder, ADAPTER_WEIGHTS), os.path.join(folder, ADAPTER_CONFIG)
    staged_w = os.path.join(folder, f".{ADAPTER_WEIGHTS}.{token}.new")
    staged_c = os.path.join(folder, f".{ADAPTER_CONFIG}.{token}.new")
    kept = os.path.join(folder, f".{ADAPTER_WEIGHTS}.{token}.old")
    keep_old = False
    try:
        for staged, final, data in ((staged_w, w_path, weights), (staged_c, c_path, config)):
            io.atomic_write_bytes(staged, data)
            if os.path.exists(final):       # keep the mode of the file it replaces
                os.chmod(staged, os.stat(final).st_mode & 0o777)
        had_weights = os.path.exists(w_path)
        if had_weights:
            try:
                os.link(w_path, kept)
            except OSError:                 # a filesystem without hard links
                shutil.copy2(w_path, kept)
        try:
            os.replace(staged_w, w_path)
            os.replace(staged_c, c_path)
        except BaseException as exc:
            try:
                if had_weights:
                    os.replace(kept, w_path)
                elif os.path.exists(w_path):
                    os.unlink(w_path)
            except OSError as undo:
                keep_old = True
                raise OSError(
                    f"saving the adapter in {folder} failed ({exc!r}), and so did putting the "
                    f"previous weights back ({undo}): they are kept as {kept}; rename it to "
                    f"{ADAPTER_WEIGHTS} to have the previous adapter again, or save again"
                ) from exc
            raise
    finally:
        for path in (staged_w, staged_c) if keep_old else (staged_w, staged_c, kept):
            with contextlib.suppress(OSError):
                os.unlink(path)
    io.fsync_folder(folder)         # the renames themselves survive a crash


def _recorded_digest(path, weights: bool) -> str | None:
    """The ``weights_sha256`` a weights file (or a config file) records, if any."""
    try:
        if weights:
            with safetensors.safe_open(path, framework="np") as f:
                return (f.metadata() or {}).get(WEIGHTS_DIGEST)
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        return meta.get(WEIGHTS_DIGEST) if isinstance(meta, dict) else None
    except Exception:       # a damaged leftover tells nothing
        return None


def _mismatch_message(directory, cfg_digest, w_digest) -> str:
    """What happened to a folder whose config and weights do not belong together, and the way out."""
    expects = f"expects {str(cfg_digest)[:12]}..." if cfg_digest else "records no digest"
    lines = [
        f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} in {directory} do not belong together (the "
        f"weights' digest is {w_digest[:12]}..., the config {expects}): a save_pretrained into "
        "this folder was stopped between writing the two files (a killed process, a power "
        "cut), or one file was copied in from another adapter.",
    ]
    # what a stopped save leaves behind: the new config, the old weights (see _replace_pair)
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(f".{ADAPTER_CONFIG}.") and name.endswith(".new") \
                and _recorded_digest(path, weights=False) == w_digest:
            lines.append(f"The config that belongs to these weights (the adapter being saved) is "
                         f"{path}: rename it to {ADAPTER_CONFIG} to load that adapter.")
        elif name.startswith(f".{ADAPTER_WEIGHTS}.") and name.endswith(".old") \
                and cfg_digest and _recorded_digest(path, weights=True) == cfg_digest:
            lines.append(f"The weights that belong to this config (the previous adapter) are "
                         f"{path}: rename it to {ADAPTER_WEIGHTS} to load that adapter.")
    lines.append("Or save the adapter again from the model (PeftModel.save_pretrained, or run "
                 "minipeft finetune with --out again).")
    return " ".join(lines)


def read_adapter(directory: str) -> tuple[dict, dict]:
    """(metadata, arrays) of an adapter folder, with clear errors for what is missing.

    A weights file written by :meth:`PeftModel.save_pretrained` records the
    digest of its arrays (``weights_sha256``), and so does the config saved
    with it: a pair whose digests differ is refused (a save stopped between
    its two renames), and so are weights whose arrays no longer give their
    own digest (damaged). Files written without a digest (by hand, or by an
    older version) are read as they are.
    """
    from .. import io

    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    w_path = os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS} (written by save_pretrained)"
            )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON ({exc})") from None
    for key in ("config", "base_fingerprint"):
        if key not in meta:
            raise ValueError(f"{cfg_path} is not a minipeft adapter config (no {key!r})")
    state, w_meta = io.load_tensors(w_path)
    w_digest = w_meta.get(WEIGHTS_DIGEST)
    if w_digest is not None:
        if meta.get(WEIGHTS_DIGEST) != w_digest:
            raise ValueError(_mismatch_message(directory, meta.get(WEIGHTS_DIGEST), w_digest))
        if _digest(state.items()) != w_digest:
            raise ValueError(
                f"{w_path} is damaged: its arrays no longer give the digest recorded when they "
                f"were saved ({w_digest[:12]}...). Save the adapter again from the model, or, "
                f"if you changed the weights on purpose, write them without the "
                f"{WEIGHTS_DIGEST!r} metadata entry.")
    return meta, state


def _config_dict(model) -> dict:
    """The base's config as saved beside an adapter; a quantized base adds how it is stored."""
    import dataclasses

    cfg = getattr(model, "config", None)
    out = dataclasses.asdict(cfg) if cfg is not None and dataclasses.is_dataclass(cfg) else {}
    rec = getattr(model, "quantization_config", None)
    if rec is not None:
        out["quantization"] = {"format": rec.format, "blocksize": rec.blocksize,
                               "double_quant": bool(rec.double_quant)}
    return out


def _check_recorded_quantization(model: Module, meta: dict, directory) -> None:
    """Before touching ``model``: a base already quantized must be so as the adapter records."""
    from ..nn.quant import quantization_config  # noqa: PLC0415

    rec = (meta.get("base_config") or {}).get("quantization")
    have = quantization_config(model)
    if rec is None or have is None:
        return
    mine = {"format": have.format, "blocksize": have.blocksize,
            "double_quant": bool(have.double_quant)}
    if mine != rec:
        raise ValueError(
            f"the adapter in {directory} was trained on a base stored as {rec}, and this base "
            f"is stored as {mine}: load it onto the float base, which is then quantized as "
            "recorded")


def _quantize_as_recorded(pm: PeftModel, meta: dict) -> None:
    """Store a float base as the adapter's record says it was trained on (QLoRA: NF4).

    Called once the float base's fingerprint has been checked and the method
    has wrapped it (and frozen what it does not train). An adapter trained
    on a float base, or a base already quantized as recorded, is left as it is.
    """
    from ..nn.quant import quantization_config, quantize_model  # noqa: PLC0415

    rec = (meta.get("base_config") or {}).get("quantization")
    if rec is not None and quantization_config(pm) is None:
        quantize_model(pm, rec["format"], rec["blocksize"] or 64, rec["double_quant"])


def get_peft_model(model: Module, config: PeftConfig, adapter_name: str = "default",
                   **method_kwargs) -> PeftModel:
    """Freeze ``model``, add the method ``config`` describes, and return the PeftModel."""
    return PeftModel(model, config, adapter_name, **method_kwargs)
