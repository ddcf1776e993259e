r"""PeftModel: a frozen base with named adapters, in Hugging Face peft's vocabulary.

``get_peft_model(model, config)`` freezes the base (every method but full
fine-tuning), injects the method (see :mod:`.tuner`) and returns a
:class:`PeftModel` that

* trains only what the method says (``requires_grad`` is the single source
  of truth; the optimizer is given ``model.trainable_parameters()``);
* reports it: ``print_trainable_parameters()`` prints peft's line;
* saves and loads only the adapter (``save_pretrained`` / ``from_pretrained``
  / ``load_adapter``), with a fingerprint of the base that refuses a wrong base;
  a save is one commit (:func:`minipeft.io.commit_files`), and a refused load
  changes nothing (it is tried on a copy of the model first);
* holds several named adapters over one shared base: ``add_adapter``,
  ``set_adapter``, ``disable_adapter()``; the base is never modified by switching;
* merges where the maths allows (``merge_adapter``, ``merge_and_unload``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import warnings
from typing import NamedTuple

import numpy as np

from .. import backend, io
from ..autograd import LEDGER
from ..nn.module import Module, base_parameters, parameters_digest
from ..nn.module import digest as _digest
from ..nn.quant import QuantLinear, quantization_config, quantize_model
from .config import FullFinetuneConfig, PeftConfig, config_from_dict
from .tuner import Method

#: peft_type -> Method subclass; filled by each method family's module
METHOD_CLASSES: dict[str, type[Method]] = {}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: a fine-tuning run's record (task, settings, scores), saved with the adapter when given
RUN_RECORD = "finetune.json"
#: the key, in every file of an adapter, of the digest of the weights it was saved with
WEIGHTS_DIGEST = "weights_sha256"
#: the key, in the JSON files, of the digest of the weights that save replaced (or null)
REPLACES_DIGEST = "replaces_sha256"
FORMAT = "minipeft-adapter-1"


def register_method(peft_type: str):
    def deco(cls):
        METHOD_CLASSES[peft_type] = cls
        return cls
    return deco


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
    return parameters_digest(model)


def _base_params(model: Module):
    """(name, parameter) of the base's own parameters (adapter parameters excluded)."""
    return base_parameters(model)


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
        with LEDGER.owned_by("method"):         # a soft prompt's encoder is the method's
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
    def save_pretrained(self, directory: str, adapter_name: str | None = None, *,
                        run_record: dict | None = None) -> None:
        """Write the adapter (only the adapter) into ``directory``, as one commit.

        The folder gets ``adapter_model.safetensors`` (the arrays),
        ``adapter_config.json`` (the config, the base's fingerprint, the
        trainable count) and, given ``run_record`` (a JSON object: what the
        run was, e.g. finetune's task and scores), ``finetune.json``. The
        weights file is the commit point: it holds the config and the run
        record too, in its metadata, and replacing it is one ``os.replace``
        (:func:`minipeft.io.commit_files`). So a save stopped at any moment
        (an exception, Ctrl-C, a killed process) leaves a folder that loads as
        exactly the previous adapter or exactly this one, and the next save
        removes what it left. A ``finetune.json`` from an earlier save that
        this one has no record for is removed.
        """
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory).strip():
            # "" would mean the current folder, and replace any adapter saved there
            raise ValueError(f"save_pretrained needs a folder to save the adapter in, got "
                             f"{directory!r}; name one, e.g. save_pretrained('out/lora')")
        name = adapter_name or self.active_adapter
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; adapters here: {sorted(self.adapters)}")
        if run_record is not None:
            if not isinstance(run_record, dict):
                raise TypeError(f"run_record must be a dict (a JSON object), got "
                                f"{type(run_record).__name__}")
            json.dumps(run_record)          # refuse what JSON cannot hold, before writing
        method = self.adapters[name]
        state = {k: np.ascontiguousarray(backend.asnumpy(v))
                 for k, v in method.state_dict(self).items()}
        weights_digest = _digest(state.items())
        config = {
            "config": self.peft_config[name].to_dict(),
            "base_fingerprint": self.base_fingerprint,
            "base_config": _config_dict(self.base_model),
            "trainable_count": int(method.trainable_count(self)),
            "format": FORMAT,
        }

        def build(previous):
            # each file names the weights it is saved with and the weights it replaces:
            # what tells a reader, after a stopped save, which copy belongs to which file
            stamp = {WEIGHTS_DIGEST: weights_digest, REPLACES_DIGEST: previous.get(WEIGHTS_DIGEST)}
            copies = {ADAPTER_CONFIG: {**config, **stamp}}
            if run_record is not None:
                copies[RUN_RECORD] = {**run_record, **stamp}
            return {"format": FORMAT, WEIGHTS_DIGEST: weights_digest}, copies

        io.commit_files(directory, ADAPTER_WEIGHTS, state, build, drop=(RUN_RECORD,))

    def load_adapter(self, directory, adapter_name: str = "default",
                     is_trainable: bool = False) -> None:
        """Add the adapter saved in ``directory`` under ``adapter_name`` and activate it.

        Everything is checked before this model changes: the base's
        fingerprint, then the config against the weights (names, shapes,
        rank, counts), by loading them into a copy of this model. A refused
        load leaves this model exactly as it was. ``directory`` may also be
        what :func:`read_adapter_files` read.
        """
        files = directory if isinstance(directory, AdapterFiles) else read_adapter_files(directory)
        _check_base(files, self.base_fingerprint)
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        config = config_from_dict(files.meta["config"])
        kwargs = _loading_kwargs(config, files.state)

        def put(pm):
            pm.add_adapter(adapter_name, config, **kwargs)
            _load_checked(pm, adapter_name, files)
            pm.set_adapter(adapter_name)

        # the dry run: every check the method makes runs on a copy (its warnings are
        # given once, by the real run)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            put(copy.deepcopy(self))
        previous = self.active_adapter
        try:
            put(self)
        except BaseException:
            # not expected once the copy took it (a MemoryError, Ctrl-C): undo
            with contextlib.suppress(Exception):
                if adapter_name in self.adapters:
                    self.delete_adapter(adapter_name)
                if previous is not None:
                    self.set_adapter(previous)
            raise
        if not is_trainable:
            self.adapters[adapter_name].deactivate_training(self)

    @classmethod
    def from_pretrained(cls, model: Module, directory, adapter_name: str = "default",
                        is_trainable: bool = False) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``directory``.

        Refuses, before touching ``model``, an adapter made for another base,
        and a config that does not fit its weights: the adapter is first
        built and loaded on a copy of ``model``, where every check of the
        method runs (names, shapes, rank, counts, mask indices); only then is
        ``model`` wrapped. ``directory`` may also be what
        :func:`read_adapter_files` read (one read for the adapter and its run
        record).
        """
        files = directory if isinstance(directory, AdapterFiles) else read_adapter_files(directory)
        _check_base(files, fingerprint(model))
        config = config_from_dict(files.meta["config"])
        _check_recorded_quantization(model, files.meta, files.directory)
        kwargs = _loading_kwargs(config, files.state)

        def fill(pm):
            _quantize_as_recorded(pm, files.meta)
            _load_checked(pm, adapter_name, files)
            pm.set_adapter(adapter_name)

        fill(cls(copy.deepcopy(model), config, adapter_name, **kwargs))   # the dry run
        flags = [(p, p.requires_grad) for p in model.parameters()]
        pm = cls(model, config, adapter_name, **kwargs)
        try:
            fill(pm)
        except BaseException:
            # not expected once the copy took it (a MemoryError, Ctrl-C): undo
            with contextlib.suppress(Exception):
                pm.unload()
            for p, flag in flags:
                p.requires_grad = flag
            raise
        if not is_trainable:
            pm.adapters[adapter_name].deactivate_training(pm)
        return pm


def _check_base(files, fp: str) -> None:
    """Refuse an adapter saved for a base with another fingerprint."""
    saved = files.meta["base_fingerprint"]
    if saved != fp:
        raise ValueError(
            f"the adapter in {files.directory} was trained on another base model "
            f"(fingerprint {str(saved)[:12]}..., this base {fp[:12]}...): "
            "load it onto the base it was made for"
        )


def _load_checked(pm, adapter_name: str, files) -> None:
    """Load the saved arrays into a fresh adapter and check the count the config recorded."""
    method = pm.adapters[adapter_name]
    method.load_state_dict(pm, files.state)
    saved = files.meta.get("trainable_count")
    if saved is not None and int(saved) != method.trainable_count(pm):
        raise ValueError(
            f"{ADAPTER_CONFIG} in {files.directory} records trainable_count {saved}, but its "
            f"config and weights give {method.trainable_count(pm)}: the files do not describe "
            "one adapter; save the adapter again from the model"
        )


def _loading_kwargs(config, state) -> dict:
    """What the method needs to be built for the saved ``state`` (a mask's entries)."""
    if config.peft_type not in METHOD_CLASSES:
        raise ValueError(f"no method registered for {config.peft_type}")
    return METHOD_CLASSES[config.peft_type].loading_kwargs(state)


# ---------------------------------------------------------------------------
# Reading an adapter folder
# ---------------------------------------------------------------------------


class AdapterFiles(NamedTuple):
    """What one read of an adapter folder gives (see :func:`read_adapter_files`)."""

    meta: dict                  # adapter_config.json: config, base_fingerprint, ...
    state: dict                 # name -> host array
    run_record: dict | None     # finetune.json, or None where the adapter has none
    directory: str


def _recorded_digest(path, weights: bool) -> str | None:
    """The ``weights_sha256`` a weights file (or a config file) records, if any."""
    try:
        if weights:
            return io.load_tensors(path)[1].get(WEIGHTS_DIGEST)
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        return meta.get(WEIGHTS_DIGEST) if isinstance(meta, dict) else None
    except Exception:       # a damaged leftover tells nothing
        return None


def _mismatch_message(directory, cfg_digest, w_digest) -> str:
    """What happened to a folder of the older layout whose two files do not belong together."""
    expects = f"expects {str(cfg_digest)[:12]}..." if cfg_digest else "records no digest"
    lines = [
        f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} in {directory} do not belong together (the "
        f"weights' digest is {w_digest[:12]}..., the config {expects}): a save_pretrained into "
        "this folder by an older minipeft was stopped between writing the two files (a killed "
        "process, a power cut), or one file was copied in from another adapter.",
    ]
    # what such a stopped save left behind: the new config, the old weights
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


def _read_object(path: str, what: str) -> dict:
    """A JSON object from ``path``, or a ValueError that names the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): {what}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} should hold a JSON object (written by save_pretrained), got "
                         f"{type(obj).__name__}: {what}")
    return obj


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two JSON objects."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y or (key in a) != (key in b):
            out.append(f"{prefix}{key}")
    return out


def _resolve_copy(directory: str, name: str, saved: dict | None, digest: str,
                  replaced: str | None, required: bool) -> dict | None:
    r"""The contents of the JSON file ``name`` beside committed weights (see read_adapter_files).

    ``saved`` is the copy the weights file holds (None: it was saved without
    one), ``digest`` the weights' digest, ``replaced`` the digest of the
    weights this save replaced.
    """
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(
                f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS} (written by save_pretrained); put it back, or save the "
                "adapter again")
        return None
    how = (f"the adapter beside it is intact; remove or repair {name} to load it" if not required
           else "repair it, or save the adapter again")
    on_disk = _read_object(path, how)
    if name == ADAPTER_CONFIG:
        for key in ("config", "base_fingerprint"):
            if key not in on_disk:
                raise ValueError(f"{path} is not a minipeft adapter config (no {key!r})")
    own, before = on_disk.get(WEIGHTS_DIGEST), on_disk.get(REPLACES_DIGEST)
    if own == digest:
        # this file was saved with these weights; a difference is the user's edit
        # (compared as canonical text: a NaN score equals itself there)
        if saved is not None and _canonical(on_disk) != _canonical(saved):
            warnings.warn(
                f"{path} differs from the copy saved inside {ADAPTER_WEIGHTS} in "
                f"{', '.join(_differences(saved, on_disk))}: it was edited after saving, and the "
                "edited file is what loads", stacklevel=4)
        return on_disk
    if own is None or before == digest or (replaced is not None and own == replaced):
        if own is None:
            why = "records no weights digest (written by hand or by an older minipeft)"
        elif before == digest:
            why = "was written by a save that stopped before its weights replaced these"
        else:
            why = "belongs to the adapter these weights replaced (its save stopped before " \
                  "rewriting it)"
        warnings.warn(f"{path} {why}: it is ignored, and the copy saved inside "
                      f"{ADAPTER_WEIGHTS} is used; the next save_pretrained rewrites it",
                      stacklevel=4)
        return saved
    raise ValueError(
        f"{name} and {ADAPTER_WEIGHTS} in {directory} do not belong together ({name} was "
        f"saved with weights {str(own)[:12]}..., the weights here are {digest[:12]}...): one of "
        f"them was copied in from another adapter. Copy its partner in too, remove {name} "
        f"(the weights file holds its own copy{'' if not required else ', but the folder needs one'}"
        "), or save the adapter again from the model."
    )


def read_adapter_files(directory) -> AdapterFiles:
    r"""Read an adapter folder once: its config, its arrays and its run record.

    **Which file is the truth.** ``adapter_model.safetensors`` is the commit
    point of a save (see :meth:`PeftModel.save_pretrained`): it holds the
    arrays, their digest (``weights_sha256``) and, in its metadata, the
    config and the run record it was saved with. ``adapter_config.json`` and
    ``finetune.json`` beside it are readable copies, and each records the
    digest of the weights it was saved with and of the weights those
    replaced (``replaces_sha256``). A copy is read and then

    * used, when it was saved with these weights. If it differs from the
      copy inside the weights file, it was edited by hand: the edit is what
      loads (so a user may change a knob, as in Hugging Face peft), a
      warning names the fields, and the edit goes through every check a
      saved config does (:func:`config_from_dict`, then against the weights
      and the base, see :meth:`PeftModel.from_pretrained`), so a value the
      config refuses, or a rank that does not fit the weights, is refused.
      Why not refuse every edit: the readable file is the one people are
      told to read and change, and it is checked as strictly as the saved
      one; why not ignore it: an edit that silently did nothing would be a
      surprise of its own;
    * ignored, with a warning, in favour of the copy inside the weights file
      when it belongs to a save that stopped around the commit: written for
      weights that never replaced these, or left from the adapter these
      replaced (or it records no digest at all). That is how a stopped save
      loads as exactly one adapter with no manual step;
    * refused when it was saved with other weights altogether (copied in
      from another adapter).

    A missing ``adapter_config.json`` is refused (the folder holds both
    files); a missing ``finetune.json`` means no run record. Reading never
    writes (folders may be read-only; a concurrent save's staged files are
    left alone); the next save rewrites stale copies and removes leftovers.

    Folders of the older layout (weights without copies in their metadata)
    load as before: the config file and the weights must record the same
    digest, and a stopped save of that layout is refused with the way to
    recover either adapter.
    """
    directory = os.fspath(directory)
    w_path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(w_path):
        raise FileNotFoundError(
            f"{w_path} not found: an adapter folder holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} (written by save_pretrained)"
        )
    state, w_meta = io.load_tensors(w_path, what="adapter weights")
    saved = io.committed_copies(w_meta)
    if ADAPTER_CONFIG not in saved:
        meta, state = _read_pair(directory, state, w_meta)
        record_path = os.path.join(directory, RUN_RECORD)
        record = (_read_object(record_path, "the adapter beside it is intact; remove or repair "
                                            f"{RUN_RECORD} to load it")
                  if os.path.isfile(record_path) else None)
        return AdapterFiles(meta, state, record, directory)
    digest = w_meta.get(WEIGHTS_DIGEST)
    if digest is None or _digest(state.items()) != digest:
        raise ValueError(
            f"{w_path} is damaged: its arrays no longer give the digest recorded when they "
            f"were saved ({str(digest)[:12]}...). Save the adapter again from the model.")
    replaced = saved[ADAPTER_CONFIG].get(REPLACES_DIGEST)
    meta = _resolve_copy(directory, ADAPTER_CONFIG, saved[ADAPTER_CONFIG], digest, replaced,
                         required=True)
    record = _resolve_copy(directory, RUN_RECORD, saved.get(RUN_RECORD), digest, replaced,
                           required=False)
    return AdapterFiles(meta, state, record, directory)


def read_adapter(directory) -> tuple[dict, dict]:
    """(config file contents, arrays) of an adapter folder (see :func:`read_adapter_files`)."""
    files = read_adapter_files(directory)
    return files.meta, files.state


def _read_pair(directory: str, state: dict, w_meta: dict) -> tuple[dict, dict]:
    """The older layout: a config file and a weights file that record the same digest.

    Files written without a digest (by hand, or by an older version) are read
    as they are.
    """
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    w_path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{cfg_path} not found: an adapter folder holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} (written by save_pretrained)"
        )
    meta = _read_object(cfg_path, "repair it, or save the adapter again")
    for key in ("config", "base_fingerprint"):
        if key not in meta:
            raise ValueError(f"{cfg_path} is not a minipeft adapter config (no {key!r})")
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
    cfg = getattr(model, "config", None)
    out = dataclasses.asdict(cfg) if cfg is not None and dataclasses.is_dataclass(cfg) else {}
    rec = getattr(model, "quantization_config", None)
    if rec is not None:
        out["quantization"] = {"format": rec.format, "blocksize": rec.blocksize,
                               "double_quant": bool(rec.double_quant)}
    return out


def _check_recorded_quantization(model: Module, meta: dict, directory) -> None:
    """Before touching ``model``: a base already quantized must be so as the adapter records."""
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
    rec = (meta.get("base_config") or {}).get("quantization")
    if rec is not None and quantization_config(pm) is None:
        quantize_model(pm, rec["format"], rec["blocksize"] or 64, rec["double_quant"])


def get_peft_model(model: Module, config: PeftConfig, adapter_name: str = "default",
                   **method_kwargs) -> PeftModel:
    """Freeze ``model``, add the method ``config`` describes, and return the PeftModel."""
    return PeftModel(model, config, adapter_name, **method_kwargs)
