"""Reading extracted Debian packages: man pages rendered with groff, fortune files, gettext catalogs
and copyright files.

A *tree* is a directory with one sub-directory per package, each holding what ``dpkg-deb -x`` wrote
(``<tree>/<package>/usr/share/...``). English pages live in ``usr/share/man/manN/``, translations in
``usr/share/man/<lang>/manN/``. Pages may be gzipped or plain; ``.so`` alias pages are skipped.
"""

from __future__ import annotations

import dataclasses
import gettext
import gzip
import re
import shutil
import subprocess
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataNotFoundError

LANGUAGES = ("en", "de", "fr", "es", "ru")
GROFF = ("groff", "-Tutf8", "-P-cbou", "-rLL=1000n", "-Kutf8")
#: section headings, upper-cased and without accents, in the five languages
NAME_HEADINGS = frozenset({"NAME", "BEZEICHNUNG", "NOM", "NOMBRE", "ИМЯ", "НАЗВАНИЕ"})
DESCRIPTION_HEADINGS = frozenset({"DESCRIPTION", "BESCHREIBUNG", "DESCRIPCION", "ОПИСАНИЕ"})
_DASH = re.compile(r"\s+(?:\\-|[-‐‑–—−])+\s+")
_SPACE = re.compile(r"\s+")
_PAGE_FILE = re.compile(r"^(?P<name>.+)\.(?P<section>\d[a-z0-9]*)(?:\.gz)?$")


@dataclasses.dataclass(frozen=True)
class PageSource:
    """One man page file of an extracted package."""

    package: str
    lang: str
    #: ``manN/<file name without .gz>``, the same for a page and its translations
    key: str
    path: Path

    @property
    def name(self) -> str:
        """The page name without its section (``ls`` for ``man1/ls.1``)."""
        return page_name(self.key)


@dataclasses.dataclass(frozen=True)
class Page:
    """The parts of a rendered page that the collections use."""

    package: str
    lang: str
    key: str
    #: the NAME line's text after the first dash ("list directory contents"); empty if none
    summary: str
    #: DESCRIPTION paragraphs, whitespace collapsed
    paragraphs: tuple[str, ...]

    def description(self, max_words: int | None = None) -> str:
        """The DESCRIPTION as one string, cut after ``max_words`` words."""
        words = " ".join(self.paragraphs).split()
        return " ".join(words if max_words is None else words[:max_words])


def page_name(key: str) -> str:
    """``man3/printf.3`` → ``printf``: the name shared by pages of different sections."""
    match = _PAGE_FILE.match(key.split("/", 1)[-1])
    return match.group("name") if match else key.split("/", 1)[-1]


def _lang(folder: str) -> str:
    """``de``, ``de.UTF-8`` and ``de_DE`` all mean German."""
    return re.split(r"[._@]", folder, maxsplit=1)[0]


def scan_pages(tree: Path, languages: Iterable[str] = LANGUAGES) -> list[PageSource]:
    """Every man page file under ``tree/<package>/usr/share/man``, sorted by (lang, key, package)."""
    wanted = set(languages)
    found: list[PageSource] = []
    for package_dir in sorted(p for p in tree.iterdir() if p.is_dir()):
        man = package_dir / "usr" / "share" / "man"
        if not man.is_dir():
            continue
        for path in man.rglob("*"):
            if not path.is_file() or path.is_symlink() or not _PAGE_FILE.match(path.name):
                continue  # symlinked pages are aliases, like .so pages
            parts = path.relative_to(man).parts
            if len(parts) == 2 and parts[0].startswith("man"):
                lang = "en"
            elif len(parts) == 3 and parts[1].startswith("man"):
                lang = _lang(parts[0])
            else:
                continue
            if lang in wanted:
                key = f"{parts[-2]}/{path.name.removesuffix('.gz')}"
                found.append(PageSource(package_dir.name, lang, key, path))
    return sorted(found, key=lambda s: (s.lang, s.key, s.package))


