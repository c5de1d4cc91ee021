"""One forward for a batch of rows with mixed adapters: classification logits, or greedy generation
of a causal LM with left padding. Row ``i`` runs with adapter ``names[i]`` (None: the base model),
through :func:`adapterkit.per_row`, so one base GEMM serves the whole batch.

Row order is kept as given (the rows' adapters are bound to their positions); nothing here sorts.
These functions run on the engine's worker thread only: fast tokenizers are not safe to share
between threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor, nn

from ...core.outputs import logits_of
from ...core.per_row import per_row
from ...core.state import adapted_states
from ...errors import ConfigError
from ...train.causal import PromptFormat, Sampling, generate_tokens

Names = Sequence[str | None]


def rows(model: nn.Module, names: Names) -> ContextManager[Any]:
    """:func:`per_row` for ``names``; nothing for a model without adapters (every row is the base)."""
    return per_row(model, list(names)) if adapted_states(model) else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Generated:
    """One row's answer: the decoded text and the number of new tokens (an end token included)."""

    text: str
    tokens: int


def classify(model: nn.Module, tokenizer: Any, names: Names, texts: Sequence[str], max_length: int) -> Tensor:
    """``[len(texts), classes]`` float32 logits, row ``i`` under adapter ``names[i]``."""
    if len(names) != len(texts):
        raise ConfigError(f"{len(names)} adapter names for {len(texts)} texts")
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad(), rows(model, names):
        logits = logits_of(model(**inputs))
    return logits.detach().float().cpu()


class Generator:
    """Greedy generation for one causal LM and its tokenizer (its chat template when it has one)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = PromptFormat(tokenizer)

    def prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        """The prompt's token ids; a prompt longer than ``max_tokens`` is refused (ConfigError)."""
        ids = self.format.prompt_ids(prompt)
        if len(ids) > max_tokens:
            raise ConfigError(f"the prompt has {len(ids)} tokens; this server takes at most {max_tokens}")
        return ids

    def generate(self, names: Names, prompts: Sequence[list[int]], max_new_tokens: Sequence[int]) -> list[Generated]:
        """Greedy answers, row ``i`` under adapter ``names[i]`` with its own ``max_new_tokens[i]``
        (the batch decodes to the largest; each row keeps its first tokens, which greedy decoding
        makes the same as a run of its own length)."""
        if not (len(names) == len(prompts) == len(max_new_tokens)) or not prompts:
            raise ConfigError("need one adapter name, prompt and max_new_tokens per row")
        with rows(self.model, names):
            out = generate_tokens(self.model, self.format, prompts, Sampling(max_new_tokens=max(max_new_tokens)))
        stops = set(self.format.stop_ids)
        answers = []
        for row, limit in enumerate(max_new_tokens):
            new = out[row, :limit].tolist()
            end = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
            answers.append(Generated(self.tokenizer.decode(new[:end], skip_special_tokens=True), end))
        return answers
