"""Training and scoring the ranking-aware adapter on frozen (cached) tokens."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...analysis.ranking_metrics import OrderingMetrics, ordering_metrics
from ...core.config import AdapterConfig
from ...core.state import get_state
from ...core.steps import step
from ...errors import ConfigError
from ...core.api import attach
from ...methods.ranking import RankingAdapterConfig, RankingLayer, ranking_layer, ranking_loss
from .sampler import InstructionBatches, InstructionPool


@dataclasses.dataclass(frozen=True)
class InstructionTokens:
    """One instruction's text tokens (T, D) and mask (T,)."""

    tokens: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.mask.shape != self.tokens.shape[:1]:
            raise ConfigError(f"instruction tokens must be (T, D) with a (T,) mask, got {tuple(self.tokens.shape)} "
                              f"and {tuple(self.mask.shape)}")
        if not bool(self.mask.any()):
            raise ConfigError("an instruction's mask is empty")


@dataclasses.dataclass(frozen=True)
class RankingTrainSettings:
    """AdamW with weight decay 0.01 (the official command), ``epochs`` passes over the pools."""

    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 16
    negative_ratio: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("epochs", 1), ("batch_size", 2), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        for name, positive in (("lr", True), ("weight_decay", False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 or (value == 0 and not positive)):
                raise ConfigError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


def _config(model: nn.Module, name: str) -> RankingAdapterConfig:
    config: AdapterConfig = get_state(model).record(name).config
    assert isinstance(config, RankingAdapterConfig)
    return config


def _check_inputs(model: nn.Module, name: str, images: Tensor, texts: Mapping[str, InstructionTokens],
                  pools: Sequence[InstructionPool]) -> None:
    """Everything a step would trip over, as a :class:`ConfigError` before the first step."""
    if images.dim() != 3:
        raise ConfigError(f"image tokens must be (N, P, D), got {tuple(images.shape)}")
    if not pools:
        raise ConfigError("no instruction pools")
    missing = sorted({p.instruction for p in pools} - set(texts))
    if missing:
        raise ConfigError(f"no text tokens for instructions {missing}")
    indices = [i for p in pools for i in p.positives + p.negatives]
    if min(indices) < 0 or max(indices) >= images.shape[0]:
        raise ConfigError(f"a pool refers to image {max(indices) if max(indices) >= 0 else min(indices)}, "
                          f"but there are {images.shape[0]} images")
    encoder = ranking_layer(model, name).adapter.encoder
    widths = {"image": (images.shape[-1], encoder.image_in[0].in_features)}
    widths.update({f"text {k!r}": (t.tokens.shape[-1], encoder.text_in[0].in_features) for k, t in texts.items()})
    for what, (given, needed) in widths.items():
        if given != needed:
            raise ConfigError(f"{what} tokens have width {given}; the adapter was built for {needed}")


def _forked_rng(layer: nn.Module) -> Any:
    """The caller's RNG streams (CPU, and the layer's CUDA device) are put back afterwards."""
    device = next(layer.parameters()).device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def attach_ranking(model: nn.Module, config: RankingAdapterConfig, name: str, seed: int = 0) -> RankingLayer:
    """Attach a ranking adapter whose initial weights come from ``seed`` (the caller's RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach(model, config, name)
    return ranking_layer(model, name)


def train_ranking(model: nn.Module, name: str, images: Tensor, texts: Mapping[str, InstructionTokens],
                  pools: Sequence[InstructionPool], settings: RankingTrainSettings = RankingTrainSettings(),
                  progress: bool = True) -> list[float]:
    """Train the ranking adapter ``name`` of ``model`` on image tokens ``images`` (N, P, D), one
    instruction per batch (``pools``); returns the loss of every step. Only the adapter trains."""
    _check_inputs(model, name, images, texts, pools)
    config = _config(model, name)
    layer = ranking_layer(model, name)
    batches = InstructionBatches(pools, settings.batch_size, settings.negative_ratio, settings.seed)
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    device = next(layer.parameters()).device
    losses: list[float] = []
    was_training = layer.training
    layer.train()
    bar = tqdm(total=settings.epochs * len(batches), desc="rank train", disable=not progress, mininterval=1.0)
    try:
        with _forked_rng(layer):  # dropout draws from its own seed; the caller's RNG is left alone (not thread-safe)
            torch.manual_seed(settings.seed)
            for batch in (b for epoch in range(settings.epochs) for b in batches.epoch(epoch)):
                text = texts[batch.instruction]
                step(model)
                optimizer.zero_grad(set_to_none=True)
                out = layer(images[batch.indices].to(device), text.tokens.to(device), text.mask.to(device),
                            pairs=config.pair_branch)
                loss = ranking_loss(out, batch.targets.to(device), config.rank_weight, config.regression_weight)
                loss.total.backward()
                optimizer.step()
                losses.append(loss.total.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        bar.close()
        layer.train(was_training)
    return losses


@torch.no_grad()
def score_images(model: nn.Module, name: str, images: Tensor, text: InstructionTokens, batch_size: int = 64) -> Tensor:
    """Regression scores (N,) of the images under one instruction (eval mode; batch-independent)."""
    if images.dim() != 3:
        raise ConfigError(f"image tokens must be (N, P, D), got {tuple(images.shape)}")
    layer = ranking_layer(model, name)
    was_training = layer.training
    layer.eval()
    try:
        device = next(layer.parameters()).device
        parts = [layer(images[i:i + batch_size].to(device), text.tokens.to(device), text.mask.to(device)).scores.cpu()
                 for i in range(0, images.shape[0], batch_size)]
    finally:
        layer.train(was_training)
    return torch.cat(parts)


def evaluate_ranking(model: nn.Module, name: str, images: Tensor, texts: Mapping[str, InstructionTokens],
                     pools: Sequence[InstructionPool]) -> dict[str, OrderingMetrics]:
    """Per-instruction ordering metrics over each pool's positives (its evaluation images)."""
    _check_inputs(model, name, images, texts, pools)
    out = {}
    for pool in pools:
        indices = torch.tensor(pool.positives, dtype=torch.long)
        scores = score_images(model, name, images[indices], texts[pool.instruction])
        out[pool.instruction] = ordering_metrics(scores.tolist(), pool.targets)
    return out
