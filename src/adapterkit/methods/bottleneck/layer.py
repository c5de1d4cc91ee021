"""The bottleneck module and how it attaches to a wrapped module's input and output."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import TargetError
from ...core.layers import ModuleLayer
from ...core.snapshot import ModelSnapshot
from .config import BottleneckConfig

ACTIVATION_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def feature_dims(module: nn.Module, module_name: str) -> tuple[int, int, bool]:
    """``(input features, output features, convolutional)`` of a module or a block: its own
    ``in/out_features`` or ``in/out_channels``, else those of its first and last linear/conv layer."""
    own = linear_or_conv(module)
    if own is not None:
        return own
    inner = [m for m in module.modules() if linear_or_conv(m) is not None]
    if not inner:
        raise TargetError(f"module {module_name!r} ({type(module).__name__}) has no linear or convolutional layer "
                          "to infer the adapter's width from")
    first, last = linear_or_conv(inner[0]), linear_or_conv(inner[-1])
    return first[0], last[1], last[2]


def can_wrap(module: nn.Module) -> bool:
    """A linear or conv layer, or a block containing one (its width can be inferred)."""
    return any(linear_or_conv(m) is not None for m in module.modules())


def linear_or_conv(module: nn.Module) -> tuple[int, int, bool] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels, True
    return None


def projection(conv: bool, in_dim: int, out_dim: int, device: Any, bias: bool = True) -> nn.Module:
    """A linear map on the last dimension, or a 1×1 convolution on the channels; fp32."""
    if conv:
        return nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=bias, device=device, dtype=torch.float32)
    return nn.Linear(in_dim, out_dim, bias=bias, device=device, dtype=torch.float32)


def init_projections(down: nn.Module, up: nn.Module, init: str) -> None:
    with torch.no_grad():
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(up.weight, std=0.02)
        else:
            nn.init.zeros_(up.weight)  # Up = 0: a fresh adapter is an identity
        for bias in (down.bias, up.bias):
            if bias is not None:
                nn.init.zeros_(bias)


def split_output(output: Any) -> tuple[Tensor, tuple]:
    """Blocks may return tuples (hidden states first); the adapter changes the hidden states."""
    if isinstance(output, tuple):
        return output[0], output[1:]
    return output, ()


def join_output(hidden: Tensor, rest: tuple) -> Any:
    return (hidden, *rest) if rest else hidden


class BottleneckLayer(ModuleLayer):
    """``s · Up(dropout(act(Down(h))))`` added to the wrapped module's output; ``h`` is that
    output (sequential styles) or the module's input (parallel)."""

    def __init__(self, adapter_name: str, config: BottleneckConfig, in_dim: int, out_dim: int, conv: bool,
                 module_name: str, device: Any = None) -> None:
        super().__init__(adapter_name)
        self.parallel = config.style == "parallel"
        reads = in_dim if self.parallel else out_dim
        width = config.width_for(reads, module_name)
        self.down = projection(conv, reads, width, device, config.bias)
        self.up = projection(conv, width, out_dim, device, config.bias)
        init_projections(self.down, self.up, config.init)
        self.conv = conv
        self.activation = config.act
        self.scaling = float(config.scaling)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _project(self, module: nn.Module, x: Tensor) -> Tensor:
        name = "down" if module is self.down else "up"
        weight = self.weight_of(f"{name}.weight")  # low-bit adapters: the dequantised weight
        return F.conv2d(x, weight, module.bias) if self.conv else F.linear(x, weight, module.bias)

    def bottleneck_output(self, source: Tensor) -> Tensor:
        """``Up(dropout(act(Down(source))))`` in fp32."""
        hidden = ACTIVATION_FUNCTIONS[self.activation](self._project(self.down, source.to(torch.float32)))
        return self._project(self.up, self.dropout(hidden))

    def adapt(self, inputs: Tensor, output: Any, scale: float) -> Any:
        hidden, rest = split_output(output)
        delta = self.bottleneck_output(inputs if self.parallel else hidden)
        if delta.shape != hidden.shape:  # e.g. a parallel adapter beside a strided or reshaping block
            raise TargetError(f"adapter {self.adapter_name!r}: its output {tuple(delta.shape)} does not match the wrapped "
                              f"module's output {tuple(hidden.shape)}; use a sequential style (pfeiffer/houlsby) here")
        return join_output(hidden + (delta * (self.scaling * scale)).to(hidden.dtype), rest)

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"adapter={self.adapter_name!r}, {kind}, activation={self.activation}, scaling={self.scaling:g}"


PROBE_SIZE = 16  # height and width of the probe image for convolutional modules


def check_fits(layer: BottleneckLayer, module: nn.Module, module_name: str) -> None:
    """Refuse at attach an adapter whose output cannot be added to ``module``'s (a parallel adapter
    beside a strided or reshaping block, a sequential one after a block of another width).

    Probes with one forward of the module and the adapter on a tiny zero input, in eval mode
    without gradients and random draws; the module's structure, hooks and modes are restored. A
    module that cannot run on its input alone (it needs further arguments) is not probed: the
    forward then reports a mismatch.
    """
    in_dim, _, conv = feature_dims(module, module_name)
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype, device = (torch.float32, None) if param is None else (param.dtype, param.device)
    shape = (1, in_dim, PROBE_SIZE, PROBE_SIZE) if conv else (1, 2, in_dim)
    probe = torch.zeros(shape, dtype=dtype, device=device)
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    modes = [(m, m.training) for m in layer.modules()]
    try:
        with ModelSnapshot(module, values=False), torch.no_grad(), torch.random.fork_rng(devices=cuda):
            module.eval()
            layer.eval()
            try:
                output = module(probe)
            except Exception:  # noqa: BLE001 - the module needs more than one input: not probed
                return
            hidden, _ = split_output(output)
            if not isinstance(hidden, Tensor):
                raise TargetError(f"module {module_name!r} ({type(module).__name__}) returns {type(hidden).__name__}, "
                                  "not a tensor (or a tuple starting with one) that an adapter can add to")
            try:
                layer.adapt(probe, output, 1.0)
            except TargetError as error:
                raise TargetError(f"module {module_name!r} ({type(module).__name__}): {error}") from None
            except RuntimeError as error:
                raise TargetError(f"module {module_name!r} ({type(module).__name__}): the adapter does not fit its "
                                  f"output {tuple(hidden.shape)} for input {shape}: {error}") from None
    finally:
        for submodule, mode in modes:
            submodule.training = mode
