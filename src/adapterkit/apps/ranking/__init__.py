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
from .baselines import (Heuristic, ImageStatistics, compute_statistics, evaluate_scores, heuristic_for,  # noqa: E402
                        training_items)
from .baselines_ridge import RidgeProbes, RidgeSettings, fit_ridge_probes, pooled_features  # noqa: E402
from .baselines_finetune import (FrontSplit, TailBaseline, TailSettings, efficientnet_split, fit_finetune,  # noqa: E402
                                 fit_lora, front_activations)

__all__ += [
    "FrontSplit", "Heuristic", "ImageStatistics", "RidgeProbes", "RidgeSettings", "TailBaseline", "TailSettings",
    "compute_statistics", "efficientnet_split", "evaluate_scores", "fit_finetune", "fit_lora", "fit_ridge_probes",
    "front_activations", "heuristic_for", "pooled_features", "training_items",
]
