"""The SHiRA layer: trainable values at fixed flat indices of one base weight."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ...errors import BaseModelMismatchError, CorruptFileError
from ...core import packed
from ...core.layers import DeltaLayer
from ...core.stamp import TensorStamp, stamp_matches
from . import masks
from ...io import sparse_indices as storage
from .kernels import SparseDelta, SparseLinear, csr_pattern

ROWCOL = "indices_rowcol"  # (2, nnz) rows/cols, as PEFT stores them


class ShiraLayer(DeltaLayer):
    """``ΔW`` = ``values`` scattered at ``indices`` (sorted flat positions in the ``out × in`` weight).

    ``values`` start at zero, so a fresh adapter is the base model; entries outside the mask are
    never touched, whatever the optimizer does, because they are not parameters at all.
    ``regenerable`` layers (rand/struct masks) are saved without their indices.
    """

    def __init__(self, adapter_name: str, shape: tuple[int, int], indices: Tensor, device: torch.device,
                 mask_rule: str, mask_seed: int, budget: int, struct_axis: str = "rows") -> None:
        super().__init__(adapter_name)
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.to(device=device, dtype=torch.int64))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=device))
        self.mask_rule, self.mask_seed, self.budget, self.struct_axis = mask_rule, mask_seed, budget, struct_axis
        self.regenerable = mask_rule in ("rand", "struct")

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def quantizable(self) -> list[str]:
        return ["values"]  # low-bit SHiRA: the values are one tensor per layer

    def stored_shape(self, name: str, tensors: Mapping[str, Tensor]) -> torch.Size:
        """A layer built for loading learns its entry count from the file's index tensors."""
        if name != "values" or self.values.numel():
            return super().stored_shape(name, tensors)
        if storage.HEADER in tensors:
            return torch.Size([int(tensors[storage.HEADER][0])])
        if ROWCOL in tensors:
            return torch.Size([tensors[ROWCOL].shape[-1]])
        if self.mask_rule == "struct":
            return torch.Size([self._regenerate(0, 0, "").numel()])
        return torch.Size([self.budget])  # a seeded rand mask has exactly its budget (checked by digest)

    # -- compute -----------------------------------------------------------------------------
    def _pattern(self) -> Tensor:
        """The mask as CSR, cached until the indices change (loading, in-place writes,
        ``indices.data = ...``) or move (``.to``)."""
        cached = getattr(self, "_csr", None)
        if cached is None or cached[0] is not self.indices or not stamp_matches(cached[1], self.indices):
            self._csr = (self.indices, TensorStamp(self.indices), csr_pattern(self.indices, self.shape))
        return self._csr[2]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_csr", None)  # a cache, and sparse CSR tensors cannot be deep-copied
        return state

    def forward_with_base(self, base: nn.Module, x: Tensor, scale: float) -> Tensor:
        return SparseLinear.apply(x, self.weight_of("values"), base.weight, base.bias, self.indices, scale, self._pattern(),
                                  self.workspace)

    def delta_output(self, x: Tensor, scale: float) -> Tensor:
        return SparseDelta.apply(x, self.weight_of("values"), self.indices, self.shape, scale, self._pattern())

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        flat = weight.view(-1)
        delta = self.weight_of("values").detach() * scale
        if weight.dtype == torch.float32:
            flat.index_add_(0, self.indices, delta)
        else:  # low precision: add in fp32, round once
            flat.index_copy_(0, self.indices, (flat.index_select(0, self.indices).float() + delta).to(weight.dtype))

    def support(self) -> Tensor:
        return self.indices

    def sparse_delta(self, scale: float) -> Tensor:
        return self.weight_of("values").detach() * scale

    # -- files -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = packed.saved(self, "values")  # low-bit and packed: the codes and μ, σ
        if self.regenerable:
            out[storage.SEED] = torch.tensor([self.mask_seed], dtype=torch.int64)
            out[storage.DIGEST] = storage.index_digest(self.indices)
        else:
            out.update(storage.pack(self.indices))
        return out

    def accepted_keys(self) -> set[str]:
        return {"values", storage.SEED, storage.DIGEST, storage.HEADER, storage.UNARY, storage.LOW, ROWCOL}

    def plain_tensors(self) -> dict[str, Tensor]:
        """Values and (2, nnz) int32 rows/cols, the layout PEFT uses."""
        rows, cols = self.indices // self.shape[1], self.indices % self.shape[1]
        return {"values": self.weight_of("values").detach(), ROWCOL: torch.stack([rows, cols]).to(torch.int32)}

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        values = tensors.get("values")
        if values is None or values.dim() != 1 or not values.is_floating_point() or values.numel() == 0:
            raise CorruptFileError(f"{where}: missing or malformed SHiRA values")
        numel = self.shape[0] * self.shape[1]
        keys = set(tensors) - {"values"}
        if keys == {storage.HEADER, storage.UNARY, storage.LOW}:
            indices, regenerable = storage.unpack(dict(tensors), numel, where), False
        elif keys == {storage.SEED, storage.DIGEST}:
            indices, regenerable = self._regenerate(int(tensors[storage.SEED][0]), values.numel(), where), True
            if not torch.equal(storage.index_digest(indices), tensors[storage.DIGEST].to(torch.uint8)):
                raise CorruptFileError(f"{where}: the regenerated {self.mask_rule} mask differs from the saved one")
            self.mask_seed = int(tensors[storage.SEED][0])
        elif keys == {ROWCOL}:
            pairs = tensors[ROWCOL]
            # PEFT writes float32 indices on Windows: exact below 2**24, so integral values are accepted
            integral = not pairs.is_floating_point() or bool((pairs == pairs.round()).all() and pairs.abs().max() < 2**24)
            if pairs.dim() != 2 or pairs.shape[0] != 2 or pairs.shape[1] != values.numel() or not integral:
                raise CorruptFileError(f"{where}: SHiRA indices must be (2, {values.numel()}) integers, got "
                                       f"{tuple(pairs.shape)} {pairs.dtype}")
            rows, cols = pairs.to(torch.int64)
            if rows.numel() and (rows.max() >= self.shape[0] or cols.max() >= self.shape[1] or min(rows.min(), cols.min()) < 0):
                raise BaseModelMismatchError(f"{where}: SHiRA indices fall outside the {self.shape} weight")
            flat = rows * self.shape[1] + cols
            order = flat.argsort()
            indices, values, regenerable = flat[order], values[order], False
        else:
            raise CorruptFileError(f"{where}: unexpected SHiRA tensors {sorted(keys)}")
        if indices.numel() != values.numel():
            raise CorruptFileError(f"{where}: {indices.numel()} indices for {values.numel()} values")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise CorruptFileError(f"{where}: SHiRA indices repeat")
        device = self.indices.device
        self.indices = indices.to(device)
        self.values = nn.Parameter(values.detach().to(device=device, dtype=torch.float32).clone())
        self.regenerable = regenerable

    def _regenerate(self, seed: int, count: int, where: str) -> Tensor:
        if self.mask_rule == "rand":
            return masks.rand(self.shape[0] * self.shape[1], count, seed)
        if self.mask_rule == "struct":
            return masks.struct(self.shape[0], self.shape[1], self.budget, self.struct_axis)
        raise CorruptFileError(f"{where}: a {self.mask_rule} mask cannot be regenerated; the file must hold its indices")

    def extra_repr(self) -> str:
        density = self.nnz / (self.shape[0] * self.shape[1])
        return f"adapter={self.adapter_name!r}, mask={self.mask_rule}, nnz={self.nnz} ({100 * density:.2f}%)"
