"""A cross-lingual retrieval (CLIR) collection built from Debian's man pages and their human translations.

:func:`fetch_clir` downloads Debian bookworm packages with ``apt-get download`` (nothing is installed),
unpacks them with ``dpkg-deb -x``, renders every man page with groff and builds, deterministically,
into ``cache_dir()/clir``:

* **Cross-lingual collections** ``en-de``, ``en-fr``, ``en-es``, ``en-ru``: the query is the English
  NAME one-liner of a page (the text after the dash), its one relevant document is the translated
  DESCRIPTION of the same page (first :data:`DESCRIPTION_WORDS` words). The document pool holds every
  translated DESCRIPTION of that language, including pages without an English original (distractors).
* **Monolingual collections** ``de-de``, ``fr-fr``, ``es-es``, ``ru-ru``: the same pages and documents,
  queried with the translated NAME one-liner.
* **English ranking training data** (an MS MARCO stand-in): English pages whose *names* (page name
  without section) occur in no test collection, NAME one-liner → DESCRIPTION, with their own pool.
* **Monolingual text** for language modules: fortunes (de, es, ru; the offensive ``off/`` collections
  skipped), DESCRIPTION paragraphs of translated pages that are **not** a query page of any test
  collection of that language, and translated gettext messages (≥ 5 words) of the downloaded packages;
  English text comes from the held-out training pages only. Every text that shares 8 consecutive words
  with any document of a test pool of its language (relevant or distractor), or contains one of its
  test queries, is left out (:func:`unseen_texts`): language modules never read what they are tested on.

Identical document texts are merged (the smallest id is kept and the qrels point at it). Page texts
are GPL (and other free) licensed: they are kept in the cache, never in the repository;
``clir/LICENSES.json`` records each package's copyright file. Loading never touches the network.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import subprocess  # noqa: F401  (tests patch clir.subprocess.run; the download lives in .debian)
import time
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError, DataNotFoundError
from . import debian, manpages
from .data import cache_dir

FETCH_COMMAND = "adapterkit fetch-data clir"
FORMAT_VERSION = 2  # 2: monolingual text filtered against the test collections
SHINGLE_WORDS = 8  # a text sharing this many consecutive words with a test document is left out
_WORD = re.compile(r"\w+")
DESCRIPTION_WORDS = 200
MIN_PARAGRAPH_WORDS = 5  # shorter DESCRIPTION paragraphs are mostly option names
TRANSLATED = ("de", "fr", "es", "ru")
CLIR_PAIRS = (*(f"en-{lang}" for lang in TRANSLATED), *(f"{lang}-{lang}" for lang in TRANSLATED))
TRANSLATION_PACKAGES = tuple(f"manpages-{lang}{dev}" for lang in TRANSLATED for dev in ("", "-dev"))
ENGLISH_PACKAGES = ("manpages", "manpages-dev")
#: packages that own the English originals of translated section 1/5/8 pages (the translations are
#: aligned only where the original is present)
ORIGINAL_PACKAGES = (
    "coreutils", "util-linux", "bsdutils", "bsdextrautils", "mount", "procps", "psmisc", "findutils",
    "grep", "sed", "tar", "gzip", "bzip2", "diffutils", "man-db", "passwd", "login", "e2fsprogs", "kbd",
    "apt", "dpkg", "debianutils", "systemd", "openssh-client",
)
#: English-only pages (no translations in manpages-l10n) that enlarge the ranking training data
TRAINING_PACKAGES = ("git-man", "libssl-doc", "iproute2", "lvm2")
FORTUNE_PACKAGES = ("fortunes-de", "fortunes-es", "fortunes-ru")
PACKAGES = (*ENGLISH_PACKAGES, *TRANSLATION_PACKAGES, *ORIGINAL_PACKAGES, *TRAINING_PACKAGES, *FORTUNE_PACKAGES)


@dataclasses.dataclass(frozen=True)
class Collection:
    """A retrieval test (or training) collection: queries, documents and graded relevance (``qrels``)."""

    pair: str
    query_lang: str
    doc_lang: str
    queries: dict[str, str]
    docs: dict[str, str]
    #: ``qrels[qid][did] = 1`` for the relevant documents (one per query here)
    qrels: dict[str, dict[str, int]]

    def __len__(self) -> int:
        return len(self.queries)


@dataclasses.dataclass(frozen=True)
class PackageLicence:
    """Where the text of one Debian package comes from and under which licences."""

    package: str
    version: str
    #: the ``License:`` names of its machine-readable copyright file (empty if free-form)
    licences: tuple[str, ...]
    copyright: str


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What :func:`build_clir` wrote."""

    root: Path
    queries: dict[str, int]
    docs: dict[str, int]
    ranking_train_queries: int
    #: monolingual texts per language and source (``fortunes``, ``manpages``, ``gettext``)
    monolingual: dict[str, dict[str, int]]
    pages_rendered: int
    seconds: float


