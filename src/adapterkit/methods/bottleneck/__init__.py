"""Bottleneck adapters: sequential (Houlsby, Pfeiffer) and parallel (He et al., AdaptFormer), linear or 1×1-conv."""

from .config import BottleneckConfig
from .layer import BottleneckLayer, can_wrap, check_fits, feature_dims
from .method import BottleneckMethod

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckMethod", "can_wrap", "check_fits", "feature_dims"]