def read_source(path: Path) -> str:
    """The roff source of a page (gunzipped when needed)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def is_alias(source: str) -> bool:
    """A ``.so`` page only points at another page."""
    for line in source.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(('.\\"', "'\\\"", '.\\}')) or stripped == ".":
            continue
        return stripped.startswith(".so ")
    return True  # an empty page has nothing to render


def render(source: str) -> str:
    """Plain UTF-8 text of a page: one line per paragraph (1000-character lines), no formatting."""
    if shutil.which("groff") is None:
        raise DataNotFoundError("groff is needed to render man pages; install it with: apt-get install groff")
    macros = "-mandoc" if re.search(r"^\.(Dd|Sh)\b", source, re.MULTILINE) else "-man"  # BSD mdoc pages
    try:
        done = subprocess.run([GROFF[0], macros, *GROFF[1:]], input=source.encode("utf-8"), capture_output=True,
                              timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return ""  # a page that does not render in two minutes is left out, like an empty one
    return done.stdout.decode("utf-8", errors="replace")


def _heading(line: str) -> str:
    folded = unicodedata.normalize("NFKD", line.strip().upper())
    return "".join(c for c in folded if not unicodedata.combining(c))


def parse(text: str) -> tuple[str, tuple[str, ...]]:
    """(NAME text after the first dash, DESCRIPTION paragraphs) of a rendered page.

    Section headings start at column 0; the first and last non-empty lines are the page's header
    and footer. Paragraphs are separated by blank lines.
    """
    lines = text.splitlines()
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if len(filled) < 3:
        return "", ()
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[filled[0] + 1: filled[-1]]:
        if line.strip() and not line[0].isspace():
            heading = _heading(line)
            current = sections.setdefault(heading, []) if heading not in sections else None
            continue
        if current is not None:
            current.append(line)
    name = next((sections[h] for h in sections if h in NAME_HEADINGS), [])
    description = next((sections[h] for h in sections if h in DESCRIPTION_HEADINGS), [])
    name_text = _SPACE.sub(" ", " ".join(name)).strip()
    parts = _DASH.split(name_text, maxsplit=1)
    summary = parts[1].strip() if len(parts) == 2 else ""
    return summary, tuple(_paragraphs(description))


def _paragraphs(lines: list[str]) -> Iterator[str]:
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line.strip())
        elif block:
            yield _SPACE.sub(" ", " ".join(block)).strip()
            block = []


def _load_page(source: PageSource) -> Page | None:
    roff = read_source(source.path)
    if is_alias(roff):
        return None
    summary, paragraphs = parse(render(roff))
    return Page(source.package, source.lang, source.key, summary, paragraphs)


def render_pages(sources: list[PageSource], workers: int = 2, progress: bool = False) -> list[Page]:
    """Render and parse every non-alias page, in the order of ``sources``.

    Threads suffice: each page is rendered by its own groff process, the threads only wait for it.
    """
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(_load_page, sources), total=len(sources), disable=not progress,
                            desc="rendering man pages", unit="page"))
    return [page for page in results if page is not None]


# -- other text ----------------------------------------------------------------------------------
def fortunes(package_dir: Path) -> list[str]:
    """Fortune entries (split at ``%`` lines) of one package, whitespace collapsed, sorted and unique.

    ``*.dat`` indexes, ``*.u8`` duplicates, symlinks and the ``off/`` (offensive) collections are skipped.
    """
    entries: set[str] = set()
    games = package_dir / "usr" / "share" / "games"
    for path in sorted(games.rglob("*")) if games.is_dir() else []:
        if (not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8")
                or "off" in path.relative_to(games).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            cleaned = _SPACE.sub(" ", entry).strip()
            letters = sum(c.isalpha() for c in cleaned)
            if len(cleaned.split()) >= 3 and letters >= 0.6 * len(cleaned.replace(" ", "")):
                entries.add(cleaned)  # the letter share drops ASCII art
    return sorted(entries)


def catalog_messages(package_dir: Path, lang: str, min_words: int = 5) -> list[str]:
    """Translated messages (msgstr) of the package's gettext catalogs for ``lang``, sorted and unique."""
    found: set[str] = set()
    locale = package_dir / "usr" / "share" / "locale"
    for path in sorted(locale.glob("*/LC_MESSAGES/*.mo")) if locale.is_dir() else []:
        if _lang(path.parts[-3]) != lang or path.is_symlink():
            continue
        try:
            with path.open("rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog  # type: ignore[attr-defined]
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        for msgid, msgstr in catalog.items():
            if not msgid or not isinstance(msgstr, str):
                continue  # the header entry, plural forms' keys are tuples
            cleaned = _SPACE.sub(" ", re.sub(r"%[-+ #0-9.*]*[a-zA-Z]", " ", msgstr)).strip()
            if len(cleaned.split()) >= min_words:
                found.add(cleaned)
    return sorted(found)


def copyright_text(tree: Path, package: str) -> str:
    """``usr/share/doc/<package>/copyright``, following a doc-directory link to another package's tree."""
    doc = tree / package / "usr" / "share" / "doc" / package
    candidates = [doc / "copyright"]
    if doc.is_symlink():
        target = Path(doc.readlink()).name
        candidates += [tree / other / "usr" / "share" / "doc" / target / "copyright" for other in (target, package)]
        candidates += sorted(tree.glob(f"*/usr/share/doc/{target}/copyright"))
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    return ""


def licence_names(copyright: str) -> list[str]:
    """The ``License:`` short names of a machine-readable (DEP-5) copyright file, sorted."""
    names = {m.group(1).strip() for m in re.finditer(r"^License:[ \t]*(\S[^\n]*)$", copyright, re.MULTILINE)}
    return sorted(names)
