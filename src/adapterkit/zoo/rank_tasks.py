"""Two image-ordering tasks on real photos (issue 13): "quality" (Task A) and "counting" (Task B).

Each task is a directory ``cache_dir()/rank/<task>/`` of 224×224 RGB PNG images plus ``manifest.json``:
per image its group (the reference photo or background photo it was made from), its split, one target per
instruction, and the ids of the photos and cut-outs it uses; the manifest also carries their licences and
attributions. Builds are deterministic (seeded) and are redone only when the builder version, seed,
configuration or curated photo set changes.

* ``quality`` (:mod:`.rank_quality`): every reference photo × ``variants`` copies, each with an independent
  random level 0–4 of blur, noise, JPEG compression, darkness and contrast loss; one instruction per
  attribute ("Sort the images by how blurry they are."), whose target is that attribute's level, so one
  image ranks differently under different instructions.
* ``counting`` (:mod:`.rank_counting`): 0–8 cut-outs of each of 2–3 categories pasted, fully visible and
  apart, on random crops of the reference photos; "Sort the images by the number of sheep." with the
  per-category count as target (0 where absent).

Splits: ``split`` is by reference/background photo (the same photo split in both tasks, stratified by
package). ``heldout_split`` (counting only) is the harder scheme: its train and val images show no cut-out
of the held-out categories, whose instructions are the only ones of its test split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import ConfigError, DataNotFoundError
from .data import cache_dir
from .photos import FETCH_COMMAND, PhotoSet, load_photos

TASKS = ("quality", "counting")
SPLITS = ("train", "val", "test")
SCHEMES = ("default", "heldout")
BUILDER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Instruction:
    """A sorting instruction and the attribute (or category word) its targets measure."""

    text: str
    attribute: str


@dataclasses.dataclass(frozen=True)
class RankImage:
    """One image of a ranking task: ``targets[instruction text]`` is its ground-truth score (higher sorts later)."""

    path: Path
    group: str
    split: str
    targets: dict[str, float]
    #: ids of the photos and cut-outs the image is made of (see :attr:`RankTask.licences`)
    sources: tuple[str, ...] = ()
    #: split under the held-out-category scheme; "" where the image is not part of it
    heldout_split: str = ""


@dataclasses.dataclass(frozen=True)
class RankTask:
    """A built ranking task: instructions, images with targets, and the licences of their sources."""

    name: str
    instructions: tuple[Instruction, ...]
    images: tuple[RankImage, ...]
    root: Path
    seed: int = 0
    #: counting: the category words of the held-out scheme's test split
    heldout: tuple[str, ...] = ()
    licences: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def split(self, name: str, scheme: str = "default") -> "RankTask":
        """The images of one split; under ``scheme="heldout"`` also only the instructions that split may see
        (test: the held-out categories; train/val: the others)."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown split scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        if scheme == "heldout" and not self.heldout:
            raise ConfigError(f"task {self.name} has no held-out split scheme")
        if scheme == "default":
            return dataclasses.replace(self, images=tuple(i for i in self.images if i.split == name))
        unseen = set(self.heldout)
        keep = tuple(i for i in self.instructions if (i.attribute in unseen) == (name == "test"))
        texts = {i.text for i in keep}
        images = tuple(dataclasses.replace(i, targets={t: v for t, v in i.targets.items() if t in texts})
                       for i in self.images if i.heldout_split == name)
        return dataclasses.replace(self, instructions=keep, images=images)

    def instruction(self, attribute: str) -> Instruction:
        """The instruction whose targets measure ``attribute`` (e.g. ``"blur"``, ``"sheep"``)."""
        for instruction in self.instructions:
            if instruction.attribute == attribute:
                return instruction
        raise ConfigError(f"task {self.name} has no instruction for {attribute!r}; "
                          f"choose from {', '.join(i.attribute for i in self.instructions)}")

    def targets(self, instruction: str | Instruction) -> list[float]:
        """Every image's target under ``instruction`` (its text or the :class:`Instruction`), in image order."""
        text = instruction.text if isinstance(instruction, Instruction) else instruction
        if text not in {i.text for i in self.instructions}:
            raise ConfigError(f"instruction {text!r} is not one of task {self.name}'s")
        return [image.targets[text] for image in self.images]

    @property
    def paths(self) -> list[Path]:
        """The image files, in image order."""
        return [image.path for image in self.images]


# -- shared by the builders ----------------------------------------------------------------------
def photo_splits(photos: PhotoSet, seed: int, fractions: tuple[float, float] = (0.2, 0.2)) -> dict[str, str]:
    """``{photo id: split}``: per package, a seeded shuffle gives ``fractions`` (val, test) of its photos
    to val and test (at least one each where a package has three or more photos), the rest to train."""
    by_package: dict[str, list[str]] = {}
    for photo in photos.photos:
        by_package.setdefault(photo.package, []).append(photo.id)
    splits: dict[str, str] = {}
    for package, ids in sorted(by_package.items()):
        ids = sorted(ids)
        random.Random(f"{seed}:{package}").shuffle(ids)
        n_val, n_test = (max(1 if len(ids) >= 3 else 0, round(len(ids) * f)) for f in fractions)
        for i, photo_id in enumerate(ids):
            splits[photo_id] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return splits


