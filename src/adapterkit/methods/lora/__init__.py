"""LoRA: ``y = W₀x + s · B A x`` with ``s = alpha / r`` (or ``alpha / √r`` for rsLoRA).

Unfused, the delta is computed as ``(x Aᵀ) Bᵀ`` — a dense ΔW is never built in the training
forward. Fused, ΔW is accumulated into the weight with one GEMM-accumulate (``addmm``).
"""

from .config import LoRAConfig, pattern_value
from .layer import LoRALayer, is_conv_target, is_lora_target
from .method import LoRAMethod
from .peft import LoRACodec

__all__ = ["LoRACodec", "LoRAConfig", "LoRALayer", "LoRAMethod", "is_conv_target", "is_lora_target", "pattern_value"]
