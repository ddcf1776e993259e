r"""Interop with Hugging Face: GPT-2 model folders and peft adapter folders, both ways.

What a learner builds here should not be a dead end. This module moves the
two things minipeft makes, a GPT and an adapter, to and from the files that
Hugging Face ``transformers`` and ``peft`` read and write:

* :func:`load_hf_gpt2` reads a local GPT-2 folder (``config.json`` plus
  ``model.safetensors``) into minipeft's :class:`~minipeft.nn.GPT`, and
  :func:`load_hf_tokenizer` its ``tokenizer.json``, so a real GPT-2 generates
  text here;
* :func:`save_hf_gpt2` writes a minipeft GPT as such a folder, which
  ``transformers.GPT2LMHeadModel.from_pretrained`` loads;
* :func:`export_peft_adapter` writes a minipeft adapter as a peft adapter
  folder (``adapter_config.json`` plus ``adapter_model.safetensors``), which
  ``peft.PeftModel.from_pretrained`` loads onto that GPT-2;
* :func:`import_peft_adapter` reads such a folder (one trained with peft, for
  instance at scale) back onto a minipeft GPT.

None of this needs PyTorch: both formats are safetensors (named arrays) and
JSON, so the conversion is NumPy, :mod:`safetensors` and :mod:`json` alone.
Only the tokenizer needs the ``tokenizers`` library, imported when asked
for. The optional extra ``hf`` (``pip install -e ".[hf]"``, after
``pip install torch==2.13.0``) installs transformers, peft and tokenizers, which
the tests use to check every conversion against the real thing; the rest of
minipeft never imports them.

Why the mapping is almost the identity
--------------------------------------
minipeft's GPT uses GPT-2's parameter names and shapes, without the
``transformer.`` prefix that ``GPT2LMHeadModel`` puts before its body. In
particular GPT-2's ``Conv1D`` stores its weight (in, out), the transpose of
``torch.nn.Linear``, and so does minipeft's ``Linear``: weights copy over
untransposed. The LM head is tied to ``wte`` on both sides, so it is not
stored (``tie_word_embeddings`` says so); the causal-mask buffers old GPT-2
files carry (``h.N.attn.bias``, ``h.N.attn.masked_bias``) are not weights and
are skipped.

Adapters need a little more. peft's keys start with
``base_model.model.transformer.`` (the wrapped ``GPT2LMHeadModel``'s names)
for the modules it adapts; the soft prompts' key is bare::

    minipeft (module h.0.attn.c_attn)      peft key                                  conversion
    lora_A (in, r)                         ...h.0.attn.c_attn.lora_A.weight          transposed: (r, in)
    lora_B (r, out)                        ...h.0.attn.c_attn.lora_B.weight          transposed: (out, r)
    lora_magnitude (out,)  (DoRA)          ...h.0.attn.c_attn.lora_magnitude_vector  as is
    ia3_l (out,)  (output scaling)         ...h.0.attn.c_attn.ia3_l                  (out, 1)
    ia3_l (in,)   (feed-forward, input)    ...h.0.mlp.c_proj.ia3_l                   (1, in)
    prompt tuning (P, C)                   prompt_embeddings                         as is
    prefix tuning (P, n_layer*2*C)         prompt_embeddings                         as is

peft keeps each LoRA factor as a ``torch.nn.Linear`` weight, stored
(out, in): :math:`W_A` (r, in) and :math:`W_B` (out, r), and adds
:math:`s\,(x W_A^\top) W_B^\top`. minipeft keeps :math:`A = W_A^\top` (in, r)
and :math:`B = W_B^\top` (r, out) and adds :math:`s\,(xA)B`: the same
numbers. ``fan_in_fan_out`` is set because GPT-2's ``Conv1D`` weight is
(in, out), the transpose of a ``torch.nn.Linear`` weight.

Choices, and what peft does not have
------------------------------------
* **(IA)^3.** peft scales the *whole* fused ``c_attn`` output (3C: q, k and
  v); the paper scales only k and v, which is minipeft's default
  (``scale_queries=False``). Exporting the paper form writes ones for q's C
  entries: exactly the same outputs, in peft's form. (Trained further in
  peft, those entries would start to move; peft's count includes them.) An
  import is always in peft's form (``scale_queries=True``).
* **Prefix tuning** is exported as the prefixes themselves, as peft saves
  them, with ``prefix_projection`` false: a prefix made through the MLP
  loads in peft the same way, for inference or further training.
* **Methods peft does not have**, or has in another form, are refused with a
  message that says so: bottleneck adapters, element masks, layer
  selection, BitFit, full fine-tuning (a fully fine-tuned model is a whole
  model: save it with :func:`save_hf_gpt2`). peft features minipeft does not
  have (per-module ranks, trained biases, ``modules_to_save``, LoRA on the
  embeddings or the head, other methods) are refused on import.
* **Another base.** An exported adapter carries its base's fingerprint (in the
  safetensors header, which peft ignores), and a folder from
  :func:`save_hf_gpt2` carries it in ``config.json``; an import onto a base
  with another fingerprint is refused when either tells, and always when the
  shapes do not fit.

Every folder is written **atomically**: a new folder is assembled under a
temporary name beside it and renamed into place in one step; in an existing
folder every file is first written in full under a temporary name and only
then moved over the old one. A failure leaves the old folder (or none), never
a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.numpy

from .. import backend, io
from ..nn.gpt import GPT, GPTConfig
from ..peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from ..peft.model import fingerprint
from ..peft.tuner import is_linear_like, matches

__all__ = [
    "HFTokenizer", "InteropError", "export_peft_adapter", "import_peft_adapter",
    "load_hf_gpt2", "load_hf_tokenizer", "save_hf_gpt2",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

#: what ``GPT2LMHeadModel`` puts before the body's parameter names
HF_BODY = "transformer."
#: what peft puts before the wrapped model's names (then ``transformer.`` for GPT-2)
PEFT_PREFIX = "base_model.model."
#: where minipeft records a base's fingerprint (config.json, safetensors headers)
FINGERPRINT_KEY = "minipeft_fingerprint"

#: GPT2Config's defaults, for fields a config.json leaves out
GPT2_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "resid_pdrop": 0.1,
    "embd_pdrop": 0.1, "attn_pdrop": 0.1, "n_inner": None, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
    "tie_word_embeddings": True,
}

#: both names of GELU's tanh approximation, which is GPT-2's and minipeft's
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


class InteropError(ValueError):
    """A file or model that cannot be converted, with the reason (a ValueError)."""


# ---------------------------------------------------------------------------
# Writing a folder atomically
# ---------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_folder(directory, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write the files ``name -> writer(path)`` into ``directory``, all or nothing.

    A new folder is built under a temporary name beside it and renamed into
    place (one atomic step). In an existing folder each file goes to a
    temporary file first (:func:`minipeft.io._atomic_target`) and all are
    moved over the old ones only once every one is complete; other files in
    the folder are left alone.
    """
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output path exists and is not a folder: '{folder}'")
    if not folder.exists():
        parent = io.ensure_writable_dir(folder.absolute().parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
        try:
            for name, write in writers.items():
                write(staging / name)
                _fsync(staging / name)
                os.chmod(staging / name, 0o644)
            os.chmod(staging, 0o755)          # mkdtemp makes it 0700
            os.rename(staging, folder)        # atomic: the folder appears complete
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder
    io.ensure_writable_dir(folder)
    # Every file is complete on disk before the first replaces its old version.
    with contextlib.ExitStack() as stack:
        tmps = {name: stack.enter_context(io._atomic_target(folder / name)) for name in writers}
        for name, write in writers.items():
            write(tmps[name])
    return folder


def _json_writer(obj) -> Callable[[Path], None]:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return lambda path: path.write_text(text, encoding="utf-8")


def _tensors_writer(arrays: dict, metadata: dict[str, str]) -> Callable[[Path], None]:
    host = {k: np.ascontiguousarray(backend.asnumpy(v)) for k, v in arrays.items()}
    return lambda path: safetensors.numpy.save_file(host, str(path), metadata=metadata)


# ---------------------------------------------------------------------------
# Reading safetensors (bfloat16 included)
# ---------------------------------------------------------------------------


def _read_tensors(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(name -> host array, metadata)`` of a safetensors file.

    NumPy has no bfloat16, which many checkpoints use. A bfloat16 number is
    the top half of a float32's bits, so those entries are read as uint16 and
    shifted into float32: exact.
    """
    try:
        return io.load_tensors(path, what=what)
    except ValueError:
        header = _bf16_header(path)
        if header is None:          # not a bfloat16 file: safetensors' own error stands
            raise
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    dtypes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "BOOL": "?",
              "U8": "u1", "I8": "i1"}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (data_start + o for o in info["data_offsets"])
        if end > raw.size:
            raise InteropError(f"{what} '{path}' is truncated: {name!r} ends at byte {end}, "
                               f"the file has {raw.size}")
        chunk = np.asarray(raw[begin:end])
        if info["dtype"] == "BF16":
            # a bfloat16 is the top 16 bits of a float32: widen each to 32 bits, move it
            # to the high half, and read the bits as float32 (the low mantissa bits zero)
            arr = (chunk.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in dtypes:
            arr = chunk.view(dtypes[info["dtype"]])
        else:
            raise InteropError(f"{what} '{path}': tensor {name!r} has unsupported dtype {info['dtype']}")
        out[name] = arr.reshape(info["shape"]).copy()       # the header's shape, off the memmap
    return out, dict(header.get("__metadata__") or {})


def _bf16_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file (8 bytes of length, then JSON) if it has bfloat16."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 100_000_000)))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or not any(
            isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
        return None
    return header


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: '{path}'")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InteropError(f"'{path}' is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InteropError(f"'{path}' should hold a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------
# GPT-2 model folders
# ---------------------------------------------------------------------------


def _gpt_config_from_hf(hf: dict, where: Path, dropout: float | None) -> GPTConfig:
    """minipeft's GPTConfig from a GPT-2 ``config.json``, refusing what GPT-2 here is not."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type != "gpt2" and not (model_type is None and any("GPT2" in a for a in archs)):
        raise InteropError(
            f"'{where}' holds a {model_type or (archs[0] if archs else 'unknown')!r} model, not "
            "GPT-2 (config.json model_type should be 'gpt2'): minipeft's GPT is GPT-2's architecture"
        )
    c = {**GPT2_DEFAULTS, **hf}
    if "n_positions" not in hf and "n_ctx" in hf:
        c["n_positions"] = hf["n_ctx"]
    problems = []
    if c["activation_function"] not in TANH_GELU:
        problems.append(f"activation_function is {c['activation_function']!r}, minipeft has "
                        "GELU's tanh approximation ('gelu_new') only")
    if c["n_inner"] not in (None, 4 * c["n_embd"]):
        problems.append(f"n_inner is {c['n_inner']}, minipeft's MLP is 4 * n_embd = {4 * c['n_embd']}")
    if not c["scale_attn_weights"] or c["scale_attn_by_inverse_layer_idx"]:
        problems.append("attention scores are scaled otherwise than by 1/sqrt(head size)")
    if c["add_cross_attention"]:
        problems.append("it has cross-attention (an encoder-decoder model)")
    if not c["tie_word_embeddings"]:
        problems.append("its LM head is not tied to wte (tie_word_embeddings is false)")
    if problems:
        raise InteropError(f"'{where}' is a GPT-2 variant minipeft cannot run: " + "; ".join(problems))
    if dropout is None:
        # GPT-2 has three dropout rates (all 0.1 in the released models); minipeft's GPT
        # has one, so it takes the largest
        drops = {float(c[k]) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        dropout = max(drops)
    try:
        return GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                         vocab_size=c["vocab_size"], n_positions=c["n_positions"],
                         dropout=dropout, layer_norm_epsilon=c["layer_norm_epsilon"])
    except (TypeError, ValueError) as exc:
        raise InteropError(f"'{where}': {exc}") from None


def _read_hf_weights(folder: Path) -> dict[str, np.ndarray]:
    """All arrays of a model folder: ``model.safetensors``, or the shards its index lists."""
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return _read_tensors(single, "model weights")[0]
    if index.is_file():
        weight_map = _read_json(index, "weights index").get("weight_map", {})
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_tensors(folder / shard, "weights shard")[0])
        return state
    pickles = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
               if (folder / n).is_file()]
    hint = (f" It has {pickles[0]}; minipeft reads safetensors only (loading a pickle can "
            "run code): convert the folder once with transformers, "
            "GPT2LMHeadModel.from_pretrained(d).save_pretrained(d)") if pickles else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in '{folder}'.{hint}")


