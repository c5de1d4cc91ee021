"""Configuration of the ranking-aware adapter (Yu et al., ICLR 2025, arXiv 2412.06760)."""

from __future__ import annotations

import dataclasses

from ...core.config import AdapterConfig
from ...errors import ConfigError

PROMPT_STYLES = ("vector", "scalar", "none")
PAIR_COMBINES = ("subtract", "concat")


def _positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RankingAdapterConfig(AdapterConfig):
    """A text-conditioned scoring module beside a frozen image encoder and a frozen text encoder.

    Image tokens (N, P, D_img) and one instruction's text tokens (T, D_txt) are projected to
    ``width``; learnable prompt tokens join the text tokens as extra keys/values; ``fusion_layers``
    blocks of self-attention over the image tokens and cross-attention to the text run per image,
    then a final projection and ``encoder_layers`` transformer layers give the text-conditioned
    visual tokens z′. The regression head scores each image from Σ LN(z′) (the only branch used at
    inference). In training, the ranking-aware attention compares every ordered pair of images in
    the batch with ``relation_tokens`` learnable queries and one softmax over both images' tokens.

    The official code uses width 768, 32 prompt tokens and 16 relational tokens over ConvNeXt-L
    tokens; the defaults here keep those counts at a width that trains on a laptop CPU.

    Attributes:
        width: the adapter's model width (a multiple of ``heads``).
        heads: attention heads in every attention block.
        fusion_layers / encoder_layers: cross-modal fusion blocks / transformer layers after them.
        mlp_ratio: hidden width of the fusion blocks' MLPs, as a multiple of ``width``.
        prompt_tokens: learnable tokens prepended to the text tokens.
        prompt_style: ``"vector"`` (a full vector per token, default), ``"scalar"`` (one scalar per
            token broadcast over the width, as the official code) or ``"none"`` (ablation).
        relation_tokens: learnable queries of the ranking-aware attention.
        pair_branch: train the ranking-aware attention branch (off: regression loss only).
        pair_combine: ``"subtract"`` (``W_o(O_i − O_j)``, default) or ``"concat"`` (``W_o[O_i; O_j]``).
        dropout: dropout of the transformer layers after fusion.
        image_dim / text_dim: token widths of the encoders; read from the model's
            ``image_token_dim`` / ``text_token_dim`` when not given.
        rank_weight / regression_weight: ``L = rank_weight·L_rank + regression_weight·L_reg``.
    """

    requires_targets = False

    width: int = 256
    heads: int = 8
    fusion_layers: int = 2
    encoder_layers: int = 2
    mlp_ratio: float = 4.0
    prompt_tokens: int = 32
    prompt_style: str = "vector"
    relation_tokens: int = 16
    pair_branch: bool = True
    pair_combine: str = "subtract"
    dropout: float = 0.1
    image_dim: int | None = None
    text_dim: int | None = None
    rank_weight: float = 1.0
    regression_weight: float = 0.2

    def validate(self) -> None:
        owner = type(self).__name__
        for name in ("width", "heads", "fusion_layers", "relation_tokens"):
            _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "encoder_layers", self.encoder_layers, 0)
        _positive_int(owner, "prompt_tokens", self.prompt_tokens, 0)
        for name in ("image_dim", "text_dim"):
            if getattr(self, name) is not None:
                _positive_int(owner, name, getattr(self, name))
        if self.width % self.heads:
            raise ConfigError(f"{owner}: width {self.width} must be a multiple of heads {self.heads}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"{owner}: prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.pair_combine not in PAIR_COMBINES:
            raise ConfigError(f"{owner}: pair_combine must be one of {PAIR_COMBINES}, got {self.pair_combine!r}")
        if not isinstance(self.pair_branch, bool):
            raise ConfigError(f"{owner}: pair_branch must be True or False, got {self.pair_branch!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ConfigError(f"{owner}: mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{owner}: dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("rank_weight", "regression_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"{owner}: {name} must be a number >= 0, got {value!r}")
        if self.bits != 32:
            raise ConfigError(f"{owner}: low-bit ranking adapters are not supported (bits={self.bits})")

    @property
    def uses_prompts(self) -> bool:
        return self.prompt_style != "none" and self.prompt_tokens > 0
