"""User CSV/JSONL data for ``adapterkit train``: parsed into LabelledTexts, every bad input refused
with a one-line error naming the file, line and column, before a model is loaded."""

from __future__ import annotations

import json

import pytest

import adapterkit as ak
from adapterkit.cli import train as train_command
from adapterkit.cli.main import main
from adapterkit.zoo import data


def _csv(path, rows, header="text,label"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_csv_with_class_names_maps_sorted_names_to_ids(tmp_path):
    path = _csv(tmp_path / "d.csv", ['great film,pos', '"dull, long",neg', '"two\nlines",neutral', "fine,pos"])
    rows = data.labelled_file(path)
    assert rows.texts == ("great film", "dull, long", "two\nlines", "fine")
    assert rows.label_names == ("neg", "neutral", "pos") and rows.labels == (2, 0, 1, 2)
    assert rows.num_classes == 3 and rows.head(2).label_names == rows.label_names


def test_jsonl_with_integer_labels_and_other_column_names(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "y": 1}, "", {"sentence": "b", "y": -1}, {"sentence": "c", "y": "1"}])
    rows = data.labelled_file(path, text_column="sentence", label_column="y")
    assert rows.texts == ("a", "b", "c") and rows.labels == (1, 0, 1) and rows.label_names == ("-1", "1")
    split = data.split_labelled(rows, "test", 1)
    assert len(split) == 1 and len(data.split_labelled(rows, "train", 1)) == 2 and split.label_names == ("-1", "1")


@pytest.mark.parametrize("kind, rows, column, where, message", [
    ("csv", ["a,1", "b,0"], None, ":1: column 'text'", "no such column"),
    ("csv", ["a,1", " ,0"], "text,label", ":3: column 'text'", "empty text"),
    ("csv", ["a,1", "b,1.5"], "text,label", ":3: column 'label'", "non-integer label '1.5'"),
    ("csv", ["a,1", "b,pos"], "text,label", ":3: column 'label'", "mixes class names and integers"),
    ("csv", ['"x\ny",1', "b"], "text,label", ":4: column 'label'", "missing label"),
    ("csv", ["a,1", "b,1"], "text,label", ": column 'label'", "1 class(es)"),
    ("jsonl", [{"text": "a", "label": 0}, '{"text": "b", "label": 1'], None, ":2:", "malformed JSON line"),
    ("jsonl", [{"text": "a", "label": 0}, {"label": 1}], None, ":2: column 'text'", "missing"),
    ("jsonl", [{"text": "a", "label": 0}, {"text": "b"}], None, ":2: column 'label'", "missing"),
    ("jsonl", [{"text": "a", "label": 0}, {"text": "", "label": 1}], None, ":2: column 'text'", "empty text"),
    ("jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 0.5}], None, ":2: column 'label'", "non-integer label 0.5"),
    ("jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": True}], None, ":2: column 'label'", "non-integer label true"),
    ("jsonl", [{"text": "a", "label": 0}, [1, 2]], None, ":2:", "must be a JSON object"),
    ("jsonl", [{"text": "a", "label": "x"}], None, ": column 'label'", "need at least 2"),
])
def test_bad_files_name_file_line_and_column(kind, rows, column, where, message, tmp_path, capsys, monkeypatch):
    path = tmp_path / f"bad.{kind}"
    if kind == "csv":
        _csv(path, rows, header=column or "sentence,label")
    else:
        _jsonl(path, rows)
    with pytest.raises(ak.ConfigError) as error:
        data.labelled_file(path)
    assert str(error.value).startswith(f"{path}{where}") and message in str(error.value)
    # the command line says the same in one line, before any model is loaded, and writes nothing
    monkeypatch.setattr(train_command, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["train", "--out", str(tmp_path / "out"), "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}{where}" in err and message in err
    assert not (tmp_path / "out").exists()


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ak.ConfigError, match="use .csv or .jsonl"):
        data.labelled_file(tmp_path / "d.txt")
    with pytest.raises(ak.DataNotFoundError, match="d.csv"):
        data.labelled_file(tmp_path / "d.csv")
