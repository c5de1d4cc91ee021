"""A contact sheet: the sorted images in a grid, each labelled with its rank and score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from ...errors import ConfigError


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], out: str | Path, title: str = "",
                  thumb: int = 160, columns: int | None = None) -> Path:
    """Write a PNG grid of ``images`` (in the given order) with one label under each."""
    if len(images) != len(labels) or not images:
        raise ConfigError(f"a contact sheet needs images and as many labels, got {len(images)} and {len(labels)}")
    columns = columns or min(len(images), max(1, math.ceil(math.sqrt(len(images) * 1.5))))
    rows = math.ceil(len(images) / columns)
    caption, header = 18, 24 if title else 0
    sheet = Image.new("RGB", (columns * (thumb + 8) + 8, header + rows * (thumb + caption + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill="black")
    for k, (image, label) in enumerate(zip(images, labels)):
        x, y = 8 + (k % columns) * (thumb + 8), header + 8 + (k // columns) * (thumb + caption + 8)
        small = image.convert("RGB")
        small.thumbnail((thumb, thumb))
        sheet.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        draw.text((x, y + thumb + 3), label, fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
