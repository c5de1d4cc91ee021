"""Reading composable-sft's ``pytorch_diff.bin`` files and attaching them as SFT adapters.

composable-sft (Ansell et al.) saves an SFT with ``torch.save``: ``{"diffs": {name: enc}, "abs":
{name: tensor}}`` (older releases: ``"body"``/``"head"``), where ``enc`` holds ``size``, ``values``
and ``index_steps``: the entries' flat positions in **column-major** order (first dimension
fastest), sorted and delta-encoded as a list of integers. This reader

* loads the file only through a restricted unpickler (:class:`_OnlyTensorsAndNumbers`) — the one
  exception to adapterkit's no-pickle rule, for reading this foreign format — that resolves tensors,
  containers and NumPy integers (the first index step is a NumPy integer in files written by
  composable-sft) and nothing that could run code; never a full unpickle;
* decodes in int64 (composable-sft decodes in int32, which wraps around for tensors of 2**31
  entries or more) and returns row-major flat indices, adapterkit's order.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ...core.api import attach
from ...core.snapshot import rollback_on_error
from ...core.state import get_state
from ...core.targeting import logical_modules
from ...errors import BaseModelMismatchError, ConfigError, CorruptFileError, MissingFileError, UnsafeFileError
from .config import SFTConfig

FILE_NAME = "pytorch_diff.bin"


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


class _OnlyTensorsAndNumbers(pickle.Unpickler):
    """An unpickler that resolves only what a ``torch.save`` file of tensors, containers and integers
    names: torch's tensor rebuilders and ``torch.Size`` (storages are resolved by torch itself),
    ``OrderedDict``, and NumPy's integer scalars with their dtypes (the first index step of a
    composable-sft file is a NumPy integer). Anything else — any callable that could run code — is
    refused. It is local to each call: unlike ``torch.serialization.safe_globals`` it changes no
    process-wide allow-list, so concurrent ``torch.load`` calls are unaffected."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module in ("numpy.dtypes", "numpy") and name in _NUMPY_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch", "Size"),
            ("collections", "OrderedDict"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy", "dtype"), ("_codecs", "encode")}  # _codecs.encode: a NumPy scalar's raw bytes, as a str
_NUMPY_DTYPES = {f"{kind}{bits}DType" for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)} | {
    "Int8DType", "Int16DType", "Int32DType", "Int64DType", "ByteDType", "ShortDType", "IntDType", "LongDType",
    "LongLongDType", "UByteDType", "UShortDType", "UIntDType", "ULongDType", "ULongLongDType"}
_RESTRICTED_PICKLE = types.SimpleNamespace(Unpickler=_OnlyTensorsAndNumbers, __name__="adapterkit.restricted_pickle",
                                           load=lambda f, **kw: _OnlyTensorsAndNumbers(f, **kw).load())


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"{path}: holds objects other than tensors and numbers; refusing to unpickle it "
                              f"({str(exc).splitlines()[-1][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CorruptFileError(f"{path}: not a readable torch.save file ({type(exc).__name__}: {exc})") from None


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


def read_composable_sft(path: str | Path) -> ComposableSFT:
    """A composable-sft SFT (``pytorch_diff.bin``, or the directory holding it), decoded."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise MissingFileError(f"composable-sft file not found: {path}")
    data = _load(path)
    if not isinstance(data, Mapping):
        raise CorruptFileError(f"{path}: expected a dict of diffs and abs tensors, got {type(data).__name__}")
    diffs, dense = data.get("diffs", data.get("body", {})), data.get("abs", data.get("head", {})) or {}
    if not isinstance(diffs, Mapping) or not isinstance(dense, Mapping) or not (diffs or dense):
        raise CorruptFileError(f"{path}: expected 'diffs' and/or 'abs' dicts, found keys {sorted(map(str, data))[:5]}")
    for name, value in dense.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CorruptFileError(f"{path}: abs entry {name!r} is not a named tensor")
    decoded = {}
    for name, encoding in diffs.items():
        if not isinstance(name, str):
            raise CorruptFileError(f"{path}: diff names must be strings, got {name!r}")
        decoded[name] = decode(encoding, f"{path} [{name}]")
    return ComposableSFT(decoded, {name: value.detach().clone() for name, value in dense.items()})


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
