"""The LoRA layer: ``y = W₀x + s · B A x`` with ``s = alpha / r`` (or ``alpha / √r`` for rsLoRA).

Unfused, the delta is computed as ``(x Aᵀ) Bᵀ`` — a dense ΔW is never built in the training
forward. Fused, ΔW is accumulated into the weight with one GEMM-accumulate (``addmm``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layers import DeltaLayer
from ...core.targeting import is_conv1d


def is_lora_target(module: nn.Module) -> bool:
    """Modules a LoRA-shaped delta can adapt: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


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
        self.transposed = is_conv1d(base)
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

    def factors(self, for_fusing: bool = False) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scaling)`` as the unfused forward uses them, or (``for_fusing``) as they are
        folded into the weight. Variants (DyLoRA's truncation, MoSA's merge) override only this."""
        return self.weight_of("lora_A"), self.weight_of("lora_B"), self.scaling

    def delta_output(self, x: Tensor, scale: float) -> Tensor:
        a, b, scaling = self.factors()
        h = self.dropout(x.to(a.dtype))
        if self.conv is not None:
            return (F.conv2d(F.conv2d(h, a, None, *self.conv), b) * (scaling * scale)).to(x.dtype)
        return (F.linear(F.linear(h, a), b) * (scaling * scale)).to(x.dtype)

    def row_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(A, B, scaling)`` when :meth:`delta_output` is exactly ``scaling · (x Aᵀ) Bᵀ`` (a linear
        layer, no active dropout), so :func:`adapterkit.per_row` may gather many adapters' rows
        into one batched matmul; ``None`` otherwise."""
        dropping = self.training and not isinstance(self.dropout, nn.Identity)
        if self.conv is not None or dropping or type(self).delta_output is not LoRALayer.delta_output:
            return None
        return self.factors()

    def _gemm_factors(self) -> tuple[Tensor, Tensor, float]:
        # ΔW = B @ A for an (out × in) weight; a Conv1D weight is (in × out), so ΔWᵀ = Aᵀ @ Bᵀ;
        # a conv weight (out × in × kh × kw) is updated through its (out × in·kh·kw) view.
        a, b, scaling = self.factors(for_fusing=True)
        a, b = a.detach(), b.detach()
        if self.transposed:
            return a.t(), b.t(), scaling
        if self.conv is not None:
            return b.flatten(1), a.flatten(1), scaling
        return b, a, scaling

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        self.write_from(weight, weight, scale)

    def write_from(self, weight: Tensor, source: Tensor, scale: float) -> None:
        left, right, scaling = self._gemm_factors()
        alpha = scaling * scale
        in_place = source is weight
        if weight.dim() > 2:  # conv: the same GEMM on the flattened views
            weight, source = weight.view(weight.shape[0], -1), source.reshape(source.shape[0], -1)
        wide = torch.promote_types(left.dtype, torch.float32)  # fp32, or fp64 after model.double()
        if weight.dtype == wide and weight.device == left.device:
            if in_place:
                weight.addmm_(left, right, alpha=alpha)
            elif source.device == weight.device and source.dtype == weight.dtype:
                torch.addmm(source, left, right, alpha=alpha, out=weight)  # one pass: original + ΔW
            else:
                weight.copy_(source)
                weight.addmm_(left, right, alpha=alpha)
            return
        acc = self.scratch(weight.shape, wide, left.device)  # low precision: accumulate wide, round once
        acc.copy_(source)
        acc.addmm_(left.to(wide), right.to(wide), alpha=alpha)
        weight.copy_(acc)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, r={self.rank}, scaling={self.scaling:g}"
