"""Folding weight deltas into one base weight, and restoring it bit-for-bit.

Subtracting a dense delta again is not exact in floating point (``W + ΔW − ΔW ≠ W``), so exact
fusion keeps what restores the original and writes it back:

* a dense delta (LoRA): a copy of the whole original weight in host memory while fused —
  the memory cost is one extra copy of each fused weight; ``exact=False`` skips it and
  subtracts instead (drifts by rounding error each cycle);
* sparse deltas only (SHiRA, sparse masks): just the original values at the touched entries.

Switching between dense deltas is one pass that reads the saved original and writes
``original + ΔW_new`` (one fused GEMM-accumulate for LoRA) instead of restore-then-fuse.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from .errors import FusedStateError

if TYPE_CHECKING:
    from .layers import DeltaLayer

Scaled = tuple["DeltaLayer", float]


@dataclasses.dataclass(frozen=True)
class _SavedEntries:
    indices: Tensor
    values: Tensor


class WeightFusion:
    """The deltas fused into one weight and the undo information that restores it exactly."""

    def __init__(self) -> None:
        self.applied: tuple[Scaled, ...] = ()
        self.exact = True
        self._original: Tensor | None = None
        self._saved_entries: list[_SavedEntries] = []

    @property
    def is_fused(self) -> bool:
        return bool(self.applied)

    def set(self, weight: Tensor, deltas: Sequence[Scaled], exact: bool = True) -> None:
        """Make ``weight`` the original plus ``deltas``, replacing whatever is fused now."""
        deltas = tuple(deltas)
        with torch.no_grad():
            dense = [d for d in deltas if d[0].support() is None]
            if dense and exact and self._original is not None:
                first = dense[0]
                first[0].write_from(weight, self._original.to(weight.device, non_blocking=True), first[1])
                for layer, scale in deltas:
                    if layer is not first[0]:
                        layer.add_to_weight(weight, scale)
                self.applied = deltas
                return
            self.restore(weight)
            if not deltas:
                return
            self.exact = exact
            if exact and dense:
                self._original = weight.detach().to("cpu", copy=True)
            flat = weight.view(-1)
            for layer, scale in deltas:
                if exact and not dense:
                    indices = layer.support()
                    self._saved_entries.append(_SavedEntries(indices, flat.index_select(0, indices)))
                layer.add_to_weight(weight, scale)
            self.applied = deltas

    def restore(self, weight: Tensor) -> None:
        """Return ``weight`` to its original values and forget the fused deltas."""
        if not self.applied:
            return
        with torch.no_grad():
            if self._original is not None:
                weight.copy_(self._original)
            elif self.exact:
                flat = weight.view(-1)
                for saved in reversed(self._saved_entries):
                    flat.index_copy_(0, saved.indices, saved.values)
            else:
                for layer, scale in reversed(self.applied):
                    layer.add_to_weight(weight, -scale)
        self._original = None
        self._saved_entries = []
        self.applied = ()

    def original(self, weight: Tensor) -> Tensor:
        """The base weight as it was before fusion (bit-exact), without unfusing."""
        if not self.applied:
            return weight.detach()
        if self._original is not None:
            return self._original
        if not self.exact:
            raise FusedStateError("the original weight is unknown after fuse(exact=False); unfuse first")
        restored = weight.detach().clone()
        flat = restored.view(-1)
        for saved in reversed(self._saved_entries):
            flat.index_copy_(0, saved.indices, saved.values)
        return restored
