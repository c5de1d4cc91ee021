"""Ranking-aware adapter application (issue 13): frozen image/text token encoders
(:mod:`.encoders`) and their on-disk token cache (:mod:`.cache`)."""

from .cache import CacheSettings, TokenCache
from .encoders import (CLIPVisionTokens, EfficientNetTokens, HFTextTokens, ImageTokenEncoder, Preprocess,
                       RankingEncoders, clip_pair, efficientnet_minilm)

__all__ = [
    "CLIPVisionTokens", "CacheSettings", "EfficientNetTokens", "HFTextTokens", "ImageTokenEncoder", "Preprocess",
    "RankingEncoders", "TokenCache", "clip_pair", "efficientnet_minilm",
]
