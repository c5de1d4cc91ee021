"""Adapter layers and the wrapper that hosts them inside a model.

Two kinds of adapter share one wrapper:

* :class:`DeltaLayer` — a weight delta ΔW (LoRA, DyLoRA, SHiRA, sparse masks). Unfused it adds
  ``ΔW x`` to the base output; fused it is folded into the base weight and removed exactly.
* :class:`ModuleLayer` — an inserted module that transforms the base output (bottleneck
  adapters); it cannot be folded into weights.

:class:`ModuleCopy` (PEFT's ``modules_to_save``) is a full trainable copy of a small module, such
as a classifier head, that replaces the base module while its adapter is active.

The wrapper keeps the original module as ``base_layer`` and its adapters in an ``nn.ModuleList``;
adapter names live on the layer objects, never in tensor keys.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .errors import BaseModelMismatchError, CorruptFileError
from .fusion import WeightFusion
from .quantization import Quantizer


class AdapterLayer(nn.Module):
    """One adapter's state at one base module.

    Methods read their weights through :meth:`weight_of`, so any adapter can be low-bit: a
    quantised tensor is returned fake-quantised (:mod:`adapterkit.quantization`).
    """

    def __init__(self, adapter_name: str) -> None:
        super().__init__()
        self.adapter_name = adapter_name
        self.quantizers: dict[str, Quantizer] = {}

    def quantizable(self) -> list[str]:
        """Parameters that become low-bit with ``bits < 32``: every matrix (biases stay fp32)."""
        return [name for name, p in self.named_parameters() if p.dim() >= 2]

    def weight_of(self, name: str) -> Tensor:
        """Parameter ``name`` as the forward uses it (dequantised when the adapter is low-bit)."""
        param = self.get_parameter(name)
        quantizer = self.quantizers.get(name)
        return param if quantizer is None else quantizer(param)

    def stored_shape(self, name: str, tensors: Mapping[str, Tensor]) -> torch.Size:
        """The shape of parameter ``name`` as saved in ``tensors`` (whose value arrives as packed
        codes); by default the parameter's own. Layers sized by their file override this."""
        return self.get_parameter(name).shape

    def set_quantization(self, bits: int, method: str, init_zeros: bool = True) -> None:
        """Quantise :meth:`quantizable` at ``bits`` (32: full precision again). An all-zero matrix
        (e.g. LoRA's B) gets the paper's small truncated-normal init, or its codes would degenerate."""
        self.quantizers = {} if bits == 32 else {name: Quantizer(bits, method) for name in self.quantizable()}
        if init_zeros:
            with torch.no_grad():
                for name in self.quantizers:
                    param = self.get_parameter(name)
                    if not param.any():
                        nn.init.trunc_normal_(param, std=1e-3, a=-2e-3, b=2e-3)

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that are saved for this layer, by local key."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def accepted_keys(self) -> set[str]:
        """Local keys a saved file may hold for this layer (a method may accept several layouts)."""
        return set(self.tensors())

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        """Copy saved tensors in; every expected key must be present with the right shape.

        ``where`` names the file and module for error messages.
        """
        _check_and_copy(self.state_dict(), tensors, where)


