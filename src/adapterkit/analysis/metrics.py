"""Interference metrics for fusing several weight-delta adapters (SHiRA paper, §4.2).

For two adapters' deltas ``A₁, A₂`` of one ``n × m`` weight, with ``P = A₁ᵀ A₂`` (``m × m``):

* AWOR (adapter weight orthogonality ratio) ``= 1 − ‖P‖₀ / m²``, the fraction of zeros in ``P``;
* AWOM (adapter weight orthogonality magnitude) ``= ‖P‖₂``; the paper does not say which norm, so
  both the spectral and the Frobenius norm are reported.

Higher AWOR and lower AWOM mean the adapters are closer to orthogonal and interfere less when
fused. For independent random masks of density p, ``E[AWOR] ≈ (1 − p²)ⁿ``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.layers import DeltaLayer
from ..core.state import get_state
from ..errors import ConfigError


NORMS = ("spectral", "fro")


def _product(a: Tensor, b: Tensor) -> Tensor:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ConfigError(f"expected two delta tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.dim() != 2:
        raise ConfigError(f"adapters must be deltas of the same 2-D weight, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().float(), b.detach().float()
    return a.t() @ b.to(a.device)


def awor(a: Tensor, b: Tensor) -> float:
    """Fraction of exact zeros in ``aᵀ b``."""
    product = _product(a, b)
    return 1.0 - torch.count_nonzero(product).item() / product.numel()


def awom(a: Tensor, b: Tensor, norm: str = "spectral") -> float:
    """``‖aᵀ b‖`` with the spectral (``"spectral"``) or Frobenius (``"fro"``) norm."""
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")
    product = _product(a, b)
    return torch.linalg.matrix_norm(product, ord=2 if norm == "spectral" else "fro").item()


@dataclasses.dataclass(frozen=True)
class LayerOrthogonality:
    awor: float
    awom_spectral: float
    awom_fro: float


@dataclasses.dataclass(frozen=True)
class Orthogonality:
    """Per-layer metrics of two adapters and their means over the layers both adapt."""

    layers: dict[str, LayerOrthogonality]

    @property
    def awor(self) -> float:
        return sum(l.awor for l in self.layers.values()) / len(self.layers)

    @property
    def awom_spectral(self) -> float:
        return sum(l.awom_spectral for l in self.layers.values()) / len(self.layers)

    @property
    def awom_fro(self) -> float:
        return sum(l.awom_fro for l in self.layers.values()) / len(self.layers)


def orthogonality(model: nn.Module, first: str, second: str) -> Orthogonality:
    """AWOR and AWOM of two attached weight-delta adapters, per shared layer and averaged."""
    state = get_state(model)
    for name in (first, second):
        if not isinstance(name, str):
            raise ConfigError(f"adapter names must be strings, got {name!r}")
        state.record(name)
    layers = {}
    for path, wrapper in state.wrappers.items():
        a, b = wrapper.layer(first), wrapper.layer(second)
        if isinstance(a, DeltaLayer) and isinstance(b, DeltaLayer):
            da, db = a.delta_weight(wrapper.weight.shape), b.delta_weight(wrapper.weight.shape)
            layers[path] = LayerOrthogonality(awor(da, db), awom(da, db), awom(da, db, "fro"))
    if not layers:
        raise ConfigError(f"adapters {first!r} and {second!r} share no weight-delta layer")
    return Orthogonality(layers)
