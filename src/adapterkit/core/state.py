"""Per-model adapter bookkeeping, as typed objects stored on the model itself."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

from .composition import Block, RoutedSpec, flatten, routed_spec
from .routing import Routing
from .workspace import Workspace

from .config import AdapterConfig
from ..errors import AdapterNotFoundError
from .host import AdaptedModule, ModelHost
from .layers import AdapterLayer, DeltaLayer, ModuleCopy
from .registry import AdapterMethod

STATE_ATTR = "adapterkit_state"

Weighted = tuple[tuple[str, float], ...]


@dataclasses.dataclass
class AdapterRecord:
    """One attached adapter: its config and where its layers live."""

    name: str
    config: AdapterConfig
    method: AdapterMethod
    targets: tuple[str, ...]
    copies: tuple[str, ...]
    fusable: bool

    @property
    def modules(self) -> tuple[str, ...]:
        return self.targets + self.copies


@dataclasses.dataclass
class ModelState:
    """Everything adapterkit knows about one model.

    ``active`` and ``fused`` are ``(name, weight)`` pairs; fused adapters are always active.
    ``composition`` is the block given to ``ak.activate`` (None for a name or a list); it is in
    effect while its flattened adapters equal ``active`` (code that sets ``active`` directly gets
    plain-list behaviour until it puts the same adapters back). ``version`` counts changes (every
    attach, detach, activation, fuse and unfuse ends in :meth:`refresh_plans`; fusing also counts
    before it writes weights), so ``ak.per_row`` can notice a change during its block cheaply.
    """

    adapters: dict[str, AdapterRecord] = dataclasses.field(default_factory=dict)
    wrappers: dict[str, AdaptedModule] = dataclasses.field(default_factory=dict)
    active: Weighted = ()
    fused: Weighted = ()
    fused_exact: bool = True
    model_host: ModelHost | None = None  # model-level adapters (module path "")
    workspace: Workspace = dataclasses.field(default_factory=Workspace)  # scratch shared by every layer
    composition: Block | None = None
    routing: Routing = dataclasses.field(default_factory=Routing)  # per-thread masks of an active Split
    routing_hooks: tuple[RemovableHandle, ...] = ()  # model hooks deriving masks from token_type_ids
    version: int = dataclasses.field(default=0, repr=False, compare=False)

    def fields(self) -> dict[str, object]:
        """A shallow copy of every field but ``version`` (containers copied), for :meth:`set_fields`."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v) for f in dataclasses.fields(self)
                if f.name != "version"}

    def set_fields(self, values: dict[str, object]) -> None:
        """Put back what :meth:`fields` returned; a change like any other (``version`` only grows)."""
        for name, value in values.items():
            setattr(self, name, dict(value) if isinstance(value, dict) else value)
        self.changed()

    def changed(self) -> None:
        """Count a change of the adapters, their activation or the fused weights."""
        self.version += 1

    def host(self, path: str) -> AdaptedModule | ModelHost:
        """The host of module ``path`` (``""``: the model-level host)."""
        if path == "":
            assert self.model_host is not None
            return self.model_host
        return self.wrappers[path]

    def hosts(self) -> list[AdaptedModule | ModelHost]:
        return [*self.wrappers.values(), *([self.model_host] if self.model_host is not None else [])]

    def record(self, name: str) -> AdapterRecord:
        try:
            return self.adapters[name]
        except KeyError:
            known = ", ".join(self.adapters) or "none"
            raise AdapterNotFoundError(f"no adapter named {name!r} (attached: {known})") from None

    def layers(self, name: str) -> Iterator[tuple[str, AdapterLayer]]:
        """``(module name, layer)`` for every layer of adapter ``name``."""
        for path in self.record(name).modules:
            layer = self.host(path).layer(name)
            assert layer is not None
            yield path, layer

    def block(self) -> Block | None:
        """The composition in effect (its adapters are the active ones), if any."""
        block = self.composition
        return block if block is not None and flatten(block) == self.active else None

    def routed(self) -> RoutedSpec | None:
        """The composition in effect compiled for the hosts, when it holds a Split."""
        return routed_spec(self.block())

    def refresh_plans(self) -> None:
        """Rebuild every host's forward plan after a change (and count it: :meth:`changed`)."""
        self.changed()
        fused = frozenset(name for name, _ in self.fused)
        routed = self.routed()
        for host in self.hosts():
            host.set_plan(self.active, fused, routed, self.routing)


def peek_state(model: nn.Module) -> ModelState | None:
    return getattr(model, STATE_ATTR, None)


def get_state(model: nn.Module) -> ModelState:
    """The model's adapter state; an empty one when nothing is attached."""
    state = peek_state(model)
    return state if state is not None else ModelState()


def adapted_states(model: nn.Module) -> list[ModelState]:
    """The states of ``model`` or, when it is a wrapper (a loss wrapper, DDP), of the adapted
    models inside it; the common case (the adapted model itself) costs no module walk."""
    own = peek_state(model)
    if own is not None:
        return [own]
    return [s for s in map(peek_state, model.modules()) if s is not None]


def active_records(model: nn.Module) -> Iterator[tuple[ModelState, AdapterRecord]]:
    """``(state, record)`` for every active adapter of the adapted models in ``model``."""
    for state in adapted_states(model):
        for name, _ in state.active:
            yield state, state.adapters[name]


def ensure_state(model: nn.Module) -> ModelState:
    state = peek_state(model)
    if state is None:
        state = ModelState()
        setattr(model, STATE_ATTR, state)
    return state


def set_state(model: nn.Module, state: ModelState) -> None:
    setattr(model, STATE_ATTR, state)


def drop_state(model: nn.Module) -> None:
    if peek_state(model) is not None:
        delattr(model, STATE_ATTR)


def is_fusable(layer: AdapterLayer) -> bool:
    return isinstance(layer, (DeltaLayer, ModuleCopy))
