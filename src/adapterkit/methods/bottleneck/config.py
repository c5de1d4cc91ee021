"""Bottleneck adapter configuration (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022 / AdaptFormer)."""

from __future__ import annotations

import dataclasses
import math

from ...core.config import AdapterConfig
from ...errors import ConfigError

STYLES = ("pfeiffer", "houlsby", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
DEFAULT_ACTIVATION = {"pfeiffer": "relu", "houlsby": "silu", "parallel": "relu"}


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """A small down-project → activation → up-project module inserted at each target module.

    ``style="pfeiffer"`` / ``"houlsby"``: sequential — the adapter reads the wrapped module's
    output and adds to it (``out + s·Up(act(Down(out)))``). The two differ in where they usually
    go (Pfeiffer: after each feed-forward output, e.g. BERT's ``r"layer\\.\\d+\\.output\\.dense"``;
    Houlsby: after the attention output too) and in the default activation (ReLU / SiLU).
    ``style="parallel"`` (He et al., AdaptFormer): beside the wrapped module — the adapter reads
    its *input* (``out + s·Up(act(Down(x)))``), e.g. around a whole feed-forward block.

    Linear modules (and blocks whose first/last layers are linear) get ``nn.Linear`` projections
    on the last dimension; convolutional modules and blocks (e.g. EfficientNet's MBConv) get
    1×1 convolutions on the channels.

    Attributes:
        reduction_factor: bottleneck width = adapter input width // reduction_factor.
        bottleneck: explicit bottleneck width (overrides ``reduction_factor``).
        activation: ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``; default by style.
        scaling: ``s``, the factor on the adapter's output.
        dropout: dropout on the bottleneck activations during training.
        init: ``"identity"`` (default: Down Kaiming-uniform, Up and biases zero, so a fresh
            adapter leaves the model unchanged) or ``"random"`` (Up random too; for tests).
        bias: projections with biases (default). The low-bit paper's AdaptFormer has none: biases
            stay fp32 in low-bit adapters, so without them a 1-bit adapter is ~32× smaller.
    """

    reduction_factor: float = 16.0
    bottleneck: int | None = None
    style: str = "pfeiffer"
    activation: str | None = None
    scaling: float = 1.0
    dropout: float = 0.0
    init: str = "identity"
    bias: bool = True

    def validate(self) -> None:
        if self.style not in STYLES:
            raise ConfigError(f"BottleneckConfig: style must be one of {STYLES}, got {self.style!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"BottleneckConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.bottleneck is not None and (not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool)
                                            or self.bottleneck < 1):
            raise ConfigError(f"BottleneckConfig: bottleneck must be a positive integer, got {self.bottleneck!r}")
        if not isinstance(self.reduction_factor, (int, float)) or not self.reduction_factor > 0:
            raise ConfigError(f"BottleneckConfig: reduction_factor must be > 0, got {self.reduction_factor!r}")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"BottleneckConfig: scaling must be a finite number, got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"BottleneckConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("identity", "random"):
            raise ConfigError(f"BottleneckConfig: init must be 'identity' or 'random', got {self.init!r}")

    @property
    def act(self) -> str:
        return self.activation or DEFAULT_ACTIVATION[self.style]

    def width_for(self, reads: int, module_name: str) -> int:
        """The bottleneck width for an adapter reading ``reads`` features; it must be narrower."""
        width = self.bottleneck if self.bottleneck is not None else int(reads // self.reduction_factor)
        if width < 1:
            raise ConfigError(f"BottleneckConfig: reduction_factor {self.reduction_factor:g} leaves no bottleneck "
                              f"for {module_name!r} ({reads} features)")
        if width > reads:
            raise ConfigError(f"BottleneckConfig: bottleneck {width} is larger than the {reads} features the adapter "
                              f"at {module_name!r} reads")
        return width
