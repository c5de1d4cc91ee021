"""Language modules: one per language, trained with a causal-LM objective on monolingual text.

Two kinds, as in the paper: an LT-SFT whose budget K equals the parameter count of the bottleneck
adapter (:func:`~adapterkit.apps.clir.modules.adapter_size`), and a Pfeiffer bottleneck adapter
after every MLP output. The LM loss is the shortlist softmax of :class:`.reranker.LanguageModel`
(an approximation of the full 262k-way softmax; see there). The modules are saved from the LM
wrapper and load unchanged into the cross-encoder: both hold the decoder stack at ``.body``.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from ...io import artefact
from ...methods.bottleneck import BottleneckConfig
from .modules import (ADAPTER_TARGETS, LINEAR_TARGETS, Backbone, ModuleRecord, Trained, adapter_size, sft_config,
                      train_adapter, train_sft)
from .reranker import Shortlist, language_model

KINDS = ("sft", "adapter")
DEFAULT_LR = {"sft": 1e-4, "adapter": 1e-3}  # LT-SFT: both phases


@dataclasses.dataclass(frozen=True)
class LanguageOptions:
    """How a language module is trained.

    Attributes:
        kind: ``"sft"`` or ``"adapter"``.
        steps: LT-SFT steps per phase; an adapter trains ``2 * steps`` (the same optimizer steps
            as the SFT's two phases together).
        batch_size, max_tokens: packed sequences per step and tokens per sequence.
        reduction_factor: the adapter's (bottleneck = hidden // rf); the SFT's K is that adapter's size.
        shortlist_size: vocabulary ids in the LM softmax (the most frequent in the text).
        max_texts: use at most this many texts (seeded sample) of the language.
        lr: learning rate (None: :data:`DEFAULT_LR` of the kind; an SFT uses it in both phases).
        seed: data order.
    """

    kind: str = "sft"
    steps: int = 30
    batch_size: int = 8
    max_tokens: int = 64
    reduction_factor: int = 2
    shortlist_size: int = 16384
    max_texts: int = 20000
    lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"language module kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("steps", "batch_size", "max_tokens", "shortlist_size", "max_texts", "reduction_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be >= 2 (a token and its successor), got {self.max_tokens}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]

    @property
    def total_steps(self) -> int:
        return 2 * self.steps


class PackedBatches:
    """``steps`` batches of ``batch_size`` rows of ``max_tokens`` tokens cut from the texts joined
    with EOS (no padding); each row starts with BOS; labels are the input ids (shifted by the model).
    Re-iterable: every pass yields the same rows (seeded order), so a two-phase method sees the
    same data in both phases."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], batch_size: int, max_tokens: int, steps: int,
                 seed: int = 0) -> None:
        stream: list[int] = []
        eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        width = max_tokens - len(bos)
        needed = batch_size * steps * width  # stop tokenising once the batches are covered
        for start in range(0, len(texts), 256):
            for ids in tokenizer(list(texts[start:start + 256]), add_special_tokens=False)["input_ids"]:
                stream.extend(list(ids) + eos)
            if len(stream) >= needed:
                break
        rows = [bos + stream[i:i + width] for i in range(0, len(stream) - width + 1, width)]
        if not rows:
            raise ConfigError(f"the text has fewer than {width} tokens; nothing to train the language module on")
        random.Random(seed).shuffle(rows)
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.batch_size = batch_size
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        count = self.rows.shape[0]
        for step in range(self.steps):
            index = [(step * self.batch_size + j) % count for j in range(self.batch_size)]
            ids = self.rows[index]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def sample_texts(texts: Sequence[str], limit: int, seed: int) -> list[str]:
    """The non-empty texts, a seeded sample of ``limit`` of them when there are more."""
    texts = [t for t in texts if t and t.strip()]
    if len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    return texts


def language_budget(backbone: Backbone, reduction_factor: int) -> int:
    """K of a language SFT: the size of the language adapter it is compared with."""
    return adapter_size(backbone.hidden, backbone.layers, reduction_factor)


def train_language_module(backbone: Backbone, lang: str, texts: Sequence[str], options: LanguageOptions,
                          out: str | Path) -> ModuleRecord:
    """Train the ``lang`` language module of ``options.kind`` on ``texts``, save it (adapter name
    ``lang_<lang>``) with its :class:`ModuleRecord` into ``out`` and return the record."""
    texts = sample_texts(texts, options.max_texts, options.seed)
    if not texts:
        raise ConfigError(f"no {lang} text to train a language module on")
    tokenizer = backbone.tokenizer
    shortlist = Shortlist.from_texts(tokenizer, texts, options.shortlist_size)
    name = f"lang_{lang}"
    model = language_model(backbone.fresh(), shortlist)
    torch.manual_seed(options.seed)
    if options.kind == "adapter":
        batches = PackedBatches(tokenizer, texts, options.batch_size, options.max_tokens, options.total_steps,
                                options.seed)
        config = BottleneckConfig(target_modules=ADAPTER_TARGETS, reduction_factor=options.reduction_factor)
        trained: Trained = train_adapter(model, config, name, batches, options.learning_rate)
    else:
        batches = PackedBatches(tokenizer, texts, options.batch_size, options.max_tokens, options.steps, options.seed)
        config = sft_config(language_budget(backbone, options.reduction_factor), LINEAR_TARGETS, options.steps,
                            options.learning_rate)
        trained = train_sft(model, config, name, batches, options.learning_rate)
    artefact.save(model, out, name)
    first, last = trained.summary()
    record = ModuleRecord("language", options.kind, lang, name, trained.trainable, trained.seconds,
                          trained.steps, first, last,
                          {**dataclasses.asdict(options), "lr": options.learning_rate, "shortlist": len(shortlist), "model": backbone.name})
    record.write(out)
    return record
