"""The CLIR builder on hand-written man pages (tests/fixtures/clir): parsing, pairing, held-out
training pages, monolingual text, determinism, and the refusals of the loaders and of fetch_clir."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from adapterkit.errors import ConfigError, DataNotFoundError
from adapterkit.zoo import clir, manpages

FIXTURES = Path(__file__).parent / "fixtures" / "clir"
needs_groff = pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The fixture packages, with the Russian page gzipped as Debian ships it."""
    target = tmp_path / "tree"
    shutil.copytree(FIXTURES, target)
    page = target / "manpages-ru/usr/share/man/ru/man1/frob.1"
    page.with_name("frob.1.gz").write_bytes(gzip.compress(page.read_bytes(), mtime=0))
    page.unlink()
    return target


@pytest.fixture
def built(tree: Path, tmp_path: Path) -> Path:
    clir.build_clir(tree, tmp_path / "out", priority=clir.PACKAGES)
    return tmp_path / "out"


@needs_groff
@pytest.mark.parametrize("lang, key, summary, start", [
    ("en", "man1/frob.1", "frobnicate the widget", "frob turns a widget inside out"),
    ("de", "man1/frob.1", "das Widget umstülpen", "frob stülpt ein Widget um"),
    ("fr", "man1/zap.1", "supprimer les fichiers de verrou périmés", "zap cherche les fichiers"),
    ("es", "man1/zap.1", "eliminar archivos de bloqueo obsoletos", "zap busca archivos de bloqueo"),
    ("ru", "man1/frob.1", "вывернуть виджет наизнанку", "frob выворачивает виджет"),
])
def test_name_and_description_under_each_languages_headings(tree, lang, key, summary, start):
    source = next(s for s in manpages.scan_pages(tree) if (s.lang, s.key) == (lang, key))
    found_summary, paragraphs = manpages.parse(manpages.render(manpages.read_source(source.path)))
    assert found_summary == summary
    assert paragraphs[0].startswith(start)
    # the sections after DESCRIPTION (SEE ALSO, EXIT STATUS) are not part of it
    assert not any("zap(1)" in p or "Zero when" in p for p in paragraphs)


def test_parse_splits_paragraphs_and_ignores_header_footer():
    text = ("FROB(1)        General Commands        FROB(1)\n\nNOMBRE\n       frob - hacer algo\n\n"
            "DESCRIPCIÓN\n       Primera línea\n       sigue aquí.\n\n       Segundo párrafo.\n\n"
            "VÉASE TAMBIÉN\n       zap(1)\n\nfixtures 2024        FROB(1)\n")
    assert manpages.parse(text) == ("hacer algo", ("Primera línea sigue aquí.", "Segundo párrafo."))
    assert manpages.parse("NAME\n  x - y\n") == ("", ())


def test_alias_pages_are_recognised():
    assert manpages.is_alias('.\\" comment\n.so man1/zap.1\n')
    assert not manpages.is_alias('.\\" comment\n.TH ZAP 1\n.SH NAME\n')
    assert manpages.page_name("man3/printf.3") == manpages.page_name("man1/printf.1") == "printf"
    assert manpages.page_name("man3/EVP_sha1.3ssl") == "EVP_sha1"


@needs_groff
def test_alias_page_is_not_rendered(tree):
    sources = manpages.scan_pages(tree)
    assert any(s.key == "man1/zapall.1" for s in sources)
    pages = manpages.render_pages(sources)
    assert "man1/zapall.1" not in {p.key for p in pages}
    assert {p.key for p in pages if p.lang == "ru"} == {"man1/frob.1"}  # read from the .gz file