def _body_state(state: dict[str, np.ndarray], where: Path) -> dict[str, np.ndarray]:
    """GPT-2's arrays under minipeft's names: prefix removed, buffers and tied head dropped."""
    out, head = {}, None
    for name, arr in state.items():
        if name == "lm_head.weight":
            head = arr
            continue
        name = name.removeprefix(HF_BODY)
        # the causal mask (a constant) that older GPT-2 files store beside the weights
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = arr
    if head is not None and "wte.weight" in out and not (
            head.shape == out["wte.weight"].shape and np.array_equal(head, out["wte.weight"])):
        raise InteropError(
            f"'{where}': lm_head.weight differs from wte.weight; minipeft's LM head is tied "
            "to the token embedding"
        )
    return out


def _check_fits(state: dict, model: GPT, where) -> None:
    """One error listing every missing, unexpected and mis-shaped name."""
    own = {n: p.shape for n, p in model.named_parameters()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{n}: file {tuple(state[n].shape)} vs config {tuple(own[n])}"
              for n in sorted(own) if n in state and tuple(state[n].shape) != tuple(own[n])]
    problems = ([f"missing {missing}"] if missing else []) + \
               ([f"unexpected {unexpected}"] if unexpected else []) + \
               (["shapes that do not match config.json: " + "; ".join(shapes)] if shapes else [])
    if problems:
        raise InteropError(f"the weights in '{where}' do not fit a GPT-2 of its config.json: "
                           + " | ".join(problems))


