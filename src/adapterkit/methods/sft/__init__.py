"""LT-SFT — Lottery-Ticket Sparse Fine-Tuning (Ansell et al., ACL 2022, arXiv 2110.07560).

    import adapterkit as ak
    config = ak.SFTConfig(density=0.01, target_modules=r"bert", full_steps=1000, sparse_steps=1000)
    ak.sft.train_sft(model, config, "task", batches)       # phase 1, selection, rewind, phase 2
    ak.save(model, "out/task", "task"); ak.fuse(model)      # exact, like every delta adapter

``ak.attach(model, config, name, calibration=batches)`` runs phase 1 and the selection only (then
train the values with ``ak.train`` or any loop, adding ``λ · ak.sft.l1_penalty(model, name)``).
"""

from .compat import ComposableSFT, SparseDiff, attach_composable_sft, read_composable_sft
from .config import SELECTIONS, SFTConfig, match_adapter
from .layer import SFTLayer, SFTPart, index_dtype
from .method import SFTMethod
from .select import random_k, top_k, top_k_exact, top_k_histogram
from .train import l1_penalty, outcome, train_sft

__all__ = ["ComposableSFT", "SELECTIONS", "SFTConfig", "SFTLayer", "SFTMethod", "SFTPart", "SparseDiff",
           "attach_composable_sft", "index_dtype", "l1_penalty", "match_adapter", "outcome", "random_k",
           "read_composable_sft", "top_k", "top_k_exact", "top_k_histogram", "train_sft"]
