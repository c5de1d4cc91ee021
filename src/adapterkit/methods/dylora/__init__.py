"""DyLoRA — one LoRA training run that serves every rank (Valipour et al., EACL 2023, arXiv 2210.07558).

    ak.attach(model, ak.DyLoRAConfig(r_max=8, target_modules=["query", "value"]), "task")
    ak.train(model, batches)          # draws a rank per optimizer step (ak.step in a plain loop)
    ak.rank_sweep(model, "task", evaluate)   # metric at every rank; smallest rank near the best
    ak.set_rank(model, 2)             # inference at rank 2 (also while fused)
    ak.export(model, "task", "out/rank2", rank=2)   # a plain rank-2 LoRA (PEFT format)
"""

from ...core.steps import step
from .config import DyLoRAConfig
from .layer import DyLoRALayer
from .method import DyLoRAMethod, current_rank, ranks_of, set_rank
from .sweep import RankSweep, rank_sweep

__all__ = ["DyLoRAConfig", "DyLoRALayer", "DyLoRAMethod", "RankSweep", "current_rank", "rank_sweep", "ranks_of",
           "set_rank", "step"]
