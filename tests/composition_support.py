"""Shared by the composition tests: a sparse diff over several tensors of a module (weight and
bias, LT-SFT's shape: a DeltaLayer whose parts are SparseTensorDeltas, no ``delta_output``),
registered from here, and small hand-run references."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.core.sparse import SparseTensorDelta
from adapterkit.core.state import get_state


@dataclasses.dataclass(frozen=True)
class StrideDiffConfig(ak.AdapterConfig):
    """Trainable entries at every ``stride``-th flat position (from ``offset``) of a linear
    layer's weight and bias."""

    stride: int = 3
    offset: int = 0


class StrideDiffLayer(ak.DeltaLayer):
    def __init__(self, name: str, module: nn.Module, config: StrideDiffConfig) -> None:
        super().__init__(name)
        self.parts = nn.ModuleDict({
            tensor: SparseTensorDelta(p.shape, torch.arange(config.offset % config.stride, p.numel(), config.stride), p.device)
            for tensor, p in module.named_parameters(recurse=False)})

    def delta_tensors(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def part(self, tensor: str) -> SparseTensorDelta:
        return self.parts[tensor]


@ak.register_method
class StrideDiffMethod(ak.AdapterMethod):
    name = "test-composition-diff"
    config_class = StrideDiffConfig

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def create_layer(self, config, adapter_name, module_name, module, context=None):
        return StrideDiffLayer(adapter_name, module, config)


def layer_of(model: nn.Module, name: str, path: str) -> ak.AdapterLayer:
    return get_state(model).host(path).layer(name)


def add_delta(model: nn.Module, base: nn.Module, name: str, path: str, scale: float) -> None:
    """Add ``scale · Δ`` of adapter ``name`` at ``path`` of ``model`` to the tensors of ``base``
    (a plain copy of the unadapted module), one tensor at a time, in place."""
    layer = layer_of(model, name, path)
    with torch.no_grad():
        for tensor in layer.delta_tensors():
            layer.part(tensor).add_to_weight(base.get_parameter(tensor), scale)


def rows(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``b`` at the masked (batch, token) positions, ``a`` elsewhere, built row by row."""
    out = a.clone()
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                out[i, t] = b[i, t]
    return out
