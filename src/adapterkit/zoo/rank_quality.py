"""Task A "quality": reference photos × random levels of five degradations (see :mod:`.rank_tasks`).

Level 0 leaves an attribute untouched; level ``levels - 1`` is the strongest. With strength
``t = level / (levels - 1)`` (224-px images, pixel values 0–255):

==========  ======================================================  =====================================
attribute   operation                                               strongest (t = 1)
==========  ======================================================  =====================================
contrast    blend towards the image's mean grey, factor ``1 − 0.75t``  a quarter of the contrast left
blur        Gaussian blur, σ = ``4 t`` pixels                        σ = 4 px
dark        ``x ↦ 255 · (x/255)^(1 + t) · (1 − 0.55t)``               gamma 2, 45 % brightness
noise       additive Gaussian noise, σ = ``30 t`` (then clipped)     σ = 30
jpeg        JPEG round trip at quality ``90 · (5/90)^t``             quality 5
==========  ======================================================  =====================================

They are applied in that order (haze, optics, exposure, sensor, compression). Images are stored as PNG,
so the JPEG artefacts are exactly those of the chosen quality.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageFilter

from ..errors import ConfigError
from .photos import Photo, PhotoSet
from .rank_tasks import Instruction, RankImage, check_fractions, check_int, image_seed, photo_splits

ATTRIBUTES = ("blur", "noise", "jpeg", "dark", "contrast")
INSTRUCTIONS = {
    "blur": "Sort the images by how blurry they are.",
    "noise": "Sort the images by how noisy they are.",
    "jpeg": "Sort the images by how strong their JPEG compression artefacts are.",
    "dark": "Sort the images by how dark they are.",
    "contrast": "Sort the images by how low their contrast is.",
}
_ORDER = ("contrast", "blur", "dark", "noise", "jpeg")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """Task A's size: ``variants`` degraded copies of each reference photo, ``levels`` levels per attribute."""

    size: int = 224
    variants: int = 18
    levels: int = 5
    attributes: tuple[str, ...] = ATTRIBUTES
    #: fractions of each package's photos for (val, test)
    holdout: tuple[float, float] = (0.2, 0.2)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a bad size, count, level number or attribute."""
        check_int(self.size, 32, 1024, "size")
        check_int(self.variants, 1, 1000, "variants")
        check_int(self.levels, 2, 11, "levels")
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown or not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"attributes must be distinct names from {', '.join(ATTRIBUTES)}, got {self.attributes}")
        check_fractions(self.holdout, "holdout")


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size``, then cut the central ``size × size`` square."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def degrade(image: Image.Image, levels: Mapping[str, int], rng: np.random.Generator,
            num_levels: int = 5) -> Image.Image:
    """``image`` (RGB) with each attribute of ``levels`` applied at its level (see the module table)."""
    for name, level in levels.items():
        if name not in ATTRIBUTES:
            raise ConfigError(f"unknown degradation {name!r}; choose from {', '.join(ATTRIBUTES)}")
        check_int(level, 0, num_levels - 1, f"level of {name}")
    strength = {name: levels.get(name, 0) / (num_levels - 1) for name in ATTRIBUTES}
    image = image.convert("RGB")
    for name in _ORDER:
        t = strength[name]
        if t == 0:
            continue
        if name == "blur":
            image = image.filter(ImageFilter.GaussianBlur(4.0 * t))
        elif name == "jpeg":
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=max(1, round(90 * (5 / 90) ** t)))
            buffer.seek(0)
            image = Image.open(buffer).convert("RGB")
        else:
            x = np.asarray(image, dtype=np.float32)
            if name == "contrast":
                x = x.mean() + (1 - 0.75 * t) * (x - x.mean())
            elif name == "dark":
                x = 255 * (x / 255) ** (1 + t) * (1 - 0.55 * t)
            else:  # noise
                x = x + rng.normal(0.0, 30.0 * t, size=x.shape).astype(np.float32)
            image = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return image


def _reference(photo: Photo, size: int) -> Image.Image:
    with Image.open(photo.path) as image:
        return centre_crop(image, size)


def build_quality(photos: PhotoSet, images_dir: Path, seed: int,
                  config: QualityConfig) -> tuple[list[Instruction], list[RankImage], list[str]]:
    """Write every reference photo's degraded variants into ``images_dir``; instructions, images, no held-out words."""
    if len(photos.photos) < 3:
        raise ConfigError(f"the quality task needs at least 3 reference photos, got {len(photos.photos)}")
    splits = photo_splits(photos, seed, config.holdout)
    instructions = [Instruction(INSTRUCTIONS[a], a) for a in config.attributes]
    images: list[RankImage] = []
    for photo in sorted(photos.photos, key=lambda p: p.id):
        clean = _reference(photo, config.size)
        for variant in range(config.variants):
            rng = np.random.default_rng(image_seed(seed, "quality", photo.id, variant))
            levels = {a: int(rng.integers(0, config.levels)) for a in config.attributes}
            image = degrade(clean, levels, rng, config.levels)
            path = images_dir / f"{photo.id.replace(':', '-')}-{variant:03d}.png"
            image.save(path)
            targets = {i.text: float(levels[i.attribute]) for i in instructions}
            images.append(RankImage(path, photo.id, splits[photo.id], targets, (photo.id,)))
    return instructions, images, []
