"""The adapter store of a server: which adapters are loaded, from where, and what each one costs.

Adapters load only from directories under one root (symlinks resolved first, every file of the
directory too, so a link cannot smuggle in a file from elsewhere), and from a private copy of their
files read through descriptors opened after that check (:mod:`.paths`). :func:`adapterkit.load`
validates everything before it attaches, and a failure after the attach detaches again, so a refused
directory leaves the model bit-identical and the store and the model always agree. Low-bit
adapters load packed (:func:`adapterkit.pack`): the process holds their bit-packed codes, not fp32 latents.

The store is not a lock: the engine's worker thread is the only one that calls :meth:`load` and
:meth:`unload`; the read-only views (:meth:`names`, :meth:`loaded`) may be called from any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ...core.api import activate, active_adapters, detach
from ...core.build import check_adapter_name
from ...core.composition import COMPOSITION_FILE
from ...core import packed
from ...core.layers import AdapterLayer, ModelLayer
from ...core.state import get_state
from ...errors import (AdapterError, AdapterNotFoundError, ConfigError, CorruptFileError, DuplicateAdapterError,
                       MissingFileError, UnsupportedError)
from ...io import artefact
from ...io.layout import LABELS_FILE, read_label_names
from ...io.peft_format import CONFIG_FILE
from ...io.safefiles import read_json
from .errors import CapacityError
from .paths import copy_confined, resolve_under

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
        """The fields and :attr:`held`, JSON-ready."""
        return {**dataclasses.asdict(self), "held": self.held}


@dataclasses.dataclass(frozen=True)
class LoadedAdapter:
    """One adapter of the store. ``path``: its directory relative to the store's root (symlinks
    resolved); ``version``: which load of the store this is (1, 2, ... over the store's life, so an
    answer names exactly the weights that produced it, even after a reload under the same name)."""

    name: str
    path: Path
    method: str
    bits: int
    memory: AdapterMemory
    label_names: tuple[str, ...] | None = None
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the ``GET /adapters`` entry)."""
        return {"name": self.name, "path": str(self.path), "method": self.method, "bits": self.bits,
                "version": self.version, "memory": self.memory.to_dict(),
                "label_names": None if self.label_names is None else list(self.label_names)}


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


def _model_level(files: Path) -> bool:
    """Whether the adapter config in ``files`` records the whole model as its target (a model-level
    adapter), read before anything is attached."""
    recorded = read_json(files / CONFIG_FILE).get("base_model")
    modules = recorded.get("modules") if isinstance(recorded, dict) else None
    return isinstance(modules, dict) and "" in modules


@contextlib.contextmanager
def _shown_as(files: Path, shown: Any) -> Iterator[None]:
    """Errors about the private copy ``files`` name the requested directory instead."""
    try:
        yield
    except AdapterError as exc:
        if str(files) not in str(exc):
            raise
        raise type(exc)(str(exc).replace(str(files), str(shown))) from exc.__cause__


