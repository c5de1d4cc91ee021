"""Building an adapter against a model without touching it (:func:`prepare`), then inserting it
(:func:`commit`, which cannot fail on valid input). :func:`adapterkit.attach` and
:func:`adapterkit.load` are both these two steps.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import BaseModelMismatchError, ConfigError, DuplicateAdapterError, TargetError
from .config import AdapterConfig
from .host import AdaptedModule, ModelHost
from .layers import AdapterLayer, ModuleCopy
from .packing import layers_packed
from .registry import method_for
from .snapshot import ModelSnapshot
from .state import AdapterRecord, ModelState, ensure_state, get_state, is_fusable
from .targeting import logical_modules, physical_path


@dataclasses.dataclass
class PreparedAdapter:
    """An adapter built and validated against a model but not yet inserted into it."""

    record: AdapterRecord
    layers: dict[str, AdapterLayer]


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
RESERVED_NAMES = frozenset(dir(nn.ModuleDict))


def check_adapter_name(name: object) -> None:
    """Adapter names become module keys and directory names: letters, digits, ``_`` and ``-``
    (no ``.``, path separators, NUL or spaces), at most 100 characters."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > 100 or name in RESERVED_NAMES:
        raise ConfigError(
            f"invalid adapter name {name!r}: use 1-100 letters, digits, '_' or '-' (not starting with '-'), "
            "and not a name of nn.ModuleDict's own attributes")


def prepare(
    model: nn.Module,
    config: AdapterConfig,
    name: str,
    targets: Sequence[str] | None = None,
    copies: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> PreparedAdapter:
    """Build the layers of a new adapter without touching the model.

    ``targets``/``copies`` name the modules explicitly (when loading a file: the layers are
    built empty, to receive saved tensors); otherwise the config's matching rules select them
    and ``options`` go to the method's :meth:`~adapterkit.AdapterMethod.setup`.
    """
    check_adapter_name(name)
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"expected an adapter config such as ak.LoRAConfig, got {type(config).__name__}")
    state = get_state(model)
    if name in state.adapters:
        raise DuplicateAdapterError(f"an adapter named {name!r} is already attached; detach it or choose another name")
    method = method_for(config)
    explicit = targets is not None
    if not explicit:
        targets, copies = method.select(model, config)
    modules = {"": model, **dict(logical_modules(model))}
    layers: dict[str, AdapterLayer] = {}
    for path in list(targets) + list(copies or ()):
        if path not in modules:
            raise BaseModelMismatchError(f"module {path!r} does not exist in {type(model).__name__}")
    for path in targets:
        module = modules[path]
        if not method.supports(module):
            raise TargetError(f"module {path!r} ({type(module).__name__}) cannot be adapted by method {method.name!r}")
    if explicit:
        devices = sorted({p.device.index or 0 for path in targets for p in modules[path].parameters() if p.is_cuda})
        # Layers built for loading get their values from the file: building them must not
        # advance the caller's random streams.
        with torch.random.fork_rng(devices=devices):
            for path in targets:
                layers[path] = method.empty_layer(config, name, path, modules[path])
    else:
        # a setup may run a procedure on the model (e.g. train it to choose a mask): the model
        # comes back bit-identical whatever the procedure did
        with ModelSnapshot(model, values=method.setup_trains_model):
            context = method.setup(model, config, name, {path: modules[path] for path in targets}, **(options or {}))
        extra = () if context is None else (context,)  # methods without setup need not take a context
        for path in targets:
            layers[path] = method.create_layer(config, name, path, modules[path], *extra)
    if config.bits != 32:
        for layer in layers.values():  # loaded layers get their values (and codes) from the file
            layer.set_quantization(config.bits, config.quantization, init_zeros=not explicit)
    for path in copies or ():
        layers[path] = ModuleCopy(name, modules[path])
    fusable = all(is_fusable(layer) for layer in layers.values())
    record = AdapterRecord(name, config, method, tuple(targets), tuple(copies or ()), fusable)
    return PreparedAdapter(record, layers)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = physical_path(model, path).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def host_for(model: nn.Module, state: ModelState, path: str) -> AdaptedModule | ModelHost:
    """The host of module ``path``, created (and put into the model) on first use."""
    if path == "":
        if state.model_host is None:
            state.model_host = ModelHost(model, state.workspace)
            model.add_module(ModelHost.CHILD, state.model_host)
        return state.model_host
    wrapper = state.wrappers.get(path)
    if wrapper is None:
        base = model.get_submodule(physical_path(model, path))
        wrapper = AdaptedModule(base, state.workspace).train(base.training)
        replace_module(model, path, wrapper)
        state.wrappers[path] = wrapper
    return wrapper


def commit(model: nn.Module, prepared: PreparedAdapter) -> None:
    """Insert a prepared adapter into the model (cannot fail on valid input)."""
    state = ensure_state(model)
    record = prepared.record
    for path, layer in prepared.layers.items():
        host_for(model, state, path).add(layer.train(model.training if path == "" else state.wrappers[path].base_layer.training))
    adapter_params = {id(p) for host in state.hosts() for p in host.adapters.parameters()}
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)
    trainable = not layers_packed(list(prepared.layers.values()))  # loaded packed: inference only
    for layer in prepared.layers.values():
        layer.requires_grad_(trainable)
    state.adapters[record.name] = record
    if not state.active:
        state.active = ((record.name, 1.0),)
    state.refresh_plans()
