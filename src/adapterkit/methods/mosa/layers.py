"""MoSA layers: a bottleneck adapter or a LoRA whose split projections are :class:`SplitWeight`s."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layers import AdapterLayer
from ...core.seeding import layer_seed
from ..bottleneck.layer import BottleneckLayer
from ..lora import LoRALayer
from .config import MoSAConfig
from .split import SplitWeight


class _Splits:
    """What both MoSA layers share: a per-layer seeded module choice for each split projection."""

    splits: dict[str, SplitWeight]
    generator: torch.Generator

    def _setup_splits(self, config: MoSAConfig, adapter_name: str, module_name: str,
                      matrices: Mapping[str, tuple[Tensor, Tensor | None]]) -> dict[str, SplitWeight]:
        legacy = config.update_unselected == "legacy"
        self.generator = torch.Generator().manual_seed(layer_seed(config.seed, adapter_name, module_name + "/choice"))
        return {which: SplitWeight(weight, bias, config.n_modules, layer_seed(config.seed, adapter_name, f"{module_name}/{which}"),
                                   legacy) for which, (weight, bias) in matrices.items()}

    def choose_modules(self) -> None:
        """Draw one module per split projection for the next forward passes (uniform, seeded)."""
        for split in self.split_modules():
            split.selected = int(torch.randint(split.n_modules, (1,), generator=self.generator))

    def split_modules(self) -> list[SplitWeight]:
        return [m for m in self.children() if isinstance(m, SplitWeight)]  # type: ignore[attr-defined]

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        AdapterLayer.load_tensors(self, tensors, where)  # type: ignore[arg-type]
        for split in self.split_modules():
            split.load_tensors_check(where)


class MoSABottleneckLayer(_Splits, BottleneckLayer):
    """A bottleneck adapter whose Down and/or Up are split into sparse modules."""

    def __init__(self, adapter_name: str, config: MoSAConfig, in_dim: int, out_dim: int, conv: bool,
                 module_name: str, device: Any = None) -> None:
        BottleneckLayer.__init__(self, adapter_name, config.base, in_dim, out_dim, conv, module_name, device)
        self.dims = (in_dim, out_dim)
        matrices = {w: (getattr(self, w).weight, getattr(self, w).bias) for w in config.split_names}
        for which, split in self._setup_splits(config, adapter_name, module_name, matrices).items():
            setattr(self, which, split)  # replaces the dense projection: one tensor's worth of values

    def _project(self, module: nn.Module, x: Tensor) -> Tensor:
        if isinstance(module, SplitWeight):
            weight, bias = module.current(self.training)
            return F.conv2d(x, weight, bias) if self.conv else F.linear(x, weight, bias)
        return super()._project(module, x)

    def merged_state(self) -> dict[str, Tensor]:
        """State dict of the plain bottleneck adapter this one merges into."""
        out = {}
        for which in ("down", "up"):
            module = getattr(self, which)
            weight, bias = module.merged() if isinstance(module, SplitWeight) else (module.weight, module.bias)
            out[f"{which}.weight"] = weight.detach()
            if bias is not None:
                out[f"{which}.bias"] = bias.detach()
        return out


class MoSALoRALayer(_Splits, LoRALayer):
    """A LoRA whose A ("down") and/or B ("up") are split into sparse modules ("MoSL")."""

    def __init__(self, adapter_name: str, base: nn.Module, config: MoSAConfig, module_name: str) -> None:
        lora = config.base
        LoRALayer.__init__(self, adapter_name, base, r=lora.rank_for(module_name), scaling=lora.scaling_for(module_name),
                           dropout=lora.dropout, init=lora.init)
        names = {"down": "lora_A", "up": "lora_B"}
        matrices = {names[w]: (getattr(self, names[w]), None) for w in config.split_names}
        for attribute, split in self._setup_splits(config, adapter_name, module_name, matrices).items():
            delattr(self, attribute)
            setattr(self, attribute, split)

    def factor(self, name: str, merged: bool = False) -> Tensor:
        matrix = getattr(self, name)
        if isinstance(matrix, SplitWeight):
            return (matrix.merged() if merged else matrix.current(self.training))[0]
        return matrix

    def factors(self, for_fusing: bool = False) -> tuple[Tensor, Tensor, float]:  # fusing uses the merged adapter
        return self.factor("lora_A", merged=for_fusing), self.factor("lora_B", merged=for_fusing), self.scaling

    def merged_state(self) -> dict[str, Tensor]:
        return {"lora_A": self.factor("lora_A", merged=True).detach(), "lora_B": self.factor("lora_B", merged=True).detach()}
