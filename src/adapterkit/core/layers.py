"""Adapter layers and the wrapper that hosts them inside a model.

Two kinds of adapter share one wrapper:

* :class:`DeltaLayer` — a weight delta ΔW (LoRA, DyLoRA, SHiRA, sparse masks). Unfused it adds
  ``ΔW x`` to the base output; fused it is folded into the base weight and removed exactly.
  A delta may change several tensors of its module (weight *and* bias, an embedding table, a
  LayerNorm's scale): :meth:`DeltaLayer.delta_tensors` names them and :meth:`DeltaLayer.part`
  gives the fusing interface for each.
* :class:`ModuleLayer` — an inserted module that transforms the base output (bottleneck
  adapters); it cannot be folded into weights.
* :class:`ModelLayer` — a model-level adapter, not tied to one module: it rewrites the model's
  inputs and/or outputs (prompt tokens, heads living beside the frozen model).

:class:`ModuleCopy` (PEFT's ``modules_to_save``) is a full trainable copy of a small module, such
as a classifier head, that replaces the base module while its adapter is active.

The hosts that run these layers inside a model live in :mod:`adapterkit.core.host`.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import BaseModelMismatchError, CorruptFileError
from . import packed
from .fusion import TensorDelta
from .quantization import CODES, STATS, Quantizer, check_packed, decode
from .workspace import Workspace


class AdapterLayer(nn.Module):
    """One adapter's state at one base module.

    Methods read their weights through :meth:`weight_of`, so any adapter can be low-bit: a
    quantised tensor is returned fake-quantised (:mod:`adapterkit.quantization`), or dequantised
    from its codes when the adapter is packed for inference (:mod:`adapterkit.core.packed`).
    """

    def __init__(self, adapter_name: str) -> None:
        super().__init__()
        self.adapter_name = adapter_name
        self.quantizers: dict[str, Quantizer] = {}
        self.workspace: Workspace | None = None  # the model's, set when the layer is hosted

    def scratch(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A reusable work buffer from the model's :class:`~adapterkit.core.workspace.Workspace`
        (a fresh tensor for a layer not inside a model)."""
        workspace = self.workspace
        if workspace is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return workspace.buffer(shape, dtype, device)

    def quantizable(self) -> list[str]:
        """Parameters that become low-bit with ``bits < 32``: every matrix (biases stay fp32)."""
        return [name for name, p in self.named_parameters() if p.dim() >= 2]

    def weight_of(self, name: str) -> Tensor:
        """Parameter ``name`` as the forward uses it (dequantised when the adapter is low-bit)."""
        quantizer = self.quantizers.get(name)
        if quantizer is None:
            return self.get_parameter(name)
        return packed.low_bit(*packed.split(self, name), quantizer)

    def stored_shape(self, name: str, tensors: Mapping[str, Tensor]) -> torch.Size:
        """The shape of parameter ``name`` as saved in ``tensors`` (whose value arrives as packed
        codes); by default the parameter's own. Layers sized by their file override this."""
        return self.get_parameter(name).shape

    def set_quantization(self, bits: int, method: str, init_zeros: bool = True) -> None:
        """Quantise :meth:`quantizable` at ``bits`` (32: full precision again). An all-zero matrix
        (e.g. LoRA's B) gets the paper's small truncated-normal init, or its codes would degenerate."""
        self.quantizers = {} if bits == 32 else {name: Quantizer(bits, method) for name in self.quantizable()}
        if init_zeros:
            with torch.no_grad():
                for name in self.quantizers:
                    param = self.get_parameter(name)
                    if not param.any():
                        nn.init.trunc_normal_(param, std=1e-3, a=-2e-3, b=2e-3)

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that are saved for this layer, by local key (packed low-bit tensors already
        in their file form, ``<name>.codes`` and ``<name>.quant_stats``)."""
        return packed.as_saved(self, {k: v.detach() for k, v in self.state_dict().items()}, list(self.quantizers))

    def accepted_keys(self) -> set[str]:
        """Local keys a saved file may hold for this layer (a method may accept several layouts)."""
        return set(self.tensors())

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        """Copy saved tensors in; every expected key must be present with the right shape.

        ``where`` names the file and module for error messages.
        """
        _check_and_copy(self.state_dict(), tensors, where)

    def load_packed(self, tensors: Mapping[str, Tensor], where: str) -> None:
        """Load saved tensors with the low-bit ones held packed (inference only). A layer that loads
        by copying its state dict takes the file's codes straight into its buffers: no dequantised
        value is ever made. A layer with its own :meth:`load_tensors` (sizes or orders set by the
        file) loads the dequantised values, packed again at once (one layer's worth, transiently)."""
        shapes = {k: self.stored_shape(k, tensors) for k in self.quantizers}
        if type(self).load_tensors is AdapterLayer.load_tensors:
            keys: dict[str, str] = {}
            for key, quantizer in self.quantizers.items():
                check_packed(tensors.get(f"{key}.{CODES}"), tensors.get(f"{key}.{STATS}"), shapes[key].numel(),
                             quantizer.bits, f"{where}: {key!r}")
                keys.update(packed.reserve(self, key, shapes[key], quantizer))
            self.load_tensors({keys.get(k, k): v for k, v in tensors.items()}, where)
            return
        values, codes = decode(tensors, self.quantizers, shapes, where)
        self.load_tensors(values, where)
        for key, q in codes.items():
            self.quantizers[key].remember(self.get_parameter(key), q)
        for key, quantizer in self.quantizers.items():
            packed.pack_tensor(self, key, quantizer)


class DeltaLayer(AdapterLayer):
    """An adapter that is a delta of base tensors: by default ΔW of the module's ``weight``.

    A single-weight delta implements :meth:`delta_output` and :meth:`add_to_weight` (and
    optionally the faster paths below). A delta over several tensors names them in
    :meth:`delta_tensors` and returns a :class:`~adapterkit.core.fusion.TensorDelta` for each
    from :meth:`part`; unfused, the module then runs on ``base + scale · Δ`` tensors
    (:meth:`TensorDelta.apply`), so no ``delta_output`` is needed.
    """

    def delta_tensors(self) -> tuple[str, ...]:
        """Names of the base module's parameters this delta changes."""
        return ("weight",)

    def part(self, tensor: str) -> TensorDelta:
        """The fusing interface for base tensor ``tensor`` (the layer itself for ``weight``)."""
        if tensor != "weight":
            raise KeyError(tensor)
        return self

    def output_delta(self) -> bool:
        """Whether the unfused forward adds :meth:`delta_output` to the base output (else it
        runs the module on adapted tensors)."""
        return self.delta_tensors() == ("weight",) and type(self).delta_output is not DeltaLayer.delta_output

    def delta_output(self, x: Tensor, scale: float) -> Tensor:
        """``scale · ΔW x`` computed without materialising ΔW (used when unfused)."""
        raise NotImplementedError

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        """``weight += scale · ΔW`` in place (computed in fp32, cast once)."""
        raise NotImplementedError

    def write_from(self, weight: Tensor, source: Tensor, scale: float) -> None:
        """``weight = source + scale · ΔW``; methods override this with a single fused kernel."""
        weight.copy_(source)
        self.add_to_weight(weight, scale)

    def support(self) -> Tensor | None:
        """Flat indices of the weight entries ΔW touches, or ``None`` when ΔW is dense."""
        return None

    def sparse_delta(self, scale: float) -> Tensor | None:
        """For sparse deltas: ``scale · ΔW`` at :meth:`support`, in fp32 (lets fusing write
        ``original + delta`` with one index copy instead of reading the weight again)."""
        return None

    def delta_weight(self, shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense ΔW (for analysis, e.g. :mod:`adapterkit.metrics`; never used in training)."""
        held = next(iter([*self.parameters(), *self.buffers()]))  # a packed adapter may have no parameters
        weight = torch.zeros(shape, dtype=dtype, device=held.device)
        self.add_to_weight(weight, 1.0)
        return weight

    def apply(self, base: Tensor, scale: float) -> Tensor:
        """``base + scale · ΔW`` with gradient to the adapter (the generic unfused path)."""
        return base + scale * self.dense_delta(base)

    def dense_delta(self, base: Tensor) -> Tensor:
        """ΔW as a dense tensor shaped like ``base``, differentiable; only needed by deltas that
        do not implement :meth:`delta_output`."""
        raise NotImplementedError

    def forward_with_base(self, base: nn.Module, x: Tensor, scale: float) -> Tensor:
        """``base(x) + scale · ΔW x`` in one step. Optional: a method overrides it when that is
        cheaper than the two parts (used when this is the only active delta of the module)."""
        return base(x) + self.delta_output(x, scale)


class ModuleLayer(AdapterLayer):
    """An inserted module: it changes the wrapped module's output and cannot be fused."""

    def adapt(self, inputs: Tensor, output: Tensor, scale: float) -> Tensor:
        """The new output, given the wrapped module's input and (possibly already adapted) output."""
        raise NotImplementedError


class ModelLayer(AdapterLayer):
    """A model-level adapter: runs around the whole model's forward instead of one module's.

    :meth:`before` may rewrite the call's arguments (e.g. prepend prompt embeddings and extend the
    attention mask and labels), :meth:`after` the output; both default to no change. A layer may
    also just hold new modules (a head beside the frozen model) that applications call.
    """

    def before(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], scale: float) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    def after(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, scale: float) -> Any:
        return output


class ModuleCopy(AdapterLayer):
    """A full trainable copy of the base module that replaces it while the adapter is active
    (kept in full precision, also in low-bit adapters)."""

    def quantizable(self) -> list[str]:
        return []

    def __init__(self, adapter_name: str, base: nn.Module) -> None:
        super().__init__(adapter_name)
        self.module = copy.deepcopy(base)
        self.module.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        _check_and_copy(self.module.state_dict(), tensors, where)


def _check_and_copy(own: Mapping[str, Tensor], tensors: Mapping[str, Tensor], where: str) -> None:
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CorruptFileError(f"{where}: missing tensors {missing}")
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise CorruptFileError(f"{where}: unexpected tensors {unexpected}")
    for key, target in own.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise BaseModelMismatchError(
                f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key])