class AdapterStore:
    """Loads and unloads adapters of one model from directories under ``root``.

    ``classes``: how many logits the model's head has (a classifier); an adapter's ``labels.json``
    must name as many (None: not checked; :meth:`expect_classes` sets it later)."""

    def __init__(self, model: nn.Module, root: str | Path, classes: int | None = None) -> None:
        root_path = Path(root).resolve()
        if not root_path.is_dir():
            raise MissingFileError(f"adapter root is not a directory: {root}")
        self.model = model
        self.root = root_path
        self.classes = classes
        self._loaded: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()  # guards _loaded for readers on other threads
        self._loads = 0  # loads so far: the next LoadedAdapter.version is one more

    # -- read-only views (any thread) ------------------------------------------------------------
    def names(self) -> list[str]:
        """The loaded adapters' names, in load order."""
        with self._lock:
            return list(self._loaded)

    def loaded(self) -> list[LoadedAdapter]:
        """The loaded adapters, in load order."""
        with self._lock:
            return list(self._loaded.values())

    def get(self, name: str) -> LoadedAdapter:
        """The loaded adapter ``name``; :class:`AdapterNotFoundError` (naming those loaded) if none."""
        with self._lock:
            entry = self._loaded.get(name)
            names = () if entry is not None else tuple(self._loaded)  # a snapshot: another thread may load meanwhile
        if entry is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {', '.join(names) or 'none'})")
        return entry

    def held_bytes(self) -> int:
        """Bytes all loaded adapters hold in the process (:attr:`AdapterMemory.held`)."""
        return sum(entry.memory.held for entry in self.loaded())

    def __len__(self) -> int:
        with self._lock:
            return len(self._loaded)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._loaded

    def fits_in(self, bytes: int = GIB) -> dict[str, int]:
        """For each loaded adapter, how many adapters of its size fit in ``bytes`` of process memory."""
        return {entry.name: bytes // max(1, entry.memory.held) for entry in self.loaded()}

    def resolve(self, path: str | Path) -> Path:
        """``path`` (relative paths are taken from the root) with symlinks resolved; a directory
        outside the root, or holding a file that resolves outside it, raises
        :class:`~.errors.PathOutsideRootError` (see :func:`~.paths.resolve_under`)."""
        return resolve_under(self.root, path)

    def expect_classes(self, classes: int) -> None:
        """From now on check each adapter's ``labels.json`` against ``classes`` head outputs; the
        adapters loaded already are checked at once (CorruptFileError naming the first that differs)."""
        for entry in self.loaded():
            if entry.label_names is not None and len(entry.label_names) != classes:
                raise CorruptFileError(f"{entry.path / LABELS_FILE}: adapter {entry.name!r} names "
                                       f"{len(entry.label_names)} classes; the model's head has {classes}")
        self.classes = classes

    # -- changes (the engine's worker thread only) -----------------------------------------------
    def load(self, path: str | Path, name: str | None = None, max_bytes: int | None = None) -> LoadedAdapter:
        """Attach the adapter in ``path`` (under the root) as ``name`` (default: its saved name).

        Its files are read from a private copy made through descriptors (:func:`~.paths.copy_confined`).
        Every check that needs no attach runs before the model changes (an invalid config is a
        :class:`CorruptFileError`, like any other bad file); a failure after the attach (the
        memory accounting, more than ``max_bytes`` held: :class:`~.errors.CapacityError`) detaches
        it again. The adapters active before stay active (a server keeps none active: each request
        names its own). Low-bit adapters are held packed."""
        directory = self.resolve(path)
        if name is not None:
            check_adapter_name(name)
            if name in self:
                raise DuplicateAdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        if not directory.is_dir():
            raise MissingFileError(f"adapter directory not found: {path}")
        with tempfile.TemporaryDirectory(prefix="adapterkit-serve-") as scratch:
            files = Path(scratch)
            copy_confined(self.root, directory, files)
            with _shown_as(files, path):
                entry = self._attach(files, directory, path, name, max_bytes)
        with self._lock:
            self._loaded[entry.name] = entry
        return entry

    def _attach(self, files: Path, directory: Path, shown: Any, name: str | None, max_bytes: int | None) -> LoadedAdapter:
        if (files / COMPOSITION_FILE).is_file():
            raise UnsupportedError(f"{shown} holds a composition of adapters; load its members one by one")
        if _model_level(files):  # rows of one batch cannot carry different model-level adapters
            raise UnsupportedError(f"{shown}: a model-level adapter; the server batches adapters of different "
                                   "requests together and cannot serve it")
        labels = read_label_names(files)
        if labels is not None and self.classes is not None and len(labels) != self.classes:
            raise CorruptFileError(f"{shown}/{LABELS_FILE}: names {len(labels)} classes; the model's head has {self.classes}")
        previous = active_adapters(self.model)
        try:
            loaded = artefact.load(self.model, files, name, packed=True)
        except ConfigError as exc:  # a bad value in the adapter's own config file: the directory is unusable
            raise CorruptFileError(str(exc)) from exc
        try:
            activate(self.model, [n for n, _ in previous], [w for _, w in previous])
            record = get_state(self.model).record(loaded)
            if any(isinstance(layer, ModelLayer) for _, layer in get_state(self.model).layers(loaded)):
                raise UnsupportedError(f"{shown}: adapter {loaded!r} ({record.method.name}) is model-level; the "
                                       "server batches adapters of different requests together and cannot serve it")
            memory = adapter_memory(self.model, loaded, files)
            if max_bytes is not None and memory.held > max_bytes:
                raise CapacityError(f"{shown}: adapter {loaded!r} holds {memory.held:,} bytes; the server has room "
                                    f"for {max(0, max_bytes):,} more (max_adapter_bytes); unload an adapter first")
        except BaseException:
            detach(self.model, loaded)  # the store and the model never disagree
            activate(self.model, [n for n, _ in previous], [w for _, w in previous])
            raise
        self._loads += 1
        return LoadedAdapter(loaded, directory.relative_to(self.root), record.method.name, record.config.bits,
                             memory, labels, self._loads)

    def unload(self, name: str) -> LoadedAdapter:
        """Detach adapter ``name`` and free its memory."""
        entry = self.get(name)
        detach(self.model, name)
        with self._lock:
            del self._loaded[name]
        return entry
