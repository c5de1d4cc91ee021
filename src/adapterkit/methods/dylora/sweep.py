"""Rank search without retraining: evaluate one DyLoRA adapter at every rank it serves."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from torch import nn
from tqdm.auto import tqdm

from ...errors import ConfigError
from ...io.safefiles import write_json
from .method import current_rank, ranks_of, set_rank


@dataclasses.dataclass(frozen=True)
class RankSweep:
    """A metric at each rank, the best rank, and the smallest rank within ``tolerance`` of the best."""

    adapter: str
    metric: str
    ranks: tuple[int, ...]
    scores: tuple[float, ...]
    higher_is_better: bool
    tolerance: float
    best_rank: int
    chosen_rank: int

    def table(self) -> str:
        """A Markdown table of the sweep."""
        rows = [f"| rank | {self.metric} |", "|---:|---:|"]
        for rank, score in zip(self.ranks, self.scores):
            marks = " ".join(m for m, r in (("best", self.best_rank), ("chosen", self.chosen_rank)) if r == rank)
            rows.append(f"| {rank} | {score:.4f}{' (' + marks + ')' if marks else ''} |")
        return "\n".join(rows)

    def write(self, directory: str | Path, plot: bool = True) -> Path:
        """Write ``rank_sweep.json``, ``rank_sweep.md`` and (``plot=True``) ``rank_sweep.png``."""
        directory = Path(directory)
        write_json(directory / "rank_sweep.json", dataclasses.asdict(self))
        direction = "higher" if self.higher_is_better else "lower"
        (directory / "rank_sweep.md").write_text(
            f"# Rank sweep of adapter {self.adapter!r}\n\n{self.table()}\n\n"
            f"Best rank {self.best_rank}; smallest rank within {self.tolerance:g} of the best ({direction} is better): "
            f"{self.chosen_rank}.\n")
        if plot:
            self._plot(directory / "rank_sweep.png")
        return directory

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot(self.ranks, self.scores, marker="o")
        ax.axvline(self.chosen_rank, color="tab:green", linestyle="--", label=f"chosen rank {self.chosen_rank}")
        ax.set_xlabel("rank")
        ax.set_ylabel(self.metric)
        ax.set_xticks(list(self.ranks))
        ax.set_title(f"DyLoRA adapter {self.adapter!r}: {self.metric} by rank")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def rank_sweep(model: nn.Module, name: str, evaluate: Callable[[nn.Module], float], ranks: Sequence[int] | None = None,
               tolerance: float = 0.01, higher_is_better: bool = True, metric: str = "metric",
               progress: bool = True) -> RankSweep:
    """Evaluate DyLoRA adapter ``name`` at each rank (default: every rank it serves) with
    ``evaluate(model) -> float`` and pick the smallest rank within ``tolerance`` of the best score.
    The adapter's inference rank is restored afterwards (also if ``evaluate`` raises)."""
    served = list(ranks_of(model, name))
    ranks = list(served if ranks is None else ranks)
    bad = [r for r in ranks if r not in served]
    if not ranks or bad:
        raise ConfigError(f"ranks must be a non-empty subset of {served[0]}..{served[-1]}, got {ranks}")
    if not tolerance >= 0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance}")
    before = current_rank(model, name)
    scores = []
    try:
        for rank in tqdm(ranks, desc="rank sweep", unit="rank", disable=not progress, leave=False):
            set_rank(model, rank, name)
            scores.append(float(evaluate(model)))
    finally:
        set_rank(model, before, name)
    sign = 1.0 if higher_is_better else -1.0
    best = max(range(len(ranks)), key=lambda i: (sign * scores[i], -ranks[i]))
    good = [r for r, s in zip(ranks, scores) if sign * (scores[best] - s) <= tolerance]
    return RankSweep(name, metric, tuple(ranks), tuple(scores), higher_is_better, tolerance, ranks[best], min(good))