def load_hf_gpt2(directory, *, device: str = "cpu", dtype=None, dropout: float | None = None) -> GPT:
    """A minipeft GPT from a local Hugging Face GPT-2 folder (no download, no PyTorch).

    Reads ``config.json`` (GPT-2's fields: ``n_layer``, ``n_head``, ``n_embd``,
    ``vocab_size``, ``n_positions``, ``layer_norm_epsilon``; the activation
    must be GELU's tanh form) and ``model.safetensors`` (or its shards). Keys
    may carry ``transformer.`` or not; the causal-mask buffers and a tied
    ``lm_head.weight`` are skipped. The model comes back in eval mode, as
    ``from_pretrained`` returns it (minipeft's training loop calls ``train()``).

    Args:
        directory: the folder (``save_pretrained``'s output, or a hub snapshot).
        device: where the model goes ('cpu', 'gpu', 'strict').
        dtype: cast the weights (default: float32; half-precision files are upcast).
        dropout: minipeft's single dropout probability; by default the
            folder's (GPT-2's embd/attn/resid_pdrop, their maximum if they differ).

    Raises:
        FileNotFoundError: the folder, its config.json or its weights are missing.
        InteropError (a ValueError): not GPT-2, a variant minipeft cannot
            run, or weights that do not fit the config.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: '{folder}'")
    hf = _read_json(folder / CONFIG_NAME, "config.json of a Hugging Face model folder")
    config = _gpt_config_from_hf(hf, folder, dropout)
    state = _body_state(_read_hf_weights(folder), folder)
    model = GPT(config)
    _check_fits(state, model, folder)
    model.load_state_dict(state)                 # cast to the model's float32
    # in eval mode, as transformers' from_pretrained returns it (train() turns dropout on)
    return model.to(device, dtype=dtype).eval()


def _hf_config(model: GPT, fingerprint: str | None) -> dict:
    """GPT-2's ``config.json`` for a minipeft GPT."""
    c = model.config
    dtype = str(model.dtype)
    out = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        # GPT2Config's defaults (50256) would lie outside a small vocabulary
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if fingerprint:
        out[FINGERPRINT_KEY] = fingerprint
    return out


