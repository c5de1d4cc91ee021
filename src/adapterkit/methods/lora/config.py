"""LoRA's configuration (PEFT's field names where they exist)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from ...core.config import AdapterConfig
from ...errors import ConfigError

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
