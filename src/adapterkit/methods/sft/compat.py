"""Reading composable-sft's ``pytorch_diff.bin`` files and attaching them as SFT adapters.

composable-sft (Ansell et al.) saves an SFT with ``torch.save``: ``{"diffs": {name: enc}, "abs":
{name: tensor}}`` (older releases: ``"body"``/``"head"``), where ``enc`` holds ``size``, ``values``
and ``index_steps``: the entries' flat positions in **column-major** order (first dimension
fastest), sorted and delta-encoded as a list of integers. adapterkit never unpickles: the pickle is
converted once by ``tools/composable_sft.py`` (a restricted unpickler that resolves tensors,
containers and NumPy integers only) into ``composable_sft.safetensors`` + ``composable_sft.json``,
which :func:`read_composable_sft` reads. The reader

* decodes in int64 (composable-sft decodes in int32, which wraps around for tensors of 2**31
  entries or more) and returns row-major flat indices, adapterkit's order.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ...core.api import attach
from ...core.snapshot import rollback_on_error
from ...core.state import get_state
from ...core.targeting import logical_modules
from ...errors import BaseModelMismatchError, ConfigError, CorruptFileError, MissingFileError
from ...io.safefiles import read_json, read_tensors, write_json, write_tensors
from .config import SFTConfig

FILE_NAME = "pytorch_diff.bin"
CONVERTED = "composable_sft.safetensors"  # written by tools/composable_sft.py
SIZES = "composable_sft.json"


@dataclasses.dataclass(frozen=True)
class SparseDiff:
    """One parameter's diff: ``values`` at sorted unique row-major flat ``indices`` of ``shape``."""

    shape: torch.Size
    indices: Tensor
    values: Tensor


@dataclasses.dataclass(frozen=True)
class ComposableSFT:
    """A composable-sft file: sparse ``diffs`` and dense ``abs`` values (heads), by parameter name."""

    diffs: dict[str, SparseDiff]
    abs: dict[str, Tensor]

    @property
    def nnz(self) -> int:
        return sum(d.indices.numel() for d in self.diffs.values())


def _steps(raw: Any, where: str) -> np.ndarray:
    if isinstance(raw, Tensor):
        if raw.is_floating_point() or raw.dtype == torch.bool:
            raise CorruptFileError(f"{where}: index_steps must be integers")
        return raw.to(torch.int64).reshape(-1).numpy()
    if not isinstance(raw, (list, tuple)) or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                                     for s in raw):
        raise CorruptFileError(f"{where}: index_steps must be a list of integers")
    return np.asarray([int(s) for s in raw], dtype=np.int64)


