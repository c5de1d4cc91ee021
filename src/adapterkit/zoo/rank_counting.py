"""Task B "counting": photo cut-outs pasted on real backgrounds (see :mod:`.rank_tasks`).

Each image: a random square crop (``crop_scale`` of the short side, maybe flipped) of a reference photo
that shows none of the categories itself (:data:`~adapterkit.zoo.photos.SHOWS`); 2–3 categories with
0–``max_count`` cut-outs each (at most ``max_total`` in all), each cut-out a random stamp of its category,
flipped at random and scaled to a geometric-mean side drawn from ``cutout_side``. Cut-outs are placed
wholly inside the image and ``gap`` pixels clear of every other one (their alpha ≥ 128 masks), so each
stays visible and countable; one that finds no place after shrinking twice is left out, and the targets
count what was pasted. Held-out scheme: ``heldout_categories`` category words are drawn (seeded); an
image takes its categories either all from them or all from the others, with the held-out pool more
likely on test backgrounds (``unseen_share``). That scheme's train and val splits are the train/val
background images without held-out categories; its test split is every test-background image.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import ConfigError
from .photos import Cutout, Photo, PhotoSet
from .rank_tasks import Instruction, RankImage, check_fractions, check_int, image_seed, photo_splits

_IRREGULAR = {"sheep": "sheep", "deer": "deer", "fish": "fish", "mouse": "mice", "lettuce": "lettuces"}


def plural(word: str) -> str:
    """English plural of a category word (``sheep`` → ``sheep``, ``wrench`` → ``wrenches``)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def instruction_text(category: str) -> str:
    """The counting instruction for one category word."""
    return f"Sort the images by the number of {plural(category)}."


@dataclasses.dataclass(frozen=True)
class CountingConfig:
    """Task B's size and layout (pixel sizes are for ``size`` = 224 and scale with it)."""

    size: int = 224
    images: int = 1000
    max_count: int = 8
    max_total: int = 12
    categories_per_image: tuple[int, int] = (2, 3)
    heldout_categories: int = 4
    cutout_side: tuple[int, int] = (34, 56)
    gap: int = 2
    crop_scale: tuple[float, float] = (0.5, 1.0)
    #: chance that an image draws its categories from the held-out pool: on train/val backgrounds, on test ones
    unseen_share: tuple[float, float] = (0.15, 0.5)
    holdout: tuple[float, float] = (0.2, 0.2)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for bad sizes, counts or fractions."""
        check_int(self.size, 64, 1024, "size")
        check_int(self.images, 1, 100_000, "images")
        check_int(self.max_count, 1, 50, "max_count")
        check_int(self.max_total, 1, 100, "max_total")
        low, high = self.categories_per_image
        check_int(low, 1, 10, "categories_per_image[0]")
        check_int(high, low, 10, "categories_per_image[1]")
        check_int(self.heldout_categories, 0, 50, "heldout_categories")
        check_int(self.cutout_side[0], 8, 112, "cutout_side[0]")  # at 224 px: at most half the image
        check_int(self.cutout_side[1], self.cutout_side[0], 112, "cutout_side[1]")
        check_int(self.gap, 0, 16, "gap")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not all(0 <= s <= 1 for s in self.unseen_share):
            raise ConfigError(f"unseen_share must be probabilities, got {self.unseen_share}")
        check_fractions(self.holdout, "holdout")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one cut-out was pasted: its category, id and box ``(left, top, right, bottom)``."""

    category: str
    cutout: str
    box: tuple[int, int, int, int]


def _sprite(stamp: Image.Image, side: float, flip: bool) -> Image.Image:
    """``stamp`` scaled so that √(width·height) = ``side`` (resized premultiplied, no colour fringes)."""
    scale = side / (stamp.width * stamp.height) ** 0.5
    size = (max(1, round(stamp.width * scale)), max(1, round(stamp.height * scale)))
    sprite = stamp.convert("RGBa").resize(size, Image.LANCZOS).convert("RGBA")
    return sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else sprite