# -- fetching ----------------------------------------------------------------------------------
def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise DataNotFoundError(f"{tool} not found: the CLIR data is built from Debian packages; on a Debian or "
                                f"Ubuntu machine (apt-get, dpkg-deb, groff) run: {FETCH_COMMAND}")


def _download(debs: Path, packages: Iterable[str], progress: bool = False) -> None:
    debian.download(debs, packages, FETCH_COMMAND, progress)


def _extract(debs: Path, tree: Path, packages: Iterable[str]) -> dict[str, str]:
    """Unpack each package into ``tree/<package>`` (once); returns each package's version."""
    return debian.extract(debs, tree, packages)


def fetch_clir(directory: Path | None = None, progress: bool = True) -> Path:
    """Download, unpack, render and build the CLIR data into ``directory`` (default ``cache_dir()/clir``).

    A second call returns at once when the build is complete; downloaded and unpacked packages are
    reused. Raises :class:`DataNotFoundError` where ``apt-get`` cannot be used.
    """
    root = Path(directory) if directory is not None else cache_dir() / "clir"
    if debian.built(root, FORMAT_VERSION):
        return root
    for tool in ("apt-get", "dpkg-deb", "groff"):
        _need(tool)
    _download(root / "debs", PACKAGES, progress)
    versions = _extract(root / "debs", root / "tree", PACKAGES)
    build_clir(root / "tree", root, progress=progress, versions=versions, priority=PACKAGES)
    return root


# -- building ----------------------------------------------------------------------------------
def _choose(pages: list[manpages.Page], priority: tuple[str, ...]) -> dict[str, dict[str, manpages.Page]]:
    """One page per (language, key): complete pages first, then the package earliest in ``priority``."""
    rank = {package: i for i, package in enumerate(priority)}
    chosen: dict[str, dict[str, manpages.Page]] = {}
    for page in sorted(pages, key=lambda p: (not (p.summary and p.paragraphs), rank.get(p.package, len(rank)),
                                             p.package)):
        chosen.setdefault(page.lang, {}).setdefault(page.key, page)
    return chosen


def _doc_pool(lang: str, pages: dict[str, manpages.Page]) -> tuple[dict[str, str], dict[str, str]]:
    """(documents, page key → document id); identical texts share the smallest id."""
    by_text: dict[str, str] = {}
    ids: dict[str, str] = {}
    for key in sorted(pages):
        if pages[key].paragraphs:
            text = pages[key].description(DESCRIPTION_WORDS)
            ids[key] = by_text.setdefault(text, f"{lang}:{key}")
    return {did: text for text, did in sorted(by_text.items(), key=lambda item: item[1])}, ids


def _collection(pair: str, queries: dict[str, str], docs: dict[str, str], doc_ids: dict[str, str],
                query_lang: str, doc_lang: str) -> Collection:
    qrels = {f"{query_lang}:{key}": {doc_ids[key]: 1} for key in sorted(queries)}
    return Collection(pair, query_lang, doc_lang, {f"{query_lang}:{k}": queries[k] for k in sorted(queries)},
                      docs, qrels)


