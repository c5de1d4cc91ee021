"""VADER loaders: real data, deterministic disjoint splits, a clear error when missing."""

from __future__ import annotations

from collections import Counter

import pytest

import adapterkit as ak
from adapterkit.zoo import data


def test_movie_snippets_have_the_documented_size_and_balance():
    rows = data.vader("movies", "all", test_size=100)
    assert len(rows) == 10568  # 10,605 rows minus 37 rated exactly 0
    assert sum(rows.labels) == 5242
    assert all((s > 0) == bool(l) for s, l in zip(rows.scores, rows.labels))


@pytest.mark.parametrize("subset, size", [("tweets", 4196), ("amazon", 3610), ("nyt", 4946)])
def test_other_subsets_load(subset, size):
    assert len(data.vader(subset, "all", test_size=10)) == size


def test_splits_are_deterministic_disjoint_and_complete():
    train = data.vader("movies", "train", test_size=500, seed=3)
    test = data.vader("movies", "test", test_size=500, seed=3)
    assert len(test) == 500 and len(train) + len(test) == 10568
    counts = Counter(train.texts + test.texts)
    duplicated = {t for t, n in counts.items() if n > 1}
    assert set(train.texts) & set(test.texts) <= duplicated  # only the corpus's own repeated snippets can be shared
    again = data.vader("movies", "test", test_size=500, seed=3)
    assert again == test
    assert data.vader("movies", "test", test_size=500, seed=4) != test
    assert train.head(10).texts == train.texts[:10]


def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    data._read_vader.cache_clear()
    try:
        with pytest.raises(ak.DataNotFoundError, match="adapterkit fetch-data"):
            data.vader("tweets")
    finally:
        data._read_vader.cache_clear()


@pytest.mark.parametrize("kwargs", [dict(subset="imdb"), dict(split="dev"), dict(test_size=0), dict(test_size=10**6)])
def test_bad_arguments_raise_config_errors(kwargs):
    with pytest.raises(ak.ConfigError):
        data.vader(**kwargs)