def save_hf_gpt2(model: GPT, directory) -> Path:
    """Write ``model`` as a GPT-2 folder that ``GPT2LMHeadModel.from_pretrained`` loads.

    ``config.json`` holds GPT-2's fields (and the model's minipeft
    fingerprint, which transformers keeps as an extra attribute);
    ``model.safetensors`` holds every parameter under ``transformer.`` + its
    minipeft name, in the model's dtype, with the ``{"format": "pt"}`` header
    transformers checks. The LM head is not stored: it is ``wte``, and
    ``tie_word_embeddings`` tells transformers to tie it (as its own
    ``save_pretrained`` does). Written atomically (see the module docstring).
    """
    if isinstance(model, PeftModel):
        raise TypeError(
            "save_hf_gpt2 saves a plain GPT: for a PeftModel save its base "
            "(model.base_model) and export the adapter with export_peft_adapter, or "
            "merge it first (model.merge_and_unload())"
        )
    if not isinstance(model, GPT):
        raise TypeError(f"save_hf_gpt2 expects a minipeft GPT, got {type(model).__name__}")
    state = {HF_BODY + n: p.data for n, p in model.named_parameters()}
    return _write_folder(directory, {
        WEIGHTS_NAME: _tensors_writer(state, {"format": "pt"}),
        CONFIG_NAME: _json_writer(_hf_config(model, fingerprint(model))),
    })


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


class HFTokenizer:
    """A Hugging Face tokenizer with :class:`~minipeft.data.CharTokenizer`'s interface.

    ``encode(text)`` gives an int64 array of ids, ``decode(ids)`` the text;
    ``tokenizer`` is the ``tokenizers`` object itself.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def __repr__(self):
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def load_hf_tokenizer(directory) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder: ``tokenizer.json``, or GPT-2's
    ``vocab.json`` + ``merges.txt`` (byte-level BPE), through ``tokenizers``.

    ``model.generate(tok.encode(text)[None], 20)`` then ``tok.decode(...)``
    generates text with a real GPT-2.
    """
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError(
            "load_hf_tokenizer needs the 'tokenizers' library: pip install torch==2.13.0, then "
            "pip install -e \".[hf]\" (or pip install tokenizers)"
        ) from exc
    folder = Path(directory)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return HFTokenizer(tokenizers.ByteLevelBPETokenizer(str(folder / "vocab.json"),
                                                            str(folder / "merges.txt")))
    raise FileNotFoundError(
        f"no tokenizer in '{folder}': expected tokenizer.json (or vocab.json and merges.txt)"
    )


# ---------------------------------------------------------------------------
# Adapters: minipeft -> peft
# ---------------------------------------------------------------------------

