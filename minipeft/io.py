r"""Checkpoints and files: safetensors, written atomically.

A checkpoint is a flat ``name -> array`` dictionary (a model's
:meth:`~minipeft.nn.Module.state_dict`, whose names are GPT-2's) plus a small
``str -> str`` metadata dictionary, stored in the `safetensors
<https://huggingface.co/docs/safetensors>`_ format: a JSON header of names,
dtypes, shapes and offsets, then the raw bytes. Loading it runs no code
(unlike a pickle), and the same file opens in PyTorch or in Hugging Face
tools.

Every write here is **atomic**: the bytes go to a temporary file in the same
folder, are flushed to disk (``fsync``), and only then is the temporary file
renamed over the destination (``os.replace``, a single atomic step on POSIX
and Windows within one filesystem). An interrupted write (an exception, a
full disk, a killed process) therefore leaves either the old file or the new
one, never a half-written mix, and never destroys an existing good
checkpoint. The temporary file is removed when the write fails.

The generic helpers (:func:`atomic_write_bytes`, :func:`atomic_write_json`,
:func:`save_tensors`) are what the PEFT adapter files reuse, and
:func:`commit_files` makes a whole adapter folder change in one step: one
file holds everything (the weights, and the JSON files beside them in its
metadata), so its single rename is the commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from . import backend
from .autograd.tensor import Tensor
from .nn.module import Module

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "commit_files", "committed_copies",
    "ensure_writable_dir", "folder_lock", "fsync_folder", "load_checkpoint", "load_into",
    "load_tensors", "remove_leftovers", "save_checkpoint", "save_tensors",
]


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------


def _folder_error(folder: Path, exc: OSError, saving: str | None = None) -> OSError:
    """An OSError of the same kind (PermissionError, ...) that names the folder and why."""
    why = exc.strerror or str(exc)
    what = f" while saving '{saving}'" if saving else ""
    return OSError(exc.errno, f"cannot write to output folder '{folder}' ({why}){what}")


def ensure_writable_dir(directory) -> Path:
    """Create ``directory`` if needed and check that files can be created in it.

    The check is a real one (a temporary file is created and removed), so it
    holds for root, read-only filesystems and full disks alike. Raises an
    OSError naming the folder and the reason.
    """
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _folder_error(folder, exc) from exc
    return folder


@contextlib.contextmanager
def _atomic_target(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path``.

    The folder is created if missing. A folder that cannot be written raises
    an OSError that names the folder and the reason. If the body raises, the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    folder = path.parent
    # The temporary file lives in the destination's folder: os.replace is only
    # atomic within one filesystem.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _folder_error(folder, exc, path.name) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # Flush the new bytes to disk before the rename makes them visible.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; keep the old file's mode, or an ordinary 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(folder)            # persist the rename itself (the folder's entry)


def fsync_folder(folder) -> None:
    """Flush a folder's entries to disk, so that a rename into it survives a crash.

    Best effort, POSIX only: where a folder cannot be opened or synced
    (Windows), it does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_json(path, obj) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (UTF-8, final newline), atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------
# Saving tensors
# ---------------------------------------------------------------------------