class DeltaLayer(AdapterLayer):
    """An adapter that is a weight delta ΔW of the base module's ``weight``."""

    def delta_output(self, x: Tensor, scale: float) -> Tensor:
        """``scale · ΔW x`` computed without materialising ΔW (used when unfused)."""
        raise NotImplementedError

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        """``weight += scale · ΔW`` in place (computed in fp32, cast once)."""
        raise NotImplementedError

    def write_from(self, weight: Tensor, source: Tensor, scale: float) -> None:
        """``weight = source + scale · ΔW``; methods override this with a single fused kernel."""
        weight.copy_(source)
        self.add_to_weight(weight, scale)

    def support(self) -> Tensor | None:
        """Flat indices of the weight entries ΔW touches, or ``None`` when ΔW is dense."""
        return None

    def sparse_delta(self, scale: float) -> Tensor | None:
        """For sparse deltas: ``scale · ΔW`` at :meth:`support`, in fp32 (lets fusing write
        ``original + delta`` with one index copy instead of reading the weight again)."""
        return None

    def delta_weight(self, shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense ΔW (for analysis, e.g. :mod:`adapterkit.metrics`; never used in training)."""
        weight = torch.zeros(shape, dtype=dtype, device=next(iter(self.parameters())).device)
        self.add_to_weight(weight, 1.0)
        return weight

    def forward_with_base(self, base: nn.Module, x: Tensor, scale: float) -> Tensor:
        """``base(x) + scale · ΔW x`` in one step. Optional: a method overrides it when that is
        cheaper than the two parts (used when this is the only active delta of the module)."""
        return base(x) + self.delta_output(x, scale)


class ModuleLayer(AdapterLayer):
    """An inserted module: it changes the wrapped module's output and cannot be fused."""

    def adapt(self, inputs: Tensor, output: Tensor, scale: float) -> Tensor:
        """The new output, given the wrapped module's input and (possibly already adapted) output."""
        raise NotImplementedError


class ModuleCopy(AdapterLayer):
    """A full trainable copy of the base module that replaces it while the adapter is active
    (kept in full precision, also in low-bit adapters)."""

    def quantizable(self) -> list[str]:
        return []

    def __init__(self, adapter_name: str, base: nn.Module) -> None:
        super().__init__(adapter_name)
        self.module = copy.deepcopy(base)
        self.module.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        _check_and_copy(self.module.state_dict(), tensors, where)


def _check_and_copy(own: Mapping[str, Tensor], tensors: Mapping[str, Tensor], where: str) -> None:
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CorruptFileError(f"{where}: missing tensors {missing}")
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise CorruptFileError(f"{where}: unexpected tensors {unexpected}")
    for key, target in own.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise BaseModelMismatchError(
                f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key])


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """What the wrapper runs on each forward, precomputed whenever activation changes."""

    replacement: ModuleCopy | None = None
    deltas: tuple[tuple[DeltaLayer, float], ...] = ()
    modules: tuple[tuple[ModuleLayer, float], ...] = ()
    solo: tuple[DeltaLayer, float] | None = None  # the only delta, with its own combined forward


class AdaptedModule(nn.Module):
    """Hosts adapters around one base module (kept unchanged as ``base_layer``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleList()
        self.plan = ForwardPlan()
        self.fusion = WeightFusion()

    # -- membership -------------------------------------------------------------------------
    def layer(self, adapter_name: str) -> AdapterLayer | None:
        """The layer of ``adapter_name`` at this module, if any."""
        for layer in self.adapters:
            if layer.adapter_name == adapter_name:
                return layer
        return None

    def add(self, layer: AdapterLayer) -> None:
        self.adapters.append(layer)

    def remove(self, adapter_name: str) -> None:
        for index, layer in enumerate(self.adapters):
            if layer.adapter_name == adapter_name:
                del self.adapters[index]
                return

    # -- activation -------------------------------------------------------------------------
    def set_plan(self, active: tuple[tuple[str, float], ...], fused: frozenset[str]) -> None:
        """Rebuild the forward plan for the active adapters; fused deltas are skipped."""
        replacement, deltas, modules = None, [], []
        for name, weight in active:
            layer = self.layer(name)
            if layer is None:
                continue
            if isinstance(layer, ModuleCopy):
                replacement = layer
            elif isinstance(layer, DeltaLayer):
                if name not in fused:
                    deltas.append((layer, weight))
            elif isinstance(layer, ModuleLayer):
                modules.append((layer, weight))
        solo = None
        if replacement is None and len(deltas) == 1:
            overridden = type(deltas[0][0]).forward_with_base is not DeltaLayer.forward_with_base
            solo = deltas[0] if overridden else None
        self.plan = ForwardPlan(replacement, tuple(deltas), tuple(modules), solo)

    @property
    def weight(self) -> Tensor:
        """The base module's weight (the tensor weight deltas are fused into)."""
        return self.base_layer.weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = self.plan
        if plan.solo is not None:
            out = plan.solo[0].forward_with_base(self.base_layer, x, plan.solo[1])
        else:
            module = plan.replacement if plan.replacement is not None else self.base_layer
            out = module(x, *args, **kwargs)
            for layer, scale in plan.deltas:
                out = out + layer.delta_output(x, scale)
        for layer, scale in plan.modules:
            out = layer.adapt(x, out, scale)
        return out

    def extra_repr(self) -> str:
        names = [l.adapter_name for l in self.adapters]
        return f"adapters={names}"
