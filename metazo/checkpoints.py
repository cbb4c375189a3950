"""Safetensors files written and read safely: fine-tuned weights, and the checks every metazo file
(weights, run checkpoints, policies) goes through before a tensor is read.

Writing is atomic (temporary file, fsync, rename) and adds a SHA-256 of the tensors to the
metadata. Reading never unpickles, and a file's header is checked before the safetensors library
sees it: its declared size against the file's, every tensor's dtype, shape and byte range, so a
truncated, bit-flipped or hostile file is a MetazoError, never a crash or a huge allocation; the
checksum, where the file has one, catches changed tensor bytes.

The weights file's metadata says how to rebuild the model it belongs to (base model, mode, LoRA
shape), so ``metazo eval --checkpoint`` needs nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from metazo import __version__
from metazo.blocks import Block
from metazo.errors import MetazoError

WEIGHTS_FILE = "weights.safetensors"
CHECKSUM_KEY = "sha256"
MAX_HEADER_BYTES = 64 * 1024 * 1024  # safetensors' own limit is 100 MB; metazo's headers are kilobytes
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def save_weights(path: Path, blocks: list[Block], info: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the blocks' tensors (by parameter name) and ``extra`` named tensors (a sampler's
    buffers) atomically, with ``info`` as JSON metadata."""
    path = Path(path)
    tensors = {block.name: block.param.detach().to("cpu").contiguous() for block in blocks}
    tensors.update({name: t.detach().to("cpu").contiguous() for name, t in (extra or {}).items()})
    metadata = {"metazo": json.dumps({**info, "metazo_version": __version__}, sort_keys=True)}
    return write_safetensors_atomic(path, tensors, metadata)


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file so a reader never sees half of it (temporary file, fsync, rename),
    with the tensors' checksum in its metadata. A failed write (a full disk) leaves the old file, if
    any, and no temporary file, and is a MetazoError that says why."""
    path = Path(path)
    metadata = {**metadata, CHECKSUM_KEY: tensors_checksum(tensors)}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise MetazoError(f"cannot write {path}: {reason}") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safetensors_header(path: Path) -> dict[str, Any]:
    """The checked header of a safetensors file: {"__metadata__": {...}, name: {dtype, shape,
    data_offsets}}. Raises MetazoError for anything that is not a well-formed safetensors file."""
    path = Path(path)

    def bad(why: str) -> MetazoError:
        return MetazoError(f"{path} is not a readable safetensors file ({why})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad("shorter than a header")
            declared = int.from_bytes(prefix, "little")
            if declared > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"declares a {declared}-byte header in a {size}-byte file")
            raw = f.read(declared)
    except OSError as error:
        raise MetazoError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("its metadata is not a map of strings")
    data_size = size - 8 - declared
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor '{name}' has a malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ITEM_SIZES:
            raise bad(f"tensor '{name}' has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor '{name}' has a malformed shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor '{name}' lies outside the file (truncated?)")
        if offsets[1] - offsets[0] != math.prod(shape) * ITEM_SIZES[dtype]:
            raise bad(f"tensor '{name}' has {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
        spans.append(tuple(offsets))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise bad("its tensors overlap")
    return header


def checked_schema_version(path: Path, metadata: dict[str, str], file_format: str, current: int, what: str) -> int:
    """The schema version of a metazo file of ``file_format`` (policy, run checkpoint), checked: a file of
    another format or of a newer schema than this metazo's is a MetazoError that says which."""
    if metadata.get("format") != file_format:
        raise MetazoError(f"{path} is a safetensors file but not a metazo {what} (no format '{file_format}' in its metadata)")
    try:
        version = int(metadata.get("schema_version", ""))
    except ValueError:
        raise MetazoError(f"{path}: {what} schema version {metadata.get('schema_version')!r} is not a number") from None
    if version > current:
        raise MetazoError(f"{path} has {what} schema version {version}, newer than this metazo's ({current}); "
                          "upgrade metazo to read it")
    if version < 1:
        raise MetazoError(f"{path}: {what} schema version {version} is not valid")
    return version


def read_checked_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file: header checked first, checksum verified where the
    file has one (files written by metazo do). Nothing is unpickled."""
    path = Path(path)
    header = safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MetazoError(f"{path} is not a readable safetensors file ({first})") from None
    metadata = header.get("__metadata__", {})
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_checksum(tensors) != expected:
        raise MetazoError(f"{path} is corrupt: its tensors do not match the checksum in its metadata")
    return tensors, metadata


def read_weights_info(path: Path) -> dict[str, Any]:
    """The metadata of a weights file, without loading its tensors."""
    path = _existing(path)
    raw = safetensors_header(path).get("__metadata__", {}).get("metazo")
    if raw is None:
        raise MetazoError(f"{path} has no metazo metadata; it was not written by metazo")
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise MetazoError(f"{path} has corrupt metazo metadata") from None
    if not isinstance(info, dict):
        raise MetazoError(f"{path} has corrupt metazo metadata")
    return info


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, checked (safetensors only: nothing is unpickled)."""
    return read_checked_tensors(_existing(path))[0]


def load_weights(model: nn.Module, path: Path) -> int:
    """Copy the file's tensors into the model's parameters (and buffers) of the same names."""
    path = _existing(path)
    return copy_into_model(model, load_tensors(path), path)


def copy_into_model(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> int:
    """Copy named tensors into the model's parameters and buffers; all are checked before any changes."""
    params = {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}
    missing = [name for name in tensors if name not in params]
    if missing:
        raise MetazoError(f"{source} does not fit this model: it has no parameter '{missing[0]}'")
    for name, tensor in tensors.items():
        if tensor.shape != params[name].shape:
            raise MetazoError(
                f"{source} does not fit this model: '{name}' is {tuple(tensor.shape)}, "
                f"the model's is {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return len(tensors)


def _existing(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise MetazoError(f"no checkpoint at {path}")
    return path
