"""Scoring runs with ranx: MAP, MRR@10, nDCG@10 and paired significance tests between systems.

Runs and qrels are ranx's plain form, ``{query id: {doc id: score}}`` and ``{query id: {doc id: grade}}``.
Before ranx sees a run, each query's documents are re-scored by rank with ties broken by document id,
so a score tie can never change a metric between two calls. Only queries with a relevant document
count; a query that is missing from a run (or has no candidates) scores 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from ...errors import ConfigError

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]
METRICS = ("map", "mrr@10", "ndcg@10")
STAT_TESTS = ("student", "fisher", "tukey")
_NOTHING = "\x00no-candidate"  # stands in for an empty candidate list, which ranx cannot hold


def ranked_ids(scores: Mapping[str, float]) -> list[str]:
    """Document ids by descending score, ties by document id."""
    return [d for d, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))]


def rerank_cutoff(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """The top ``k`` documents of each query (ties by document id), scores unchanged."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    return {q: {d: float(docs[d]) for d in ranked_ids(docs)[:k]} for q, docs in run.items()}


def _judged(qrels: Qrels) -> dict[str, dict[str, int]]:
    judged = {}
    for qid, docs in qrels.items():
        grades = {str(d): int(g) for d, g in docs.items()}
        if any(g < 0 for g in grades.values()):
            raise ConfigError(f"query {qid!r}: relevance grades must be >= 0")
        if any(g > 0 for g in grades.values()):
            judged[str(qid)] = grades
    if not judged:
        raise ConfigError("no query has a relevant document in the qrels")
    return judged


def _by_rank(run: Mapping[str, Mapping[str, float]], qids: Sequence[str]) -> Run:
    out: Run = {}
    for qid in qids:
        order = ranked_ids(run.get(qid, {}))
        out[qid] = {d: float(len(order) - i) for i, d in enumerate(order)} if order else {_NOTHING: 0.0}
    return out


def _check_metrics(metrics: Sequence[str] | str) -> tuple[str, ...]:
    chosen = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not chosen:
        raise ConfigError("give at least one metric")
    from ranx.metrics import metric_switch
    from ranx.meta.evaluate import extract_metric_and_params

    for metric in chosen:
        try:
            metric_switch(extract_metric_and_params(metric)[0])
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"unknown metric {metric!r} (ranx names, e.g. map, mrr@10, ndcg@10): {exc}") from None
    return chosen


def _per_query(judged: dict[str, dict[str, int]], run: Mapping[str, Mapping[str, float]],
               metrics: tuple[str, ...], name: str = "run") -> dict[str, dict[str, float]]:
    import ranx

    qids = sorted(judged)
    ranx_run = ranx.Run(_by_rank(run, qids), name=name)
    ranx.evaluate(ranx.Qrels(judged), ranx_run, list(metrics), return_mean=False, save_results_in_run=True)
    return {m: {q: float(ranx_run.scores[m][q]) for q in qids} for m in metrics}


def evaluate(qrels: Qrels, run: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | str = METRICS,
             per_query: bool = False) -> dict[str, float] | dict[str, dict[str, float]]:
    """Mean of each metric over the judged queries, or with ``per_query`` each query's value
    (``{metric: {qid: value}}``)."""
    chosen = _check_metrics(metrics)
    values = _per_query(_judged(qrels), run, chosen)
    if per_query:
        return values
    return {m: math.fsum(v.values()) / len(v) for m, v in values.items()}


@dataclasses.dataclass(frozen=True)
class SystemScores:
    """One system's row of a :class:`Comparison`."""

    name: str
    means: dict[str, float]
    #: standard error of the mean over queries (sample standard deviation / sqrt(queries))
    stderrs: dict[str, float]
    #: per metric, the systems this one beats significantly (higher mean and p < max_p)
    beats: dict[str, tuple[str, ...]]
    #: per other system, per metric, the p-value of the paired test
    p_values: dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Systems scored on the same queries, with paired significance tests (ranx ``compare``)."""

    metrics: tuple[str, ...]
    systems: tuple[SystemScores, ...]
    queries: int
    stat_test: str
    max_p: float

    def system(self, name: str) -> SystemScores:
        """The row of system ``name``."""
        for row in self.systems:
            if row.name == name:
                return row
        raise ConfigError(f"no system {name!r}; systems: {', '.join(r.name for r in self.systems)}")

    def table(self, digits: int = 3) -> str:
        """A Markdown table: mean ± standard error; superscript letters mark the systems beaten."""
        letters = {row.name: chr(ord("a") + i) for i, row in enumerate(self.systems)}
        lines = ["| | system | " + " | ".join(self.metrics) + " |", "|---|---|" + "---|" * len(self.metrics)]
        for row in self.systems:
            cells = [f"{row.means[m]:.{digits}f} ± {row.stderrs[m]:.{digits}f}"
                     + ("" if not row.beats[m] else " ^" + "".join(letters[b] for b in row.beats[m]))
                     for m in self.metrics]
            lines.append(f"| {letters[row.name]} | {row.name} | " + " | ".join(cells) + " |")
        lines.append(f"\n{self.queries} queries; ^x: better than system x ({self.stat_test} test, p < {self.max_p})")
        return "\n".join(lines)


def _stderr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def compare(qrels: Qrels, runs: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str] | str = METRICS,
            stat_test: str = "student", max_p: float = 0.05) -> Comparison:
    """Score every run on the judged queries and test each pair of systems (two-sided paired Student's
    t-test by default; ``"fisher"`` randomisation with ranx's fixed seed, or ``"tukey"`` HSD)."""
    import numpy as np
    import ranx

    if stat_test not in STAT_TESTS:
        raise ConfigError(f"unknown stat_test {stat_test!r}; choose from {', '.join(STAT_TESTS)}")
    if not 0 < max_p < 1:
        raise ConfigError(f"max_p must be between 0 and 1, got {max_p}")
    if not runs:
        raise ConfigError("give at least one run to compare")
    chosen = _check_metrics(metrics)
    judged = _judged(qrels)
    qids = sorted(judged)
    names = [str(n) for n in runs]
    per_query = {name: _per_query(judged, run, chosen, name) for name, run in zip(names, runs.values())}
    report = ranx.compare(ranx.Qrels(judged), [ranx.Run(_by_rank(runs[n], qids), name=n) for n in runs],
                          list(chosen), stat_test=stat_test, max_p=max_p) if len(names) > 1 else None
    rows = []
    for name in names:
        values = {m: [per_query[name][m][q] for q in qids] for m in chosen}
        means = {m: math.fsum(v) / len(v) for m, v in values.items()}
        p_values: dict[str, dict[str, float]] = {}
        beats: dict[str, list[str]] = {m: [] for m in chosen}
        for other in names:
            if other == name or report is None:
                continue
            tests = report.comparisons[name, other]
            p_values[other] = {m: float(tests[m]["p_value"]) for m in chosen}
            for m in chosen:
                other_mean = float(np.mean([per_query[other][m][q] for q in qids]))
                if tests[m]["significant"] and means[m] > other_mean:
                    beats[m].append(other)
        rows.append(SystemScores(name, means, {m: _stderr(v) for m, v in values.items()},
                                 {m: tuple(b) for m, b in beats.items()}, p_values))
    return Comparison(chosen, tuple(rows), len(qids), stat_test, max_p)
