"""Candidate inputs: a generator continues the seed prompt; any callable can stand in for an LM."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Protocol, Sequence

from torch import nn

from ...train.causal import Sampling, generate
from .distill import activated
from .prompts import SeedPrompt

#: sampling for candidates: room for about five one-line items, nucleus off (a full sort of a
#: 262k vocabulary per step costs more than the step itself), top-k 50.
CANDIDATE_SAMPLING = Sampling(max_new_tokens=160, do_sample=True, temperature=1.0, top_k=50)


class Generator(Protocol):
    """Anything that proposes candidate inputs: ``propose(calls, seed)`` runs ``calls`` prompts
    and returns every item they produced (duplicates included; the sampler removes them)."""

    def propose(self, calls: int, seed: int) -> list[str]: ...


def _orders(prompt: SeedPrompt, calls: int, seed: int, shuffle: bool) -> list[list[int]]:
    """One seed order per call: shuffled per call for variety, or as given."""
    rng = random.Random(seed)
    base = list(range(len(prompt.seeds)))
    return [rng.sample(base, len(base)) if shuffle else base for _ in range(calls)]


class FunctionGenerator:
    """Wraps any ``prompt -> continuation`` callable (an API client, a rule-based sampler)."""

    def __init__(self, complete: Callable[[str], str], prompt: SeedPrompt, shuffle_seeds: bool = True) -> None:
        self.complete, self.prompt, self.shuffle_seeds = complete, prompt, shuffle_seeds

    def propose(self, calls: int, seed: int) -> list[str]:
        items: list[str] = []
        for order in _orders(self.prompt, calls, seed, self.shuffle_seeds):
            items += self.prompt.parse(self.complete(self.prompt.build(order)))
        return items


class LMGenerator:
    """A causal LM continuing the seed prompt as plain text (no chat template), ``batch_size``
    prompts per batched ``generate`` call with the KV cache. It generates with ``adapter`` active
    (default ``None``: the base model, whatever else is attached to it)."""

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: SeedPrompt,
                 sampling: Sampling = CANDIDATE_SAMPLING, batch_size: int = 16, shuffle_seeds: bool = True,
                 progress: bool = False, adapter: str | None = None) -> None:
        self.model, self.tokenizer, self.prompt, self.adapter = model, tokenizer, prompt, adapter
        self.sampling, self.batch_size, self.shuffle_seeds, self.progress = sampling, batch_size, shuffle_seeds, progress

    def propose(self, calls: int, seed: int) -> list[str]:
        prompts = [self.prompt.build(order) for order in _orders(self.prompt, calls, seed, self.shuffle_seeds)]
        # a row is done after the last item or a blank line; decoding on would only produce commentary
        sampling = dataclasses.replace(self.sampling, stop=self.sampling.stop or (f"\n{self.prompt.n_total + 1}.", "\n\n"))
        with activated(self.model, self.adapter):
            outputs = generate(self.model, self.tokenizer, prompts, sampling, batch_size=self.batch_size,
                               template=False, seed=seed, progress=self.progress, desc="candidates")
        return [item for text in outputs for item in self.prompt.parse(text)]


def candidates(generator: Generator, n: int, seed: int = 0, exclude: Sequence[str] = (), max_calls: int = 10_000,
               calls_per_round: int = 16) -> list[str]:
    """``n`` distinct candidates, none in ``exclude`` (no filtering) — e.g. the seeds' negatives."""
    from .sampler import RejectionSampler

    sampler = RejectionSampler(generator, lambda texts: [True] * len(texts), n, max_calls=max_calls,
                               calls_per_round=calls_per_round, exclude=exclude, progress=False)
    return list(sampler.run(seed).accepted)
