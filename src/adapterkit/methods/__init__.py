"""Built-in adapter methods. Importing this package registers them."""

from .lora import LoRAConfig, LoRALayer
from .shira import ShiraConfig, ShiraLayer

__all__ = ["LoRAConfig", "LoRALayer", "ShiraConfig", "ShiraLayer"]
