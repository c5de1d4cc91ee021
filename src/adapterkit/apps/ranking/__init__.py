"""Ranking-aware adapter application (issue 13): frozen image/text token encoders
(:mod:`.encoders`), their on-disk token cache (:mod:`.cache`), instruction-grouped batches
(:mod:`.sampler`) and training/scoring on cached tokens (:mod:`.train`)."""

from .cache import CacheSettings, TokenCache
from .encoders import (CLIPVisionTokens, EfficientNetTokens, HFTextTokens, ImageTokenEncoder, Preprocess,
                       RankingEncoders, clip_pair, efficientnet_minilm)
from .sampler import InstructionBatches, InstructionPool, RankBatch, pools_from_targets
from .train import InstructionTokens, RankingTrainSettings, evaluate_ranking, score_images, train_ranking

__all__ = [
    "CLIPVisionTokens", "CacheSettings", "EfficientNetTokens", "HFTextTokens", "ImageTokenEncoder", "InstructionBatches",
    "InstructionPool", "InstructionTokens", "Preprocess", "RankBatch", "RankingEncoders", "RankingTrainSettings",
    "TokenCache", "clip_pair", "efficientnet_minilm", "evaluate_ranking", "pools_from_targets", "score_images",
    "train_ranking",
]
