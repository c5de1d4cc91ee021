"""Reading and writing adapter files without ever executing their contents.

Only JSON and safetensors are read. Pickle-based files (``*.bin``, ``*.pt``) are refused.
Writes go to a temporary file that replaces the target at the end, so a failed save never
leaves a half-written artefact behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import CorruptFileError, MissingFileError, NonFiniteWeightsError, UnsafeFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        if any(path.with_suffix(s).is_file() for s in PICKLE_SUFFIXES):
            raise UnsafeFileError(
                f"{path.with_suffix('.bin')}: pickle-based weights are never loaded (they can execute code); "
                "convert them to safetensors"
            )
        raise MissingFileError(f"{what} not found: {path}")
    return path


def read_json(path: Path) -> dict[str, Any]:
    require_file(path, "adapter config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return data


def read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, checked to be finite."""
    require_file(path, "adapter weights")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None
    check_finite(tensors, str(path))
    return tensors


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")

    _atomic(path, write)


def check_finite(tensors: Mapping[str, Tensor], where: str) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteWeightsError(f"{where}: tensor {key!r} contains NaN or Inf values")


def write_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    check_finite(tensors, f"refusing to save {path}")
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(plain, tmp, metadata=dict(metadata or {})))
