"""Low-bit adapters (Jie, Wang & Deng, ICCV 2023, arXiv 2307.16867): 1/2/4/8-bit quantisation-aware
training of any adapter's weights and bit-packed storage.

Each quantised tensor is standardised by its own mean μ and standard deviation σ and mapped to
the nearest level of a fixed codebook (``gaussian_median``: the levels that are the medians of
their cells under N(0, 1) — ±0.6745 at 1 bit; or XNOR's ``sign_mean``: ``sign(W)·mean|W|``, 1 bit
only). The forward uses the dequantised weight ``σ·c[code] + μ``; the gradient is the
straight-through estimator's, with μ and σ inside autograd. Files store the codes packed
``8/b`` per byte, low bits first, plus μ and σ: ``numel·b/8 + 8`` bytes a tensor; for inference
a model may hold them the same way (:mod:`adapterkit.core.packed`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError, CorruptFileError
from .stamp import TensorStamp, stamp_matches

BITS = (1, 2, 4, 8, 32)
METHODS = ("gaussian_median", "sign_mean")
EPS = 1e-5  # only in the standardisation; dequantisation uses σ itself (so reloads are exact)
CODES, STATS = "codes", "quant_stats"


def check(bits: int, method: str) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise ConfigError(f"bits must be one of {BITS}, got {bits!r}")
    if method not in METHODS:
        raise ConfigError(f"quantization method must be one of {METHODS}, got {method!r}")
    if method == "sign_mean" and bits != 1:
        raise ConfigError(f"method 'sign_mean' is 1-bit only, got bits={bits}")


@functools.lru_cache(maxsize=None)
def codebook(bits: int) -> tuple[Tensor, Tensor]:
    """``(levels, thresholds)`` of the Gaussian-median codebook with ``2**bits`` levels: 500
    rounds of thresholds = midpoints of levels, levels = N(0, 1) medians of their cells."""
    n = 2 ** bits
    levels = torch.zeros(n, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    for _ in range(500):
        thresholds = (levels[:-1] + levels[1:]) / 2
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), normal.cdf(thresholds), torch.ones(1, dtype=torch.float64)])
        levels = normal.icdf((edges[:-1] + edges[1:]) / 2)
    return levels.float(), ((levels[:-1] + levels[1:]) / 2).float()


@dataclasses.dataclass
class Quantized:
    """One tensor's codes (one per element, int64) and its μ, σ."""

    codes: Tensor
    mu: Tensor
    sigma: Tensor


class Quantizer:
    """Fake quantisation of one adapter tensor, with the codes of the last dequantised value kept
    until the tensor changes (so a loaded adapter reproduces its saved weights bit for bit).

    The cache is keyed on the tensor's storage, layout, dtype, device and version
    (:class:`~adapterkit.core.stamp.TensorStamp`), so ``param.data = ...``, ``.to()`` and
    ``.cuda()`` are noticed. Codes given by :meth:`remember` (a loaded file) survive such moves
    and copies of the model as long as the tensor still holds exactly their dequantised values.
    """

    def __init__(self, bits: int, method: str = "gaussian_median") -> None:
        check(bits, method)
        self.bits, self.method = bits, method
        self._stamp: TensorStamp | None = None  # which latent tensor ``_codes`` belong to
        self._codes: Quantized | None = None
        self._remembered = False  # _codes came from a file, not from quantising the latent

    def quantize(self, latent: Tensor) -> Quantized:
        if self._codes is not None and (stamp_matches(self._stamp, latent) or self._still_remembered(latent)):
            return self._codes
        w = latent.detach().float()
        if self.method == "sign_mean":
            result = Quantized((w > 0).long().view(-1), torch.zeros((), device=w.device), w.abs().mean())
        else:
            mu, sigma = w.mean(), w.std() if w.numel() > 1 else torch.zeros((), device=w.device)
            levels, thresholds = codebook(self.bits)
            standard = (w - mu) / (sigma + EPS)
            result = Quantized(torch.bucketize(standard.view(-1), thresholds.to(w.device)), mu, sigma)
        self._keep(latent, result, remembered=False)
        return result

    def _still_remembered(self, latent: Tensor) -> bool:
        """Remembered codes stay valid for a moved or converted latent with the same values (a
        one-off comparison after the move; re-quantising them could give other codes)."""
        q = self._codes
        if not self._remembered or latent.numel() != q.codes.numel():
            return False
        values = latent.detach().float().view(-1)
        q = Quantized(q.codes.to(values.device), q.mu.to(values.device), q.sigma.to(values.device))
        if not torch.equal(self.dequantize(q, values.shape), values):
            return False
        self._keep(latent, q, remembered=True)
        return True

    def _keep(self, latent: Tensor, q: Quantized, remembered: bool) -> None:
        self._stamp, self._codes, self._remembered = TensorStamp(latent), q, remembered

    def levels(self, device: Any) -> Tensor:
        return levels(self.bits, self.method, device)

    def dequantize(self, q: Quantized, shape: torch.Size) -> Tensor:
        return dequantize(q, self.bits, self.method, shape)

    def __call__(self, latent: Tensor) -> Tensor:
        """The dequantised tensor (exact), with the straight-through gradient to ``latent``."""
        return _FakeQuantize.apply(latent, self)

    def remember(self, latent: Tensor, q: Quantized) -> None:
        """After loading: ``latent`` holds ``dequantize(q)``; keep using exactly ``q``."""
        self._keep(latent, q, remembered=True)

    def release(self) -> None:
        """Drop the cached codes (the tensor was packed: its codes live in the model's buffers)."""
        self._stamp, self._codes, self._remembered = None, None, False


