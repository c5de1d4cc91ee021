"""SHiRA behind the registry, and its PEFT file mapping."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ...core.config import AdapterConfig
from ...errors import ConfigError, UnsupportedError
from ...io.peft_format import PeftCodec
from ...core.registry import AdapterMethod, register_method
from ...core.seeding import layer_seed
from ...core.state import get_state
from . import masks
from .config import ShiraConfig
from .layer import ROWCOL, ShiraLayer


class ShiraCodec(PeftCodec):
    """SHiRA <-> PEFT: ``shira_weight`` (nnz) and ``shira_indices`` ((2, nnz) int32 rows/cols)."""

    peft_type = "SHIRA"
    key_suffixes = {"values": "shira_weight", ROWCOL: "shira_indices"}
    honoured = {"r", "mask_type", "random_seed", "target_modules", "modules_to_save", "init_weights", "exclude_modules",
                "layers_to_transform", "layers_pattern"}
    must_be_default = {"fan_in_fan_out": False}
    key_prefix = "shira_"

    def layer_tensors(self, layer: nn.Module) -> dict[str, Tensor]:
        return layer.plain_tensors()

    def to_peft(self, config: AdapterConfig, targets: list[str]) -> dict[str, Any]:
        assert isinstance(config, ShiraConfig)
        if config.r is None or config.mask == "struct":
            raise UnsupportedError("PEFT's SHiRA format needs exactly r·(in + out) entries per layer: "
                                   "save with format='adapterkit', or train with ShiraConfig(r=...) and a mask other than struct")
        return {
            "r": config.r,
            "mask_type": "random",
            "random_seed": config.seed,
            "target_modules": sorted(targets),
            "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
            "init_weights": True,
            "fan_in_fan_out": False,
        }

    def from_peft(self, data: Mapping[str, Any]) -> AdapterConfig:
        return ShiraConfig(
            r=int(data.get("r", 32)),
            mask="rand",
            seed=int(data.get("random_seed") or 0),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            modules_to_save=data.get("modules_to_save"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
        )


@register_method
class ShiraMethod(AdapterMethod):
    name = "shira"
    config_class = ShiraConfig
    peft = ShiraCodec()
    default_learning_rate = 1e-2

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def setup(self, model: nn.Module, config: AdapterConfig, adapter_name: str, targets: dict[str, nn.Module],
              calibration: Iterable[Any] | None = None, loss_fn: Any = None, **options: Any) -> dict[str, Any]:
        """Check the budgets, gather the supports to avoid, and compute calibration gradients."""
        assert isinstance(config, ShiraConfig)
        if options:
            raise ConfigError(f"method 'shira' takes the attach options calibration and loss_fn, got {sorted(options)}")
        if config.mask == "struct" and config.avoid:
            raise ConfigError("struct masks cannot avoid other adapters")
        for path, module in targets.items():
            config.budget(*module.weight.shape, module_name=path)
        state = get_state(model)
        supports: dict[str, list[Tensor]] = {}
        for other in config.avoid:
            if state.record(other).method.name != self.name:
                raise ConfigError(f"avoid={other!r}: only SHiRA adapters have supports to avoid")
            for path in targets:
                layer = state.wrappers[path].layer(other) if path in state.wrappers else None
                if layer is not None:
                    supports.setdefault(path, []).append(layer.indices.cpu())
        avoid = {path: torch.cat(found).unique() for path, found in supports.items()}
        gradients = None
        if config.mask in ("grad", "snip") and calibration is None:
            raise ConfigError(f"the {config.mask!r} mask needs calibration data: ak.attach(model, config, name, calibration=batches)")
        if calibration is not None:
            if not (config.mask in ("grad", "snip") or callable(config.mask)):
                raise ConfigError(f"calibration data is only used by grad, snip and callable masks, not {config.mask!r}")
            gradients = masks.calibration_gradients(model, targets, calibration, loss_fn, config.grad_accumulate)
        return {"avoid": avoid, "gradients": gradients}

    def create_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module,
                     context: Any = None) -> ShiraLayer:
        assert isinstance(config, ShiraConfig)
        context = context or {"avoid": {}, "gradients": None}
        weight = module.weight
        rows, cols = weight.shape
        k = config.budget(rows, cols, module_name)
        seed = layer_seed(config.seed, adapter_name, module_name)
        exclude = context["avoid"].get(module_name)
        if exclude is not None and exclude.numel() + k > rows * cols:
            raise ConfigError(f"{module_name}: {k} new entries do not fit beside the {exclude.numel()} avoided ones")
        gradient = None if context["gradients"] is None else context["gradients"][module_name]
        rule = config.mask
        if callable(rule):
            indices = masks.from_callable(rule, weight, k, seed, gradient, module_name)
        elif rule == "rand":
            indices = masks.rand(rows * cols, k, seed, exclude)
        elif rule == "struct":
            indices = masks.struct(rows, cols, k, config.struct_axis)
        elif rule == "wm":
            indices = masks.from_scores(weight.abs(), k, exclude)
        elif rule == "grad":
            indices = masks.from_scores(gradient.abs(), k, exclude)
        elif rule == "snip":
            indices = masks.from_scores((weight.detach().float() * gradient).abs(), k, exclude)
        else:
            raise ConfigError(f"mask {rule!r} names a mask function, which is not saved with an adapter; "
                              "pass the function itself as ShiraConfig(mask=...)")
        layer = ShiraLayer(adapter_name, (rows, cols), indices, weight.device, config.mask_name, seed, k, config.struct_axis)
        layer.regenerable = layer.regenerable and exclude is None
        return layer

    def empty_layer(self, config: AdapterConfig, adapter_name: str, module_name: str, module: nn.Module) -> ShiraLayer:
        assert isinstance(config, ShiraConfig)
        rows, cols = module.weight.shape
        return ShiraLayer(adapter_name, (rows, cols), torch.zeros(0, dtype=torch.int64), module.weight.device,
                          config.mask_name, 0, config.budget(rows, cols, module_name), config.struct_axis)