#: minipeft's methods that peft lacks, and what to do instead
NOT_IN_PEFT = {
    "ADAPTER": "bottleneck adapters (peft has no Houlsby/Pfeiffer adapters for GPT-2)",
    "MASK": "element masks (peft has no sparse element-wise fine-tuning)",
    "SELECTIVE": "layer selection (peft trains new parameters, not chosen base weights)",
    "BITFIT": "BitFit (peft has no bias-only method)",
    "FULL": "full fine-tuning (it is not an adapter)",
}


def _whole_model_hint(peft_type: str) -> str:
    if peft_type == "ADAPTER":
        return "there is no equivalent adapter to export to"
    return ("its result is a whole model: merge it (model.merge_and_unload() for full "
            "fine-tuning, or use the trained base) and save that with save_hf_gpt2")


def _peft_module_key(name: str) -> str:
    """peft's key stem of a module: ``h.0.mlp.c_fc`` -> ``base_model.model.transformer.h.0.mlp.c_fc``."""
    return PEFT_PREFIX + HF_BODY + name


def export_peft_adapter(peft_model, directory, adapter_name: str | None = None,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write a minipeft adapter as a Hugging Face peft adapter folder.

    The folder holds ``adapter_config.json`` (peft's fields for the method,
    ``task_type`` CAUSAL_LM, ``fan_in_fan_out`` for GPT-2's Conv1D) and
    ``adapter_model.safetensors`` under peft's key names (see the module
    docstring's table); ``peft.PeftModel.from_pretrained(gpt2, directory)``
    loads it onto the GPT-2 that :func:`save_hf_gpt2` wrote from the same base.

    Args:
        peft_model: a minipeft :class:`~minipeft.peft.PeftModel`.
        directory: the output folder (written atomically).
        adapter_name: which adapter (default: the active one).
        base_model_name_or_path: recorded in the config, where peft's
            ``AutoPeftModelForCausalLM`` looks for the base (e.g. the folder
            save_hf_gpt2 wrote).

    Raises:
        InteropError: a method peft does not have, an adapter that is merged,
            or a soft prompt with no virtual tokens.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"export_peft_adapter expects a minipeft PeftModel, got {type(peft_model).__name__}")
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters here: {sorted(peft_model.adapters)}")
    method, config = peft_model.adapters[name], peft_model.peft_config[name]
    if config.peft_type in NOT_IN_PEFT:
        raise InteropError(
            f"cannot export {NOT_IN_PEFT[config.peft_type]} as a Hugging Face peft adapter: peft "
            f"has no such method; {_whole_model_hint(config.peft_type)}. Exportable: LoRA (and "
            "DoRA), prompt tuning, prefix tuning, (IA)^3"
        )
    if method.merged:
        raise InteropError(f"adapter {name!r} is merged into the base weights: unmerge it first "
                           "(model.unmerge_adapter()), so the adapter and the base are apart")
    gc = peft_model.config
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "inference_mode": True, "revision": None, "modules_to_save": None}
    state = {k: backend.asnumpy(v) for k, v in method.state_dict(peft_model).items()}
    out = {}
    if isinstance(config, LoraConfig):
        for key, arr in sorted(state.items()):         # in name order: errors name the same entry first
            module, _, part = key.rpartition(".")
            stem = _peft_module_key(module)
            if part == "lora_A":
                out[f"{stem}.lora_A.weight"] = arr.T          # (in, r) -> (r, in)
            elif part == "lora_B":
                out[f"{stem}.lora_B.weight"] = arr.T          # (r, out) -> (out, r)
            elif part == "lora_magnitude":
                out[f"{stem}.lora_magnitude_vector"] = arr    # (out,)
            else:  # pragma: no cover - a LoRA part this module does not know
                raise InteropError(f"unknown LoRA parameter {key!r}")
        cfg = {**common, "peft_type": "LORA", "r": config.r, "lora_alpha": config.lora_alpha,
               "lora_dropout": config.lora_dropout, "target_modules": list(config.target_modules),
               "fan_in_fan_out": True, "bias": "none", "use_dora": bool(config.use_dora),
               "use_rslora": bool(config.use_rslora), "init_lora_weights": True, "layers_to_transform": None,
               "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    elif isinstance(config, IA3Config):
        for module, wrapper in method.wrappers(peft_model):
            mode, fixed = wrapper.modes[name]
            vec = backend.asnumpy(wrapper.ia3_l._parameters[name].data)
            if fixed:  # the paper's form: q is not scaled, i.e. scaled by exactly one
                vec = np.concatenate([np.ones(fixed, dtype=vec.dtype), vec])     # (3C,)
            # peft's layout: (1, in) for a vector that scales the input, (out, 1) for the output
            out[f"{_peft_module_key(module)}.ia3_l"] = vec[None, :] if mode == "in" else vec[:, None]
        cfg = {**common, "peft_type": "IA3", "target_modules": list(config.target_modules),
               "feedforward_modules": list(config.feedforward_modules), "fan_in_fan_out": True,
               "init_ia3_weights": True}
    elif isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
        if config.num_virtual_tokens == 0:
            raise InteropError("a soft prompt with 0 virtual tokens has nothing to export")
        out["prompt_embeddings"] = state["prompt_embeddings"]
        cfg = {**common, "num_virtual_tokens": config.num_virtual_tokens, "token_dim": gc.n_embd,
               "num_transformer_submodules": 1, "num_attention_heads": gc.n_head,
               "num_layers": gc.n_layer}
        if isinstance(config, PromptTuningConfig):
            cfg.update(peft_type="PROMPT_TUNING", prompt_tuning_init="RANDOM",
                       prompt_tuning_init_text=None, tokenizer_name_or_path=None)
        else:
            # the file holds the prefixes themselves, whether an MLP made them or not
            cfg.update(peft_type="PREFIX_TUNING", prefix_projection=False,
                       encoder_hidden_size=gc.n_embd)
    else:  # pragma: no cover - a method added later without an export
        raise InteropError(f"no Hugging Face export for {type(config).__name__}")
    meta = {"format": "pt", FINGERPRINT_KEY: peft_model.base_fingerprint,
            "minipeft_config": json.dumps(config.to_dict(), sort_keys=True)}
    return _write_folder(directory, {
        ADAPTER_WEIGHTS_NAME: _tensors_writer(out, meta),
        ADAPTER_CONFIG_NAME: _json_writer(cfg),
    })


# ---------------------------------------------------------------------------
# Adapters: peft -> minipeft
# ---------------------------------------------------------------------------

#: peft LoRA settings minipeft has no counterpart for, with the value that means "unused"
_LORA_UNSUPPORTED = {
    "bias": ("none", "trained biases (bias != 'none')"),
    "rank_pattern": ({}, "per-module ranks (rank_pattern)"),
    "alpha_pattern": ({}, "per-module alphas (alpha_pattern)"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save)"),
    "lora_bias": (False, "a trained bias on lora_B (lora_bias)"),
    "layer_replication": (None, "layer replication"),
    "trainable_token_indices": (None, "trainable token embeddings"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "target_parameters": (None, "LoRA on parameters rather than modules (target_parameters)"),
}


def _module_of(key: str, where) -> tuple[str, str]:
    """peft key -> (minipeft module name, the part after it), e.g. ``h.0.attn.c_attn``, ``lora_A.weight``."""
    name = key.removeprefix(PEFT_PREFIX).removeprefix(HF_BODY)
    for part in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight",
                 "lora_magnitude_vector", "ia3_l"):
        if name.endswith("." + part):
            return name[: -len(part) - 1], part
    raise InteropError(f"'{where}': unexpected entry {key!r}, which minipeft has no place for "
                       "(LoRA on embeddings or the head, trained biases, modules_to_save?)")


def _linear_shape(base: GPT, module: str, where) -> tuple[int, int]:
    """(in, out) of the base's Linear ``module``, or an error naming the Linear modules there are."""
    try:
        m = base.get_submodule(module)
    except KeyError:
        m = None
    if m is None or not hasattr(m, "in_features"):
        raise InteropError(
            f"'{where}' adapts {module!r}, which is not a Linear of this GPT (its Linear "
            "modules are h.N.attn.c_attn, h.N.attn.c_proj, h.N.mlp.c_fc, h.N.mlp.c_proj): "
            "it was made for another model"
        )
    return m.in_features, m.out_features


def _shape_error(where, what, got, want):
    return InteropError(f"'{where}': {what} has shape {tuple(got)}, this base needs {tuple(want)}: "
                        "the adapter was made for another base model")


def _peft_matches(targets, module: str) -> bool:
    """peft's target rule on the GPT-2 module ``transformer.`` + ``module``.

    A list entry matches a name equal to it or ending in ``"." + entry`` (the
    rule minipeft shares); a string is a regular expression the whole name
    must match.
    """
    key = HF_BODY + module
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def _targets(config_targets, modules: list[str], base: GPT) -> list[str]:
    """minipeft target_modules: peft's list when it picks exactly the file's modules, else their names."""
    if isinstance(config_targets, (list, tuple)) and config_targets:
        linear = [n for n, m in base.named_modules() if n and is_linear_like(m)
                  and ".base_layer" not in n]
        chosen = {n for n in linear if any(matches(n, t) for t in config_targets)}
        if chosen == set(modules):
            return list(config_targets)
    return sorted(modules, key=_natural)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def _convert_lora(hf: dict, state: dict, base: GPT, where):
    """A peft LoRA (or DoRA) adapter as a minipeft ``(LoraConfig, state dict)``.

    peft keeps torch's (out, in) layout: A is (r, in) and B (out, r); here
    A is (in, r) and B (r, out), so each is transposed. A setting minipeft's
    LoRA does not have is refused rather than dropped.
    """
    for field_name, (unused, what) in _LORA_UNSUPPORTED.items():
        value = hf.get(field_name)
        if value is not None and value != unused and value not in ([], {}, False):
            raise InteropError(f"'{where}' uses {what}, which minipeft's LoRA does not have")
    if hf.get("layers_to_transform") is not None:
        raise InteropError(f"'{where}' restricts LoRA to some layers (layers_to_transform): give "
                           "minipeft the modules by name instead")
    r = int(hf["r"])
    out, modules, dora = {}, [], False
    for key, arr in sorted(state.items()):         # in name order: errors name the same entry first
        module, part = _module_of(key, where)
        if part == "ia3_l":
            raise InteropError(f"'{where}': {key!r} is an (IA)^3 vector in a LoRA adapter")
        fan_in, fan_out = _linear_shape(base, module, where)
        if part == "lora_A.weight":
            if arr.shape != (r, fan_in):
                raise _shape_error(where, key, arr.shape, (r, fan_in))
            out[f"{module}.lora_A"] = arr.T                      # (r, in) -> (in, r)
            modules.append(module)
        elif part == "lora_B.weight":
            if arr.shape != (fan_out, r):
                raise _shape_error(where, key, arr.shape, (fan_out, r))
            out[f"{module}.lora_B"] = arr.T                      # (out, r) -> (r, out)
        else:
            # DoRA's magnitude, one number per output: any shape that flattens to (out,)
            if arr.reshape(-1).shape != (fan_out,):
                raise _shape_error(where, key, arr.shape, (fan_out,))
            out[f"{module}.lora_magnitude"] = arr.reshape(-1)    # (out,)
            dora = True
    if not modules:
        raise InteropError(f"'{where}' holds no LoRA weights")
    alpha = float(hf.get("lora_alpha", 8))
    if hf.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); minipeft by alpha / r: the same with alpha * sqrt(r)
        alpha *= math.sqrt(r)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(hf.get("lora_dropout", 0.0)),
                        target_modules=_targets(hf.get("target_modules"), modules, base),
                        use_dora=dora or bool(hf.get("use_dora")))
    return config, out


