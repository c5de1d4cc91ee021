"""Folding weight deltas into one base weight, and restoring it bit-for-bit.

Subtracting a dense delta again is not exact in floating point (``W + ΔW − ΔW ≠ W``), so exact
fusion keeps what restores the original and writes it back:

* a dense delta (LoRA): a copy of the whole original weight in host memory. The memory cost
  is one extra copy of each fused weight; the buffer is kept after ``unfuse`` so the next fuse
  does not pay for a fresh allocation (``ak.unfuse(model, free_memory=True)`` or detaching
  frees it). ``exact=False`` never allocates it and subtracts instead (drifts by rounding error);
* sparse deltas only (SHiRA, sparse masks): just the original values at the touched entries.
  While the weight stays fused, the originals gathered for each sparse adapter are also kept
  (keyed by its index tensor), so switching back and forth between adapters writes from that
  cache instead of gathering from the weight again (a random-access gather costs as much as
  both scatters). The cache is dropped by ``restore`` (``ak.unfuse``), since the user may change
  base weights then, and whenever the weight is not the tensor we last wrote (other storage,
  dtype or device after ``param.data = ...`` / ``.to()``, or a newer version counter: see
  :class:`~adapterkit.core.stamp.TensorStamp`); it costs one value per entry of each adapter visited.

The saved originals follow the weight when the model is moved or converted while fused
(``model.double().float()``, ``.cuda().cpu()``): restoring casts them to the weight's device and dtype.

Switching between dense deltas is one pass that reads the saved original and writes
``original + ΔW_new`` (one fused GEMM-accumulate for LoRA) instead of restore-then-fuse.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import torch
from torch import Tensor

from ..errors import FusedStateError
from .stamp import TensorStamp, stamp_matches


class TensorDelta(Protocol):
    """What fusing needs from a delta of one base tensor (a :class:`~adapterkit.DeltaLayer` for
    its ``weight``, or one part of a delta over several tensors)."""

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        """``weight += scale · Δ`` in place."""

    def write_from(self, weight: Tensor, source: Tensor, scale: float) -> None:
        """``weight = source + scale · Δ``."""

    def support(self) -> Tensor | None:
        """Flat indices Δ touches, or ``None`` when dense."""

    def sparse_delta(self, scale: float) -> Tensor | None:
        """``scale · Δ`` at :meth:`support` in fp32, or ``None``."""

    def apply(self, base: Tensor, scale: float) -> Tensor:
        """``base + scale · Δ`` with gradient to the adapter (unfused forwards)."""


Scaled = tuple[TensorDelta, float]


@dataclasses.dataclass(frozen=True)
class _SavedEntries:
    indices: Tensor
    values: Tensor
    stamp: TensorStamp | None = None  # of ``indices`` when cached (an index tensor may be rewritten)

    def on(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Indices and values on ``flat``'s device, values in its dtype (the model may have moved)."""
        return self.indices.to(flat.device), self.values.to(device=flat.device, dtype=flat.dtype)