@needs_groff
def test_cross_lingual_and_monolingual_collections(built):
    en_de = clir.load_collection("en-de", root=built)
    assert (en_de.query_lang, en_de.doc_lang) == ("en", "de")
    assert en_de.queries == {"en:man1/frob.1": "frobnicate the widget", "en:man1/zap.1": "remove stale lock files"}
    assert en_de.qrels == {"en:man1/frob.1": {"de:man1/frob.1": 1}, "en:man1/zap.1": {"de:man1/zap.1": 1}}
    # the German-only page is a distractor in the pool
    assert set(en_de.docs) == {"de:man1/frob.1", "de:man1/zap.1", "de:man8/blink.8"}
    assert en_de.docs["de:man1/frob.1"].startswith("frob stülpt ein Widget um")
    de_de = clir.load_collection("de-de", root=built)
    assert de_de.queries == {"de:man1/frob.1": "das Widget umstülpen", "de:man1/zap.1": "veraltete Sperrdateien entfernen"}
    assert de_de.docs == en_de.docs and set(de_de.qrels) == set(de_de.queries)
    assert clir.load_collection("en-ru", root=built).queries == {"en:man1/frob.1": "frobnicate the widget"}
    assert len(clir.load_collection("en-fr", root=built)) == len(clir.load_collection("es-es", root=built)) == 1


@needs_groff
def test_training_pages_are_held_out_of_every_test_set(built):
    train = clir.load_ranking_train(root=built)
    # man3/frob.3 shares its name with the test page man1/frob.1, so it is held out as well
    assert train.queries == {"en:man3/quux.3": "compute a checksum of a buffer",
                             "en:man7/glossary.7": "words used in the widget manuals"}
    assert train.qrels == {"en:man3/quux.3": {"en:man3/quux.3": 1}, "en:man7/glossary.7": {"en:man7/glossary.7": 1}}
    test_names = {manpages.page_name(q.split(":", 1)[1])
                  for pair in clir.CLIR_PAIRS for q in clir.load_collection(pair, root=built).queries}
    assert test_names == {"frob", "zap"}
    assert not test_names & {manpages.page_name(q.split(":", 1)[1]) for q in train.queries}


@needs_groff
def test_monolingual_text_excludes_query_pages(built):
    german = clir.load_monolingual("de", root=built)
    assert "Ein Widget im Verzeichnis ist besser als zwei auf dem Server." in german
    assert not any("stülpt" in t or "Sperrdateien" in t for t in german)  # relevant documents of test queries
    assert not any(t.startswith("blink lässt die Lampen") for t in german)  # a distractor document of the pool
    assert not any("off-Verzeichnis" in t for t in german) and ":-)" not in german
    assert len(german) == len(set(german)) == 2
    assert clir.load_monolingual("de", root=built, sources=["fortunes"]) == german
    english = clir.load_monolingual("en", root=built)
    assert sorted(english) == ["A lock file marks a widget that a process is currently working on.",
                               "A widget is any small object that can be turned inside out without damage.",
                               "quux() adds up the bytes of a buffer with a rotating carry and returns the sum. "
                               "The result is the same on every machine."]
    assert clir.load_monolingual("ru", root=built) == []  # its only page is a query page


@needs_groff
def test_licences_and_manifest(built):
    licences = clir.clir_licences(root=built)
    assert licences["manpages-de"].licences == ("Apache-2.0", "CC0-1.0")
    assert licences["manpages"].version == "unknown" and "Hand-written fixture" in licences["manpages"].copyright
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["queries"]["en-de"] == 2 and manifest["ranking_train_queries"] == 2
    assert manifest["monolingual"]["de"] == {"fortunes": 2, "gettext": 0, "manpages": 0}


