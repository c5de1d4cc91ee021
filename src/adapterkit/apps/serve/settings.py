"""What one serving engine accepts (:class:`EngineSettings`, checked against the model when the engine
starts) and what it answers (:class:`Prediction`, :class:`Generation`)."""

from __future__ import annotations

import dataclasses
from torch import nn

from ...errors import ConfigError

CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)
#: HTTP request body limit: 64 texts of 8,192 characters fit even escaped as JSON (\uXXXX: 6 bytes a character)
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Limits of one engine.

    Attributes:
        max_batch: rows per forward (a request with more texts still runs, alone).
        max_queue: requests (and admin operations) waiting to run; one more is refused with 429.
        max_wait_ms: how long the worker waits for more requests to fill a batch.
        max_texts: texts per predict request.
        max_text_chars: characters per text or prompt.
        max_length: tokens per text (classification; longer texts are truncated). At most the
            model's ``max_position_embeddings``.
        max_prompt_tokens: tokens per prompt (causal LM; a longer prompt is refused). With
            ``max_new_tokens``, at most the model's ``max_position_embeddings``.
        max_new_tokens: the most tokens one generate request may ask for.
        max_adapters: adapters loaded at once; loading one more is refused with 507.
        max_adapter_bytes: bytes all loaded adapters may hold in the process
            (:attr:`~.store.AdapterMemory.held`); a load that would exceed it is refused with 507.
    """

    max_batch: int = 32
    max_queue: int = 256
    max_wait_ms: float = 5.0
    max_texts: int = 64
    max_text_chars: int = 8192
    max_length: int = 128
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_adapters: int = 1024
    max_adapter_bytes: int = 16 * 2**30

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            least = 0 if field.name == "max_wait_ms" else 1
            if not number or value < least or (field.type == "int" and not isinstance(value, int)):
                raise ConfigError(f"EngineSettings.{field.name} must be a {field.type} >= {least}, got {value!r}")

    def check_model(self, model: nn.Module, task: str) -> None:
        """Refuse limits the model cannot run: token budgets beyond its position embeddings (a
        request that long would fail inside the forward)."""
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not isinstance(positions, int):
            return  # the model declares no limit
        if task == CLASSIFICATION and self.max_length > positions:
            raise ConfigError(f"max_length is {self.max_length} tokens, the model has {positions} positions; "
                              f"set max_length (--max-length) to at most {positions}")
        if task == CAUSAL_LM and self.max_prompt_tokens + self.max_new_tokens > positions:
            raise ConfigError(f"max_prompt_tokens + max_new_tokens is {self.max_prompt_tokens + self.max_new_tokens} "
                              f"tokens, the model has {positions} positions; lower --max-prompt-tokens or "
                              "--max-new-tokens")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One predict request's answer: per text, the arg-max class and the logits.

    ``version``: the load of ``adapter`` that answered (:attr:`~.store.LoadedAdapter.version`;
    None for the base model)."""

    adapter: str | None
    labels: list[int]
    logits: list[list[float]]
    label_names: list[str] | None = None
    version: int | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generate request's answer (``version`` as in :class:`Prediction`)."""

    adapter: str | None
    text: str
    tokens: int
    version: int | None = None


def task_of(model: nn.Module) -> str:
    """``causal-lm`` for a model that generates (a Hugging Face causal LM), else ``classification``."""
    can_generate = getattr(model, "can_generate", None)
    return CAUSAL_LM if callable(can_generate) and can_generate() else CLASSIFICATION

