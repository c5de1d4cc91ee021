"""A sparse delta of one base tensor of any shape: trainable values at fixed flat indices.

The building block for sparse fine-tunings (a diff over a module's weight, bias, embedding
table or LayerNorm scale): a :class:`~adapterkit.DeltaLayer` over several tensors keeps one
:class:`SparseTensorDelta` per tensor and returns it from ``part``. It implements the fusing
interface (:class:`~adapterkit.core.fusion.TensorDelta`), so fusing writes ``original + Δ`` at
the touched entries only and restores exactly those entries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SparseTensorDelta(nn.Module):
    """``Δ`` with ``values`` (fp32, trainable) at sorted unique flat ``indices`` of a tensor of ``shape``."""

    def __init__(self, shape: torch.Size | tuple[int, ...], indices: Tensor, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        indices = indices.to(device=device, dtype=torch.int64).reshape(-1)
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=indices.device))

    def support(self) -> Tensor:
        return self.indices

    def sparse_delta(self, scale: float) -> Tensor:
        return self.values.detach() * scale

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        flat = weight.view(-1)
        flat.index_copy_(0, self.indices, (flat.index_select(0, self.indices).float() + self.sparse_delta(scale)).to(weight.dtype))

    def write_from(self, weight: Tensor, source: Tensor, scale: float) -> None:
        weight.copy_(source)
        self.add_to_weight(weight, scale)

    def apply(self, base: Tensor, scale: float) -> Tensor:
        """``base + scale · Δ`` with gradient to :attr:`values` (computed in fp32, cast once)."""
        flat = base.reshape(-1).float().index_add(0, self.indices, self.values * scale)
        return flat.view(base.shape).to(base.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, nnz={self.indices.numel()}"
