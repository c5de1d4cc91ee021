"""Batches for the ranking-aware adapter: one instruction per batch, a share of relabelled
negatives (images from other instructions' pools whose target becomes the negative target, e.g.
zero sheep), as the official "rank" sampler."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError


@dataclasses.dataclass(frozen=True)
class InstructionPool:
    """The images one instruction ranks: ``positives`` (indices into the image set) with their
    ``targets``, and ``negatives`` that may be mixed in with target ``negative_target``."""

    instruction: str
    positives: tuple[int, ...]
    targets: tuple[float, ...]
    negatives: tuple[int, ...] = ()
    negative_target: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "positives", tuple(int(i) for i in self.positives))
        object.__setattr__(self, "targets", tuple(float(t) for t in self.targets))
        object.__setattr__(self, "negatives", tuple(int(i) for i in self.negatives))
        if len(self.positives) != len(self.targets):
            raise ConfigError(f"{self.instruction!r}: {len(self.positives)} positives but {len(self.targets)} targets")
        if len(self.positives) < 2:
            raise ConfigError(f"{self.instruction!r}: an instruction needs at least 2 images to rank")
        if not all(math.isfinite(t) for t in self.targets):
            raise ConfigError(f"{self.instruction!r}: targets must be finite")
        if set(self.positives) & set(self.negatives):
            raise ConfigError(f"{self.instruction!r}: an image cannot be both a positive and a negative")


@dataclasses.dataclass(frozen=True)
class RankBatch:
    instruction: str
    indices: Tensor  # (N,) long, into the image set
    targets: Tensor  # (N,) float32
    negatives: int  # how many of the rows are relabelled negatives (the last ones)


class InstructionBatches:
    """An epoch of batches: every instruction's positives shuffled and cut into batches of
    ``batch_size − round(batch_size · negative_ratio)`` positives, each filled up with negatives
    drawn from that instruction's pool (a short last chunk gets the same share, and a last chunk of a
    single positive is left out: one image ranks nothing); batches of all instructions in a shuffled order.
    Deterministic per ``seed`` and epoch (:meth:`epoch`); no global random state is touched."""

    def __init__(self, pools: Sequence[InstructionPool], batch_size: int = 16, negative_ratio: float = 0.2,
                 seed: int = 0, drop_last: bool = False) -> None:
        if not pools:
            raise ConfigError("no instruction pools to sample from")
        names = [p.instruction for p in pools]
        if len(set(names)) != len(names):
            raise ConfigError(f"instructions repeat: {sorted({n for n in names if names.count(n) > 1})}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
            raise ConfigError(f"batch_size must be an integer >= 2, got {batch_size!r}")
        if not isinstance(negative_ratio, (int, float)) or not 0.0 <= negative_ratio < 1.0:
            raise ConfigError(f"negative_ratio must be in [0, 1), got {negative_ratio!r}")
        self.pools, self.batch_size, self.negative_ratio = tuple(pools), batch_size, float(negative_ratio)
        self.seed, self.drop_last = seed, drop_last

    def negatives_per_batch(self, pool: InstructionPool) -> int:
        return min(round(self.batch_size * self.negative_ratio), len(pool.negatives), self.batch_size - 2)

    def epoch(self, number: int = 0) -> list[RankBatch]:
        rng = random.Random(f"{self.seed}/{number}")
        batches: list[RankBatch] = []
        for pool in self.pools:
            k = self.negatives_per_batch(pool)
            width = self.batch_size - k
            order = rng.sample(range(len(pool.positives)), len(pool.positives))
            for start in range(0, len(order), width):
                chunk = order[start:start + width]
                if len(chunk) < 2 or (self.drop_last and len(chunk) < width):
                    continue
                share = min(k, round(len(chunk) * self.negative_ratio / (1 - self.negative_ratio)))  # a short last chunk
                negatives = rng.sample(pool.negatives, share) if share else []
                indices = [pool.positives[i] for i in chunk] + negatives
                targets = [pool.targets[i] for i in chunk] + [pool.negative_target] * len(negatives)
                batches.append(RankBatch(pool.instruction, torch.tensor(indices, dtype=torch.long),
                                         torch.tensor(targets, dtype=torch.float32), len(negatives)))
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[RankBatch]:
        return iter(self.epoch(0))

    def __len__(self) -> int:
        return len(self.epoch(0))


def pools_from_targets(targets: Mapping[str, Mapping[int, float]], negative_target: float | None = 0.0,
                       min_positive: float | None = None) -> list[InstructionPool]:
    """Pools from ``{instruction: {image index: target}}``. With ``min_positive`` (e.g. 1 for
    counting), an instruction's positives are its images at or above it and every other image of
    any pool may serve as its relabelled negative; without it every listed image is a positive."""
    everyone = sorted({i for per in targets.values() for i in per})
    pools = []
    for instruction, per in targets.items():
        chosen = {i: t for i, t in per.items() if min_positive is None or t >= min_positive}
        negatives = () if min_positive is None or negative_target is None else tuple(i for i in everyone if i not in chosen)
        pools.append(InstructionPool(instruction, tuple(chosen), tuple(chosen.values()), negatives,
                                     0.0 if negative_target is None else negative_target))
    return pools