def build_collections(pages: list[manpages.Page], priority: tuple[str, ...] = ()) -> tuple[
        dict[str, Collection], Collection, dict[str, dict[str, list[str]]]]:
    """The test collections by pair, the English training collection and the page paragraphs that may
    train language modules (per language: ``{"manpages": [...]}``), from rendered pages."""
    chosen = _choose(pages, priority)
    english = {k: p for k, p in chosen.get("en", {}).items() if p.summary and p.paragraphs}
    collections: dict[str, Collection] = {}
    test_names: set[str] = set()
    query_keys: dict[str, set[str]] = {}
    for lang in TRANSLATED:
        translated = chosen.get(lang, {})
        docs, doc_ids = _doc_pool(lang, translated)
        aligned = sorted(k for k in doc_ids if k in english)
        collections[f"en-{lang}"] = _collection(f"en-{lang}", {k: english[k].summary for k in aligned}, docs,
                                                doc_ids, "en", lang)
        mono = {k: translated[k].summary for k in aligned if translated[k].summary}
        collections[f"{lang}-{lang}"] = _collection(f"{lang}-{lang}", mono, docs, doc_ids, lang, lang)
        query_keys[lang] = set(aligned)
        test_names.update(manpages.page_name(k) for k in aligned)
    test_queries = {q for c in collections.values() for q in c.queries.values()}
    held_out = {k: p for k, p in english.items()
                if manpages.page_name(k) not in test_names and p.summary not in test_queries}
    docs, doc_ids = _doc_pool("en", held_out)
    train = _collection("en-en", {k: p.summary for k, p in held_out.items()}, docs, doc_ids, "en", "en")
    text: dict[str, dict[str, list[str]]] = {"en": {"manpages": _paragraphs(held_out.values())}}
    for lang in TRANSLATED:
        pages_ = chosen.get(lang, {})
        used = set(_paragraphs(p for k, p in pages_.items() if k in query_keys[lang]))
        free = _paragraphs(p for k, p in pages_.items() if k not in query_keys[lang])
        text[lang] = {"manpages": [t for t in free if t not in used]}  # shared boilerplate stays out too
    return collections, train, text


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def unseen_texts(texts: list[str], collections: Iterable[Collection], lang: str) -> list[str]:
    """``texts`` without those that overlap a test collection of language ``lang``: sharing
    :data:`SHINGLE_WORDS` consecutive words with any document of its pools (relevant or not), or
    containing one of its queries of three or more words. Language modules must never have read the
    texts they are tested on, whatever source (fortunes, gettext messages, other pages) repeats them."""
    collections = list(collections)
    spans: dict[int, set[tuple[str, ...]]] = {}  # word n-grams to avoid, by n
    for collection in collections:
        if collection.doc_lang == lang:
            for doc in collection.docs.values():
                words = _words(doc)
                spans.setdefault(SHINGLE_WORDS, set()).update(
                    tuple(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))
        if collection.query_lang == lang:
            for query in collection.queries.values():
                words = tuple(_words(query))
                if len(words) >= 3:
                    spans.setdefault(len(words), set()).add(words)

    def seen(text: str) -> bool:
        words = _words(text)
        return any(tuple(words[i:i + n]) in grams for n, grams in spans.items() for i in range(len(words) - n + 1))

    return [t for t in texts if not seen(t)]


def _paragraphs(pages: Iterable[manpages.Page]) -> list[str]:
    return sorted({t for p in pages for t in p.paragraphs if len(t.split()) >= MIN_PARAGRAPH_WORDS})


