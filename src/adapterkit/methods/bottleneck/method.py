"""Bottleneck adapters behind the registry."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...core.config import AdapterConfig
from ...core.registry import AdapterMethod, register_method
from .config import BottleneckConfig
from .layer import BottleneckLayer, can_wrap, check_fits, feature_dims


def module_device(module: nn.Module) -> Any:
    param = next(module.parameters(), None)
    return None if param is None else param.device


@register_method
class BottleneckMethod(AdapterMethod):
    name = "bottleneck"
    config_class = BottleneckConfig
    default_learning_rate = 1e-3

    def supports(self, module: nn.Module) -> bool:
        return can_wrap(module)

    def create_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> BottleneckLayer:
        assert isinstance(config, BottleneckConfig)
        in_dim, out_dim, conv = feature_dims(module, module_name)
        layer = BottleneckLayer(adapter_name, config, in_dim, out_dim, conv, module_name, module_device(module))
        check_fits(layer, module, module_name)  # a mismatch is reported now, not at the first forward
        return layer
