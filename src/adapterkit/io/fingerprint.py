"""Base-model fingerprints: which modules an adapter touches, their shapes and dtypes, and hashes
of their original weights, so an adapter is never silently applied to the wrong model.

Two hashes are recorded, both over bf16-rounded values (the same checkpoint matches whether it
is held in fp32 or bf16):

* ``weights_sha256`` — every value of every targeted parameter (about 35 ms per 4096×4096
  weight on this project's 2-core CPU), verified by ``ak.load(..., verify="full")``;
* ``weights_sample_sha256`` — 4,096 values per parameter at fixed pseudo-random positions, plus
  the shapes; microseconds, verified by default. Any different checkpoint changes essentially
  every value, so a sample recognises it; a handful of hand-edited entries may need ``"full"``.

Nothing is cached: a cache could not see changes made through ``.data``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..core.host import AdaptedModule, ModelHost
from ..core.state import get_state
from ..core.targeting import logical_modules

SAMPLE_SIZE = 4096
_GOLDEN = 2654435761  # Knuth's multiplicative hash: spreads consecutive i over [0, n)


def _bf16_bytes(values: Tensor) -> Any:
    return values.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy()


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of all of a tensor's values rounded to bf16, plus its shape."""
    h = hashlib.sha256(repr(tuple(tensor.shape)).encode())
    h.update(_bf16_bytes(tensor))
    return h.hexdigest()


def sample_positions(numel: int, size: int = SAMPLE_SIZE) -> Tensor:
    """Fixed positions in ``[0, numel)``; the same for every run, platform and torch version."""
    if numel <= size:
        return torch.arange(numel)
    return (torch.arange(size, dtype=torch.int64) * _GOLDEN + 40503) % numel


def tensor_sample_digest(tensor: Tensor) -> str:
    """sha256 of the shape and of :data:`SAMPLE_SIZE` bf16-rounded values at fixed positions."""
    h = hashlib.sha256(repr(tuple(tensor.shape)).encode())
    flat = tensor.detach().reshape(-1)
    h.update(_bf16_bytes(flat[sample_positions(flat.numel()).to(flat.device)]))
    return h.hexdigest()


def _base_parameters(model: nn.Module, path: str, module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """A logical module's base parameters: adapters left out, fused weights as their originals."""
    wrapper = get_state(model).wrappers.get(path)
    for name, param in module.named_parameters(recurse=False):
        yield name, param if wrapper is None else wrapper.original(name)  # fused tensors as their originals
    for child_name, child in module.named_children():
        if isinstance(child, ModelHost):
            continue
        if isinstance(child, AdaptedModule):
            child = child.base_layer
        for name, param in _base_parameters(model, f"{path}.{child_name}", child):
            yield f"{child_name}.{name}", param


def _module_digest(model: nn.Module, path: str, module: nn.Module, digest: Callable[[Tensor], str]) -> str:
    h = hashlib.sha256()
    for name, param in sorted(_base_parameters(model, path, module), key=lambda item: item[0]):
        h.update(f"{name}:{digest(param)};".encode())
    return h.hexdigest()


def _describe(module: nn.Module) -> dict[str, Any]:
    weight = getattr(module, "weight", None)
    info: dict[str, Any] = {"type": type(module).__name__}
    if isinstance(weight, Tensor):
        info["shape"] = list(weight.shape)
        info["dtype"] = str(weight.dtype).removeprefix("torch.")
    return info


def weights_hash(model: nn.Module, targets: Sequence[str], full: bool) -> str:
    """The combined hash of the targeted modules' parameters (all values, or the fixed sample);
    ``""`` names the whole model (model-level adapters)."""
    modules = {"": model, **dict(logical_modules(model))}
    digest = tensor_digest if full else tensor_sample_digest
    total = hashlib.sha256()
    for path in sorted(targets):
        total.update(f"{path}={_module_digest(model, path, modules[path], digest)};".encode())
    return total.hexdigest()


def base_fingerprint(model: nn.Module, targets: Sequence[str], copies: Sequence[str] = ()) -> dict[str, Any]:
    """Fingerprint of the targeted base modules (copied modules are listed but not hashed:
    a freshly initialised head differs on every run)."""
    modules = {"": model, **dict(logical_modules(model))}
    return {
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "modules": {path: _describe(modules[path]) for path in sorted(targets)},
        "copied_modules": sorted(copies),
        "weights_sha256": weights_hash(model, targets, full=True),
        "weights_sample_sha256": weights_hash(model, targets, full=False),
    }
