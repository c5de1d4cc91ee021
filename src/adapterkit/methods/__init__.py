"""Built-in adapter methods. Importing this package registers them."""

from .lora import LoRAConfig, LoRALayer
from .shira import ShiraConfig, ShiraLayer
from .dylora import DyLoRAConfig, DyLoRALayer
from .bottleneck import BottleneckConfig, BottleneckLayer
from .mosa import MoSAConfig
from .sft import SFTConfig
from .ranking import RankingAdapterConfig

__all__ = ["BottleneckConfig", "BottleneckLayer", "MoSAConfig", "RankingAdapterConfig", "DyLoRAConfig", "DyLoRALayer", "LoRAConfig", "LoRALayer", "SFTConfig", "ShiraConfig", "ShiraLayer"]
