"""A ranking task's split as cached tokens: image tokens, instruction tokens, per-instruction targets
and the pools the sampler and the evaluation read."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ...zoo.rank_tasks import RankTask
from .cache import TokenCache
from .sampler import InstructionPool, pools_from_targets
from .train import InstructionTokens

#: counting: an instruction's training positives are its images with at least one object; the
#: others join its batches as relabelled negatives (target 0), as the official "rank" sampler
MIN_POSITIVE = {"counting": 1.0}


@dataclasses.dataclass(frozen=True)
class RankingData:
    """Cached tokens of one split: ``images`` (N, P, D) in task order, ``texts`` per instruction,
    ``targets[instruction]`` (N values)."""

    images: Tensor
    texts: dict[str, InstructionTokens]
    targets: dict[str, list[float]]

    def train_pools(self, min_positive: float | None = None) -> list[InstructionPool]:
        """Pools for training (with relabelled negatives when ``min_positive`` is given)."""
        return pools_from_targets({k: dict(enumerate(v)) for k, v in self.targets.items()}, min_positive=min_positive)

    def eval_pools(self, min_target: float | None = None) -> list[InstructionPool]:
        """Every image of the split under every instruction (targets as they are, zeros included), or
        only those with a target of at least ``min_target`` (counting: the images that show the
        object — over all images, a count's order is mostly "present or not")."""
        kept = {k: {i: t for i, t in enumerate(v) if min_target is None or t >= min_target} for k, v in self.targets.items()}
        return pools_from_targets({k: v for k, v in kept.items() if len(v) >= 2})


def ranking_data(task: RankTask, cache: TokenCache) -> RankingData:
    """Tokens (from ``cache``, computed once) and targets of ``task`` (usually one split)."""
    texts = [i.text for i in task.instructions]
    tokens, masks = cache.text_batch(texts)
    return RankingData(cache.image_tokens(task.paths),
                       {t: InstructionTokens(tokens[k], masks[k]) for k, t in enumerate(texts)},
                       {t: task.targets(t) for t in texts})
