"""Real, offline datasets with deterministic splits.

User files: :func:`labelled_file` reads a CSV or JSONL file of texts and labels, validated line by line.

VADER human-rated sentences (Hutto & Gilbert, ICWSM 2014; MIT licence): movie-review snippets,
tweets, Amazon reviews and NYT editorial snippets, each with a mean human sentiment rating in
[-4, 4]. They ship only in the ``vaderSentiment==3.3.2`` source distribution, which
``adapterkit fetch-data`` downloads once from PyPI into the local cache
(``$ADAPTERKIT_CACHE``, default ``~/.cache/adapterkit``). Loading never touches the network.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from ..errors import AdapterError, ConfigError, DataNotFoundError

VADER_VERSION = "3.3.2"
VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
VADER_SUBSETS = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
FETCH_COMMAND = "adapterkit fetch-data"


def cache_dir() -> Path:
    """Where downloaded data lives (``$ADAPTERKIT_CACHE`` or ``~/.cache/adapterkit``)."""
    return Path(os.environ.get("ADAPTERKIT_CACHE", Path.home() / ".cache" / "adapterkit"))


@dataclasses.dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels (and the underlying human scores, when there are any)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    scores: tuple[float, ...] = ()
    #: the file's label value of each class id (``label_names[i]`` became id ``i``); empty for VADER
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Classes of the task (2 for VADER's binary sentiment)."""
        return len(self.label_names) or 2

    def head(self, n: int) -> "LabelledTexts":
        """The first ``n`` examples (splits are already shuffled)."""
        return LabelledTexts(self.texts[:n], self.labels[:n], self.scores[:n], self.label_names)


def fetch_vader(directory: Path | None = None) -> Path:
    """Download the VADER source distribution from PyPI into the cache (once)."""
    directory = directory or cache_dir()
    target = directory / VADER_SDIST
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"vaderSentiment=={VADER_VERSION}", "-d", str(directory)],
        check=True,
    )
    return target


def _vader_sdist() -> Path:
    path = cache_dir() / VADER_SDIST
    if not path.is_file():
        raise DataNotFoundError(f"VADER data not found at {path}; fetch it with: {FETCH_COMMAND}")
    return path


@lru_cache(maxsize=8)
def _read_vader(subset: str) -> tuple[tuple[str, float], ...]:
    if subset not in VADER_SUBSETS:
        raise ConfigError(f"unknown VADER subset {subset!r}; choose from {sorted(VADER_SUBSETS)}")
    with tarfile.open(_vader_sdist()) as outer:
        inner = outer.extractfile(f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz")
        assert inner is not None
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as archive:
            member = archive.extractfile(f"hutto_ICWSM_2014/{VADER_SUBSETS[subset]}")
            assert member is not None
            raw = member.read().decode("utf-8", errors="replace")
    rows = []
    for line in raw.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        text = "\t".join(parts[2:]).strip()
        if score != 0.0 and text:  # a zero mean rating has no sentiment label
            rows.append((text, score))
    return tuple(rows)


def vader(subset: str = "movies", split: str = "train", test_size: int = 1000, seed: int = 0) -> LabelledTexts:
    """Binary sentiment (label 1 = positive mean rating) with a deterministic shuffled split.

    The last ``test_size`` examples of the seeded shuffle are the test split; the rest, in
    shuffled order, are the train split.
    """
    chosen = _split(list(_read_vader(subset)), split, test_size, seed)
    return LabelledTexts(
        tuple(t for t, _ in chosen), tuple(int(s > 0) for _, s in chosen), tuple(s for _, s in chosen)
    )


def _split(rows: list, split: str, test_size: int, seed: int) -> list:
    """The seeded shuffle's last ``test_size`` rows (``"test"``), the rest (``"train"``) or all."""
    if split not in ("train", "test", "all"):
        raise ConfigError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0 < test_size < len(rows):
        raise ConfigError(f"test_size must be between 1 and {len(rows) - 1}, got {test_size}")
    random.Random(seed).shuffle(rows)
    return rows if split == "all" else rows[-test_size:] if split == "test" else rows[:-test_size]


# -- user files --------------------------------------------------------------------------------
USER_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def _csv_records(path: Path, text_column: str, label_column: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}:1: column {missing[0]!r}: no such column in the header "
                              f"(columns: {', '.join(reader.fieldnames or []) or 'none'})")
        start = reader.line_num + 1
        for row in reader:
            yield start, row  # a quoted field may span lines: report the line the record starts on
            start = reader.line_num + 1


