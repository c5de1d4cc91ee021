"""LoRA: ``y = W₀x + s · B A x`` with ``s = alpha / r`` (or ``alpha / √r`` for rsLoRA).

Unfused, the delta is computed as ``(x Aᵀ) Bᵀ`` — a dense ΔW is never built in the training
forward. Fused, ΔW is accumulated into the weight with one GEMM-accumulate (``addmm``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..fusion import fp32_scratch
from ..layers import DeltaLayer
from ..peft_format import PeftCodec
from ..registry import AdapterMethod, register_method

INITS = ("default", "gaussian", "random")


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """Low-rank adapter configuration.

    Attributes:
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / √r`` with ``use_rslora``).
        dropout: dropout on the adapter branch input during training.
        use_rslora: rank-stabilised scaling ``alpha / √r``.
        fan_in_fan_out: the base weight is stored ``in × out`` (GPT-2 ``Conv1D``); detected automatically.
        init: ``"default"`` (A Kaiming-uniform, B = 0: starts as the base model), ``"gaussian"``
            (A normal with std 1/r, B = 0) or ``"random"`` (both random; for tests).
        rank_pattern / alpha_pattern: per-module overrides, keyed by a module-name pattern (as PEFT).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    init: str = "default"
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"LoRAConfig.{name} must be a mapping of module-name pattern to value")
        ranks = [self.r, *self.rank_pattern.values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise ConfigError(f"LoRAConfig: ranks must be positive integers, got r={self.r}, rank_pattern={dict(self.rank_pattern)}")
        if not all(math.isfinite(a) for a in [self.alpha, *self.alpha_pattern.values()]):
            raise ConfigError(f"LoRAConfig: alpha must be finite, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRAConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ConfigError(f"LoRAConfig: init must be one of {INITS}, got {self.init!r}")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(r) if self.use_rslora else r)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_lora_target(module: nn.Module) -> bool:
    """Modules a LoRA-shaped delta can adapt: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def is_conv_target(module: nn.Module) -> bool:
    """``nn.Conv2d`` without groups and with zero padding. Subclasses (e.g. "same"-padding
    wrappers that pad in their own forward) only with 1×1 kernels, where padding plays no part."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.padding_mode != "zeros":
        return False
    return type(module) is nn.Conv2d or tuple(module.kernel_size) == (1, 1)


class LoRALayer(DeltaLayer):
    """LoRA factors of one layer, kept in fp32: ``lora_A`` (r × in) and ``lora_B`` (out × r) for a
    linear layer; for a ``Conv2d`` (as PEFT) ``lora_A`` is a conv with the base kernel, stride and
    padding to r channels (r × in × kh × kw) and ``lora_B`` a 1×1 conv (out × r × 1 × 1)."""

    def __init__(self, adapter_name: str, base: nn.Module, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__(adapter_name)
        self.transposed = _is_conv1d(base)
        weight = base.weight
        factory = {"device": weight.device, "dtype": torch.float32}
        self.conv = (base.stride, base.padding, base.dilation) if isinstance(base, nn.Conv2d) else None
        if self.conv is not None:
            a_shape, b_shape = (r, *weight.shape[1:]), (weight.shape[0], r, 1, 1)
        else:
            out_features, in_features = weight.shape[::-1] if self.transposed else weight.shape
            a_shape, b_shape = (r, in_features), (out_features, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "random":
                nn.init.normal_(self.lora_B, std=0.02)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta_output(self, x: Tensor, scale: float) -> Tensor:
        a, b = self.weight_of("lora_A"), self.weight_of("lora_B")
        h = self.dropout(x.to(a.dtype))
        if self.conv is not None:
            return (F.conv2d(F.conv2d(h, a, None, *self.conv), b) * (self.scaling * scale)).to(x.dtype)
        return (F.linear(F.linear(h, a), b) * (self.scaling * scale)).to(x.dtype)

    def _factors(self) -> tuple[Tensor, Tensor]:
        # ΔW = B @ A for an (out × in) weight; a Conv1D weight is (in × out), so ΔWᵀ = Aᵀ @ Bᵀ;
        # a conv weight (out × in × kh × kw) is updated through its (out × in·kh·kw) view.
        a, b = self.weight_of("lora_A"), self.weight_of("lora_B")
        if self.transposed:
            return a.t(), b.t()
        if self.conv is not None:
            return b.flatten(1), a.flatten(1)
        return b, a

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        self.write_from(weight, weight, scale)

    def write_from(self, weight: Tensor, source: Tensor, scale: float) -> None:
        left, right = self._factors()
        left, right, alpha = left.detach(), right.detach(), self.scaling * scale
        in_place = source is weight
        if weight.dim() > 2:  # conv: the same GEMM on the flattened views
            weight, source = weight.view(weight.shape[0], -1), source.reshape(source.shape[0], -1)
        if weight.dtype == torch.float32 and weight.device == left.device:
            if in_place:
                weight.addmm_(left, right, alpha=alpha)
            elif source.device == weight.device and source.dtype == weight.dtype:
                torch.addmm(source, left, right, alpha=alpha, out=weight)  # one pass: original + ΔW
            else:
                weight.copy_(source)
                weight.addmm_(left, right, alpha=alpha)
            return
        acc = fp32_scratch(weight.shape, left.device)  # low precision: accumulate in fp32, round once
        acc.copy_(source)
        acc.addmm_(left, right, alpha=alpha)
        weight.copy_(acc)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, r={self.rank}, scaling={self.scaling:g}"


class LoRACodec(PeftCodec):
    """LoRA <-> PEFT ``adapter_config.json`` and key names."""

    peft_type = "LORA"
    key_suffixes = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    # PEFT fields we read; any other field must keep its default value or loading is refused.
    honoured = {
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
        "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
        "layers_pattern", "init_lora_weights",
    }
    must_be_default = {"bias": "none", "use_dora": False, "lora_bias": False, "use_qalora": False}

    def to_peft(self, config: AdapterConfig, targets: list[str]) -> dict[str, Any]:
        assert isinstance(config, LoRAConfig)
        return {
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": sorted(targets),
            "exclude_modules": None,
            "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
            "fan_in_fan_out": config.fan_in_fan_out,
            "bias": "none",
            "use_rslora": config.use_rslora,
            "use_dora": False,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}[config.init],
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def from_peft(self, data: Mapping[str, Any]) -> AdapterConfig:
        init = data.get("init_lora_weights", True)
        return LoRAConfig(
            r=int(data.get("r", 8)),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            modules_to_save=data.get("modules_to_save"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            use_rslora=bool(data.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "default",
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )


@register_method
class LoRAMethod(AdapterMethod):
    name = "lora"
    config_class = LoRAConfig
    peft = LoRACodec()

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
