"""The ranking-aware adapter (Yu et al., ICLR 2025): order images by a text instruction with a
small text-conditioned module beside frozen image and text encoders."""

from .config import RankingAdapterConfig
from .losses import RankingLoss, log_smooth_l1, pair_labels, pairwise_rank_loss, ranking_loss
from .method import RankingLayer, RankingMethod, ranking_layer, token_dims
from .modules import RankingAdapter, RankingAwareAttention, RankingOutput, RegressionHead, TextConditionedEncoder

__all__ = ["RankingAdapter", "RankingAdapterConfig", "RankingAwareAttention", "RankingLayer", "RankingLoss",
           "RankingMethod", "RankingOutput", "RegressionHead", "TextConditionedEncoder", "log_smooth_l1",
           "pair_labels", "pairwise_rank_loss", "ranking_layer", "ranking_loss", "token_dims"]
