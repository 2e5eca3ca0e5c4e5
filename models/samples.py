"""A small generated dataset of coloured shapes: the built-in default and the tests' data."""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")


def make_sample_dataset(root: Path, per_class: int = 24, size: int = 128, seed: int = 0) -> Path:
    """Write per_class PNG images of each shape into root/<shape>/; returns root."""
    rng = random.Random(seed)
    for shape in SHAPES:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(shape, size, rng).save(folder / f"{shape}_{i:03d}.png")
    return root


def draw_shape(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One shape of random colour, size, place and rotation on a noisy background."""
    background = tuple(rng.randrange(150, 256) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # clutter, so the task is not trivial
        x, y = rng.randrange(size), rng.randrange(size)
        draw.line(
            (x, y, x + rng.randrange(-20, 20), y + rng.randrange(-20, 20)),
            fill=tuple(rng.randrange(256) for _ in range(3)),
            width=2,
        )
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    colour = tuple(rng.randrange(0, 140) for _ in range(3))
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(angle + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        corners = [(angle + k * 2 * math.pi / 3, r) for k in range(3)]
    else:  # five-pointed star: alternate outer and inner radius
        corners = [(angle + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for a, d in corners]