def _convert_ia3(hf: dict, state: dict, base: GPT, where):
    """A peft (IA)^3 adapter as a minipeft ``(IA3Config, state dict)``: each vector flattened.

    peft scales the fused ``c_attn`` output as a whole (q included), so the
    config has ``scale_queries=True``.
    """
    if hf.get("modules_to_save"):
        raise InteropError(f"'{where}' uses modules_to_save, which minipeft's (IA)^3 does not have")
    out, modules, feedforward = {}, [], []
    for key, arr in sorted(state.items()):         # in name order: errors name the same entry first
        module, part = _module_of(key, where)
        if part != "ia3_l":
            raise InteropError(f"'{where}': {key!r} is a LoRA weight in an (IA)^3 adapter")
        fan_in, fan_out = _linear_shape(base, module, where)
        # peft's rule: a feed-forward module scales its input (1, in), any other its output (out, 1)
        if _peft_matches(hf.get("feedforward_modules") or [], module):
            want = (1, fan_in)
            feedforward.append(module)
        else:
            want = (fan_out, 1)
        if arr.shape != want:
            raise _shape_error(where, key, arr.shape, want)
        out[f"{module}.ia3_l"] = arr.reshape(-1)                 # (in,) or (out,)
        modules.append(module)
    if not modules:
        raise InteropError(f"'{where}' holds no (IA)^3 vectors")
    targets = _targets(hf.get("target_modules"), modules, base)
    ff = _targets(hf.get("feedforward_modules"), feedforward, base) if feedforward else []
    config = IA3Config(target_modules=targets, feedforward_modules=ff, scale_queries=True)
    return config, out


