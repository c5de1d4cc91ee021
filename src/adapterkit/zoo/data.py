"""Real, offline datasets with deterministic splits.

VADER human-rated sentences (Hutto & Gilbert, ICWSM 2014; MIT licence): movie-review snippets,
tweets, Amazon reviews and NYT editorial snippets, each with a mean human sentiment rating in
[-4, 4]. They ship only in the ``vaderSentiment==3.3.2`` source distribution, which
``adapterkit fetch-data`` downloads once from PyPI into the local cache
(``$ADAPTERKIT_CACHE``, default ``~/.cache/adapterkit``). Loading never touches the network.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, DataNotFoundError

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

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> "LabelledTexts":
        """The first ``n`` examples (splits are already shuffled)."""
        return LabelledTexts(self.texts[:n], self.labels[:n], self.scores[:n])


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
    if split not in ("train", "test", "all"):
        raise ConfigError(f"split must be 'train', 'test' or 'all', got {split!r}")
    rows = list(_read_vader(subset))
    if not 0 < test_size < len(rows):
        raise ConfigError(f"test_size must be between 1 and {len(rows) - 1}, got {test_size}")
    random.Random(seed).shuffle(rows)
    chosen = rows if split == "all" else rows[-test_size:] if split == "test" else rows[:-test_size]
    return LabelledTexts(
        tuple(t for t, _ in chosen), tuple(int(s > 0) for _, s in chosen), tuple(s for _, s in chosen)
    )
