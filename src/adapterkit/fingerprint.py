"""Base-model fingerprints: which modules an adapter touches, their shapes and dtypes, and a hash
of their original weights, so an adapter is never silently applied to the wrong model.

The hash is computed over bf16-rounded weights, so the same checkpoint matches whether it is
held in fp32 or bf16. It is recomputed on every save and verified load (about 50 ms per
4096×4096 weight on one CPU core): no cache could notice a change made through ``.data``.
``ak.load(..., ignore_fingerprint=True)`` skips it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .layers import AdaptedModule
from .state import get_state
from .targeting import logical_modules

def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's values rounded to bf16, plus its shape."""
    h = hashlib.sha256(repr(tuple(tensor.shape)).encode())
    canonical = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    h.update(canonical.view(torch.int16).numpy())
    return h.hexdigest()


def _module_digest(model: nn.Module, path: str, module: nn.Module) -> str:
    """Digest of all of a module's own parameters; a fused weight counts as its original."""
    wrapper = get_state(model).wrappers.get(path)
    fused = isinstance(wrapper, AdaptedModule) and wrapper.fusion.is_fused
    h = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        if fused and name == "weight":
            param = wrapper.fusion.original(wrapper.weight)
        digest = tensor_digest(param)
        h.update(f"{name}:{digest};".encode())
    return h.hexdigest()


def _describe(module: nn.Module) -> dict[str, Any]:
    weight = getattr(module, "weight", None)
    info: dict[str, Any] = {"type": type(module).__name__}
    if isinstance(weight, Tensor):
        info["shape"] = list(weight.shape)
        info["dtype"] = str(weight.dtype).removeprefix("torch.")
    return info


def base_fingerprint(model: nn.Module, targets: Sequence[str], copies: Sequence[str] = ()) -> dict[str, Any]:
    """Fingerprint of the targeted base modules (copied modules are listed but not hashed:
    a freshly initialised head differs on every run)."""
    modules = dict(logical_modules(model))
    described: dict[str, Any] = {}
    total = hashlib.sha256()
    for path in sorted(targets):
        module = modules[path]
        described[path] = _describe(module)
        total.update(f"{path}={_module_digest(model, path, module)};".encode())
    return {
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "modules": described,
        "copied_modules": sorted(copies),
        "weights_sha256": total.hexdigest(),
    }
