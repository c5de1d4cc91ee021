"""MoSA configuration (Zhang et al., "MoSA: Mixture of Sparse Adapters", arXiv 2312.02923)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...core.config import AdapterConfig
from ...errors import ConfigError
from ...core.registry import get_method
from ..bottleneck import BottleneckConfig
from ..lora import LoRAConfig

SPLITS = ("up", "down", "both")
UPDATES = ("never", "legacy")
TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


@dataclasses.dataclass(frozen=True)
class MoSAConfig(AdapterConfig):
    """Split an adapter into ``n_modules`` disjoint sparse modules, train one per step, merge back.

    Attributes:
        base: the adapter being split: a :class:`BottleneckConfig` or a :class:`LoRAConfig`; the
            target selection comes from it unless given here.
        n_modules: N ≥ 2. Each split matrix's entries are partitioned into N random, disjoint,
            equal-size element sets (seeded per adapter and layer).
        split: which projection is split: ``"up"`` (Up / LoRA B; the reference's default),
            ``"down"`` (Down / LoRA A) or ``"both"``; the other stays dense and trains every step.
        consistency_weight: weight of the symmetric-KL term between two stochastic passes
            (:func:`adapterkit.mosa.two_pass_loss`); 0 turns the second pass off.
        update_unselected: what the optimizer does to modules not chosen in a step.
            ``"never"`` (default): they get no gradient (``None``), so any torch ≥ 2 optimizer
            skips them — no stale-momentum drift, no weight decay, Adam's step count advances
            only when chosen. ``"legacy"``: they get a zero gradient, so Adam(W) still moves them
            by stale momentum and decay — what the reference code did on torch 1.11.
        seed: seed of the partitions and of the per-step module choice.
    """

    base: BottleneckConfig | LoRAConfig | None = None
    n_modules: int = 4
    split: str = "up"
    consistency_weight: float = 1.0
    update_unselected: str = "never"
    seed: int = 0

    def __post_init__(self) -> None:
        base = self.base
        if isinstance(base, dict):  # from to_dict(): {"method": ..., "config": {...}}
            base = get_method(base.get("method", "")).config_class.from_dict(base.get("config", {}))
            object.__setattr__(self, "base", base)
        if not isinstance(base, (BottleneckConfig, LoRAConfig)):
            raise ConfigError(f"MoSAConfig.base must be a BottleneckConfig or a LoRAConfig, got {type(base).__name__}")
        for field in TARGET_FIELDS:
            if getattr(self, field) is None:
                object.__setattr__(self, field, getattr(base, field))
        super().__post_init__()

    def validate(self) -> None:
        if self.bits != 32 or self.base.bits != 32:
            raise ConfigError("MoSAConfig: low-bit MoSA training is not supported; train in full precision, then "
                              "ak.to_plain(model, name) and ak.quantize(model, name, bits) the merged adapter")
        if not isinstance(self.n_modules, int) or isinstance(self.n_modules, bool) or self.n_modules < 2:
            raise ConfigError(f"MoSAConfig: n_modules must be an integer >= 2, got {self.n_modules!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"MoSAConfig: split must be one of {SPLITS}, got {self.split!r}")
        if self.update_unselected not in UPDATES:
            raise ConfigError(f"MoSAConfig: update_unselected must be one of {UPDATES}, got {self.update_unselected!r}")
        if not isinstance(self.consistency_weight, (int, float)) or not self.consistency_weight >= 0:
            raise ConfigError(f"MoSAConfig: consistency_weight must be >= 0, got {self.consistency_weight!r}")

    @property
    def split_names(self) -> tuple[str, ...]:
        """Which of ("down", "up") are split."""
        return ("down", "up") if self.split == "both" else (self.split,)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["base"] = {"method": type(self.base).method, "config": self.base.to_dict()}
        return data
