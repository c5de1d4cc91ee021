"""Packing whole low-bit adapters for inference (:func:`pack`) and back (:func:`unpack`).

A packed adapter holds its low-bit tensors as bit-packed codes plus μ and σ, the bytes its file holds
(:mod:`adapterkit.core.packed`), instead of an fp32 latent plus an int64 code per weight: ``bits/8``
bytes a weight instead of 12 (96× less at 1 bit, 12× at 8 bits). It runs, fuses, switches
and saves exactly like before packing; it cannot be trained: its low-bit tensors are buffers, not
parameters, and its other parameters (biases, ``modules_to_save`` copies) are frozen.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import ConfigError, UnsupportedError
from . import packed
from .layers import AdapterLayer
from .state import ModelState, active_records, get_state


def _layers(state: ModelState, name: str) -> list[AdapterLayer]:
    return [layer for _, layer in state.layers(name)]


def _low_bit_layers(layers: Sequence[AdapterLayer]) -> list[AdapterLayer]:
    """``layers`` and their sub-layers that hold low-bit tensors."""
    return [sub for layer in layers for sub in layer.modules() if isinstance(sub, AdapterLayer) and sub.quantizers]


def is_packed(model: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` is held packed (inference only)."""
    return layers_packed(_layers(get_state(model), name))


def layers_packed(layers: Sequence[AdapterLayer]) -> bool:
    """Whether any of ``layers`` holds a packed tensor."""
    return any(packed.is_packed(sub, key) for sub in _low_bit_layers(layers) for key in sub.quantizers)


def pack(model: nn.Module, name: str) -> None:
    """Hold low-bit adapter ``name`` packed, for inference: each quantised tensor becomes its
    bit-packed codes (``8/bits`` a byte) plus μ and σ, exactly the codes its forward uses now; the
    fp32 latents and cached int64 codes are released. Outputs, fusing, per-row batches and
    :func:`adapterkit.save` (the same file bytes) are unchanged; training is refused until
    :func:`unpack`. Packing a packed adapter changes nothing.

    In ``state_dict`` a packed tensor ``x`` appears as two buffers of its module, ``x_codes``
    (uint8) and ``x_quant_stats`` (μ, σ); :func:`adapterkit.save` writes them as the file keys
    ``x.codes`` and ``x.quant_stats``. ``ak.load(..., packed=True)`` loads a low-bit file straight
    into this form.
    """
    state = get_state(model)
    record = state.record(name)
    if record.config.bits == 32:
        raise ConfigError(f"adapter {name!r} is full precision: nothing to pack (ak.quantize it to 1, 2, 4 or 8 bits first)")
    layers = _layers(state, name)
    low_bit = _low_bit_layers(layers)
    for sub in low_bit:  # every check before the first change
        for key in sub.quantizers:
            packed.check_free(sub, key)
    for sub in low_bit:
        for key, quantizer in sub.quantizers.items():
            packed.pack_tensor(sub, key, quantizer)
    for layer in layers:
        layer.requires_grad_(False)


def unpack(model: nn.Module, name: str) -> None:
    """Make packed adapter ``name`` trainable again: its low-bit tensors become fp32 latent
    parameters holding their dequantised values (the forward is bit-identical; training then moves
    the latents as for any low-bit adapter) and all its parameters require gradients, as after
    :func:`adapterkit.load`. Unpacking an unpacked adapter changes nothing."""
    state = get_state(model)
    layers = _layers(state, name)
    if not layers_packed(layers):
        return
    for sub in _low_bit_layers(layers):
        for key, quantizer in sub.quantizers.items():
            packed.unpack_tensor(sub, key, quantizer)
    for layer in layers:
        layer.requires_grad_(True)


def refuse_training(model: nn.Module) -> None:
    """Training with packed adapters active: they stay frozen like the base model (another active
    adapter may train on top of them), but an :class:`UnsupportedError` is raised when one of them
    has a trainable parameter (someone set ``requires_grad``) or no other active adapter is trainable."""
    packed_names, trainable = [], []
    for state, record in active_records(model):
        layers = _layers(state, record.name)
        if layers_packed(layers):
            packed_names.append(record.name)
        if any(p.requires_grad for layer in layers for p in layer.parameters()):
            trainable.append(record.name)
    touched = [name for name in packed_names if name in trainable]
    if touched or (packed_names and not trainable):
        raise UnsupportedError(f"adapter(s) {touched or packed_names} are packed for inference: their low-bit tensors "
                               "are not parameters; ak.unpack(model, name) to train them")
