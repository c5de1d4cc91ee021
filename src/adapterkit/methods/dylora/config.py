"""DyLoRA configuration (Valipour et al., EACL 2023, arXiv 2210.07558)."""

from __future__ import annotations

import dataclasses
import math

from ...core.config import AdapterConfig
from ...errors import ConfigError

DISTRIBUTIONS = ("uniform", "geometric")
SCALINGS = ("alpha_over_b", "alpha_over_rmax")
SCOPES = ("global", "per_layer")
INITS = ("default", "random")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DyLoRAConfig(AdapterConfig):
    """A LoRA trained for every rank ``r_min ≤ b ≤ r_max`` at once.

    Each optimizer step samples a rank ``b`` and trains the truncated adapter
    ``B[:, :b] A[:b]``; afterwards any prefix rank works (:func:`adapterkit.set_rank`).

    Attributes:
        r_max / r_min: the rank range.
        alpha: scale numerator: the update at rank ``b`` is scaled by ``alpha / b``
            (``scaling="alpha_over_b"``, the paper's rule) or ``alpha / r_max``
            (``"alpha_over_rmax"``: one scale for every prefix, which lets the prefixes nest like
            a truncated SVD; with ``alpha / b`` each prefix gets its own magnitude and the
            full-rank fit is traded for small-rank quality).
        distribution: how ``b`` is drawn: ``"uniform"`` on ``{r_min … r_max}`` or
            ``"geometric"`` (``P(b) ∝ (1 − p)^(b − r_min)`` with ``p = geometric_p``, favouring
            small ranks as in nested dropout).
        frozen: ``True`` (the official training): gradient reaches only component ``b`` (row
            ``b`` of A, column ``b`` of B); ``False``: components ``1 … b``.
        scope: ``"global"``: one ``b`` for every layer per step (the paper); ``"per_layer"``:
            each layer draws its own.
        seed: the sampler's seed (combined with the adapter name, so two adapters draw
            different sequences).
        dropout: dropout on the adapter input during training.
        init: ``"default"`` (A Kaiming-uniform, B = 0, as loralib) or ``"random"`` (both random; tests).
    """

    r_max: int = 8
    r_min: int = 1
    alpha: float = 16.0
    distribution: str = "uniform"
    geometric_p: float = 0.25
    frozen: bool = True
    scaling: str = "alpha_over_b"
    scope: str = "global"
    seed: int = 0
    dropout: float = 0.0
    init: str = "default"

    def validate(self) -> None:
        if not (_is_int(self.r_max) and _is_int(self.r_min)) or self.r_min < 1:
            raise ConfigError(f"DyLoRAConfig: r_min and r_max must be positive integers, got r_min={self.r_min!r}, "
                              f"r_max={self.r_max!r}")
        if self.r_min > self.r_max:
            raise ConfigError(f"DyLoRAConfig: r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"DyLoRAConfig: alpha must be a positive number, got {self.alpha!r}")
        for field, allowed in (("distribution", DISTRIBUTIONS), ("scaling", SCALINGS), ("scope", SCOPES),
                               ("init", INITS)):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"DyLoRAConfig: {field} must be one of {allowed}, got {getattr(self, field)!r}")
        if not 0.0 < self.geometric_p < 1.0:
            raise ConfigError(f"DyLoRAConfig: geometric_p must be in (0, 1), got {self.geometric_p}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"DyLoRAConfig: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.frozen, bool):
            raise ConfigError(f"DyLoRAConfig: frozen must be True or False, got {self.frozen!r}")

    @property
    def ranks(self) -> range:
        return range(self.r_min, self.r_max + 1)

    def scale_at(self, rank: int) -> float:
        """The update's scale at rank ``rank``."""
        return self.alpha / (rank if self.scaling == "alpha_over_b" else self.r_max)

    def rank_probabilities(self) -> list[float]:
        """``P(b)`` for ``b`` in :attr:`ranks`."""
        if self.distribution == "uniform":
            weights = [1.0] * len(self.ranks)
        else:
            weights = [(1.0 - self.geometric_p) ** i for i in range(len(self.ranks))]
        total = sum(weights)
        return [w / total for w in weights]
