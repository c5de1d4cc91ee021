"""``adapterkit clir ...`` wired end to end on a tiny random Gemma3 (data and model loading patched)."""

from __future__ import annotations

import json

import pytest

from adapterkit.apps.clir import modules, ranking, tasks
from adapterkit.apps.clir.evaluate import Comparison, SystemScores
from adapterkit.cli.main import main
from adapterkit.errors import ConfigError
from test_clir_app import WordTokenizer, examples, fake_candidates, fake_collection, tiny_gemma, words


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(modules.Backbone, "load", classmethod(lambda cls, name="gemma3": cls(name, tiny_gemma(),
                                                                                             WordTokenizer())))
    monkeypatch.setattr(tasks, "language_texts", lambda lang: [words(800 + i, 12) for i in range(20)])
    monkeypatch.setattr(tasks, "ranking_examples", lambda count, limit=None, seed=0: examples())
    coll = fake_collection("en-de")
    monkeypatch.setattr(tasks, "pair_data", lambda pair, options: tasks.PairData(coll, sorted(coll.queries),
                                                                                 fake_candidates(coll)))
    seen = {}

    def compare(qrels, runs, metrics):  # ranx is tested with the data; here: what reaches it
        seen["runs"], seen["qrels"] = runs, qrels
        rows = tuple(SystemScores(n, {m: 0.5 for m in metrics}, {m: 0.1 for m in metrics}, {m: () for m in metrics},
                                  {o: {m: 0.2 for m in metrics} for o in runs if o != n}) for n in runs)
        return Comparison(tuple(metrics), rows, len(qrels), "student", 0.05)

    import adapterkit.apps.clir.evaluate as evaluate

    monkeypatch.setattr(evaluate, "compare", compare)
    return seen


TINY = ["--steps", "1", "--reduction-factor", "4"]


def test_train_language_ranking_and_evaluate_from_the_command_line(patched, tmp_path, capsys):
    for lang in ("en", "de"):
        assert main(["clir", "train-language", "--lang", lang, "--kind", "adapter", "--out", str(tmp_path / lang),
                     "--batch-size", "2", "--max-tokens", "8", "--shortlist-size", "40", *TINY]) == 0
    assert main(["clir", "train-ranking", "--kind", "adapter", "--lang-module", str(tmp_path / "en"),
                 "--out", str(tmp_path / "rank"), "--negatives", "2", "--max-doc-tokens", "8", *TINY]) == 0
    record = json.loads((tmp_path / "rank" / modules.RECORD_FILE).read_text())
    assert record["kind"] == "adapter" and record["on_top_of"] == str(tmp_path / "en")
    capsys.readouterr()
    assert main(["clir", "evaluate", "--pair", "en-de", "--system", "adapter+split", "--ranking", str(tmp_path / "rank"),
                 "--qlang", str(tmp_path / "en"), "--dlang", str(tmp_path / "de"), "--top-k", "3", "--depth", "6",
                 "--queries", "4", "--max-doc-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "map" in out and "mrr@10" in out and "ndcg@10" in out and "adapter+split" in out
    runs = patched["runs"]
    assert set(runs) == {"first-stage", "adapter+split"}
    assert all(len(docs) == 6 for docs in runs["adapter+split"].values())  # top-3 reranked, the rest kept
    # the wrong modules are refused in one line, before anything loads
    for argv in (["--system", "sft+dlang", "--ranking", str(tmp_path / "rank"), "--dlang", str(tmp_path / "de")],
                 ["--system", "adapter+split", "--ranking", str(tmp_path / "rank"), "--dlang", str(tmp_path / "de")],
                 ["--system", "adapter+dlang", "--ranking", str(tmp_path / "rank"), "--dlang", str(tmp_path / "en")],
                 ["--system", "adapter", "--ranking", str(tmp_path / "de")]):
        assert main(["clir", "evaluate", "--pair", "en-de", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("adapterkit: error: ") and err.count("\n") == 1, err


def test_bad_command_lines_are_one_line_errors(patched, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the command line was checked")

    monkeypatch.setattr(modules.Backbone, "load", classmethod(no_model))
    cases = [["clir", "evaluate", "--pair", "xx-yy", "--system", "first-stage"],
             ["clir", "train-language", "--lang", "de", "--kind", "adapter", "--out", str(tmp_path), "--steps", "0"],
             ["clir", "train-ranking", "--kind", "sft", "--out", str(tmp_path / "r")],
             ["clir", "train-ranking", "--kind", "lora", "--out", str(tmp_path / "r"), "--loss", "pairwise"],
             ["clir"]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("adapterkit: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_ranking_options_are_checked_before_training():
    with pytest.raises(ConfigError):
        ranking.RankingOptions(kind="adapter", negatives=0)
    with pytest.raises(ConfigError):
        ranking.check_lang_module("lora", "some/dir")