def levels(bits: int, method: str, device: Any) -> Tensor:
    """The codebook's values: ``[-1, 1]`` for ``sign_mean``, the Gaussian medians otherwise."""
    return (torch.tensor([-1.0, 1.0]) if method == "sign_mean" else codebook(bits)[0]).to(device)


def dequantize(q: Quantized, bits: int, method: str, shape: torch.Size) -> Tensor:
    """``σ·c[code] + μ`` in fp32 (the one formula of the fake-quantised and the packed forward)."""
    return (q.sigma * levels(bits, method, q.codes.device)[q.codes] + q.mu).view(shape)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, latent: Tensor, quantizer: Quantizer) -> Tensor:
        q = quantizer.quantize(latent)
        ctx.save_for_backward(latent)
        ctx.quantizer, ctx.q = quantizer, q
        return quantizer.dequantize(q, latent.shape).to(latent.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (latent,) = ctx.saved_tensors
        quantizer, q = ctx.quantizer, ctx.q
        with torch.enable_grad():
            w = latent.detach().requires_grad_(True)
            if quantizer.method == "sign_mean":  # sign is the identity to the STE; the scale is live
                value = w.abs().mean() * (w + (torch.sign(w) - w).detach())
            else:
                mu, sigma = w.mean(), w.std() if w.numel() > 1 else torch.zeros((), device=w.device)
                standard = (w - mu) / (sigma + EPS)
                code_value = quantizer.levels(w.device)[q.codes].view(w.shape)
                value = sigma * (standard + (code_value - standard).detach()) + mu
            (result,) = torch.autograd.grad(value, w, grad)
        return result, None


# -- storage -----------------------------------------------------------------------------------
def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes → uint8, ``8/bits`` codes a byte, low bits first (the last byte zero-padded)."""
    per_byte = 8 // bits
    flat = codes.to(torch.uint8).view(-1).cpu()
    padded = torch.zeros(math.ceil(flat.numel() / per_byte) * per_byte, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    grouped = padded.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (grouped << shifts).sum(1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """The inverse of :func:`pack`: ``count`` int64 codes, on ``packed``'s device."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).view(-1, 1) >> shifts) & (2 ** bits - 1)
    return codes.view(-1)[:count].to(torch.int64)


def encode(tensors: Mapping[str, Tensor], quantizers: Mapping[str, Quantizer]) -> dict[str, Tensor]:
    """A layer's saved tensors with every quantised one replaced by ``<key>.codes`` (packed
    uint8) and ``<key>.quant_stats`` (float32 μ, σ)."""
    out = dict(tensors)
    for key, quantizer in quantizers.items():
        if quantizer.bits == 32 or key not in out:
            continue
        latent = out.pop(key)
        q = quantizer.quantize(latent)
        out[f"{key}.{CODES}"] = pack(q.codes, quantizer.bits)
        out[f"{key}.{STATS}"] = torch.stack([q.mu, q.sigma]).float().cpu()
    return out


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes one tensor takes in a file: packed codes plus μ and σ (``numel·bits/8 + 8``), or
    ``4·numel`` in full precision."""
    return 4 * numel if bits == 32 else math.ceil(numel * bits / 8) + 8


def stored_keys(keys: set[str], quantizers: Mapping[str, Quantizer]) -> set[str]:
    """The keys a file holds for a layer with these quantised tensors."""
    out = set(keys)
    for key, quantizer in quantizers.items():
        if quantizer.bits != 32 and key in out:
            out.discard(key)
            out.update({f"{key}.{CODES}", f"{key}.{STATS}"})
    return out


def decode(tensors: Mapping[str, Tensor], quantizers: Mapping[str, Quantizer], shapes: Mapping[str, torch.Size],
           where: str) -> tuple[dict[str, Tensor], dict[str, Quantized]]:
    """The inverse of :func:`encode`: dequantised tensors by key, and the codes to remember."""
    out, found = dict(tensors), {}
    for key, quantizer in quantizers.items():
        if quantizer.bits == 32 or f"{key}.{CODES}" not in out:
            continue
        packed, stats = out.pop(f"{key}.{CODES}"), out.pop(f"{key}.{STATS}", None)
        count = math.prod(shapes[key])
        check_packed(packed, stats, count, quantizer.bits, f"{where}: {key!r}")
        q = Quantized(unpack(packed, quantizer.bits, count), stats[0].float(), stats[1].float())
        out[key] = quantizer.dequantize(q, shapes[key])
        found[key] = q
    return out, found


def check_packed(packed: Tensor | None, stats: Tensor | None, count: int, bits: int, what: str) -> None:
    """Saved codes must be ``count`` packed ``bits``-bit codes (uint8) with a mean and a std."""
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(count * bits / 8) \
            or stats is None or stats.numel() != 2 or not stats.is_floating_point():
        raise CorruptFileError(f"{what} is not {count} packed {bits}-bit codes with mean and std")
