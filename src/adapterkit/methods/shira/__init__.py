"""SHiRA — Sparse High Rank Adapters (Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175)."""

from .config import MASKS, ShiraConfig
from .layer import ShiraLayer
from .method import ShiraMethod

__all__ = ["MASKS", "ShiraConfig", "ShiraLayer", "ShiraMethod"]
