"""``adapterkit info``: what an adapter directory holds, without loading a model.

``parameters`` is the adapter's logical parameter count, the number of trainable values it had
when attached (adapter weights and copied modules), not the number of stored elements: low-bit
tensors are stored as packed ``<key>.codes`` bytes plus their mean and std, and SHiRA stores mask
seeds, digests or Rice-coded indices beside its values. ``bytes_on_disk`` is the directory's size.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from ..core import quantization
from ..core.registry import get_method
from ..errors import AdapterError, MissingFileError
from ..io import artefact
from ..io.safefiles import read_json, read_tensors

CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")


def _stand_in(described: Mapping[str, Any]) -> nn.Module | None:
    """A weightless (meta-device) module with the recorded type and weight shape, for the torch
    module types whose constructor the shape determines; ``None`` for any other."""
    kind, shape = described.get("type"), described.get("shape")
    if not isinstance(shape, list):
        return None
    if kind == "Linear" and len(shape) == 2:
        return nn.Linear(shape[1], shape[0], device="meta")
    if kind == "Embedding" and len(shape) == 2:
        return nn.Embedding(shape[0], shape[1], device="meta")
    if kind in CONV_TYPES and len(shape) >= 3:  # assumes groups=1, as the file does not record it
        return getattr(nn, kind)(shape[1], shape[0], tuple(shape[2:]), device="meta")
    return None


def _by_module(tensors: Mapping[str, Tensor], paths: list[str]) -> dict[str, dict[str, Tensor]]:
    """Saved keys ``"<path>.<local>"`` grouped by the longest module path that prefixes them."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        path = max((p for p in paths if key.startswith(p + ".")), key=len, default="")
        grouped.setdefault(path, {})[key[len(path) + 1:]] = tensor
    return grouped


def _code_count(data: Mapping[str, Any], path: str, key: str, local: Mapping[str, Tensor]) -> int | None:
    """Elements behind ``<key>.codes`` at ``path``: the shape an empty layer of the adapter's method
    expects there, built on a stand-in of the recorded base module; ``None`` if it cannot be built."""
    module = _stand_in(data["base_model"]["modules"].get(path, {}))
    if module is None:
        return None
    try:
        method = get_method(data["method"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = method.config_class.from_dict(data["config"])
        layer = method.empty_layer(config, data.get("name", "default"), path, module)
        return math.prod(layer.stored_shape(key, local))
    except (AdapterError, AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        return None


def logical_parameters(data: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[int, bool]:
    """``(count, exact)``: floating-point tensors count their elements; packed codes the elements
    they encode; integer tensors (indices, seeds, digests) and quantisation statistics nothing.
    ``exact`` is False when a code count had to be bounded from the packed size."""
    native = "peft_type" not in data
    base = data.get("base_model", {}) if native else {}
    paths = list(base.get("modules", {})) + list(base.get("copied_modules", []))
    bits = data.get("config", {}).get("bits", 32) if native else 32
    count, exact = 0, True
    for path, local in _by_module(tensors, paths).items():
        for key, tensor in local.items():
            if key.endswith("." + quantization.STATS) or not (tensor.is_floating_point() or key.endswith("." + quantization.CODES)):
                continue
            if not key.endswith("." + quantization.CODES):
                count += tensor.numel()
                continue
            codes = _code_count(data, path, key.removesuffix("." + quantization.CODES), local)
            exact = exact and codes is not None
            count += codes if codes is not None else tensor.numel() * 8 // bits  # at most this many
    return count, exact


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def info(args: argparse.Namespace) -> int:
    """Print method, format, logical parameter count, sizes and base fingerprint of an adapter directory."""
    directory = Path(args.adapter)
    if not directory.is_dir():
        raise MissingFileError(f"adapter directory not found: {directory}")
    config = read_json(directory / artefact.CONFIG_FILE)
    if "peft_type" in config:
        tensors = read_tensors(directory / "adapter_model.safetensors")
        summary = {"format": "peft", "method": config["peft_type"].lower(), "r": config.get("r"),
                   "target_modules": config.get("target_modules")}
    else:
        tensors = read_tensors(directory / artefact.WEIGHTS_FILE)
        base = config.get("base_model", {})
        summary = {"format": "adapterkit", "method": config.get("method"), "name": config.get("name"),
                   "adapterkit_version": config.get("adapterkit_version"),
                   "base_model": base.get("name_or_path"), "base_weights_sha256": base.get("weights_sha256"),
                   "adapted_modules": len(base.get("modules", {})), "copied_modules": base.get("copied_modules", []),
                   "bits": config.get("config", {}).get("bits", 32), "config": config.get("config")}
    count, exact = logical_parameters(config, tensors)
    summary["parameters"] = count if exact else f"at most {count} (packed codes of modules of unknown shape)"
    summary["tensors"] = len(tensors)
    summary["tensor_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    summary["bytes_on_disk"] = _directory_size(directory)
    for key, value in summary.items():
        print(f"{key:>20}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0