@needs_groff
def test_build_is_deterministic(tree, built, tmp_path):
    clir.build_clir(tree, tmp_path / "again", workers=1, priority=clir.PACKAGES)
    names = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(tmp_path / "again")) for p in (tmp_path / "again").rglob("*") if p.is_file())
    for name in names:
        if name != "manifest.json":  # it records the build time
            assert (built / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_identical_documents_are_merged():
    page = lambda lang, key, summary, text: manpages.Page("p", lang, key, summary, (text,))  # noqa: E731
    pages = [page("en", "man1/a.1", "first", "x"), page("en", "man1/b.1", "second", "y"),
             page("de", "man1/a.1", "erstes", "gleicher Text"), page("de", "man1/b.1", "zweites", "gleicher Text")]
    collections, _, _ = clir.build_collections(pages)
    en_de = collections["en-de"]
    assert en_de.docs == {"de:man1/a.1": "gleicher Text"}
    assert en_de.qrels == {"en:man1/a.1": {"de:man1/a.1": 1}, "en:man1/b.1": {"de:man1/a.1": 1}}


def test_missing_data_names_the_fetch_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="adapterkit fetch-data clir"):
        clir.load_collection("en-de", root=tmp_path)
    for load in (clir.load_ranking_train, clir.clir_licences, lambda root: clir.load_monolingual("de", root=root)):
        with pytest.raises(DataNotFoundError, match="adapterkit fetch-data clir"):
            load(root=tmp_path)
    with pytest.raises(ConfigError, match="en-de"):
        clir.load_collection("en-fi", root=tmp_path)
    with pytest.raises(ConfigError):
        clir.load_monolingual("fi", root=tmp_path)


def test_fetch_without_apt_get_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(clir.shutil, "which", lambda tool: None if tool == "apt-get" else "/usr/bin/" + tool)
    with pytest.raises(DataNotFoundError, match="adapterkit fetch-data clir"):
        clir.fetch_clir(tmp_path)
    assert not any(tmp_path.iterdir())


def test_failed_download_names_the_command(tmp_path, monkeypatch):
    class Failed:
        returncode, stderr, stdout = 100, "E: Unable to locate package manpages-de\n", ""

    monkeypatch.setattr(clir.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DataNotFoundError, match=r"apt-get update && adapterkit fetch-data clir"):
        clir._download(tmp_path / "debs", ["manpages-de"])


@needs_groff
def test_fetch_reuses_a_complete_build(built, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a complete build must not run anything")

    monkeypatch.setattr(clir.subprocess, "run", refuse)
    assert clir.fetch_clir(built, progress=False) == built


def test_texts_overlapping_a_test_collection_are_left_out():
    document = "Der Befehl kopiert jede Datei in das angegebene Verzeichnis und behält dabei die Rechte."
    collection = clir.Collection("en-de", "en", "de", {"en:q": "copy files and directories"}, {"de:d": document},
                                 {"en:q": {"de:d": 1}})
    mono = clir.Collection("de-de", "de", "de", {"de:q": "Dateien und Verzeichnisse kopieren"}, {"de:d": document},
                           {"de:q": {"de:d": 1}})
    texts = ["Ein Satz, der nichts mit Handbuchseiten zu tun hat, bleibt im Training.",
             "Achtung: DER BEFEHL kopiert jede Datei in das angegebene Verzeichnis, sagt die Meldung.",  # 8 words shared
             "Der Befehl kopiert jede Datei in das Netz.",  # only 7 words in a row
             "Hilfe: Dateien und Verzeichnisse kopieren (siehe oben)."]  # a German test query
    kept = clir.unseen_texts(texts, [collection, mono], "de")
    assert kept == [texts[0], texts[2]]
    english = ["How to copy files and directories quickly", "Nothing to do with the queries at all"]
    assert clir.unseen_texts(english, [collection, mono], "en") == english[1:]
    assert clir.unseen_texts(texts, [collection, mono], "ru") == texts  # other languages are not affected


@needs_groff
def test_monolingual_text_shares_no_eight_words_with_any_test_document(built):
    for lang in ("de", "ru"):
        docs = [d for pair in (f"en-{lang}", f"{lang}-{lang}") for d in clir.load_collection(pair, built).docs.values()]
        grams = {tuple(w[i:i + 8]) for d in docs for w in [clir._words(d)] for i in range(len(w) - 7)}
        for text in clir.load_monolingual(lang, built):
            words = clir._words(text)
            assert not any(tuple(words[i:i + 8]) in grams for i in range(len(words) - 7)), text
