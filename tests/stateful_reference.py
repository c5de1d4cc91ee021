"""The independent reference of tests/test_stateful.py: what each adapter must compute, written out
by hand from its parameters in float64 (``W + s·B@A``, values scattered at indices, the bottleneck's
formula, the low-bit fake quantisation), and the whole MLP's output for an active set."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

import adapterkit as ak
from adapterkit.core.quantization import codebook

Weighted = tuple[tuple[str, float], ...]

QUANTISED = {"lora": ("lora_A", "lora_B"), "dylora": ("lora_A", "lora_B"), "shira": ("values",),
             "bottleneck": ("down.weight", "up.weight")}  # the documented rule: matrices (SHiRA: its values)
ACTIVATIONS = {"relu": lambda t: t.clamp_min(0), "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
               "silu": lambda t: t * torch.sigmoid(t), "tanh": torch.tanh}


def dequantised(latent: Tensor, bits: int, method: str) -> Tensor:
    """The low-bit paper's fake quantisation, written out: standardise, nearest codebook level, scale back."""
    if bits == 32:
        return latent.double()
    if method == "sign_mean":
        return torch.where(latent > 0, 1.0, -1.0).double() * latent.abs().mean().double()
    levels = codebook(bits)[0]
    mu, sigma = latent.mean(), latent.std()
    codes = ((latent - mu) / (sigma + 1e-5)).unsqueeze(-1).sub(levels).abs().argmin(-1)
    return sigma.double() * levels.double()[codes] + mu.double()


@dataclasses.dataclass
class Spec:
    """The machine's model of one adapter."""

    kind: str
    config: ak.AdapterConfig
    latent: dict[str, dict[str, Tensor]]  # module -> parameter -> stored fp32 value
    indices: dict[str, Tensor]  # SHiRA: module -> flat positions
    rank: int = 0  # DyLoRA's inference rank
    codes_kept: bool = False  # loaded low-bit: the forward uses the saved (dequantised) values as they are

    def effective(self, path: str, param: str) -> Tensor:
        """A parameter as the forward must use it, in float64."""
        value = self.latent[path][param]
        if param not in QUANTISED[self.kind] or self.codes_kept:
            return value.double()
        return dequantised(value, self.config.bits, self.config.quantization)

    def delta(self, path: str, shape: torch.Size) -> Tensor:
        """Dense ΔW (out × in) of a weight-delta adapter, by hand."""
        c = self.config
        if self.kind == "shira":
            flat = torch.zeros(shape.numel(), dtype=torch.float64)
            flat[self.indices[path]] = self.effective(path, "values")
            return flat.view(shape)
        a, b = self.effective(path, "lora_A"), self.effective(path, "lora_B")
        if self.kind == "dylora":
            return c.alpha / self.rank * b[:, : self.rank] @ a[: self.rank]
        r = a.shape[0]
        return c.alpha / (math.sqrt(r) if c.use_rslora else r) * b @ a

    def adapt(self, path: str, x: Tensor, out: Tensor, weight: float) -> Tensor:
        """A bottleneck adapter's output ``out + w·s·Up(act(Down(h)))``, h = out (sequential) or x (parallel)."""
        c, get = self.config, lambda p: self.effective(path, p)
        h = x if c.style == "parallel" else out
        hidden = ACTIVATIONS[c.activation](h @ get("down.weight").T + get("down.bias"))
        return out + weight * c.scaling * (hidden @ get("up.weight").T + get("up.bias"))


def reference_output(x: Tensor, layers: dict[str, tuple[Tensor, Tensor]], specs: dict[str, Spec], active: Weighted) -> Tensor:
    """The MLP (Linear layers ``layers`` = path -> (weight, bias), ReLU between them) with the active
    adapters: weighted deltas added to each weight, inserted modules applied in activation order
    (each reads the previous one's output)."""
    h = x.double()
    for i, (path, (weight, bias)) in enumerate(layers.items()):
        weight = weight.double()
        for name, w in active:
            if specs[name].kind != "bottleneck" and path in specs[name].config.target_modules:
                weight = weight + w * specs[name].delta(path, weight.shape)
        out = h @ weight.T + bias.double()
        for name, w in active:
            if specs[name].kind == "bottleneck" and path in specs[name].config.target_modules:
                out = specs[name].adapt(path, h, out, w)
        h = out.clamp_min(0) if i < len(layers) - 1 else out
    return h