def _check_metadata(metadata) -> dict[str, str]:
    """safetensors metadata is ``str -> str``; say which entry is not."""
    if metadata is None:
        return {}
    bad = [f"{k!r}: {type(v).__name__}" for k, v in metadata.items()
           if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(
            "checkpoint metadata must map str to str (convert numbers with str() or "
            "json.dumps); not strings: " + ", ".join(bad)
        )
    return dict(metadata)


def save_tensors(tensors: Mapping, path, metadata: dict[str, str] | None = None) -> Path:
    """Save ``name -> array`` (any device; Tensors too) as safetensors, atomically.

    Arrays are copied to the host (:func:`backend.asnumpy`) and made
    contiguous; dtypes are kept exactly (float32 stays float32, float64 stays
    float64), so a round trip is bit-exact.
    """
    meta = _check_metadata(metadata)
    host = {}
    for name, a in tensors.items():
        if isinstance(a, Tensor):
            a = a.data
        host[str(name)] = np.ascontiguousarray(backend.asnumpy(a))
    with _atomic_target(path) as tmp:
        safetensors.numpy.save_file(host, str(tmp), metadata=meta or None)
    return Path(path)


def save_checkpoint(model_or_state_dict, path, metadata: dict[str, str] | None = None) -> Path:
    """Save a Module's state dict (or a state dict) to ``path`` as safetensors.

    ``metadata`` (``str -> str``) travels in the file's header: a config as
    JSON, the step, the seed. The write is atomic (see the module docstring).
    """
    if isinstance(model_or_state_dict, Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(
            f"save_checkpoint: expected a Module or a state dict, "
            f"got {type(model_or_state_dict).__name__}"
        )
    return save_tensors(state, path, metadata)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_tensors(path, what: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: ``(name -> NumPy array on the host, metadata)``.

    The file is read once, and arrays and metadata are parsed from those
    bytes, so both come from the same file even while another process
    replaces it (a save's ``os.replace``). Raises FileNotFoundError for a
    missing file and ValueError for a file that is not safetensors (a
    truncated one included); ``what`` names the file in those messages
    ("checkpoint", "adapter weights").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: '{path}'")
    if path.is_dir():
        raise IsADirectoryError(f"{what} path is a folder, expected a file: '{path}'")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = safetensors.numpy.load(data)
        # the header: an 8-byte little-endian length, then that many bytes of JSON
        (n,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(
            f"'{path}' is not a readable safetensors file ({exc}); "
            "was it written by save_checkpoint, and completely?"
        ) from exc
    return tensors, dict(metadata)


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a checkpoint: ``(state dict of host NumPy arrays, metadata)`` (see load_tensors)."""
    return load_tensors(path, what="checkpoint")


def load_into(model: Module, path, strict: bool = True) -> dict[str, str]:
    """Load a checkpoint into ``model`` (moved to its device and dtype); returns the metadata.

    Nothing is changed unless every name and shape fits: a mismatch raises a
    ValueError naming the file and listing every missing, unexpected and
    mis-shaped entry (the list is :meth:`Module.load_state_dict`'s).
    """
    state, metadata = load_checkpoint(path)
    try:
        model.load_state_dict(state, strict=strict)
    except ValueError as exc:
        raise ValueError(f"checkpoint '{path}' does not fit {type(model).__name__}: {exc}") \
            from exc
    return metadata


# ---------------------------------------------------------------------------
# A folder that changes in one step: one committed file, readable copies beside it
# ---------------------------------------------------------------------------

#: the metadata key prefix, in a committed file, of each copy beside it (compact JSON)
COPY_KEY = "copy:"
#: what a stopped write leaves: ``.NAME.<random>.tmp`` (and ``.new`` / ``.old`` from before)
LEFTOVER_SUFFIXES = (".tmp", ".new", ".old")


#: folder -> (descriptor, (st_dev, st_ino)) of the folder locks this process holds
_HELD: dict[str, tuple[int, tuple[int, int]]] = {}


@contextlib.contextmanager
def folder_lock(folder) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself: no lock file).

    Two saves into one folder take turns, so neither removes the other's
    temporary files as leftovers. Readers take no lock: they never write.
    A lock that this process failed to release (a Ctrl-C in a notebook
    between taking and closing it) is dropped when the folder is locked
    again, instead of waiting for it forever; so saves from two threads of
    one process are not serialised. Where ``flock`` is missing (Windows)
    saves are not serialised.
    """
    try:
        import fcntl
    except ImportError:                     # pragma: no cover - Windows
        yield
        return
    key = os.path.realpath(folder)
    stale = _HELD.pop(key, None)
    if stale is not None:
        # close the leaked descriptor only if it still is this folder (numbers are reused)
        with contextlib.suppress(OSError):
            st = os.fstat(stale[0])
            if (st.st_dev, st.st_ino) == stale[1]:
                os.close(stale[0])
    fd = os.open(folder, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        _HELD[key] = (fd, (st.st_dev, st.st_ino))
        fcntl.flock(fd, fcntl.LOCK_EX)      # released when the descriptor closes
        yield
    finally:
        os.close(fd)
        _HELD.pop(key, None)


def remove_leftovers(folder, names) -> list[str]:
    """Remove the temporary files that stopped writes of ``names`` left in ``folder``.

    Only hidden names of the form ``.NAME.<anything>.tmp`` (and ``.new`` /
    ``.old``, the helper files of an older save) are touched. Call it only
    under :func:`folder_lock`: a concurrent save's staged file looks the same.
    Returns the names removed.
    """
    removed = []
    for entry in sorted(os.listdir(folder)):
        if any(entry.startswith(f".{n}.") for n in names) and entry.endswith(LEFTOVER_SUFFIXES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
                removed.append(entry)
    return removed


def commit_files(directory, name: str, tensors: Mapping, build, drop=()) -> Path:
    r"""Save ``tensors`` as ``directory/name`` with readable JSON copies beside it, as one commit.

    ``build(previous)`` is called with the metadata of the file being
    replaced (``{}`` if none) and returns ``(metadata, copies)``: the
    ``str -> str`` metadata of the new file and ``{file name: JSON object}``,
    the copies to write beside it. Each copy also travels in the new file's
    metadata (as compact JSON, under ``copy:<file name>``), so the one file
    ``name`` holds everything and its ``os.replace`` is **the commit**:
    before it the folder is the previous save, after it the new one.

    The steps, under :func:`folder_lock`:

    1. remove what stopped saves left (:func:`remove_leftovers`);
    2. write each copy (atomically: temporary file, fsync, rename);
    3. write ``name`` the same way: the commit;
    4. remove the files named in ``drop`` that this save has no copy of.

    A save stopped after 2 leaves new copies beside the previous file, one
    stopped after 3 may leave a copy the new save dropped: the caller puts in
    each copy what tells a reader which file it belongs to (see
    :func:`minipeft.peft.model.read_adapter`), and the reader takes the
    committed text instead of a copy that belongs to another save.
    """
    folder = Path(os.fspath(directory))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _folder_error(folder, exc, name) from exc
    target = folder / name
    with folder_lock(folder):
        # what is being replaced: a file that cannot be read stops the save (the caller
        # stamps the copies with it); one that is not safetensors is replaced as nothing
        previous = {}
        if target.is_file():
            with contextlib.suppress(ValueError):
                previous = load_tensors(target)[1]
        metadata, copies = build(previous)
        remove_leftovers(folder, [name, *copies, *drop])
        for n, obj in copies.items():
            atomic_write_json(folder / n, obj)
        # the metadata keeps each copy compact (the header stays small); a reader compares
        # the parsed objects, not the text
        packed = {COPY_KEY + n: json.dumps(obj, sort_keys=True, separators=(",", ":"))
                  for n, obj in copies.items()}
        save_tensors(tensors, target, {**metadata, **packed})
        for n in drop:
            if n not in copies:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / n)
        fsync_folder(folder)
    return target


def committed_copies(metadata: Mapping[str, str]) -> dict[str, object]:
    """``{file name: JSON object}`` of the copies a committed file's metadata holds."""
    out = {}
    for key, text in metadata.items():
        if key.startswith(COPY_KEY):
            try:
                out[key[len(COPY_KEY):]] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the metadata entry {key!r} is not valid JSON ({exc}): the "
                                 "file was changed after it was saved; save it again") from None
    return out
