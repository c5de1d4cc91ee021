"""Baselines that train the image encoder's last blocks, one regressor per instruction (issue 13):

* **fine-tuning** (:func:`fit_finetune`, the paper's "fine-tuned CLIP" row): a copy of the last
  blocks (EfficientNet-Lite0: the last ``k`` MBConv blocks + ``conv_head``/BN) and a new linear head;
* **LoRA** (:func:`fit_lora`, adapterkit's own): ``ak.LoRAConfig`` adapters on the 1×1 convolutions
  of one shared copy of those blocks, one adapter + head per instruction.

To fit a small CPU, the frozen front of the encoder runs once per image (:func:`front_activations`):
the activation entering the first trainable module is cached in memory and training runs only the
tail. The tail stays in eval mode: BatchNorm uses its pretrained statistics (its affine weights train
when fine-tuning) — one-instruction batches of 16 would give noisy batch statistics — and
EfficientNet's drop-connect is off. Loss: ``log(1 + SmoothL1)`` on the raw targets, plus
``pair_weight`` × the pairwise BCE on score differences (:func:`pair_loss`).
The encoder itself is never changed: every trained module is a deep copy.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...core.api import activate, adapter_parameters, attach
from ...errors import ConfigError
from ...methods.lora import LoRAConfig
from ...methods.ranking.losses import log_smooth_l1
from .baselines import TrainingItems, check_common, check_pools, training_items
from .encoders import EfficientNetTokens, ImageInput
from .sampler import InstructionPool

#: LoRA targets in an :func:`efficientnet_split` tail: every 1×1 convolution (depthwise convs have groups)
EFFICIENTNET_LORA_TARGETS = ("_expand_conv", "_project_conv", "conv_head")


@dataclasses.dataclass(frozen=True)
class FrontSplit:
    """An image encoder cut before ``boundary``: ``encoder`` (called on pixels) runs the frozen
    front until ``boundary``'s input, which is cached; ``tail`` maps that input to the encoder's
    feature map (N, C, H, W) or tokens (N, P, D)."""

    encoder: nn.Module
    boundary: nn.Module
    tail: nn.Module

    def __post_init__(self) -> None:
        if not any(m is self.boundary for m in self.encoder.modules()):
            raise ConfigError("the boundary module is not part of the encoder")
        if not any(m is self.boundary for m in self.tail.modules()):
            raise ConfigError("the boundary module must be the tail's first module")


def efficientnet_split(encoder: EfficientNetTokens, trainable_blocks: int = 2) -> FrontSplit:
    """Split EfficientNet(-Lite) tokens before its last ``trainable_blocks`` MBConv blocks; the tail
    is those blocks, then ``conv_head``, its BatchNorm and activation (``extract_features``'s end)."""
    if not isinstance(encoder, EfficientNetTokens):
        raise ConfigError(f"efficientnet_split needs an EfficientNetTokens encoder, got {type(encoder).__name__}")
    blocks = encoder.backbone._blocks
    if not isinstance(trainable_blocks, int) or isinstance(trainable_blocks, bool) \
            or not 1 <= trainable_blocks <= len(blocks):
        raise ConfigError(f"trainable_blocks must be an integer in [1, {len(blocks)}], got {trainable_blocks!r}")
    first = len(blocks) - trainable_blocks
    parts = [(f"block{i}", blocks[i]) for i in range(first, len(blocks))]
    backbone = encoder.backbone
    parts += [("conv_head", backbone._conv_head), ("bn_head", backbone._bn1), ("act_head", backbone._swish)]
    return FrontSplit(encoder, blocks[first], nn.Sequential(collections.OrderedDict(parts)))


class _Reached(Exception):
    def __init__(self, value: Tensor) -> None:
        super().__init__("front reached")
        self.value = value


def _stop_at_boundary(module: nn.Module, args: tuple) -> None:
    # the encoder's own forward runs the front; stopping here skips the tail, which is trained
    raise _Reached(args[0].detach())


@torch.no_grad()
def front_activations(split: FrontSplit, images: Sequence[ImageInput] | Tensor, batch_size: int = 32,
                      progress: bool = True) -> Tensor:
    """The frozen front's output (the tail's input) for every image, float32 on the CPU, in eval mode.
    ``images`` are PIL images or paths (preprocessed by the encoder's ``pixels``) or a pixel tensor."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(images, Tensor):
        count = images.shape[0] if images.dim() == 4 else 0
    elif isinstance(images, (str, Path)) or not isinstance(images, Sequence):
        raise ConfigError("images must be a sequence of PIL images or paths, or a pixel tensor")
    else:
        count = len(images)
    if count == 0:
        raise ConfigError("no images (a pixel tensor must be (N, 3, H, W))")
    pixels_of = getattr(split.encoder, "pixels", None)
    if pixels_of is None and not isinstance(images, Tensor):
        raise ConfigError(f"{type(split.encoder).__name__} has no pixels(): pass a pixel tensor")
    modes = [(m, m.training) for m in split.encoder.modules()]
    device = next(split.encoder.parameters()).device
    handle = split.boundary.register_forward_pre_hook(_stop_at_boundary)
    parts = []
    try:
        split.encoder.eval()
        for start in tqdm(range(0, count, batch_size), desc="front", disable=not progress, mininterval=1.0):
            chunk = images[start:start + batch_size]
            pixels = pixels_of(chunk) if pixels_of is not None else chunk
            try:
                split.encoder(pixels.to(device))
            except _Reached as reached:
                parts.append(reached.value.float().cpu())
            else:
                raise ConfigError("the encoder's forward never reached the boundary module")
    finally:
        handle.remove()
        for module, mode in modes:
            module.training = mode
    return torch.cat(parts)


@dataclasses.dataclass(frozen=True)
class TailSettings:
    """AdamW over one instruction's rows (positives + ``negative_ratio`` relabelled negatives),
    ``batch_size`` rows a step, ``epochs`` passes. ``lr`` is for the tail (fine-tuning) or the LoRA
    factors; ``None`` picks 1e-4 for fine-tuning and 1e-3 for LoRA; the new head uses ``head_lr``."""

    epochs: int = 10
    lr: float | None = None
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    pair_weight: float = 0.0
    negative_ratio: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "head_lr", "weight_decay", "pair_weight"):
            value = getattr(self, name)
            if value is None and name == "lr":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0 \
                    or (value == 0 and name in ("lr", "head_lr")):
                raise ConfigError(f"{name} must be a finite number >= 0 (learning rates > 0), got {value!r}")
        check_common(self.negative_ratio, self.seed)


class PooledLinearHead(nn.Module):
    """Mean over the spatial positions (N, C, H, W) or tokens (N, P, D), then a linear score (N,)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean((2, 3)) if x.dim() == 4 else x.mean(1)
        return self.linear(pooled).squeeze(-1)


@dataclasses.dataclass
class TailBaseline:
    """Per-instruction regressors on cached front activations. ``tails[i]`` is the instruction's
    tail module (fine-tuning: its own copy; LoRA: the shared copy, run with ``adapters[i]`` active)."""

    kind: str
    tails: dict[str, nn.Module]
    heads: dict[str, PooledLinearHead]
    adapters: dict[str, str]
    trainable_params: dict[str, int]
    train_seconds: float
    losses: dict[str, list[float]]

    @torch.no_grad()
    def scores(self, activations: Tensor, instruction: str, batch_size: int = 64) -> Tensor:
        """Scores (N,) of cached activations under one instruction."""
        if instruction not in self.heads:
            raise ConfigError(f"no {self.kind} regressor for instruction {instruction!r}")
        tail, head = self.tails[instruction], self.heads[instruction]
        if instruction in self.adapters:
            activate(tail, self.adapters[instruction])
        device = next(head.parameters()).device
        return torch.cat([head(tail(activations[i:i + batch_size].to(device))).cpu()
                          for i in range(0, activations.shape[0], batch_size)])


def _check(split: FrontSplit, activations: Tensor, pools: Sequence[InstructionPool], settings: TailSettings) -> None:
    if not isinstance(split, FrontSplit):
        raise ConfigError(f"split must be a FrontSplit, got {type(split).__name__}")
    if not isinstance(settings, TailSettings):
        raise ConfigError(f"settings must be TailSettings, got {type(settings).__name__}")
    if not isinstance(activations, Tensor) or activations.dim() < 2 or not activations.is_floating_point():
        raise ConfigError("activations must be a float tensor (N, ...) from front_activations")
    check_pools(pools, activations.shape[0])


def _features(tail: nn.Module, activations: Tensor) -> int:
    probe = copy.deepcopy(tail).eval()  # a copy: running the tail in training mode would move BN statistics
    try:
        with torch.no_grad():
            out = probe(activations[:1].to(next(probe.parameters()).device))
    except RuntimeError as exc:
        raise ConfigError(f"the activations {tuple(activations.shape)} do not fit the tail: {exc}") from None
    if out.dim() not in (3, 4):
        raise ConfigError(f"the tail must output (N, C, H, W) or (N, P, D), got {tuple(out.shape)}")
    return int(out.shape[1] if out.dim() == 4 else out.shape[2])


def _new_head(tail: nn.Module, features: int, targets: np.ndarray, seed: int) -> PooledLinearHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = PooledLinearHead(features)
    with torch.no_grad():
        head.linear.bias.fill_(float(targets.mean()))  # start at the mean target: the regression loss starts small
    return head.to(next(tail.parameters()).device)


def pair_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """RankNet's loss: mean ``BCEWithLogits(s_i − s_j, 1)`` over the ordered pairs with ``y_i > y_j``
    (ties and the diagonal carry no order; 0 when there is no such pair)."""
    above = targets[:, None] > targets[None, :]
    if not bool(above.any()):
        return scores.sum() * 0.0
    return F.softplus(-(scores[:, None] - scores[None, :])[above]).mean()


def _train(tail: nn.Module, head: PooledLinearHead, groups: list[dict], activations: Tensor, items: TrainingItems,
           settings: TailSettings, seed: int, desc: str, progress: bool) -> list[float]:
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    device = next(head.parameters()).device
    rows = torch.from_numpy(items.indices)
    targets = torch.from_numpy(items.targets).float()
    generator = torch.Generator().manual_seed(seed)
    steps = settings.epochs * -(-len(rows) // settings.batch_size)
    losses: list[float] = []
    tail.eval()  # BatchNorm keeps its pretrained statistics; no drop-connect (see the module docstring)
    with tqdm(total=steps, desc=desc, disable=not progress, mininterval=1.0) as bar:
        for _ in range(settings.epochs):
            for batch in torch.randperm(len(rows), generator=generator).split(settings.batch_size):
                if len(batch) < 2:
                    continue
                y = targets[batch].to(device)
                optimizer.zero_grad(set_to_none=True)
                scores = head(tail(activations[rows[batch]].to(device)))
                loss = log_smooth_l1(scores, y)
                if settings.pair_weight:
                    loss = loss + settings.pair_weight * pair_loss(scores, y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def fit_finetune(split: FrontSplit, activations: Tensor, pools: Sequence[InstructionPool],
                 settings: TailSettings = TailSettings(), progress: bool = True) -> TailBaseline:
    """Fine-tune a deep copy of ``split.tail`` (every parameter) and a new head per instruction on the
    cached ``activations`` (from :func:`front_activations`, indexed by the pools)."""
    _check(split, activations, pools, settings)
    items = training_items(pools, settings.negative_ratio, settings.seed)
    features = _features(split.tail, activations)
    lr = 1e-4 if settings.lr is None else settings.lr
    tails, heads, counts, losses = {}, {}, {}, {}
    start = time.perf_counter()
    for k, pool in enumerate(pools):
        name = pool.instruction
        tail = copy.deepcopy(split.tail).requires_grad_(True)
        head = _new_head(tail, features, items[name].targets, settings.seed + k)
        groups = [{"params": list(tail.parameters()), "lr": lr},
                  {"params": list(head.parameters()), "lr": settings.head_lr}]
        counts[name] = sum(p.numel() for g in groups for p in g["params"])
        losses[name] = _train(tail, head, groups, activations, items[name], settings, settings.seed + k,
                              f"finetune {k + 1}/{len(pools)}", progress)
        tails[name], heads[name] = tail.requires_grad_(False), head.requires_grad_(False)
    return TailBaseline("finetune", tails, heads, {}, counts, time.perf_counter() - start, losses)


def fit_lora(split: FrontSplit, activations: Tensor, pools: Sequence[InstructionPool], lora: LoRAConfig | None = None,
             settings: TailSettings = TailSettings(), progress: bool = True) -> TailBaseline:
    """One LoRA adapter (``lora``; default r = 8 on :data:`EFFICIENTNET_LORA_TARGETS`) per instruction
    on one shared deep copy of ``split.tail``, plus a new head each, trained on cached ``activations``."""
    _check(split, activations, pools, settings)
    lora = LoRAConfig(r=8, alpha=16.0, target_modules=list(EFFICIENTNET_LORA_TARGETS)) if lora is None else lora
    if not isinstance(lora, LoRAConfig):
        raise ConfigError(f"lora must be a LoRAConfig, got {type(lora).__name__}")
    items = training_items(pools, settings.negative_ratio, settings.seed)
    features = _features(split.tail, activations)
    lr = 1e-3 if settings.lr is None else settings.lr
    tail = copy.deepcopy(split.tail)
    heads, adapters, counts, losses = {}, {}, {}, {}
    start = time.perf_counter()
    for k, pool in enumerate(pools):
        name, adapter = pool.instruction, f"instruction{k}"
        with torch.random.fork_rng(devices=[]):  # LoRA's A init draws from the seed, not the caller's RNG
            torch.manual_seed(settings.seed + k)
            attach(tail, lora, adapter)
        activate(tail, adapter)
        head = _new_head(tail, features, items[name].targets, settings.seed + k)
        factors = list(adapter_parameters(tail, adapter))
        groups = [{"params": factors, "lr": lr}, {"params": list(head.parameters()), "lr": settings.head_lr}]
        counts[name] = sum(p.numel() for g in groups for p in g["params"])
        losses[name] = _train(tail, head, groups, activations, items[name], settings, settings.seed + k,
                              f"lora {k + 1}/{len(pools)}", progress)
        heads[name], adapters[name] = head.requires_grad_(False), adapter
    return TailBaseline("lora", {p.instruction: tail for p in pools}, heads, adapters, counts,
                        time.perf_counter() - start, losses)


__all__ = ["EFFICIENTNET_LORA_TARGETS", "FrontSplit", "PooledLinearHead", "TailBaseline", "TailSettings",
           "efficientnet_split", "fit_finetune", "fit_lora", "front_activations", "pair_loss"]