def _convert_soft_prompt(hf: dict, state: dict, base: GPT, where):
    """A peft prompt- or prefix-tuning adapter as a minipeft config and state dict.

    Both store one array, ``prompt_embeddings``, in the layout minipeft
    uses too: (P, C) for prompt tuning, (P, L·2·C) for prefix tuning (the
    prefixes themselves, not the MLP that made them).
    """
    gc = base.config
    if set(state) != {"prompt_embeddings"}:
        raise InteropError(f"'{where}': a soft prompt file holds one array 'prompt_embeddings', "
                           f"found {sorted(state)}")
    if int(hf.get("num_transformer_submodules") or 1) != 1:
        raise InteropError(f"'{where}' is a soft prompt for an encoder-decoder model "
                           "(num_transformer_submodules 2); minipeft's GPT is decoder-only")
    emb = state["prompt_embeddings"]
    P = int(hf.get("num_virtual_tokens") or emb.shape[0])
    if hf["peft_type"] == "PROMPT_TUNING":
        want, config = (P, gc.n_embd), PromptTuningConfig(num_virtual_tokens=P,
                                                          prompt_tuning_init="RANDOM")
    else:
        want = (P, gc.n_layer * 2 * gc.n_embd)
        config = PrefixTuningConfig(num_virtual_tokens=P)
    if tuple(emb.shape) != want:
        raise _shape_error(where, "prompt_embeddings", emb.shape, want)
    return config, {"prompt_embeddings": emb}