def image_seed(seed: int, *keys: str | int) -> list[int]:
    """Entropy for ``numpy.random.default_rng``: stable across runs and independent of other images."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def photos_fingerprint(photos: PhotoSet) -> str:
    """Changes when the curated photo set (ids, files' sizes, licences) changes."""
    items = sorted((item.id, item.path.stat().st_size if item.path.is_file() else -1)
                   for item in (*photos.photos, *photos.cutouts))
    blob = json.dumps([items, photos.licences()], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- building and loading --------------------------------------------------------------------------
def _config_for(name: str, config: Any) -> Any:
    # the builders import this module's types, so they are imported here, not at the top
    from .rank_counting import CountingConfig
    from .rank_quality import QualityConfig

    cls = {"quality": QualityConfig, "counting": CountingConfig}[name]
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise ConfigError(f"task {name} takes a {cls.__name__}, not {type(config).__name__}")
    return config


def build_rank_task(name: str, out: Path, photos: PhotoSet, seed: int = 0, config: Any = None) -> RankTask:
    """Build task ``name`` from ``photos`` into ``out`` (removing an earlier build); ``manifest.json`` is
    written last and marks a complete build. Build time goes to ``build.json`` (the manifest stays
    byte-identical across builds with the same inputs)."""
    from .rank_counting import build_counting
    from .rank_quality import build_quality

    if name not in TASKS:
        raise ConfigError(f"unknown ranking task {name!r}; choose from {', '.join(TASKS)}")
    config = _config_for(name, config)
    config.validate()
    start = time.perf_counter()
    out = Path(out)
    partial = out / "images.partial"  # an earlier build survives a refused or failed one
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    builder = build_quality if name == "quality" else build_counting
    try:
        instructions, partial_images, heldout = builder(photos, partial, seed, config)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (out / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)
    partial.rename(out / "images")
    images = [dataclasses.replace(i, path=out / "images" / i.path.name) for i in partial_images]
    used = sorted({source for image in images for source in image.sources})
    licences = photos.licences()
    task = RankTask(name, tuple(instructions), tuple(images), out, seed, tuple(heldout),
                    {k: licences[k] for k in used})
    manifest = {
        "format": BUILDER_VERSION, "task": name, "seed": seed, "config": dataclasses.asdict(config),
        "photos": photos_fingerprint(photos), "heldout": list(task.heldout),
        "instructions": [dataclasses.asdict(i) for i in task.instructions],
        "images": [_image_record(i, out) for i in task.images], "licences": task.licences,
    }
    _write_json(out / "build.json", {"seconds": round(time.perf_counter() - start, 1), "images": len(images)})
    _write_json(out / "manifest.json", manifest)
    return task


def _image_record(image: RankImage, root: Path) -> dict[str, Any]:
    record = dataclasses.asdict(image)
    record["path"] = image.path.relative_to(root).as_posix()
    record["sources"] = list(image.sources)
    return record


def _write_json(path: Path, value: object) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    partial.replace(path)


def read_rank_task(root: Path | str) -> RankTask:
    """Load a built task from its directory (no building, no network)."""
    root = Path(root)
    try:
        raw = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        images = tuple(RankImage(root / r["path"], r["group"], r["split"],
                                 {k: float(v) for k, v in r["targets"].items()}, tuple(r["sources"]),
                                 r["heldout_split"]) for r in raw["images"])
        return RankTask(raw["task"], tuple(Instruction(**i) for i in raw["instructions"]), images, root, raw["seed"],
                        tuple(raw["heldout"]), raw["licences"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataNotFoundError(f"no complete ranking task in {root} ({exc}); build it with: {FETCH_COMMAND}") from exc


def _up_to_date(root: Path, name: str, seed: int, config: Any, photos: PhotoSet | None) -> bool:
    try:
        raw = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = (raw.get("format") == BUILDER_VERSION and raw.get("task") == name and raw.get("seed") == seed
            and raw.get("config") == json.loads(json.dumps(dataclasses.asdict(config))))
    return same and (photos is None or raw.get("photos") == photos_fingerprint(photos))


def rank_task(name: str, root: Path | str | None = None, seed: int = 0, config: Any = None,
              photos: PhotoSet | None = None, rebuild: bool = False) -> RankTask:
    """Task ``name`` (``"quality"`` or ``"counting"``), built into ``root`` (default
    ``cache_dir()/rank/<name>``) unless an up-to-date build is there. ``photos`` defaults to the curated set
    of :func:`~adapterkit.zoo.photos.load_photos`; without it, an existing build of the same version, seed
    and configuration is loaded as it is."""
    if name not in TASKS:
        raise ConfigError(f"unknown ranking task {name!r}; choose from {', '.join(TASKS)}")
    config = _config_for(name, config)
    config.validate()
    out = Path(root) if root is not None else cache_dir() / "rank" / name
    if photos is None:
        try:
            photos = load_photos()
        except DataNotFoundError:
            if not rebuild and _up_to_date(out, name, seed, config, None):
                return read_rank_task(out)
            raise
    if not rebuild and _up_to_date(out, name, seed, config, photos):
        return read_rank_task(out)
    return build_rank_task(name, out, photos, seed, config)


def check_fractions(values: Sequence[float], what: str) -> None:
    """ConfigError unless every value is in [0, 1) and they sum below 1."""
    if any(not 0 <= v < 1 for v in values) or sum(values) >= 1:
        raise ConfigError(f"{what} must be fractions in [0, 1) summing below 1, got {tuple(values)}")


def check_int(value: object, low: int, high: int, what: str) -> None:
    """ConfigError unless ``value`` is an int in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{what} must be an integer in [{low}, {high}], got {value!r}")


def groups(images: Iterable[RankImage]) -> set[str]:
    """The groups (reference or background photos) of some images."""
    return {image.group for image in images}
