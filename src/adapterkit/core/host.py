"""The modules that host adapters inside a model.

* :class:`AdaptedModule` replaces one base module (kept unchanged as ``base_layer``) and runs its
  adapters around it: weight deltas (unfused, or folded into the base tensors by a
  :class:`~adapterkit.core.fusion.WeightFusion` per tensor), inserted modules, a replacing copy.
  While a :class:`~adapterkit.Split` routes tokens through one of its adapters, it runs a
  :class:`RoutedPlan` instead (both token paths, rows chosen by the thread's routing mask); every
  other module, and every model without an active Split, runs the plain precomputed plan.
  Inside :func:`adapterkit.per_row` it runs each batch row's own adapter (:mod:`.rows`).
* :class:`ModelHost` is a child of the model itself and runs model-level adapters around the
  model's forward (forward hooks: no forward is copied and no class is swapped).

Both keep their adapters in an ``nn.ModuleDict`` keyed by adapter name, so parameter keys such as
``encoder.layer.0.attention.self.query.adapters.task.lora_A`` are stable whatever the order of
attaching and detaching.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from .composition import Branch, RoutedSpec
from .functional import call_with
from .fusion import WeightFusion
from .layers import AdapterLayer, DeltaLayer, ModelLayer, ModuleCopy, ModuleLayer
from .routing import Routing, select
from .rows import RowSlot, run_rows
from .workspace import Workspace

Active = tuple[tuple[str, float], ...]


class _Host(nn.Module):
    """Name-keyed adapter storage shared by both hosts."""

    def __init__(self, workspace: Workspace | None) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.workspace = workspace if workspace is not None else Workspace()

    def layer(self, adapter_name: str) -> AdapterLayer | None:
        """The layer of ``adapter_name`` here, if any."""
        return self.adapters[adapter_name] if adapter_name in self.adapters else None

    def add(self, layer: AdapterLayer) -> None:
        """Add ``layer`` (or replace the layer of the same adapter, keeping its place)."""
        layer.workspace = self.workspace
        self.adapters[layer.adapter_name] = layer

    def remove(self, adapter_name: str) -> None:
        del self.adapters[adapter_name]

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


ModuleSteps = tuple[tuple[ModuleLayer, float], ...]


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """What an :class:`AdaptedModule` runs on each forward, precomputed whenever activation changes."""

    replacement: ModuleCopy | None = None
    deltas: tuple[tuple[DeltaLayer, float], ...] = ()  # add delta_output to the module's output
    tensor_deltas: tuple[tuple[DeltaLayer, float], ...] = ()  # run the module on base + Δ tensors
    modules: ModuleSteps = ()
    solo: tuple[DeltaLayer, float] | None = None  # the only delta, with its own combined forward
    routed: RoutedPlan | None = None  # a Split routes tokens through this module: run that instead


@dataclasses.dataclass(frozen=True)
class BranchStep:
    """Inserted modules that differ per token: ``a`` for the unmasked tokens, ``b`` for the masked."""

    a: ModuleSteps
    b: ModuleSteps


@dataclasses.dataclass(frozen=True)
class RoutedPlan:
    """The forward of a module while a Split routes tokens through it.

    The module with its deltas runs per token path (``a``: unmasked, ``b``: masked; no inserted
    modules in these plans) and the rows are chosen by the mask. When both paths differ only in
    deltas that add an output (LoRA-like), ``shared`` is the one module run both build on, so the
    module runs once and each delta once; otherwise (sparse/tensor deltas with their own forward,
    replacing copies) the module runs once per path. ``steps`` are the inserted modules in order.
    """

    routing: Routing
    by: str
    a: ForwardPlan
    b: ForwardPlan
    shared: ForwardPlan | None
    steps: tuple[tuple[ModuleLayer, float] | BranchStep, ...]


class AdaptedModule(_Host):
    """Hosts adapters around one base module (kept unchanged as ``base_layer``)."""

    def __init__(self, base_layer: nn.Module, workspace: Workspace | None = None) -> None:
        super().__init__(workspace)
        self.base_layer = base_layer
        self.plan = ForwardPlan()
        self.fusions: dict[str, WeightFusion] = {}
        self.row_slot = RowSlot()  # this thread's ak.per_row assignment, if any

    # -- fusing ------------------------------------------------------------------------------
    def fusion(self, tensor: str = "weight") -> WeightFusion:
        """The undo information of base tensor ``tensor``."""
        return self.fusions.setdefault(tensor, WeightFusion())

    @property
    def is_fused(self) -> bool:
        return any(f.is_fused for f in self.fusions.values())

    def fuse(self, deltas: list[tuple[DeltaLayer, float]], exact: bool) -> None:
        """Make every base tensor the original plus ``deltas`` (replacing what is fused now)."""
        tensors = {t for t, f in self.fusions.items() if f.is_fused}
        tensors.update(t for layer, _ in deltas for t in layer.delta_tensors())
        for tensor in sorted(tensors):
            parts = [(layer.part(tensor), w) for layer, w in deltas if tensor in layer.delta_tensors()]
            self.fusion(tensor).set(self.base_layer.get_parameter(tensor), parts, exact)

    def restore(self) -> None:
        """Every base tensor back to its original value."""
        for tensor, fusion in self.fusions.items():
            if fusion.is_fused:
                fusion.restore(self.base_layer.get_parameter(tensor))

    def free_memory(self) -> None:
        for fusion in self.fusions.values():
            fusion.free_memory()
        self.workspace.free()

    def original(self, tensor: str) -> Tensor:
        """Base tensor ``tensor`` as it was before fusing (bit-exact), without unfusing."""
        param = self.base_layer.get_parameter(tensor)
        fusion = self.fusions.get(tensor)
        return param.detach() if fusion is None else fusion.original(param)

    @property
    def host_bytes(self) -> int:
        return sum(f.host_bytes for f in self.fusions.values())

    # -- activation --------------------------------------------------------------------------
    def set_plan(self, active: Active, fused: frozenset[str], routed: RoutedSpec | None = None,
                 routing: Routing | None = None) -> None:
        """Rebuild the forward plan for the active adapters; fused deltas are skipped. ``routed``:
        an active composition with a Split (used only where a routed adapter has a layer here)."""
        if routed is not None and routing is not None and any(name in self.adapters for name in routed.routed):
            self.plan = ForwardPlan(routed=self._routed_plan(routed, fused, routing))
        else:
            self.plan = self._plan(active, fused)

    def _plan(self, active: Active, fused: frozenset[str]) -> ForwardPlan:
        replacement, deltas, tensor_deltas, modules = None, [], [], []
        for name, weight in active:
            layer = self.layer(name)
            if isinstance(layer, ModuleCopy):
                replacement = layer
            elif isinstance(layer, DeltaLayer):
                if name not in fused:
                    (deltas if layer.output_delta() else tensor_deltas).append((layer, weight))
            elif isinstance(layer, ModuleLayer):
                modules.append((layer, weight))
        solo = None
        if replacement is None and len(deltas) == 1 and not tensor_deltas:
            overridden = type(deltas[0][0]).forward_with_base is not DeltaLayer.forward_with_base
            solo = deltas[0] if overridden else None
        return ForwardPlan(replacement, tuple(deltas), tuple(tensor_deltas), tuple(modules), solo)

    def _module_steps(self, active: Active) -> ModuleSteps:
        return tuple((layer, w) for name, w in active if isinstance(layer := self.layer(name), ModuleLayer))

    def _routed_plan(self, spec: RoutedSpec, fused: frozenset[str], routing: Routing) -> RoutedPlan:
        a, b = (dataclasses.replace(self._plan(path, fused), modules=()) for path in spec.paths)
        shared = None
        if a == b:
            b = a  # the routed adapters only insert modules here: one module run
        elif a.solo is None and b.solo is None and a.replacement is b.replacement and a.tensor_deltas == b.tensor_deltas:
            shared = ForwardPlan(a.replacement, (), a.tensor_deltas)
        steps: list[tuple[ModuleLayer, float] | BranchStep] = []
        for step in spec.steps:
            if isinstance(step, Branch):
                if (branch := BranchStep(self._module_steps(step.a), self._module_steps(step.b))).a or branch.b:
                    steps.append(branch)
            elif isinstance(layer := self.layer(step[0]), ModuleLayer):
                steps.append((layer, step[1]))
        return RoutedPlan(routing, spec.by, a, b, shared, tuple(steps))

    @property
    def weight(self) -> Tensor:
        """The base module's weight (the tensor most deltas are fused into)."""
        return self.base_layer.weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = self.row_slot.current()
        if rows is not None:  # inside ak.per_row: each row runs its own adapter, not the plan
            return run_rows(self, rows, x, args, kwargs)
        plan = self.plan
        if plan.routed is not None:
            return self._routed_forward(plan.routed, x, args, kwargs)
        out = self._run(plan, x, args, kwargs)
        for layer, scale in plan.modules:
            out = layer.adapt(x, out, scale)
        return out

    def _run(self, plan: ForwardPlan, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The module with the plan's unfused deltas (no inserted modules)."""
        if plan.solo is not None:
            return plan.solo[0].forward_with_base(self.base_layer, x, plan.solo[1])
        if plan.tensor_deltas:
            replaced: dict[str, Tensor] = {}
            for layer, scale in plan.tensor_deltas:
                for tensor in layer.delta_tensors():
                    current = replaced.get(tensor, self.base_layer.get_parameter(tensor))
                    replaced[tensor] = layer.part(tensor).apply(current, scale)
            out = call_with(self.base_layer, replaced, (x, *args), kwargs)
        else:
            module = plan.replacement if plan.replacement is not None else self.base_layer
            out = module(x, *args, **kwargs)
        for layer, scale in plan.deltas:
            out = out + layer.delta_output(x, scale)
        return out

    def _routed_forward(self, r: RoutedPlan, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        mask = r.routing.mask(r.by)
        where = type(self.base_layer).__name__
        if r.a is r.b:
            out = self._run(r.a, x, args, kwargs)
        elif r.shared is not None:
            base = self._run(r.shared, x, args, kwargs)
            done: dict[int, Tensor] = {}  # a delta on both paths is computed once
            paths = []
            for plan in (r.a, r.b):
                out = base
                for layer, scale in plan.deltas:
                    delta = done.get(id(layer))
                    if delta is None:
                        delta = done[id(layer)] = layer.delta_output(x, scale)
                    out = out + delta
                paths.append(out)
            out = select(mask, paths[0], paths[1], where)
        else:
            out = select(mask, self._run(r.a, x, args, kwargs), self._run(r.b, x, args, kwargs), where)
        for step in r.steps:
            if isinstance(step, BranchStep):
                out = select(mask, _adapt(step.a, x, out), _adapt(step.b, x, out), where)
            else:
                out = step[0].adapt(x, out, step[1])
        return out


def _adapt(steps: ModuleSteps, x: Tensor, out: Any) -> Any:
    for layer, scale in steps:
        out = layer.adapt(x, out, scale)
    return out


class ModelHost(_Host):
    """Model-level adapters of one model, run by forward hooks on the model (see :class:`ModelLayer`).

    It is registered as the model's child ``adapterkit_model_adapters``, so the adapters'
    parameters are the model's (optimizers, ``.to()``, ``state_dict``).
    """

    CHILD = "adapterkit_model_adapters"

    def __init__(self, model: nn.Module, workspace: Workspace | None = None) -> None:
        super().__init__(workspace)
        self.plan: tuple[tuple[ModelLayer, float], ...] = ()
        self._handles = (model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True))

    def set_plan(self, active: Active, fused: frozenset[str], routed: RoutedSpec | None = None,
                 routing: Routing | None = None) -> None:
        # model-level adapters are never routed (refused inside a Split); they run as listed
        self.plan = tuple((layer, w) for name, w in active if isinstance(layer := self.layer(name), ModelLayer))

    def close(self) -> None:
        """Remove the forward hooks (when the last model-level adapter is detached)."""
        for handle in self._handles:
            handle.remove()

    def _before(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for layer, scale in self.plan:
            args, kwargs = layer.before(model, args, kwargs, scale)
        return args, kwargs

    def _after(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        for layer, scale in reversed(self.plan):
            output = layer.after(model, args, kwargs, output, scale)
        return output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("ModelHost is not called; its adapters run around the model's own forward")