def decode(encoding: Any, where: str) -> SparseDiff:
    """One composable-sft encoding as row-major indices (sorted) and the matching values."""
    if not isinstance(encoding, Mapping) or not {"size", "index_steps", "values"} <= set(encoding):
        raise CorruptFileError(f"{where}: expected a dict with size, index_steps and values")
    size = encoding["size"]
    if not isinstance(size, (tuple, list)) or not all(isinstance(s, int) and s >= 0 for s in size):
        raise CorruptFileError(f"{where}: size must be a list of dimensions, got {size!r}")
    shape = torch.Size(size)
    values = encoding["values"]
    if not isinstance(values, Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise CorruptFileError(f"{where}: values must be a 1-D floating-point tensor")
    steps = _steps(encoding["index_steps"], where)
    if steps.size != values.numel():
        raise CorruptFileError(f"{where}: {steps.size} index steps for {values.numel()} values")
    numel = math.prod(shape)
    if steps.size and (steps[0] < 0 or (steps[1:] <= 0).any()):
        raise CorruptFileError(f"{where}: index steps must give strictly increasing positions")
    column_major = np.cumsum(steps, dtype=np.int64)  # int64: positions beyond 2**31 stay exact
    if column_major.size and column_major[-1] >= numel:
        raise CorruptFileError(f"{where}: position {int(column_major[-1])} is outside the {tuple(shape)} tensor")
    row_major = np.zeros_like(column_major)
    divisor, multiplier = 1, numel
    for dim in shape:  # first dimension fastest in the file, slowest in row-major order
        multiplier //= max(dim, 1)
        row_major += (column_major // divisor) % dim * multiplier
        divisor *= dim
    order = np.argsort(row_major, kind="stable")
    return SparseDiff(shape, torch.from_numpy(row_major[order]), values.detach()[torch.from_numpy(order)].clone())


def from_contents(data: Any, where: str) -> ComposableSFT:
    """A composable-sft file's contents (``{"diffs": {name: enc}, "abs": {name: tensor}}``), decoded."""
    if not isinstance(data, Mapping):
        raise CorruptFileError(f"{where}: expected a dict of diffs and abs tensors, got {type(data).__name__}")
    diffs, dense = data.get("diffs", data.get("body", {})), data.get("abs", data.get("head", {})) or {}
    if not isinstance(diffs, Mapping) or not isinstance(dense, Mapping) or not (diffs or dense):
        raise CorruptFileError(f"{where}: expected 'diffs' and/or 'abs' dicts, found keys {sorted(map(str, data))[:5]}")
    for name, value in dense.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CorruptFileError(f"{where}: abs entry {name!r} is not a named tensor")
    decoded = {}
    for name, encoding in diffs.items():
        if not isinstance(name, str):
            raise CorruptFileError(f"{where}: diff names must be strings, got {name!r}")
        decoded[name] = decode(encoding, f"{where} [{name}]")
    return ComposableSFT(decoded, {name: value.detach().clone() for name, value in dense.items()})


def write_converted(data: Any, directory: Path, where: str) -> Path:
    """Check and decode a composable-sft file's contents, then write them as :data:`CONVERTED` +
    :data:`SIZES` in ``directory`` (the encoding kept: column-major index steps)."""
    from_contents(data, where)  # refuse anything malformed before writing
    diffs, dense = data.get("diffs", data.get("body", {})), data.get("abs", data.get("head", {})) or {}
    tensors = {f"abs.{k}": v.detach().contiguous() for k, v in dense.items()}
    sizes = {}
    for name, enc in diffs.items():
        tensors[f"diffs.{name}.values"] = enc["values"].detach().contiguous()
        tensors[f"diffs.{name}.index_steps"] = torch.from_numpy(_steps(enc["index_steps"], where))
        sizes[name] = [int(d) for d in enc["size"]]
    directory = Path(directory)
    write_tensors(directory / CONVERTED, tensors, {"format": "composable-sft", "source": Path(where).name})
    write_json(directory / SIZES, {"sizes": sizes})
    return directory


def read_composable_sft(path: str | Path) -> ComposableSFT:
    """A composable-sft SFT converted by ``tools/composable_sft.py`` (the directory holding
    :data:`CONVERTED` and :data:`SIZES`), decoded. The original pickle is never read here."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if not (directory / CONVERTED).is_file():
        hint = (f"; convert the pickle once with: python tools/composable_sft.py {directory}"
                if (directory / FILE_NAME).is_file() else "")
        raise MissingFileError(f"no converted composable-sft file ({CONVERTED}) in {directory}{hint}")
    tensors = read_tensors(directory / CONVERTED)
    sizes = read_json(directory / SIZES).get("sizes")
    if not isinstance(sizes, dict):
        raise CorruptFileError(f"{directory / SIZES}: expected {{'sizes': {{name: [dims]}}}}")
    diffs = {}
    for name, size in sizes.items():
        if f"diffs.{name}.values" not in tensors or f"diffs.{name}.index_steps" not in tensors:
            raise CorruptFileError(f"{directory / CONVERTED}: tensors of diff {name!r} missing")
        diffs[name] = {"size": size, "values": tensors[f"diffs.{name}.values"],
                       "index_steps": tensors[f"diffs.{name}.index_steps"]}
    dense = {k[len("abs."):]: v for k, v in tensors.items() if k.startswith("abs.")}
    return from_contents({"diffs": diffs, "abs": dense}, str(directory / CONVERTED))


def attach_composable_sft(model: nn.Module, source: str | Path | ComposableSFT, name: str = "default",
                          with_abs: bool = True, prefix: str = "") -> str:
    """Attach a composable-sft SFT to ``model`` as SFT adapter ``name`` (selection ``"given"``) and
    return the name. ``prefix`` is put before every parameter name of the file (e.g. ``"bert."``);
    ``with_abs=False`` leaves out the dense ``abs`` tensors (e.g. a language SFT's MLM head on a
    task model). Every name and shape is checked before the model is touched."""
    sft = source if isinstance(source, ComposableSFT) else read_composable_sft(source)
    modules = dict(logical_modules(model))
    diffs = {f"{prefix}{key}": diff for key, diff in sft.diffs.items() if diff.indices.numel()}
    dense = {f"{prefix}{key}": value for key, value in sft.abs.items()} if with_abs else {}
    if not diffs:
        raise ConfigError("the SFT holds no non-empty diffs to attach")
    for key, shape in [*((k, d.shape) for k, d in diffs.items()), *((k, v.shape) for k, v in dense.items())]:
        path, _, tensor = key.rpartition(".")
        param = modules[path]._parameters.get(tensor) if path in modules else None
        if param is None:
            raise BaseModelMismatchError(f"the model has no parameter {key!r}")
        if tuple(param.shape) != tuple(shape):
            raise BaseModelMismatchError(f"{key!r} has shape {tuple(shape)} in the SFT, {tuple(param.shape)} in the model")
    targets = sorted({key.rpartition(".")[0] for key in diffs})
    heads = sorted({key.rpartition(".")[0] for key in dense})
    overlap = sorted(set(targets) & set(heads))
    if overlap:
        raise ConfigError(f"modules {overlap[:3]} have both diffs and abs tensors; attach with with_abs=False")
    config = SFTConfig(k=sum(d.indices.numel() for d in diffs.values()), selection="given", full_steps=0,
                       target_modules="|".join(map(re.escape, targets)), modules_to_save=heads or None,
                       tensors=tuple(sorted({key.rpartition(".")[2] for key in diffs})))
    with rollback_on_error(model, values=False):  # attaching writes no existing tensor
        attach(model, config, name, support={key: d.indices for key, d in diffs.items()})
        state = get_state(model)
        with torch.no_grad():
            for key, diff in diffs.items():
                path, _, tensor = key.rpartition(".")
                state.wrappers[path].layer(name).part(tensor).values.copy_(diff.values)
            for key, value in dense.items():
                path, _, tensor = key.rpartition(".")
                state.wrappers[path].layer(name).module.get_parameter(tensor).copy_(value)
    return name
