"""Zero-shot cross-lingual reranking with language and ranking modules (Litschko et al., COLING 2022)
on a decoder cross-encoder: :mod:`.reranker` (models), :mod:`.language` and :mod:`.ranking`
(training), :mod:`.systems` (the evaluated compositions), :mod:`.pipeline` (rerank and score).
:mod:`.first_stage` (BM25 and multilingual USE runs, BM25 hard negatives) and :mod:`.evaluate`
(ranx metrics and significance tables) work on the collections of :mod:`adapterkit.zoo.clir`."""

# the function evaluate stays in its module: exporting it here would hide the module of that name
from .evaluate import METRICS, Comparison, SystemScores, compare, ranked_ids, rerank_cutoff
from .first_stage import bm25_negatives, bm25_run, encode_cached, tokenize, use_run

__all__ = [
    "METRICS", "Comparison", "SystemScores", "bm25_negatives", "bm25_run", "compare", "encode_cached", "ranked_ids",
    "rerank_cutoff", "tokenize", "use_run",
]
