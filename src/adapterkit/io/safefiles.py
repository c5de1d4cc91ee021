"""Reading and writing adapter files without ever executing their contents.

Only JSON and safetensors are read. Pickle-based files (``*.bin``, ``*.pt``) are refused.
Writes go to a temporary file that replaces the target at the end, so a failed save never
leaves a half-written artefact behind.
"""

from __future__ import annotations

import hashlib
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


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON text as Python values; anything unparsable (bad UTF-8, bad syntax, numbers beyond
    Python's digit limit, nesting beyond the recursion limit) is a :class:`CorruptFileError`."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptFileError(f"{where}: not valid JSON ({exc})") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    require_file(path, "adapter config")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot be read ({exc})") from None
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return data


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's key, dtype, shape and raw bytes (exactly what safetensors
    stores), in key order: a flipped stored bit changes it."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        h.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_tensors(path: Path, digest: Any = None, recorded_in: str = "") -> dict[str, Tensor]:
    """All tensors of a safetensors file, checked against ``digest`` (from
    :func:`tensors_digest`; ``None``: files written before digests, not checked) and to be finite."""
    require_file(path, "adapter weights")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError, OverflowError) as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None
    if digest is not None and (not isinstance(digest, str) or tensors_digest(tensors) != digest):
        raise CorruptFileError(f"{path}: the stored tensors do not match the digest recorded in {recorded_in or path}: "
                               "the file is damaged")
    check_finite(tensors, str(path))
    return tensors


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors header."""
    from safetensors import safe_open

    require_file(path, "adapter weights")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError, OverflowError) as exc:
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


def write_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
                  digest_key: str | None = None) -> str:
    """Write a safetensors file and return :func:`tensors_digest` of what it stores (also put into
    the header metadata under ``digest_key`` when given)."""
    check_finite(tensors, f"refusing to save {path}")
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = tensors_digest(plain)
    metadata = {**(metadata or {}), **({digest_key: digest} if digest_key else {})}
    _atomic(path, lambda tmp: save_file(plain, tmp, metadata=metadata))
    return digest