def paste_cutouts(background: Image.Image, items: list[tuple[str, str, Image.Image]], rng: np.random.Generator,
                  sides: tuple[float, float], gap: int = 2, tries: int = 40) -> tuple[Image.Image, list[Placement]]:
    """Paste ``items`` (category, cut-out id, RGBA stamp) on a copy of ``background``, each wholly inside and
    ``gap`` pixels clear of the others; returns the image and the placements actually made."""
    canvas = background.convert("RGB").copy()
    width, height = canvas.size
    occupied = np.zeros((height + 2 * gap, width + 2 * gap), dtype=bool)  # padded: windows never clip
    placements: list[Placement] = []
    for category, cutout_id, stamp in items:
        side, flip = float(rng.uniform(*sides)), bool(rng.random() < 0.5)
        for _ in range(3):  # full size, then smaller twice
            sprite = _sprite(stamp, side, flip)
            mask = np.asarray(sprite.getchannel("A")) >= 128
            h, w = mask.shape
            grown = ndimage.binary_dilation(np.pad(mask, gap), iterations=gap) if gap else mask
            spot = None
            if h <= height and w <= width and mask.any():
                for _ in range(tries):
                    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                    if not (occupied[y:y + h + 2 * gap, x:x + w + 2 * gap] & grown).any():
                        spot = (x, y)
                        break
            if spot is not None:
                x, y = spot
                canvas.paste(sprite, (x, y), sprite)
                occupied[y + gap:y + gap + h, x + gap:x + gap + w] |= mask
                placements.append(Placement(category, cutout_id, (x, y, x + w, y + h)))
                break
            side *= 0.75
    return canvas, placements


def _background(photo: Photo, size: int, rng: np.random.Generator, scale: tuple[float, float]) -> Image.Image:
    with Image.open(photo.path) as image:
        image = image.convert("RGB")
    side = max(16, round(min(image.size) * float(rng.uniform(*scale))))
    x, y = int(rng.integers(0, image.width - side + 1)), int(rng.integers(0, image.height - side + 1))
    crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _counts(rng: np.random.Generator, n: int, config: CountingConfig) -> list[int]:
    for _ in range(100):
        counts = rng.integers(0, config.max_count + 1, size=n)
        if counts.sum() <= config.max_total:
            return [int(c) for c in counts]
    return [int(c) for c in np.minimum(counts, config.max_total // n)]  # practically unreachable


def build_counting(photos: PhotoSet, images_dir: Path, seed: int,
                   config: CountingConfig) -> tuple[list[Instruction], list[RankImage], list[str]]:
    """Write the counting images into ``images_dir``; instructions, images and the held-out category words."""
    categories = photos.categories()
    names = sorted(categories)
    most = config.categories_per_image[1]
    held = config.heldout_categories
    if len(names) < held + most or 0 < held < most:
        raise ConfigError(f"the counting task needs pools of at least {most} categories on both sides of {held} "
                          f"held-out ones; the photo set has {len(names)}: {', '.join(names)}")
    backgrounds = sorted((p for p in photos.photos if not set(p.shows) & set(names)), key=lambda p: p.id)
    if len(backgrounds) < 3:
        raise ConfigError(f"the counting task needs at least 3 background photos that show none of its "
                          f"categories, got {len(backgrounds)}")
    heldout = sorted(random.Random(f"{seed}:heldout").sample(names, config.heldout_categories))
    seen = [n for n in names if n not in heldout]
    splits = photo_splits(photos, seed, config.holdout)
    stamps: dict[str, Image.Image] = {}
    for cutout in (c for items in categories.values() for c in items):
        with Image.open(cutout.path) as image:
            stamps[cutout.id] = image.convert("RGBA")
    instructions = [Instruction(instruction_text(n), n) for n in names]
    scale = config.size / 224
    sides = (config.cutout_side[0] * scale, config.cutout_side[1] * scale)
    images: list[RankImage] = []
    for index in range(config.images):
        photo = backgrounds[index % len(backgrounds)]
        split = splits[photo.id]
        rng = np.random.default_rng(image_seed(seed, "counting", index))
        unseen = bool(heldout) and rng.random() < config.unseen_share[split == "test"]
        pool = heldout if unseen else seen
        n_categories = int(rng.integers(config.categories_per_image[0], min(most, len(pool)) + 1))
        chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=n_categories, replace=False))]
        items: list[tuple[str, str, Image.Image]] = []
        for category, count in zip(chosen, _counts(rng, n_categories, config)):
            for _ in range(count):
                cutout: Cutout = categories[category][int(rng.integers(len(categories[category])))]
                items.append((category, cutout.id, stamps[cutout.id]))
        items = [items[i] for i in rng.permutation(len(items))]
        background = _background(photo, config.size, rng, config.crop_scale)
        image, placements = paste_cutouts(background, items, rng, sides, config.gap)
        path = images_dir / f"count-{index:05d}.png"
        image.save(path)
        pasted = {n: 0 for n in names}
        for placement in placements:
            pasted[placement.category] += 1
        targets = {instruction_text(n): float(pasted[n]) for n in names}
        # held-out scheme: every test-background image is a test image (those without held-out categories
        # are its negatives); train/val keep only images free of held-out categories
        heldout_split = "test" if split == "test" else "" if unseen else split
        sources = (photo.id, *sorted({p.cutout for p in placements}))
        images.append(RankImage(path, photo.id, split, targets, sources, heldout_split))
    return instructions, images, heldout
