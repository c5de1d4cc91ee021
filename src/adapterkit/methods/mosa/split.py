"""One weight matrix used as N disjoint sparse modules, in one tensor's worth of memory."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...core.stamp import TensorStamp, stamp_matches
from ...errors import CorruptFileError


def partition(numel: int, n: int, seed: int) -> Tensor:
    """int8 module id per element: a seeded uniform score's rank mapped to N equal bins
    (sizes ⌊numel/N⌋ or +1), so the N masks are disjoint and cover every element."""
    score = torch.rand(numel, generator=torch.Generator().manual_seed(seed))
    ranks = torch.empty(numel, dtype=torch.int64)
    ranks[score.argsort()] = torch.arange(numel)
    return (ranks * n // numel).to(torch.int8)


class SplitWeight(nn.Module):
    """``W_k = W₀ + M_k ⊙ Δ`` for modules k = 0 … N−1, and the merge ``W₀ + Δ / N``.

    ``initial`` is the frozen W₀ (zero for a zero-initialised Up; the shared init for Down);
    Δ is stored as N trainable vectors, ``values[k]`` holding module k's entries, so a module not
    used in a step gets no gradient at all (``legacy=False``), or an exact zero one
    (``legacy=True``). With a bias, each module has its own full bias vector, averaged at merge
    (as the reference, which keeps N full module copies).
    """

    def __init__(self, initial: Tensor, bias: Tensor | None, n_modules: int, seed: int, legacy: bool) -> None:
        super().__init__()
        self.n_modules, self.legacy = n_modules, legacy
        self.register_buffer("initial", initial.detach().to(torch.float32).clone())
        self.register_buffer("part", partition(initial.numel(), n_modules, seed).view(initial.shape))
        self._indices: tuple[TensorStamp, list[Tensor]] | None = None
        self.values = nn.ParameterList(
            nn.Parameter(torch.zeros(len(i), device=initial.device)) for i in self.indices)
        self.biases = None if bias is None else nn.ParameterList(
            nn.Parameter(bias.detach().to(torch.float32).clone()) for _ in range(n_modules))
        self.selected = 0

    @property
    def indices(self) -> list[Tensor]:
        """Flat positions of each module's entries, derived from ``part`` and rebuilt whenever
        ``part`` is another tensor, was written, or moved (``.to()``, ``.cuda()``, loading)."""
        cached = self._indices
        if cached is None or not stamp_matches(cached[0], self.part):
            flat = self.part.view(-1)
            cached = self._indices = (TensorStamp(self.part), [(flat == k).nonzero().view(-1) for k in range(self.n_modules)])
        return cached[1]

    @property
    def shape(self) -> torch.Size:
        return self.initial.shape

    def module_weight(self, k: int) -> tuple[Tensor, Tensor | None]:
        """Module k's weight and bias (with gradient to module k only)."""
        weight = self.initial.view(-1).index_add(0, self.indices[k], self.values[k]).view(self.shape)
        bias = None if self.biases is None else self.biases[k]
        if self.legacy:  # zero gradients for the others: Adam(W) still moves them (stale momentum, decay)
            zero = sum((v.sum() for j, v in enumerate(self.values) if j != k), torch.zeros((), device=weight.device))
            weight = weight + 0.0 * zero
            if bias is not None:
                bias = bias + 0.0 * sum(b.sum() for j, b in enumerate(self.biases) if j != k)
        return weight, bias

    def merged(self) -> tuple[Tensor, Tensor | None]:
        """``(W₀ + Δ/N, mean of the biases)`` — the weights of the merged plain adapter."""
        delta = torch.cat(list(self.values)) / self.n_modules
        weight = self.initial.view(-1).index_add(0, torch.cat(self.indices), delta).view(self.shape)
        bias = None if self.biases is None else torch.stack(list(self.biases)).mean(0)
        return weight, bias

    def current(self, training: bool) -> tuple[Tensor, Tensor | None]:
        """The selected module while training; the merge otherwise."""
        return self.module_weight(self.selected) if training else self.merged()

    def load_tensors_check(self, where: str) -> None:
        """After loading: the partition must be N disjoint bins that fit the stored values."""
        flat = self.part.view(-1)
        if flat.min() < 0 or flat.max() >= self.n_modules:
            raise CorruptFileError(f"{where}: MoSA partition has module ids outside 0..{self.n_modules - 1}")
        for k, (index, values) in enumerate(zip(self.indices, self.values)):
            if len(index) != len(values):
                raise CorruptFileError(f"{where}: MoSA module {k} has {len(values)} values for {len(index)} entries")