_CONVERTERS = {"LORA": _convert_lora, "IA3": _convert_ia3, "PROMPT_TUNING": _convert_soft_prompt,
               "PREFIX_TUNING": _convert_soft_prompt}


def _check_base(base_fp: Callable[[], str], folder: Path, hf: dict, meta: dict) -> None:
    """Refuse an adapter whose recorded base fingerprint is not this base's, where one is recorded.

    ``base_fp`` computes this base's fingerprint (a hash of every weight: only
    worth computing when there is something to compare it with).
    """
    recorded, source = meta.get(FINGERPRINT_KEY), "its safetensors header"
    path = hf.get("base_model_name_or_path")
    if recorded is None and path and (Path(path) / CONFIG_NAME).is_file():
        with contextlib.suppress(InteropError, OSError):
            recorded = _read_json(Path(path) / CONFIG_NAME, "config").get(FINGERPRINT_KEY)
            source = f"the config.json of its base_model_name_or_path '{path}'"
    if recorded is None:
        return
    fp = base_fp()
    if recorded != fp:
        raise InteropError(
            f"the adapter in '{folder}' was made for another base model (fingerprint "
            f"{recorded[:12]}... in {source}; this base {fp[:12]}...): load it onto the base it "
            "was made for"
        )


def read_peft_adapter(directory, base: GPT, base_fingerprint: str | None = None):
    """(minipeft config, minipeft-named arrays) for a peft adapter folder, checked against ``base``.

    ``base_fingerprint``: the base's, when known (a PeftModel keeps it);
    computed from ``base`` otherwise, and only if the adapter records one.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: '{folder}'")
    hf = _read_json(folder / ADAPTER_CONFIG_NAME, f"{ADAPTER_CONFIG_NAME} of a peft adapter folder")
    weights = folder / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        bin_hint = (" (it has adapter_model.bin, a pickle minipeft does not read: re-save it with "
                    "peft's save_pretrained, which writes safetensors)"
                    if (folder / "adapter_model.bin").is_file() else "")
        raise FileNotFoundError(f"adapter weights not found: '{weights}'{bin_hint}")
    peft_type = hf.get("peft_type")
    if peft_type not in _CONVERTERS:
        raise InteropError(
            f"'{folder}' is a peft {peft_type or 'unknown-type'} adapter; minipeft imports "
            f"{', '.join(sorted(_CONVERTERS))} (the methods it shares with peft)"
        )
    if hf.get("task_type") not in (None, "CAUSAL_LM"):
        raise InteropError(f"'{folder}' was made for a {hf['task_type']} model; minipeft's GPT is "
                           "a causal language model (task_type CAUSAL_LM)")
    state, meta = _read_tensors(weights, "adapter weights")
    _check_base(lambda: base_fingerprint or fingerprint(base), folder, hf, meta)
    config, arrays = _CONVERTERS[peft_type](hf, state, base, folder)
    dtype = base.dtype
    return config, {k: np.ascontiguousarray(v).astype(dtype) for k, v in arrays.items()}


def import_peft_adapter(model, directory, adapter_name: str = "default", is_trainable: bool = False):
    """A minipeft PeftModel with the Hugging Face peft adapter in ``directory``.

    ``model`` is a minipeft GPT (the base the adapter was trained on, e.g.
    :func:`load_hf_gpt2` of the folder peft used) or a PeftModel, which gets
    the adapter as another one. Everything is checked before ``model`` is
    touched: the method (LoRA and DoRA, (IA)^3, prompt tuning, prefix tuning),
    the shapes against this base, and the base's fingerprint where the
    adapter records one. The adapter is active; it trains only with
    ``is_trainable=True``, as in peft.
    """
    base = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(base, GPT):
        raise TypeError("import_peft_adapter expects a minipeft GPT or PeftModel, "
                        f"got {type(model).__name__}")
    known = model.base_fingerprint if isinstance(model, PeftModel) else None
    config, arrays = read_peft_adapter(directory, base, known)
    if isinstance(model, PeftModel):
        pm = model
        pm.add_adapter(adapter_name, config)
    else:
        pm = get_peft_model(model, config, adapter_name)
    pm.adapters[adapter_name].load_state_dict(pm, arrays)
    pm.set_adapter(adapter_name)
    if not is_trainable:
        pm.adapters[adapter_name].deactivate_training(pm)
    return pm
