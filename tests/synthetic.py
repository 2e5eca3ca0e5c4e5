"""Seeded synthetic images the tests upload and index."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noise_png(seed: int = 0, size: int = 48) -> bytes:
    """A size x size RGB PNG of seeded noise: distinct bytes and embeddings per seed."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
