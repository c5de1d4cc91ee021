"""The SFT layer: a sparse diff over several parameters of one module (weight, bias, an embedding
table, a norm's scale), one :class:`~adapterkit.core.sparse.SparseTensorDelta` per parameter."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ...core import packed
from ...core.layers import DeltaLayer
from ...core.quantization import Quantizer
from ...core.sparse import SparseTensorDelta
from ...errors import BaseModelMismatchError, CorruptFileError
from ...io import sparse_indices as storage

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
              nn.LocalResponseNorm)
INT32_LIMIT = 2**31


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's norm types, or a class named ``*Norm`` (LlamaRMSNorm, T5LayerNorm, ...)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def eligible_tensors(module: nn.Module, tensors: str | Sequence[str], freeze_norms: bool) -> list[str]:
    """The module's own parameters an SFT may change (``tensors``: ``"all"`` or names)."""
    if freeze_norms and is_norm(module):
        return []
    return [name for name, _ in module.named_parameters(recurse=False) if tensors == "all" or name in tensors]


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest index type for flat positions in a tensor of ``numel`` entries: int32 below
    2**31 entries, int64 from there on (decoding in int32 would wrap around)."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


class SFTPart(SparseTensorDelta):
    """One parameter's diff; in a low-bit adapter its values pass through the layer's quantizer."""

    def __init__(self, shape: torch.Size | tuple[int, ...], indices: Tensor, device: torch.device | str | None = None,
                 values: Tensor | None = None) -> None:
        super().__init__(shape, indices, device)
        self.quantizer: Quantizer | None = None  # set by SFTLayer.set_quantization
        if values is not None:
            with torch.no_grad():
                self.values.copy_(values)

    def effective_values(self) -> Tensor:
        """The values the diff adds (fake-quantised when low-bit; gradient to the latent values)."""
        return self.values if self.quantizer is None else packed.low_bit(self, "values", self.quantizer)

    def sparse_delta(self, scale: float) -> Tensor:
        return self.effective_values().detach() * scale

    def apply(self, base: Tensor, scale: float) -> Tensor:
        flat = base.reshape(-1).float().index_add(0, self.indices, self.effective_values() * scale)
        return flat.view(base.shape).to(base.dtype)

    @property
    def nnz(self) -> int:
        return self.indices.numel()


def _key(tensor: str) -> str:
    return tensor  # direct parameters of a module never contain dots


