"""Built-in adapter methods. Importing this package registers them."""

from .lora import LoRAConfig, LoRALayer

__all__ = ["LoRAConfig", "LoRALayer"]
