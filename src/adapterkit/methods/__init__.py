"""Built-in adapter methods. Importing this package registers them."""

from .lora import LoRAConfig, LoRALayer
from .shira import ShiraConfig, ShiraLayer
from .dylora import DyLoRAConfig, DyLoRALayer

__all__ = ["DyLoRAConfig", "DyLoRALayer", "LoRAConfig", "LoRALayer", "ShiraConfig", "ShiraLayer"]