def build_clir(tree: Path, out: Path, progress: bool = False, workers: int = 2,
               versions: dict[str, str] | None = None, priority: tuple[str, ...] = (), seed: int = 0) -> BuildReport:
    """Build every collection from an unpacked package tree (``tree/<package>/usr/share/...``) into ``out``.

    Deterministic: pages are sorted, merged texts keep the smallest id and the monolingual texts are
    shuffled with ``seed``. ``manifest.json`` is written last and marks a complete build.
    """
    start = time.perf_counter()
    tree, out = Path(tree), Path(out)
    if not tree.is_dir():
        raise DataNotFoundError(f"no unpacked packages at {tree}; run: {FETCH_COMMAND}")
    sources = manpages.scan_pages(tree)
    pages = manpages.render_pages(sources, workers=workers, progress=progress)
    collections, train, text = build_collections(pages, priority)
    packages = sorted(p.name for p in tree.iterdir() if p.is_dir())
    for lang in TRANSLATED:
        text[lang]["fortunes"] = sorted({t for p in packages if p == f"fortunes-{lang}"
                                         for t in manpages.fortunes(tree / p)})
        text[lang]["gettext"] = sorted({t for p in packages for t in manpages.catalog_messages(tree / p, lang)})
    text = {lang: {source: unseen_texts(texts, collections.values(), lang) for source, texts in by_source.items()}
            for lang, by_source in text.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for directory in ("pairs", "mono"):
        (out / directory).mkdir(exist_ok=True)
    for pair, collection in collections.items():
        _write_json(out / "pairs" / f"{pair}.json", dataclasses.asdict(collection))
    _write_json(out / "ranking-train.json", dataclasses.asdict(train))
    monolingual: dict[str, dict[str, int]] = {}
    for lang, by_source in sorted(text.items()):
        rows = [{"text": t, "source": source} for source in sorted(by_source) for t in by_source[source]]
        random.Random(seed).shuffle(rows)
        with (out / "mono" / f"{lang}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        monolingual[lang] = {source: len(texts) for source, texts in sorted(by_source.items())}
    licences = {}
    for package in packages:
        text_ = manpages.copyright_text(tree, package)
        licences[package] = {"version": (versions or {}).get(package, "unknown"),
                             "licences": manpages.licence_names(text_), "copyright": text_}
    _write_json(out / "LICENSES.json", licences)
    report = BuildReport(out, {p: len(c.queries) for p, c in collections.items()},
                         {p: len(c.docs) for p, c in collections.items()}, len(train.queries), monolingual,
                         len(pages), round(time.perf_counter() - start, 1))
    manifest = {"format": FORMAT_VERSION, "packages": {p: licences[p]["version"] for p in packages},
                **{k: v for k, v in dataclasses.asdict(report).items() if k != "root"}}
    _write_json(out / "manifest.json", manifest)
    return report


def _write_json(path: Path, value: object) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    partial.replace(path)


# -- loading -----------------------------------------------------------------------------------
def _root(root: Path | str | None) -> Path:
    path = Path(root) if root is not None else cache_dir() / "clir"
    if not debian.built(path, FORMAT_VERSION):
        raise DataNotFoundError(f"CLIR data not found in {path}; fetch it with: {FETCH_COMMAND}")
    return path


def _read_collection(path: Path) -> Collection:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return Collection(raw["pair"], raw["query_lang"], raw["doc_lang"], raw["queries"], raw["docs"], raw["qrels"])


def load_collection(pair: str, root: Path | str | None = None) -> Collection:
    """The test collection of ``pair`` (one of :data:`CLIR_PAIRS`, e.g. ``"en-de"``)."""
    if pair not in CLIR_PAIRS:
        raise ConfigError(f"unknown CLIR pair {pair!r}; choose from {', '.join(CLIR_PAIRS)}")
    return _read_collection(_root(root) / "pairs" / f"{pair}.json")


def load_ranking_train(root: Path | str | None = None) -> Collection:
    """The English ranking training collection (pages held out of every test collection)."""
    return _read_collection(_root(root) / "ranking-train.json")


def load_monolingual(lang: str, root: Path | str | None = None, sources: Iterable[str] | None = None) -> list[str]:
    """Monolingual text of ``lang`` (en, de, fr, es, ru) in a fixed shuffled order.

    ``sources`` keeps only some of ``"manpages"``, ``"fortunes"``, ``"gettext"`` (default: all).
    None of the texts is the relevant document of a test query of that language.
    """
    if lang not in ("en", *TRANSLATED):
        raise ConfigError(f"no monolingual text for {lang!r}; choose from en, {', '.join(TRANSLATED)}")
    wanted = None if sources is None else set(sources)
    path = _root(root) / "mono" / f"{lang}.jsonl"
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return [row["text"] for row in rows if wanted is None or row["source"] in wanted]


def clir_licences(root: Path | str | None = None) -> dict[str, PackageLicence]:
    """Each package's version, licence names and copyright file, by package name."""
    raw = json.loads((_root(root) / "LICENSES.json").read_text(encoding="utf-8"))
    return {name: PackageLicence(name, entry["version"], tuple(entry["licences"]), entry["copyright"])
            for name, entry in sorted(raw.items())}
