"""Packed low-bit tensors: the inference-only form that holds what the file holds, no more.

A low-bit tensor (:mod:`~adapterkit.core.quantization`) normally lives as its fp32 latent parameter
plus the int64 codes its quantizer caches: ``12·numel`` bytes. Packed, the parameter is gone and the
module that held it keeps two buffers instead:

* ``<name>_codes``: uint8, ``8/bits`` codes a byte, low bits first (the file's ``<name>.codes``);
* ``<name>_quant_stats``: μ and σ, a floating buffer in the latent's dtype that follows
  ``.to(dtype)`` like any buffer (exact in fp32/fp64; half precision rounds μ and σ) and is saved
  as float32 (the file's ``<name>.quant_stats``).

The attribute ``<name>`` becomes a :class:`PackedTensor` (shape, bits, method), so code that asks a
layer for a shape (``lora_A.shape``, ``values.numel()``) keeps working. The forward dequantises on
every use with :func:`~adapterkit.core.quantization.dequantize`, the fake-quantised forward's own
formula, so outputs are bit-identical to the unpacked adapter's; there is no cache, so the bytes held
are ``ceil(numel·bits/8)`` plus two floats a tensor. Buffers rather than a module per tensor: a module
costs about 2 KB of Python objects, more than the codes of a small adapter.

Everything here acts on one module; :mod:`adapterkit.core.packing` packs whole adapters.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .quantization import CODES, STATS, Quantized, Quantizer, dequantize, pack, unpack


@dataclasses.dataclass(frozen=True)
class PackedTensor:
    """Stands in for a packed low-bit parameter: its shape and how its codes decode. The codes
    and μ, σ are buffers of the module that holds this (see the module docstring)."""

    shape: torch.Size
    bits: int
    method: str

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)


def split(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(owner, leaf)`` for a dotted tensor name inside ``module`` (``"down.weight"``)."""
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def held(module: nn.Module, name: str) -> Tensor | PackedTensor:
    """Tensor ``name`` as ``module`` holds it: the latent parameter, or its :class:`PackedTensor`."""
    owner, leaf = split(module, name)
    return getattr(owner, leaf)


def is_packed(module: nn.Module, name: str) -> bool:
    return isinstance(held(module, name), PackedTensor)


def buffers(owner: nn.Module, leaf: str) -> tuple[Tensor, Tensor]:
    """The packed codes and μ, σ of ``owner.<leaf>``."""
    return owner.get_buffer(f"{leaf}_{CODES}"), owner.get_buffer(f"{leaf}_{STATS}")


def low_bit(owner: nn.Module, leaf: str, quantizer: Quantizer) -> Tensor:
    """Low-bit tensor ``owner.<leaf>`` as the forward uses it: the fake-quantised latent (with the
    straight-through gradient), or, packed, its codes dequantised (no gradient: not a parameter)."""
    spec = getattr(owner, leaf)
    if not isinstance(spec, PackedTensor):
        return quantizer(spec)
    codes, stats = buffers(owner, leaf)
    q = Quantized(unpack(codes, spec.bits, spec.numel()), stats[0].float(), stats[1].float())
    return dequantize(q, spec.bits, spec.method, spec.shape).to(stats.dtype)


def check_free(module: nn.Module, name: str) -> None:
    """The names of ``name``'s packed buffers must be free in its module."""
    owner, leaf = split(module, name)
    for suffix in (CODES, STATS):
        if not is_packed(module, name) and hasattr(owner, f"{leaf}_{suffix}"):
            raise ConfigError(f"{type(owner).__name__} already has an attribute {leaf}_{suffix}; {name!r} cannot be packed")


def _install(owner: nn.Module, leaf: str, spec: PackedTensor, codes: Tensor, stats: Tensor) -> None:
    delattr(owner, leaf)  # the latent parameter
    owner.register_buffer(f"{leaf}_{CODES}", codes)
    owner.register_buffer(f"{leaf}_{STATS}", stats)
    setattr(owner, leaf, spec)  # a plain attribute: not a parameter, buffer or module


