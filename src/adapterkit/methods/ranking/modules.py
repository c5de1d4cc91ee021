"""The ranking-aware adapter's modules: cross-modal fusion, the regression head and the
ranking-aware attention over pairs of images (training only)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from .config import RankingAdapterConfig


def _mlp(width: int, depth: int) -> nn.Sequential:
    """``[Linear, LayerNorm, ReLU] × depth``."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers)


class FusionBlock(nn.Module):
    """Self-attention over one image's tokens, cross-attention from them to the instruction's
    tokens (and the prompt tokens), then an MLP; pre-norm residual blocks."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = max(1, int(round(width * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, image: Tensor, text: Tensor, text_padding: Tensor | None) -> Tensor:
        x = self.norm_self(image)
        image = image + self.self_attention(x, x, x, need_weights=False)[0]
        x = self.norm_cross(image)
        image = image + self.cross_attention(x, text, text, key_padding_mask=text_padding, need_weights=False)[0]
        return image + self.mlp(self.norm_mlp(image))


class TextConditionedEncoder(nn.Module):
    """Image tokens + one instruction's tokens → text-conditioned visual tokens z′ (N, P, width)."""

    def __init__(self, config: RankingAdapterConfig, image_dim: int, text_dim: int) -> None:
        super().__init__()
        width = config.width
        self.image_in = nn.Sequential(nn.Linear(image_dim, width), nn.LayerNorm(width))
        self.text_in = nn.Sequential(nn.Linear(text_dim, width), nn.LayerNorm(width))
        self.prompt_style = config.prompt_style if config.uses_prompts else "none"
        if self.prompt_style != "none":
            columns = width if self.prompt_style == "vector" else 1  # "scalar": one value broadcast over the width
            self.prompt = nn.Parameter(torch.randn(config.prompt_tokens, columns) * 0.02)
        self.fusion = nn.ModuleList(FusionBlock(width, config.heads, config.mlp_ratio) for _ in range(config.fusion_layers))
        self.out_norm, self.out_proj = nn.LayerNorm(width), nn.Linear(width, width)
        if config.encoder_layers:
            layer = nn.TransformerEncoderLayer(width, config.heads, dim_feedforward=width, dropout=config.dropout,
                                               batch_first=True)
            self.encoder: nn.Module = nn.TransformerEncoder(layer, config.encoder_layers, enable_nested_tensor=False)
        else:
            self.encoder = nn.Identity()

    def text_keys(self, text: Tensor, mask: Tensor | None, batch: int) -> tuple[Tensor, Tensor | None]:
        """Projected text tokens with the prompt tokens in front, per image: (N, K + T, width)."""
        keys = self.text_in(text)
        if keys.dim() == 2:
            keys = keys.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        keys = keys.expand(batch, -1, -1)
        padding = None if mask is None else ~mask.to(torch.bool).expand(batch, -1)
        if self.prompt_style != "none":
            prompt = self.prompt.expand(self.prompt.shape[0], keys.shape[-1]).to(keys.dtype)
            keys = torch.cat([prompt.expand(batch, -1, -1), keys], dim=1)
            if padding is not None:
                padding = torch.cat([padding.new_zeros(batch, prompt.shape[0]), padding], dim=1)
        return keys, padding

    def forward(self, image: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        x = self.image_in(image)
        keys, padding = self.text_keys(text, text_mask, x.shape[0])
        for block in self.fusion:
            x = block(x, keys, padding)
        return self.encoder(self.out_proj(self.out_norm(x)))


class RegressionHead(nn.Module):
    """``s_i = Linear(MLP(Σ_tokens LN(z′_i)))``: one score per image, independent of the batch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.mlp, self.out = nn.LayerNorm(width), _mlp(width, 2), nn.Linear(width, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(self.mlp(self.norm(tokens).sum(dim=1))).squeeze(-1)


class RankingAwareAttention(nn.Module):
    """Pair logits ``r_ij`` ("image i ranks above image j") for every ordered pair of a batch.

    M relational queries attend, with **one softmax over the 2P tokens of both images**, to the
    keys/values ``LN(W_kv z′)`` of images i and j; ``O_i`` and ``O_j`` are the two halves' outputs
    and ``W_o(O_i − O_j)`` (or ``W_o[O_i; O_j]``), summed over the queries, feeds the pair MLP.

    The joint softmax is computed from per-image partial sums (each image's max logit, exp-sum and
    exp-weighted values), so the N² pairs cost O(N²·M·width) and never materialise N²·2P tokens.
    Both halves of pair (i, j) share one denominator, formed by a commutative sum, so
    ``O_i − O_j`` is exactly antisymmetric in (i, j) and exactly zero on the diagonal.
    """

    def __init__(self, config: RankingAdapterConfig) -> None:
        super().__init__()
        width, self.heads = config.width, config.heads
        self.queries = nn.Parameter(torch.randn(config.relation_tokens, width) * 0.02)
        self.q_proj, self.q_norm = nn.Linear(width, width), nn.LayerNorm(width)
        self.kv_proj, self.kv_norm = nn.Linear(width, width), nn.LayerNorm(width)
        self.combine = config.pair_combine
        self.out_proj = nn.Linear(width * (2 if self.combine == "concat" else 1), width)
        self.head = nn.Sequential(nn.LayerNorm(width), _mlp(width, 3), nn.Linear(width, 1))

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # (..., L, width) -> (..., H, L, dh)

    def halves(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(O_first, O_second)`` for every ordered pair: (N, N, M, width) each, heads concatenated."""
        queries = self._split(self.q_norm(self.q_proj(self.queries)))  # (H, M, dh)
        values = self._split(self.kv_norm(self.kv_proj(tokens)))  # (N, H, P, dh); keys = values
        logits = torch.einsum("hmd,nhpd->nhmp", queries, values) / math.sqrt(queries.shape[-1])
        peak = logits.amax(dim=-1)  # (N, H, M)
        weights = torch.exp(logits - peak.unsqueeze(-1))
        mass = weights.sum(dim=-1)  # (N, H, M)
        summed = torch.einsum("nhmp,nhpd->nhmd", weights, values)  # (N, H, M, dh)
        pair_peak = torch.maximum(peak.unsqueeze(1), peak.unsqueeze(0))  # (N, N, H, M), symmetric
        first_scale = torch.exp(peak.unsqueeze(1) - pair_peak)  # image i in pair (i, j)
        second_scale = torch.exp(peak.unsqueeze(0) - pair_peak)  # image j in pair (i, j)
        total = first_scale * mass.unsqueeze(1) + second_scale * mass.unsqueeze(0)
        first = (first_scale / total).unsqueeze(-1) * summed.unsqueeze(1)  # (N, N, H, M, dh)
        second = (second_scale / total).unsqueeze(-1) * summed.unsqueeze(0)
        merge = lambda x: x.transpose(-3, -2).flatten(-2)  # noqa: E731  (N, N, M, width)
        return merge(first), merge(second)

    def difference(self, tokens: Tensor) -> Tensor:
        """``O_i − O_j`` before ``W_o``: (N, N, M, width), antisymmetric with a zero diagonal."""
        first, second = self.halves(tokens)
        return first - second

    def forward(self, tokens: Tensor) -> Tensor:
        first, second = self.halves(tokens)
        pair = first - second if self.combine == "subtract" else torch.cat([first, second], dim=-1)
        return self.head(self.out_proj(pair).sum(dim=2)).squeeze(-1)  # (N, N)


@dataclasses.dataclass(frozen=True)
class RankingOutput:
    """``scores`` (N,) from the regression head; ``pair_logits`` (N, N), row i column j = "i above
    j" (flattened row-major: index i·N + j), when the pair branch ran."""

    scores: Tensor
    pair_logits: Tensor | None = None


class RankingAdapter(nn.Module):
    """The whole adapter: fusion encoder, regression head and (when configured) the pair branch."""

    def __init__(self, config: RankingAdapterConfig, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.encoder = TextConditionedEncoder(config, image_dim, text_dim)
        self.regression = RegressionHead(config.width)
        self.pairs = RankingAwareAttention(config) if config.pair_branch else None

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None,
                pairs: bool = False) -> RankingOutput:
        """Scores for a batch of images under one instruction (text tokens (T, D) + mask (T,), or
        one instruction per image: (N, T, D) + (N, T)); ``pairs=True`` also runs the pair branch."""
        tokens = self.encoder(image_tokens, text_tokens, text_mask)
        scores = self.regression(tokens)
        return RankingOutput(scores, self.pairs(tokens) if pairs and self.pairs is not None else None)