def json_lines(path: Path, error: type[AdapterError] = ConfigError) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; text that is not UTF-8, a
    malformed line or a line that is not a JSON object raises ``error`` naming ``file:line``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        yield number, row


def _jsonl_records(path: Path, text_column: str, label_column: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, row in json_lines(path):
        for column in (text_column, label_column):
            if column not in row:
                raise ConfigError(f"{path}:{number}: column {column!r}: missing")
        yield number, row


def _label(value: Any, where: str) -> int | str:
    """A label as an int or a class name; numbers that are not integers are refused."""
    if value is None:
        raise ConfigError(f"{where}: missing label")
    if isinstance(value, (bool, float, list, dict)):
        raise ConfigError(f"{where}: non-integer label {json.dumps(value)}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text:
        raise ConfigError(f"{where}: empty label")
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        raise ConfigError(f"{where}: non-integer label {text!r}")
    return text


def labelled_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """A CSV (with a header) or JSONL file of texts and labels, checked completely before it is returned.

    Labels are integers or class names (not both in one file); the sorted distinct values become
    class ids ``0..K-1`` and are kept in :attr:`LabelledTexts.label_names`. Any problem (missing
    column, empty text, non-integer number as label, malformed JSON line, fewer than 2 classes)
    raises :class:`ConfigError` naming the file, line and column.
    """
    path = Path(path)
    kind = USER_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown data file type {path.suffix!r}; use .csv or .jsonl")
    if not path.is_file():
        raise DataNotFoundError(f"data file not found: {path}")
    records = _csv_records if kind == "csv" else _jsonl_records
    texts: list[str] = []
    values: list[int | str] = []
    try:
        for number, row in records(path, text_column, label_column):
            text = row.get(text_column)
            if not isinstance(text, str):
                what = "missing text" if text is None else f"text must be a string, got {json.dumps(text)}"
                raise ConfigError(f"{path}:{number}: column {text_column!r}: {what}")
            if not text.strip():
                raise ConfigError(f"{path}:{number}: column {text_column!r}: empty text")
            value = _label(row.get(label_column), f"{path}:{number}: column {label_column!r}")
            if values and isinstance(value, str) != isinstance(values[0], str):
                raise ConfigError(f"{path}:{number}: column {label_column!r}: label {value!r} mixes class names "
                                  f"and integers")
            texts.append(text)
            values.append(value)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names = sorted(set(values))  # type: ignore[type-var]  # all ints or all strings
    if len(names) < 2:
        raise ConfigError(f"{path}: column {label_column!r}: {len(texts)} examples but {len(names)} class(es) "
                          f"{[str(n) for n in names]}; need at least 2")
    ids = {name: i for i, name in enumerate(names)}
    return LabelledTexts(tuple(texts), tuple(ids[v] for v in values), (), tuple(str(n) for n in names))


def split_labelled(rows: LabelledTexts, split: str, test_size: int, seed: int = 0) -> LabelledTexts:
    """A deterministic split of a user file, as :func:`vader` splits VADER."""
    chosen = _split(list(zip(rows.texts, rows.labels)), split, test_size, seed)
    return LabelledTexts(tuple(t for t, _ in chosen), tuple(l for _, l in chosen), (), rows.label_names)