def pack_tensor(module: nn.Module, name: str, quantizer: Quantizer) -> None:
    """Replace low-bit parameter ``name`` by its packed codes: exactly the codes the forward uses
    now (remembered from a file, or quantised from the latent). Its quantizer's cache is dropped."""
    owner, leaf = split(module, name)
    latent = getattr(owner, leaf)
    if isinstance(latent, PackedTensor):
        return
    zero = torch.zeros((), device=latent.device)  # an empty tensor (e.g. an SFT part without entries) has no μ, σ
    q = quantizer.quantize(latent) if latent.numel() else Quantized(torch.zeros(0, dtype=torch.int64), zero, zero)
    codes = pack(q.codes, quantizer.bits).to(latent.device)
    stats = torch.stack([q.mu, q.sigma]).float().to(device=latent.device, dtype=latent.dtype)
    _install(owner, leaf, PackedTensor(latent.shape, quantizer.bits, quantizer.method), codes, stats)
    quantizer.release()


def reserve(module: nn.Module, name: str, shape: torch.Size, quantizer: Quantizer) -> dict[str, str]:
    """Replace parameter ``name`` by zeroed packed buffers of ``shape`` (a layer built for loading,
    about to receive a file's codes); returns the file keys → state-dict keys of the two buffers."""
    check_free(module, name)
    owner, leaf = split(module, name)
    latent = getattr(owner, leaf)
    codes = torch.zeros(math.ceil(math.prod(shape) * quantizer.bits / 8), dtype=torch.uint8, device=latent.device)
    stats = torch.zeros(2, dtype=latent.dtype, device=latent.device)
    _install(owner, leaf, PackedTensor(torch.Size(shape), quantizer.bits, quantizer.method), codes, stats)
    return {f"{name}.{CODES}": f"{name}_{CODES}", f"{name}.{STATS}": f"{name}_{STATS}"}


def unpack_tensor(module: nn.Module, name: str, quantizer: Quantizer) -> None:
    """Make packed tensor ``name`` a latent parameter again, holding its dequantised values; the
    quantizer remembers the codes, so the forward is unchanged until training moves the latent."""
    owner, leaf = split(module, name)
    spec = getattr(owner, leaf)
    if not isinstance(spec, PackedTensor):
        return
    codes, stats = buffers(owner, leaf)
    q = Quantized(unpack(codes, spec.bits, spec.numel()), stats[0].float(), stats[1].float())
    value = dequantize(q, spec.bits, spec.method, spec.shape).to(stats.dtype)
    delattr(owner, f"{leaf}_{CODES}")
    delattr(owner, f"{leaf}_{STATS}")
    delattr(owner, leaf)
    setattr(owner, leaf, nn.Parameter(value))
    quantizer.remember(getattr(owner, leaf), q)


def saved(module: nn.Module, name: str) -> dict[str, Tensor]:
    """Tensor ``name`` as a file stores it before encoding: ``{name: latent}``, or for a packed
    tensor its codes and float32 μ, σ under the file's keys (``<name>.codes``, ``<name>.quant_stats``)."""
    owner, leaf = split(module, name)
    spec = getattr(owner, leaf)
    if not isinstance(spec, PackedTensor):
        return {name: spec.detach()}
    codes, stats = buffers(owner, leaf)
    return {f"{name}.{CODES}": codes.detach(), f"{name}.{STATS}": stats.detach().float()}


def as_saved(module: nn.Module, state: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """``module``'s state-dict tensors with the packed buffers of ``names`` under their file keys
    (:func:`saved`); the others unchanged."""
    out = dict(state)
    for name in names:
        if is_packed(module, name):
            for suffix in (CODES, STATS):
                del out[f"{name}_{suffix}"]
            out.update(saved(module, name))
    return out
