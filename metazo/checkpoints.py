"""Fine-tuned weights as safetensors: the trained tensors only (adapters only in LoRA mode).

The file's metadata says how to rebuild the model it belongs to (base model, mode, LoRA shape), so
``metazo eval --checkpoint`` needs nothing else. Loading never unpickles.
"""

from __future__ import annotations

import json
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


def save_weights(path: Path, blocks: list[Block], info: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the blocks' tensors (by parameter name) and ``extra`` named tensors (a sampler's
    buffers) atomically, with ``info`` as JSON metadata."""
    path = Path(path)
    tensors = {block.name: block.param.detach().to("cpu").contiguous() for block in blocks}
    tensors.update({name: t.detach().to("cpu").contiguous() for name, t in (extra or {}).items()})
    metadata = {"metazo": json.dumps({**info, "metazo_version": __version__}, sort_keys=True)}
    return write_safetensors_atomic(path, tensors, metadata)


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file so a reader never sees half of it: temporary file, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_weights_info(path: Path) -> dict[str, Any]:
    """The metadata of a weights file, without loading its tensors."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("metazo")
    except (SafetensorError, OSError, ValueError) as error:
        raise MetazoError(f"{path} is not a readable safetensors file ({error})") from None
    if raw is None:
        raise MetazoError(f"{path} has no metazo metadata; it was not written by metazo")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise MetazoError(f"{path} has corrupt metazo metadata") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file (safetensors only: nothing is unpickled)."""
    path = _existing(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise MetazoError(f"{path} is not a readable safetensors file ({error})") from None


def load_weights(model: nn.Module, path: Path) -> int:
    """Copy the file's tensors into the model's parameters (and buffers) of the same names."""
    path = _existing(path)
    tensors = load_tensors(path)
    params = {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}
    missing = [name for name in tensors if name not in params]
    if missing:
        raise MetazoError(f"{path} does not fit this model: it has no parameter '{missing[0]}'")
    for name, tensor in tensors.items():  # check all before changing any
        if tensor.shape != params[name].shape:
            raise MetazoError(
                f"{path} does not fit this model: '{name}' is {tuple(tensor.shape)}, "
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
