"""LoRA <-> PEFT files."""

from __future__ import annotations

from typing import Any, Mapping

from ...core.config import AdapterConfig
from ...errors import UnsupportedError
from ...io.peft_format import PeftCodec
from .config import LoRAConfig


class LoRACodec(PeftCodec):
    """LoRA <-> PEFT ``adapter_config.json`` and key names."""

    peft_type = "LORA"
    key_suffixes = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    # PEFT fields we read; any other field must keep its default value or loading is refused.
    honoured = {
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
        "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
        "layers_pattern", "init_lora_weights",
    }
    must_be_default = {"bias": "none", "use_dora": False, "lora_bias": False, "use_qalora": False}
    key_prefix = "lora_"
    feature_keys = {"lora_embedding_A": "LoRA on embedding layers", "lora_embedding_B": "LoRA on embedding layers",
                    "lora_magnitude_vector": "DoRA (use_dora)", "lora_B.bias": "LoRA biases (lora_bias)"}
    # init_lora_weights values that leave the base weights untouched, so the file is the whole
    # adapter. PiSSA, OLoRA, CorDA, LoRA-GA subtract the initial adapter from the base weights and
    # LoftQ quantises them: the file's LoRA only reproduces its outputs on that changed base.
    base_preserving_inits = (True, False, "gaussian", "orthogonal", "eva", "mica")

    def check_fields(self, data: Mapping[str, Any], where: str) -> None:
        init = data.get("init_lora_weights", True)
        if not any(init is ok or (isinstance(init, str) and init == ok) for ok in self.base_preserving_inits):
            raise UnsupportedError(
                f"{where}: PEFT option init_lora_weights={init!r} is not supported: it rewrites the base model's weights "
                "(PiSSA/OLoRA/CorDA/LoRA-GA residuals, LoftQ quantisation), which the adapter file does not hold; "
                "save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA")
        super().check_fields(data, where)

    def to_peft(self, config: AdapterConfig, targets: list[str]) -> dict[str, Any]:
        assert isinstance(config, LoRAConfig)
        return {
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": sorted(targets),
            "exclude_modules": None,
            "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
            "fan_in_fan_out": config.fan_in_fan_out,
            "bias": "none",
            "use_rslora": config.use_rslora,
            "use_dora": False,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}[config.init],
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def from_peft(self, data: Mapping[str, Any]) -> AdapterConfig:
        init = data.get("init_lora_weights", True)
        return LoRAConfig(
            r=int(data.get("r", 8)),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            modules_to_save=data.get("modules_to_save"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            use_rslora=bool(data.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "default",
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )
