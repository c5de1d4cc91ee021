"""Ranking-aware adapter application (issue 13): frozen image/text token encoders (:mod:`.encoders`),
their on-disk token cache (:mod:`.cache`), instruction-grouped batches (:mod:`.sampler`),
training/scoring on cached tokens (:mod:`.train`) and the benchmark's comparison rows
(:mod:`.baselines`, :mod:`.baselines_ridge`, :mod:`.baselines_finetune`)."""

from .baselines import Heuristic, ImageStatistics, compute_statistics, evaluate_scores, heuristic_for, training_items
from .baselines_finetune import (FrontSplit, TailBaseline, TailSettings, efficientnet_split, fit_finetune, fit_lora,
                                 front_activations)
from .baselines_ridge import RidgeProbes, RidgeSettings, fit_ridge_probes, pooled_features
from .cache import CacheSettings, TokenCache
from .encoders import (CLIPVisionTokens, EfficientNetTokens, HFTextTokens, ImageTokenEncoder, Preprocess,
                       RankingEncoders, clip_pair, efficientnet_minilm)
from .sampler import InstructionBatches, InstructionPool, RankBatch, pools_from_targets
from .train import (InstructionTokens, RankingTrainSettings, attach_ranking, evaluate_ranking, score_images,
                    train_ranking)

__all__ = [
    "CLIPVisionTokens", "CacheSettings", "EfficientNetTokens", "FrontSplit", "HFTextTokens", "Heuristic",
    "ImageStatistics", "ImageTokenEncoder", "InstructionBatches", "InstructionPool", "InstructionTokens", "Preprocess",
    "RankBatch", "RankingEncoders", "RankingTrainSettings", "RidgeProbes", "RidgeSettings", "TailBaseline",
    "TailSettings", "TokenCache", "attach_ranking", "clip_pair", "compute_statistics", "efficientnet_minilm",
    "efficientnet_split", "evaluate_ranking", "evaluate_scores", "fit_finetune", "fit_lora", "fit_ridge_probes",
    "front_activations", "heuristic_for", "pooled_features", "pools_from_targets", "score_images", "train_ranking", "training_items",
]
