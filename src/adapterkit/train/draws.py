"""The per-step random generators of adapters (DyLoRA's rank sampler, MoSA's module choice).

They are plain ``torch.Generator`` attributes of adapter layers, seeded per layer, so they are
not in any state dict: a checkpoint stores their states here (``adapterkit_draws.safetensors``)
to resume with the draws an uninterrupted run would make, and data-parallel ranks compare a
digest of them to prove they drew alike. Found generically: any method that keeps its per-step
randomness in such a generator is covered without naming it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..core.state import adapted_states
from ..errors import CorruptFileError
from ..io.safefiles import read_tensors, write_tensors

DRAWS_FILE = "adapterkit_draws.safetensors"


def generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held by a layer (or a module inside it) of every attached adapter,
    keyed ``"<adapter>/<module path>/<sub-module>.<attribute>"``."""
    found: dict[str, torch.Generator] = {}
    for state in adapted_states(model):
        for name in state.adapters:
            for path, layer in state.layers(name):
                for sub, module in layer.named_modules():
                    for attribute, value in vars(module).items():
                        if isinstance(value, torch.Generator):
                            found[f"{name}/{path}/{sub}.{attribute}"] = value
    return found


def generator_states(model: nn.Module) -> dict[str, Tensor]:
    """The states of :func:`generators` (uint8 tensors), by the same keys."""
    return {key: g.get_state() for key, g in generators(model).items()}


def check_generator_states(model: nn.Module, states: Mapping[str, Tensor], where: str = "saved draws") -> None:
    """Every key must name a generator of ``model`` and every value be a state of one."""
    found = generators(model)
    unknown = sorted(set(states) - set(found))
    if unknown:
        raise CorruptFileError(f"{where}: generator states for {unknown[:3]} that this model has no generator for")
    bad = [k for k, v in states.items() if v.dtype != torch.uint8 or v.dim() != 1
           or v.numel() != found[k].get_state().numel()]
    if bad:
        raise CorruptFileError(f"{where}: generator states {bad[:3]} are not states of a torch.Generator")


def restore_generator_states(model: nn.Module, states: Mapping[str, Tensor], where: str = "saved draws") -> None:
    """Put saved states back (all checked before any is set)."""
    check_generator_states(model, states, where)
    found = generators(model)
    for key, value in states.items():
        found[key].set_state(value.clone())


def save_draws(model: nn.Module, directory: str | Path) -> Path | None:
    """Write :func:`generator_states` to ``directory/DRAWS_FILE`` (nothing when there are none)."""
    states = generator_states(model)
    if not states:
        return None
    path = Path(directory) / DRAWS_FILE
    write_tensors(path, states)
    return path


def read_draws(model: nn.Module, directory: str | Path) -> dict[str, Tensor]:
    """The generator states :func:`save_draws` wrote in ``directory``, checked against ``model``'s
    generators but not yet set (``{}`` when it holds none): restore them with
    :func:`restore_generator_states` once everything else of a checkpoint has loaded."""
    path = Path(directory) / DRAWS_FILE
    if not path.is_file():
        return {}
    states = read_tensors(path)
    check_generator_states(model, states, str(path))
    return states


def digest(chunks: Iterable[bytes]) -> int:
    """A 56-bit digest of byte chunks (a non-negative int64)."""
    h = hashlib.blake2b(digest_size=7)
    for chunk in chunks:
        h.update(chunk)
    return int.from_bytes(h.digest(), "little")


def fingerprint(model: nn.Module) -> int:
    """A digest of every generator's key and state: equal on two processes exactly when they
    hold the same generators and have drawn the same sequences from the same seeds."""
    return digest(part for key, state in sorted(generator_states(model).items())
                  for part in (key.encode(), state.numpy().tobytes()))
