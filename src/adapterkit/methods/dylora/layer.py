"""One DyLoRA layer: LoRA factors of rank ``r_max`` used through a prefix of ``b`` components."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..lora import LoRALayer
from .config import DyLoRAConfig


class DyLoRALayer(LoRALayer):
    """LoRA factors ``lora_A`` (r_max × in) and ``lora_B`` (out × r_max) used at a prefix rank.

    In training mode the forward uses :attr:`train_rank` (drawn each optimizer step by
    :func:`adapterkit.step`); in eval mode and when fused, :attr:`eval_rank`
    (:func:`adapterkit.set_rank`, ``r_max`` by default). Truncation slices the factors, so the
    adapter's compute is O(b).
    """

    def __init__(self, adapter_name: str, base: nn.Module, config: DyLoRAConfig, sampler_seed: int) -> None:
        super().__init__(adapter_name, base, r=config.r_max, scaling=config.scale_at(config.r_max),
                         dropout=config.dropout, init=config.init)
        self.config = config
        self.train_rank = config.r_max
        self.eval_rank = config.r_max
        self.generator = torch.Generator().manual_seed(sampler_seed)
        self._probabilities = torch.tensor(config.rank_probabilities(), dtype=torch.float64)

    def draw_rank(self) -> int:
        """The next rank from this layer's seeded sampler."""
        index = torch.multinomial(self._probabilities, 1, generator=self.generator)
        return self.config.r_min + int(index)

    def set_eval_rank(self, rank: int) -> None:
        self.eval_rank = rank
        self.scaling = self.config.scale_at(rank)  # what fusing (LoRALayer.write_from) applies

    @property
    def rank_in_use(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def truncated(self, rank: int) -> tuple[Tensor, Tensor]:
        """``(A[:b], B[:, :b])``; in frozen training only component ``b`` carries gradient."""
        a, b = self.weight_of("lora_A")[:rank], self.weight_of("lora_B")[:, :rank]
        if self.config.frozen and self.training and rank > 1 and torch.is_grad_enabled():
            a = torch.cat([a[: rank - 1].detach(), a[rank - 1:]])
            b = torch.cat([b[:, : rank - 1].detach(), b[:, rank - 1:]], dim=1)
        return a, b

    def factors(self, for_fusing: bool = False) -> tuple[Tensor, Tensor, float]:
        rank = self.eval_rank if for_fusing else self.rank_in_use
        a, b = self.truncated(rank)
        return a, b, self.config.scale_at(rank)

    def extra_repr(self) -> str:
        return (f"adapter={self.adapter_name!r}, r_max={self.config.r_max}, train_rank={self.train_rank}, "
                f"eval_rank={self.eval_rank}, scaling={self.config.scaling}, frozen={self.config.frozen}")
