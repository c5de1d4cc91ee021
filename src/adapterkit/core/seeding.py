"""Seeds derived from a base seed and names, so every adapter and layer draws its own stream."""

from __future__ import annotations

import hashlib


def layer_seed(seed: int, adapter_name: str, module_name: str) -> int:
    """A seed of its own for every (base seed, adapter, module); ``module_name=""`` for one per adapter."""
    digest = hashlib.sha256(f"{seed}\0{adapter_name}\0{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
