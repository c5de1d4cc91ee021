"""Rejection sampling: generate, drop duplicates, keep what the discriminator accepts, stop at N."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from tqdm.auto import tqdm

from ...errors import BudgetExceededError, ConfigError
from .generator import Generator
from .prompts import dedup_key

Accept = Callable[[Sequence[str]], Sequence[bool]]


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What one sampling run saw: ``candidates`` are the distinct new candidates in the order they
    were judged, ``accepted`` the first ``target_size`` of them the discriminator accepted."""

    accepted: tuple[str, ...]
    candidates: tuple[str, ...]
    calls: int
    duplicates: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted over judged candidates (judging stops once the target is reached)."""
        judged = self.candidates[: self.candidates.index(self.accepted[-1]) + 1] if self.accepted else self.candidates
        return len(self.accepted) / max(1, len(judged))


class RejectionSampler:
    """Draws candidates from ``generator`` in rounds of ``calls_per_round`` calls until exactly
    ``target_size`` are accepted. Candidates equal (up to whitespace) to an ``exclude`` text (the
    seeds) or to an earlier candidate are dropped before judging. Raises
    :class:`~adapterkit.errors.BudgetExceededError` after ``max_calls`` calls."""

    def __init__(self, generator: Generator, accept: Accept, target_size: int, *, max_calls: int = 2000,
                 calls_per_round: int = 16, exclude: Sequence[str] = (), max_chars: int = 1000,
                 progress: bool = True) -> None:
        for label, value in (("target_size", target_size), ("max_calls", max_calls), ("calls_per_round", calls_per_round)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{label} must be a positive integer, got {value!r}")
        self.generator, self.accept, self.target_size = generator, accept, target_size
        self.max_calls, self.calls_per_round, self.max_chars = max_calls, calls_per_round, max_chars
        self.exclude = {dedup_key(t) for t in exclude}
        self.progress = progress

    def run(self, seed: int = 0, resume: SampleResult | None = None,
            on_round: Callable[[SampleResult], None] | None = None) -> SampleResult:
        """Sample until ``target_size`` candidates are accepted. ``on_round`` receives the state after
        every round (to checkpoint it); ``resume`` continues from such a state, from the same
        generator, discriminator and ``seed``: each round's generator seed is ``seed + calls``, so a
        resumed run gives exactly what an uninterrupted one would have."""
        seen = set(self.exclude)
        judged: list[str] = []
        accepted: list[str] = []
        calls = duplicates = 0
        if resume is not None:
            if not set(resume.accepted) <= set(resume.candidates) or len(resume.accepted) >= self.target_size:
                raise ConfigError("the state to resume from is not an unfinished run of this sampler")
            judged, accepted = list(resume.candidates), list(resume.accepted)
            calls, duplicates = resume.calls, resume.duplicates
            seen |= {dedup_key(t) for t in judged}  # every candidate of a finished round was judged
        bar = tqdm(total=self.target_size, initial=len(accepted), desc="filter", disable=not self.progress, leave=False,
                   mininterval=1.0)
        try:
            while len(accepted) < self.target_size:
                if calls >= self.max_calls:
                    raise BudgetExceededError(
                        f"rejection sampling stopped after {calls} generator calls with {len(accepted)} of "
                        f"{self.target_size} accepted ({len(judged)} distinct candidates judged, {duplicates} duplicates); "
                        "raise max_calls, add seeds, or check the discriminator (it may reject almost everything)")
                n = min(self.calls_per_round, self.max_calls - calls)
                proposed = self.generator.propose(n, seed + calls)
                calls += n
                fresh = []
                for text in proposed:
                    key = dedup_key(text)
                    if not key or len(text) > self.max_chars or key in seen:
                        duplicates += bool(key) and key in seen
                        continue
                    seen.add(key)
                    fresh.append(text.strip())
                verdicts = list(self.accept(fresh)) if fresh else []
                if len(verdicts) != len(fresh):
                    raise ConfigError(f"the discriminator returned {len(verdicts)} verdicts for {len(fresh)} candidates")
                for text, ok in zip(fresh, verdicts):
                    if len(accepted) == self.target_size:
                        break
                    judged.append(text)
                    if bool(ok):
                        accepted.append(text)
                        bar.update(1)
                bar.set_postfix(acceptance=f"{len(accepted) / max(1, len(judged)):.2f}", calls=calls)
                if on_round is not None and len(accepted) < self.target_size:
                    on_round(SampleResult(tuple(accepted), tuple(judged), calls, duplicates))
        finally:
            bar.close()
        return SampleResult(tuple(accepted), tuple(judged), calls, duplicates)
