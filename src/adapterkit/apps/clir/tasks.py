"""The CLIR data behind training and evaluation (``adapterkit.zoo.clir`` plus the first stage),
shared by the command line and the benchmark."""

from __future__ import annotations

import dataclasses
import random
from typing import Mapping, Sequence

from ...errors import ConfigError
from .evaluate import METRICS
from ...zoo.clir import Collection
from .pipeline import EvalOptions, Run, first_stage_run, select_queries
from .ranking import RankingExample

__all__ = ["METRICS", "PairData", "examples_from", "language_texts", "pair_data", "ranking_examples"]


def language_texts(lang: str) -> list[str]:
    """Monolingual text of ``lang`` (fortunes, translated man pages, messages; never a test document)."""
    from ...zoo.clir import load_monolingual

    return load_monolingual(lang)


def examples_from(collection: Collection, negatives: Mapping[str, Sequence[str]], count: int,
                  limit: int | None = None, seed: int = 0) -> list[RankingExample]:
    """One example per query with a relevant document and ``count`` negatives (not relevant)."""
    out = []
    for qid in sorted(collection.queries):
        relevant = sorted(d for d, rel in collection.qrels.get(qid, {}).items() if rel > 0 and d in collection.docs)
        negs = [d for d in negatives.get(qid, ()) if d not in collection.qrels.get(qid, {}) and d in collection.docs]
        if relevant and len(negs) >= count:
            out.append(RankingExample(collection.queries[qid], collection.docs[relevant[0]],
                                      tuple(collection.docs[d] for d in negs[:count])))
    random.Random(seed).shuffle(out)
    return out[:limit] if limit else out


def ranking_examples(count: int, limit: int | None = None, seed: int = 0) -> list[RankingExample]:
    """English training examples: NAME line → DESCRIPTION, ``count`` BM25 negatives per query."""
    from ...zoo.clir import load_ranking_train
    from .first_stage import bm25_negatives

    collection = load_ranking_train()
    examples = examples_from(collection, bm25_negatives(collection, count, seed), count, limit, seed)
    if not examples:
        raise ConfigError(f"no English training query has {count} BM25 negatives")
    return examples


@dataclasses.dataclass
class PairData:
    """A test collection, the chosen queries and the first stage's candidates for them."""

    collection: Collection
    qids: list[str]
    candidates: Run


def pair_data(pair: str, options: EvalOptions) -> PairData:
    """Load ``pair``, sample its queries and retrieve their first-stage candidates."""
    from ...zoo.clir import load_collection

    collection = load_collection(pair)
    qids = select_queries(collection, options.queries, options.seed)
    return PairData(collection, qids, first_stage_run(collection, options.depth, qids))
