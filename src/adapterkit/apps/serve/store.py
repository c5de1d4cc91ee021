"""The adapter store of a server: which adapters are loaded, from where, and what each one costs.

Adapters load only from directories under one root (symlinks resolved first, every file of the
directory too, so a link cannot smuggle in a file from elsewhere). :func:`adapterkit.load` validates
everything before it attaches, so a refused directory leaves the model bit-identical. Low-bit
adapters load packed (:func:`adapterkit.pack`): the process holds their bit-packed codes, not fp32 latents.

The store is not a lock: the engine's worker thread is the only one that calls :meth:`load` and
:meth:`unload`; the read-only views (:meth:`names`, :meth:`loaded`) may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

from torch import nn

from ...core.api import activate, active_adapters, detach
from ...core.build import check_adapter_name
from ...core.composition import COMPOSITION_FILE
from ...core import packed
from ...core.layers import AdapterLayer, ModelLayer
from ...core.state import get_state
from ...errors import (AdapterNotFoundError, ConfigError, CorruptFileError, DuplicateAdapterError, MissingFileError,
                       UnsupportedError)
from ...io import artefact
from ...io.safefiles import read_json
from .errors import PathOutsideRootError

#: class names written by ``adapterkit train`` on a user file (the CLI's LABELS_FILE; the CLI sits above apps)
LABELS_FILE = "labels.json"
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class AdapterMemory:
    """Bytes one loaded adapter holds in this process, and its files on disk.

    Attributes:
        parameters: its parameters (for an unpacked low-bit adapter: the fp32 latent weights).
        buffers: its buffers (e.g. SHiRA's int64 indices; a packed low-bit adapter's codes, ``8/bits`` a
            byte, and μ, σ per tensor).
        codes: unpacked low-bit adapters: the codes the quantizers keep (one int64 per weight, plus μ, σ).
        file: the adapter's weights file (safetensors; for a low-bit adapter: the bit-packed codes, μ and σ).
    """

    parameters: int
    buffers: int
    codes: int
    file: int

    @property
    def held(self) -> int:
        """Everything the process holds for the adapter."""
        return self.parameters + self.buffers + self.codes

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "held": self.held}


@dataclasses.dataclass(frozen=True)
class LoadedAdapter:
    """One adapter of the store."""

    name: str
    path: Path
    method: str
    bits: int
    memory: AdapterMemory
    label_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "method": self.method, "bits": self.bits,
                "memory": self.memory.to_dict(), "label_names": None if self.label_names is None else list(self.label_names)}


def _tensor_bytes(tensors: Any, seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def adapter_memory(model: nn.Module, name: str, directory: Path | None = None) -> AdapterMemory:
    """What adapter ``name`` holds in memory (see :class:`AdapterMemory`); ``directory``: where it was
    loaded from, for the file size (0 without one)."""
    seen: set[int] = set()
    parameters = buffers = codes = 0
    for _, layer in get_state(model).layers(name):
        parameters += _tensor_bytes(layer.parameters(), seen)
        buffers += _tensor_bytes(layer.buffers(), seen)
        for sub in layer.modules():
            if not isinstance(sub, AdapterLayer):
                continue
            for key, quantizer in sub.quantizers.items():
                latent = packed.held(sub, key)
                if isinstance(latent, packed.PackedTensor):
                    continue  # its codes are buffers, counted above
                # the codes the forward uses: cached at load (or computed now, as the first forward would)
                q = quantizer.quantize(latent)
                codes += _tensor_bytes((q.codes, q.mu, q.sigma), seen)
    file = sum(p.stat().st_size for p in directory.glob("*.safetensors") if p.is_file()) if directory is not None else 0
    return AdapterMemory(parameters, buffers, codes, file)


def _label_names(directory: Path) -> tuple[str, ...] | None:
    path = directory / LABELS_FILE
    if not path.is_file():
        return None
    names = read_json(path).get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CorruptFileError(f"{path}: label_names must be a non-empty list of strings")
    return tuple(names)


class AdapterStore:
    """Loads and unloads adapters of one model from directories under ``root``."""

    def __init__(self, model: nn.Module, root: str | Path) -> None:
        root_path = Path(root).resolve()
        if not root_path.is_dir():
            raise MissingFileError(f"adapter root is not a directory: {root}")
        self.model = model
        self.root = root_path
        self._loaded: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()  # guards _loaded for readers on other threads

    # -- read-only views (any thread) ------------------------------------------------------------
    def names(self) -> list[str]:
        """The loaded adapters' names, in load order."""
        with self._lock:
            return list(self._loaded)

    def loaded(self) -> list[LoadedAdapter]:
        with self._lock:
            return list(self._loaded.values())

    def get(self, name: str) -> LoadedAdapter:
        with self._lock:
            entry = self._loaded.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._loaded) or 'none'})")
        return entry

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._loaded

    def fits_in(self, bytes: int = GIB) -> dict[str, int]:
        """For each loaded adapter, how many adapters of its size fit in ``bytes`` of process memory."""
        return {entry.name: bytes // max(1, entry.memory.held) for entry in self.loaded()}

    def resolve(self, path: str | Path) -> Path:
        """``path`` (relative paths are taken from the root) with symlinks resolved; a directory
        outside the root, or holding a file that resolves outside it, raises
        :class:`PathOutsideRootError`."""
        if not isinstance(path, (str, Path)) or not str(path) or "\x00" in str(path):
            raise ConfigError(f"an adapter path must be a non-empty string, got {path!r}")
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if not resolved.is_relative_to(self.root):
            raise PathOutsideRootError(f"{path}: adapters load only from directories under the server's root")
        if resolved.is_dir():
            for entry in resolved.iterdir():
                if not entry.resolve().is_relative_to(self.root):
                    raise PathOutsideRootError(f"{path}: {entry.name} links outside the server's root")
        return resolved

    # -- changes (the engine's worker thread only) -----------------------------------------------
    def load(self, path: str | Path, name: str | None = None) -> LoadedAdapter:
        """Attach the adapter in ``path`` (under the root) as ``name`` (default: its saved name).

        Every check runs before the model changes; the adapters active before stay active (a
        server keeps none active: each request names its own). Low-bit adapters are held packed."""
        directory = self.resolve(path)
        if name is not None:
            check_adapter_name(name)
            if name in self:
                raise DuplicateAdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        if not directory.is_dir():
            raise MissingFileError(f"adapter directory not found: {path}")
        if (directory / COMPOSITION_FILE).is_file():
            raise UnsupportedError(f"{path} holds a composition of adapters; load its members one by one")
        labels = _label_names(directory)
        previous = active_adapters(self.model)
        loaded = artefact.load(self.model, directory, name, packed=True)
        activate(self.model, [n for n, _ in previous], [w for _, w in previous])
        record = get_state(self.model).record(loaded)
        if any(isinstance(layer, ModelLayer) for _, layer in get_state(self.model).layers(loaded)):
            detach(self.model, loaded)  # rows of one batch cannot carry different model-level adapters
            raise UnsupportedError(f"{path}: adapter {loaded!r} ({record.method.name}) is model-level; "
                                   "the server batches adapters of different requests together and cannot serve it")
        entry = LoadedAdapter(loaded, directory, record.method.name, record.config.bits,
                              adapter_memory(self.model, loaded, directory), labels)
        with self._lock:
            self._loaded[loaded] = entry
        return entry

    def unload(self, name: str) -> LoadedAdapter:
        """Detach adapter ``name`` and free its memory."""
        entry = self.get(name)
        detach(self.model, name)
        with self._lock:
            del self._loaded[name]
        return entry
