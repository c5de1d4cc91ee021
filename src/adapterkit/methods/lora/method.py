"""LoRA registered as a method."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...core.config import AdapterConfig
from ...core.registry import AdapterMethod, register_method
from .config import LoRAConfig
from .layer import LoRALayer, is_conv_target, is_lora_target
from .peft import LoRACodec


@register_method
class LoRAMethod(AdapterMethod):
    name = "lora"
    config_class = LoRAConfig
    peft = LoRACodec()
    default_learning_rate = 3e-3

    def supports(self, module: nn.Module) -> bool:
        return is_lora_target(module) or is_conv_target(module)

    def create_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> LoRALayer:
        assert isinstance(config, LoRAConfig)
        return LoRALayer(
            adapter_name,
            module,
            r=config.rank_for(module_name),
            scaling=config.scaling_for(module_name),
            dropout=config.dropout,
            init=config.init,
        )
