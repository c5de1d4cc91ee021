"""MoSA behind the registry: per-step module choice, and the merge into a plain adapter."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ...core.config import AdapterConfig
from ...errors import TargetError
from ...core.layers import AdapterLayer
from ...core.registry import AdapterMethod, method_for, register_method
from ...core.state import active_records
from ..bottleneck import BottleneckConfig, BottleneckLayer, can_wrap, check_fits, feature_dims
from ..bottleneck.method import module_device
from ..lora import LoRALayer, is_lora_target
from .config import MoSAConfig
from .layers import MoSABottleneckLayer, MoSALoRALayer, _Splits


@register_method
class MoSAMethod(AdapterMethod):
    name = "mosa"
    config_class = MoSAConfig
    default_learning_rate = 3e-3

    def supports(self, module: nn.Module) -> bool:
        return can_wrap(module)  # the wider of the two bases; create_layer checks the actual one

    def create_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> AdapterLayer:
        assert isinstance(config, MoSAConfig)
        if not method_for(config.base).supports(module):
            raise TargetError(f"module {module_name!r} ({type(module).__name__}) cannot host a MoSA "
                              f"{type(config.base).method} adapter")
        if isinstance(config.base, BottleneckConfig):
            in_dim, out_dim, conv = feature_dims(module, module_name)
            layer = MoSABottleneckLayer(adapter_name, config, in_dim, out_dim, conv, module_name, module_device(module))
            check_fits(layer, module, module_name)
            return layer
        if not is_lora_target(module):  # MoSA's split LoRA is written for linear layers only
            raise TargetError(f"module {module_name!r} ({type(module).__name__}) cannot host a MoSA LoRA adapter: only "
                              "nn.Linear (and GPT-2 Conv1D) layers can; use a bottleneck base for convolutions")
        return MoSALoRALayer(adapter_name, module, config, module_name)

    def on_step(self, config: AdapterConfig, layers: list[AdapterLayer]) -> None:
        for layer in layers:
            if isinstance(layer, _Splits):
                layer.choose_modules()

    def trains_every_parameter(self, config: AdapterConfig) -> bool:
        assert isinstance(config, MoSAConfig)
        return config.update_unselected == "legacy"  # "never": unchosen modules get no gradient at all

    def portable(self, config: AdapterConfig, layers: Mapping[str, AdapterLayer], bases: Mapping[str, nn.Module],
                 **options: Any) -> tuple[AdapterConfig, dict[str, AdapterLayer]]:
        """The merged adapter: the base method's plain layers with the average of the N modules."""
        assert isinstance(config, MoSAConfig)
        super().portable(config, layers, bases, **options)
        out: dict[str, AdapterLayer] = dict(layers)
        for path, layer in layers.items():
            if isinstance(layer, MoSABottleneckLayer):
                plain: AdapterLayer = BottleneckLayer(layer.adapter_name, config.base, *layer.dims, layer.conv, path,
                                                      next(layer.parameters()).device)
            elif isinstance(layer, MoSALoRALayer):
                lora = config.base
                plain = LoRALayer(layer.adapter_name, bases[path], r=lora.rank_for(path), scaling=lora.scaling_for(path),
                                  dropout=lora.dropout, init="default")
            else:
                continue
            plain.load_tensors(layer.merged_state(), f"MoSA adapter {layer.adapter_name!r} at {path}")
            plain.train(layer.training)
            out[path] = plain
        return config.base, out


def resample(model: nn.Module) -> None:
    """Draw fresh module choices in every active MoSA adapter (the second stochastic pass)."""
    for state, record in active_records(model):
        if isinstance(record.config, MoSAConfig):
            record.method.on_step(record.config, [layer for _, layer in state.layers(record.name)])
