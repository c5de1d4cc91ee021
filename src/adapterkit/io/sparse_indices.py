"""Compact on-disk form of SHiRA indices.

* Masks that follow from the layer's shape and seed alone (``rand`` without ``avoid``, ``struct``)
  store no indices at all: the seed and a sha256 of the indices, checked when the mask is
  regenerated on load.
* Other masks store the sorted flat indices as gaps, Rice-coded in two bit streams: a unary
  stream of quotients and a fixed-width stream of remainders, with the width chosen per layer
  to minimise the size. About 7.5 bits per entry at 1.5% density (int32 row/col pairs, as
  PEFT stores them, take 64). Both streams decode without a sequential loop.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from ..errors import CorruptFileError

HEADER, UNARY, LOW = "index_header", "index_unary", "index_low"
SEED, DIGEST = "mask_seed", "index_sha256"


def index_digest(indices: Tensor) -> Tensor:
    """sha256 of the int64 indices, as a uint8 tensor of 32 bytes."""
    raw = hashlib.sha256(indices.cpu().to(torch.int64).numpy().tobytes()).digest()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def pack(indices: Tensor) -> dict[str, Tensor]:
    """Rice-code sorted unique flat indices."""
    idx = indices.cpu().numpy().astype(np.int64)
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0 because the indices strictly increase
    count = gaps.size
    widths = np.arange(0, 41)
    sizes = [int(count * w + (gaps >> w).sum() + count) for w in widths]
    width = int(widths[int(np.argmin(sizes))])
    quotients = gaps >> width
    unary_bits = int(quotients.sum()) + count
    unary = np.ones(unary_bits, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0  # each quotient: that many ones, then a zero
    low = gaps & ((1 << width) - 1)
    low_bits = ((low[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    return {
        HEADER: torch.tensor([count, width, unary_bits], dtype=torch.int64),
        UNARY: torch.from_numpy(np.packbits(unary)),
        LOW: torch.from_numpy(np.packbits(low_bits)),
    }


def unpack(tensors: dict[str, Tensor], numel: int, where: str) -> Tensor:
    """Inverse of :func:`pack`, validating everything a corrupt file could get wrong."""
    header = tensors[HEADER]
    if header.dtype != torch.int64 or header.shape != (3,):
        raise CorruptFileError(f"{where}: malformed {HEADER}")
    count, width, unary_bits = (int(v) for v in header)
    unary_bytes, low_bytes = tensors[UNARY], tensors[LOW]
    if not (0 <= width <= 40 and 0 < count <= numel and count <= unary_bits <= unary_bytes.numel() * 8
            and unary_bytes.dtype == low_bytes.dtype == torch.uint8 and count * width <= low_bytes.numel() * 8):
        raise CorruptFileError(f"{where}: index streams do not match their header")
    unary = np.unpackbits(unary_bytes.numpy())[:unary_bits]
    ends = np.flatnonzero(unary == 0)
    if ends.size != count:
        raise CorruptFileError(f"{where}: index stream holds {ends.size} entries, header says {count}")
    quotients = np.diff(ends, prepend=-1) - 1
    low = np.unpackbits(low_bytes.numpy())[: count * width].reshape(count, width).astype(np.int64)
    remainders = low @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64)) if width else np.zeros(count, np.int64)
    indices = np.cumsum((quotients.astype(np.int64) << width) + remainders + 1) - 1
    if indices[-1] >= numel:
        raise CorruptFileError(f"{where}: index {int(indices[-1])} is outside the weight ({numel} entries)")
    return torch.from_numpy(indices)