class SFTLayer(DeltaLayer):
    """A sparse diff of the parameters ``tensor_names`` of one module.

    Every eligible parameter has a part, possibly empty, so the support can grow in place
    (:meth:`grow`, for iterative LT-SFT) and a layer built for loading accepts any of them. Only
    parts with entries are deltas (:meth:`delta_tensors`) and are saved. Entries outside the
    support are not parameters at all, so no optimizer, weight decay or clipping can move them.
    """

    def __init__(self, adapter_name: str, module: nn.Module, tensor_names: Sequence[str],
                 chosen: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(adapter_name)
        self.tensor_names = tuple(tensor_names)
        self.shapes = {t: module.get_parameter(t).shape for t in self.tensor_names}
        device = next(iter(module.parameters())).device
        empty = torch.zeros(0, dtype=torch.int64)
        self.parts = nn.ModuleDict({_key(t): SFTPart(self.shapes[t], (chosen or {}).get(t, empty), device)
                                    for t in self.tensor_names})
        self._bits: tuple[int, str] | None = None
        #: what the selection produced (shared by the adapter's layers; see SFTConfig.outcome)
        self.outcome: dict | None = None

    # -- the delta ---------------------------------------------------------------------------
    def delta_tensors(self) -> tuple[str, ...]:
        return tuple(t for t in self.tensor_names if self.parts[_key(t)].nnz)

    def part(self, tensor: str) -> SFTPart:
        if tensor not in self.tensor_names:
            raise KeyError(tensor)
        return self.parts[_key(tensor)]

    def output_delta(self) -> bool:
        return False  # always the tensor-delta path: the module runs on base + Δ tensors

    @property
    def nnz(self) -> int:
        return sum(p.nnz for p in self.parts.values())

    def support(self) -> Tensor | None:  # several tensors: the fusing interface lives on the parts
        return None

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        """``weight += scale · Δ`` of the module's ``weight`` only (``delta_weight`` for analysis such
        as :func:`adapterkit.metrics.orthogonality`; fusing goes through :meth:`part`)."""
        if "weight" in self.tensor_names:
            self.part("weight").add_to_weight(weight, scale)

    def supports(self) -> dict[str, Tensor]:
        """Flat indices of the chosen entries, by parameter name (only parameters with entries)."""
        return {t: self.part(t).indices for t in self.delta_tensors()}

    def grow(self, tensor: str, new: Tensor) -> None:
        """Add entries ``new`` (not in the support) to ``tensor``'s diff; trained values are kept and
        new entries start at zero. Optimizers holding the old values must be rebuilt."""
        old = self.part(tensor)
        merged, order = torch.cat([old.indices, new.to(old.indices.device, torch.int64)]).sort()
        if merged.numel() > 1 and bool((merged[1:] == merged[:-1]).any()):
            raise ValueError(f"grow: entries of {tensor!r} are already in the support")
        values = torch.cat([old.values.detach(), torch.zeros(new.numel(), device=old.values.device)])[order]
        self.parts[_key(tensor)] = SFTPart(old.shape, merged, merged.device, values)
        self._requantize()

    def l1(self) -> Tensor:
        """``Σ|values|`` over every part (latent values: the ones the optimizer moves)."""
        total = torch.zeros((), device=next(iter(self.parts.values())).values.device)
        for part in self.parts.values():
            total = total + part.values.abs().sum()
        return total

    # -- low-bit values ----------------------------------------------------------------------
    def quantizable(self) -> list[str]:
        return [f"parts.{key}.values" for key in self.parts]  # each parameter's values: one tensor

    def set_quantization(self, bits: int, method: str, init_zeros: bool = True) -> None:
        super().set_quantization(bits, method, init_zeros)
        self._bits = None if bits == 32 else (bits, method)
        self._link_quantizers()

    def _requantize(self) -> None:
        """New parts after growing or loading get quantizers; existing ones keep theirs."""
        if self._bits is not None:
            keys = self.quantizable()
            self.quantizers = {k: self.quantizers.get(k) or Quantizer(*self._bits) for k in keys}
        self._link_quantizers()

    def _link_quantizers(self) -> None:
        for key, part in self.parts.items():
            part.quantizer = self.quantizers.get(f"parts.{key}.values")

    def stored_shape(self, name: str, tensors: Mapping[str, Tensor]) -> torch.Size:
        """A layer built for loading learns each part's entry count from the file's index header."""
        key = name.removeprefix("parts.").removesuffix(".values")
        header = tensors.get(f"parts.{key}.{storage.HEADER}")
        if header is not None and header.numel() == 3:
            return torch.Size([int(header[0])])
        return super().stored_shape(name, tensors)

    # -- files -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for key, part in self.parts.items():
            if part.nnz:
                out.update(packed.saved(self, f"parts.{key}.values"))  # low-bit and packed: codes and μ, σ
                out.update({f"parts.{key}.{k}": v for k, v in storage.pack(part.indices).items()})
        return out

    def accepted_keys(self) -> set[str]:
        return {f"parts.{key}.{leaf}" for key in self.parts
                for leaf in ("values", storage.HEADER, storage.UNARY, storage.LOW)}

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        built = {}
        for key, part in self.parts.items():
            found = {leaf: tensors[f"parts.{key}.{leaf}"] for leaf in ("values", storage.HEADER, storage.UNARY, storage.LOW)
                     if f"parts.{key}.{leaf}" in tensors}
            if not found:
                continue
            if len(found) != 4:
                raise CorruptFileError(f"{where}: the diff of {key!r} needs values and packed indices, got {sorted(found)}")
            values = found.pop("values")
            numel = part.shape.numel()
            indices = storage.unpack(found, numel, f"{where} [{key}]")
            if values.dim() != 1 or not values.is_floating_point() or values.numel() != indices.numel():
                raise CorruptFileError(f"{where}: {values.numel()} values for the {indices.numel()} entries of {key!r}")
            built[key] = SFTPart(part.shape, indices, part.indices.device, values.float())
        for key, part in built.items():
            self.parts[key] = part
        self._requantize()

    def load_support(self, tensor: str, indices: Tensor, values: Tensor, where: str) -> None:
        """Replace ``tensor``'s diff by ``values`` at sorted unique flat ``indices`` (foreign files)."""
        part = self.part(tensor)
        numel = part.shape.numel()
        if indices.numel() != values.numel():
            raise CorruptFileError(f"{where}: {indices.numel()} indices for {values.numel()} values")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise BaseModelMismatchError(f"{where}: entries fall outside the {tuple(part.shape)} parameter {tensor!r}")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise CorruptFileError(f"{where}: indices must be sorted and unique")
        self.parts[_key(tensor)] = SFTPart(part.shape, indices, part.indices.device, values.float())
        self._requantize()

    def extra_repr(self) -> str:
        counts = ", ".join(f"{t}={self.part(t).nnz}" for t in self.delta_tensors()) or "empty"
        return f"adapter={self.adapter_name!r}, nnz: {counts}"