class WeightFusion:
    """The deltas fused into one weight and the undo information that restores it exactly."""

    def __init__(self) -> None:
        self.applied: tuple[Scaled, ...] = ()
        self.exact = True
        self._host_copy: Tensor | None = None  # reusable buffer for the dense original
        self._holds_original = False  # the buffer currently equals the original weight
        self._saved_entries: list[_SavedEntries] = []
        # id(indices) -> originals at those entries; each entry holds its index tensor, so the id
        # cannot be reused while the entry lives
        self._originals: dict[int, _SavedEntries] = {}
        self._weight: TensorStamp | None = None  # the weight as we left it, to notice writes by others

    @property
    def is_fused(self) -> bool:
        return bool(self.applied)

    def set(self, weight: Tensor, deltas: Sequence[Scaled], exact: bool = True) -> None:
        """Make ``weight`` the original plus ``deltas``, replacing whatever is fused now."""
        if not stamp_matches(self._weight, weight):  # replaced, moved or written by someone else
            self._originals.clear()
        with torch.no_grad():
            self._set(weight, tuple(deltas), exact)
        self._weight = TensorStamp(weight)

    def _set(self, weight: Tensor, deltas: tuple[Scaled, ...], exact: bool) -> None:
        dense = [d for d in deltas if d[0].support() is None]
        if dense and exact and self._holds_original:
            first, rest = dense[0], [d for d in deltas if d is not dense[0]]
            if self._host_copy.device == weight.device:
                first[0].write_from(weight, self._host_copy, first[1])
            else:  # accelerator: one pinned host-to-device copy, then accumulate in place
                weight.copy_(self._host_copy, non_blocking=True)
                rest.insert(0, first)
            for layer, scale in rest:
                layer.add_to_weight(weight, scale)
            self.applied = deltas
            return
        self._restore(weight)
        if not deltas:
            return
        self.exact = exact
        if exact and dense:
            self._save_original(weight)
        flat = weight.view(-1)
        for position, (layer, scale) in enumerate(deltas):
            if exact and not dense:
                indices = layer.support()
                # only the first delta sees the original weight; later ones may overlap it
                before = self._cached_originals(flat, indices) if position == 0 else flat.index_select(0, indices)
                self._saved_entries.append(_SavedEntries(indices, before))
                delta = layer.sparse_delta(scale)
                if delta is not None:  # one scatter per adapter (plus a gather on a cache miss)
                    flat.index_copy_(0, indices, (before.to(delta.dtype) + delta).to(flat.dtype))
                    continue
            layer.add_to_weight(weight, scale)
        self.applied = deltas

    def _cached_originals(self, flat: Tensor, indices: Tensor) -> Tensor:
        cached = self._originals.get(id(indices))
        if cached is None or cached.indices is not indices or not stamp_matches(cached.stamp, indices) \
                or cached.values.dtype != flat.dtype or cached.values.device != flat.device:
            cached = _SavedEntries(indices, flat.index_select(0, indices), TensorStamp(indices))
            self._originals[id(indices)] = cached
        return cached.values

    def restore(self, weight: Tensor) -> None:
        """Return ``weight`` to its original values and forget the fused deltas."""
        self._restore(weight)
        self._originals.clear()

    def _restore(self, weight: Tensor) -> None:
        if not self.applied:
            return
        with torch.no_grad():
            if self._holds_original:
                weight.copy_(self._host_copy)
            elif self.exact:
                flat = weight.view(-1)
                for saved in reversed(self._saved_entries):
                    flat.index_copy_(0, *saved.on(flat))
            else:
                for layer, scale in reversed(self.applied):
                    layer.add_to_weight(weight, -scale)
        self._holds_original = False
        self._saved_entries = []
        self.applied = ()

    def _save_original(self, weight: Tensor) -> None:
        buffer = self._host_copy
        if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
            buffer = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=weight.is_cuda)
            self._host_copy = buffer
        buffer.copy_(weight)
        self._holds_original = True

    def free_memory(self) -> None:
        """Drop the reusable host buffer (only when nothing is fused)."""
        if not self.applied:
            self._host_copy = None

    @property
    def host_bytes(self) -> int:
        """Host memory held for exact restoring."""
        buffer = 0 if self._host_copy is None else self._host_copy.numel() * self._host_copy.element_size()
        # the saved entries' index tensors are the adapters' own supports: only the values are extra
        saved = sum(s.values.numel() * s.values.element_size() for s in self._saved_entries)
        cached = sum(s.values.numel() * s.values.element_size() for s in self._originals.values()
                     if not any(s.values is e.values for e in self._saved_entries))
        return buffer + saved + cached

    def original(self, weight: Tensor) -> Tensor:
        """The base weight as it was before fusion (bit-exact), without unfusing."""
        if not self.applied:
            return weight.detach()
        if self._holds_original:
            return self._host_copy.to(device=weight.device, dtype=weight.dtype)
        if not self.exact:
            raise FusedStateError("the original weight is unknown after fuse(exact=False); unfuse first")
        restored = weight.detach().clone()
        flat = restored.view(-1)
        for saved in reversed(self._saved_entries):
            flat.index_copy_(0, *saved.on(flat))
        return restored
