"""Ridge probes on pooled frozen tokens (a comparison row of the ranking benchmark, issue 13): one
text-agnostic head fitted on every instruction's (image, target) rows mixed — it cannot know the
criterion — and one head per instruction (the oracle that knows it). scikit-learn's ``Ridge`` on
standardised features; ``alpha`` per head from a small grid by validation SRCC."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from ...errors import ConfigError
from .baselines import TrainingItems, check_common, check_pools, training_items
from .sampler import InstructionPool

POOLINGS = ("mean", "mean+max")


def pooled_features(tokens: Tensor | np.ndarray, pooling: str = "mean") -> np.ndarray:
    """``(N, P, D)`` tokens → ``(N, D)`` mean-pooled, or ``(N, 2D)`` mean and max concatenated (float64)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    x = np.asarray(tokens.detach().cpu().float() if isinstance(tokens, Tensor) else tokens, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] == 0:
        raise ConfigError(f"tokens must be (N, P, D), got {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("tokens must be finite")
    return x.mean(1) if pooling == "mean" else np.concatenate([x.mean(1), x.max(1)], axis=1)


@dataclasses.dataclass(frozen=True)
class RidgeSettings:
    """Ridge on standardised pooled tokens; ``alpha`` from ``alphas`` by validation SRCC (ties: the
    larger alpha). Without validation pools, ``val_fraction`` of the images is held out (seeded)."""

    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    pooling: str = "mean"
    val_fraction: float = 0.2
    negative_ratio: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(self.alphas))
        if not self.alphas or not all(isinstance(a, (int, float)) and math.isfinite(a) and a > 0 for a in self.alphas):
            raise ConfigError(f"alphas must be positive finite numbers, got {self.alphas}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check_common(self.negative_ratio, self.seed)


@dataclasses.dataclass(frozen=True)
class RidgeHead:
    """A linear scorer on raw pooled features (standardisation folded in): ``x @ weight + bias``."""

    weight: np.ndarray
    bias: float
    alpha: float
    val_srcc: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight + self.bias


@dataclasses.dataclass(frozen=True)
class RidgeProbes:
    """The text-agnostic head and one head per instruction, on the same pooled features."""

    pooling: str
    agnostic: RidgeHead
    per_instruction: dict[str, RidgeHead]
    train_seconds: float

    @property
    def trainable_params(self) -> dict[str, int]:
        """Weights + bias: one head for every instruction (agnostic), or one head each (oracle, total)."""
        one = self.agnostic.weight.size + 1
        return {"agnostic": one, "per_instruction": one * len(self.per_instruction)}

    def scores(self, tokens: Tensor | np.ndarray, instruction: str | None = None) -> np.ndarray:
        """Scores of the images ``(N, P, D)``: the instruction's own head, or (``None``) the agnostic one."""
        features = pooled_features(tokens, self.pooling)
        if instruction is None:
            return self.agnostic.predict(features)
        if instruction not in self.per_instruction:
            raise ConfigError(f"no ridge head for instruction {instruction!r}")
        return self.per_instruction[instruction].predict(features)


def _mean_srcc(predictions: np.ndarray, rows: Sequence[TrainingItems]) -> float:
    values = []
    for items in rows:
        s, y = predictions[items.indices], items.targets
        if len(y) > 1 and np.ptp(y) > 0 and np.ptp(s) > 0:
            values.append(stats.spearmanr(s, y).statistic)
    return float(np.mean(values)) if values else float("nan")


def _fit_head(x: np.ndarray, items: Sequence[TrainingItems], alpha: float) -> RidgeHead:
    from sklearn.linear_model import Ridge

    rows = np.concatenate([i.indices for i in items])
    targets = np.concatenate([i.targets for i in items])
    mean, scale = x[rows].mean(0), x[rows].std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features (ReLU zeros) stay at 0
    ridge = Ridge(alpha=alpha).fit((x[rows] - mean) / scale, targets)
    weight = ridge.coef_ / scale
    return RidgeHead(weight, float(ridge.intercept_ - mean @ weight), float(alpha), float("nan"))


def _select(x: np.ndarray, x_val: np.ndarray, rows: Sequence[TrainingItems], held: Sequence[TrainingItems],
            alphas: Sequence[float]) -> RidgeHead:
    best: RidgeHead | None = None
    for alpha in sorted(alphas):
        head = _fit_head(x, rows, alpha)
        srcc = _mean_srcc(head.predict(x_val), held)
        if best is None or (math.isnan(best.val_srcc) or srcc >= best.val_srcc):
            best = dataclasses.replace(head, val_srcc=srcc)
    assert best is not None
    return best


def _split_validation(items: dict[str, TrainingItems], fraction: float, seed: int,
                      ) -> tuple[dict[str, TrainingItems], dict[str, TrainingItems]]:
    # hold out whole images (the same image under every instruction), so the agnostic head's
    # validation never sees an image it was fitted on; validation ranks the held-out positives only
    everyone = np.unique(np.concatenate([i.indices for i in items.values()]))
    held = set(np.random.default_rng(seed).permutation(everyone)[:max(1, round(fraction * len(everyone)))].tolist())
    train, val = {}, {}
    for name, i in items.items():
        mask = np.array([k in held for k in i.indices.tolist()], dtype=bool)
        kept = (~mask[:i.positives]).sum()
        train[name] = TrainingItems(i.indices[~mask], i.targets[~mask], int(kept))
        val_mask = mask & (np.arange(len(mask)) < i.positives)
        val[name] = TrainingItems(i.indices[val_mask], i.targets[val_mask], int(val_mask.sum()))
        if mask.all() or (~mask).sum() < 2:
            raise ConfigError(f"{name!r}: too few images to hold out val_fraction={fraction} for choosing alpha")
    return train, val


def fit_ridge_probes(tokens: Tensor | np.ndarray, pools: Sequence[InstructionPool],
                     settings: RidgeSettings = RidgeSettings(), val_tokens: Tensor | np.ndarray | None = None,
                     val_pools: Sequence[InstructionPool] | None = None) -> RidgeProbes:
    """Fit the text-agnostic ridge head (all instructions' rows mixed: it cannot know the criterion)
    and one head per instruction on pooled ``tokens`` (N, P, D) indexed by ``pools``. ``alpha`` is
    chosen per head by SRCC on ``val_tokens``/``val_pools`` (the agnostic head: the mean over
    instructions), or on a held-out share of the training images when they are not given."""
    x = pooled_features(tokens, settings.pooling)
    check_pools(pools, len(x))
    items = training_items(pools, settings.negative_ratio, settings.seed)
    if (val_tokens is None) != (val_pools is None):
        raise ConfigError("give both val_tokens and val_pools, or neither")
    start = time.perf_counter()
    if val_pools is None:
        train, val = _split_validation(items, settings.val_fraction, settings.seed)
        x_val = x
    else:
        x_val = pooled_features(val_tokens, settings.pooling)
        check_pools(val_pools, len(x_val))
        if x_val.shape[1] != x.shape[1]:
            raise ConfigError(f"validation tokens have dimension {x_val.shape[1]}, training tokens {x.shape[1]}")
        missing = sorted({p.instruction for p in pools} - {p.instruction for p in val_pools})
        if missing:
            raise ConfigError(f"no validation pools for instructions {missing}")
        train, val = items, training_items(val_pools, 0.0)

    agnostic = _select(x, x_val, list(train.values()), [val[p.instruction] for p in pools], settings.alphas)
    per_instruction = {p.instruction: _select(x, x_val, [train[p.instruction]], [val[p.instruction]], settings.alphas)
                       for p in tqdm(pools, desc="ridge probes", disable=len(pools) < 8, mininterval=1.0)}
    return RidgeProbes(settings.pooling, agnostic, per_instruction, time.perf_counter() - start)


__all__ = ["POOLINGS", "RidgeHead", "RidgeProbes", "RidgeSettings", "fit_ridge_probes", "pooled_features"]
