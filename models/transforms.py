"""The one way every stage turns an image into the model's input: decode (reduced while
decoding, to the size the model needs), fit to the square (crop, letterbox or resize, as the
bundle's preprocessing says), then the eval crop or training's augmentations, and normalise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL.Image import Image
from torchvision.transforms import InterpolationMode, v2

from models.backbones import Preprocessing
from models.images import DEFAULT_MAX_PIXELS, load_image

Transform = Callable[[torch.Tensor], torch.Tensor]  # resized uint8 (3, S, S) -> model input


def decode(source: Path | bytes, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """The one decode policy of every stage: an upright RGB image, reduced while decoding
    (JPEG draft, libvips shrink-on-load) to no less than the resize size."""
    return load_image(source, max_pixels=max_pixels, draft_size=pre.resize_size)


def resized(image: Image, pre: Preprocessing) -> torch.Tensor:
    """The deterministic part of preprocessing, what the training cache keeps: a uint8
    (3, R, R) square, R = resize_size, whose centre crop_size square is what the network sees.

    crop: short side to R, the centre square (the rest is cut off). letterbox and resize: the
    whole image inside the centre crop_size square (aspect kept, or stretched to fill it), on
    its background colour, so that neither the eval crop nor training's random crops lose its
    ends more than they lose the background."""
    tensor = v2.functional.pil_to_tensor(image)
    if pre.fit == "crop":
        tensor = v2.functional.resize(
            tensor, [pre.resize_size], interpolation=_interpolation(pre), antialias=True
        )
        return v2.functional.center_crop(tensor, [pre.resize_size])
    height, width = tensor.shape[-2:]
    scale = pre.crop_size / max(height, width)
    size = [pre.crop_size, pre.crop_size]
    if pre.fit == "letterbox":
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
    inner = v2.functional.resize(tensor, size, interpolation=_interpolation(pre), antialias=True)
    canvas = background_of(tensor).expand(3, pre.resize_size, pre.resize_size).clone()
    top, left = (pre.resize_size - size[0]) // 2, (pre.resize_size - size[1]) // 2
    canvas[:, top : top + size[0], left : left + size[1]] = inner
    return canvas


def background_of(pixels: torch.Tensor) -> torch.Tensor:
    """An image's background colour: the per-channel median of its outermost pixels (3, 1, 1)."""
    frame = torch.cat(
        [pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1
    )  # (3, 2H + 2W)
    return frame.median(dim=1).values.view(3, 1, 1)


def _interpolation(pre: Preprocessing) -> InterpolationMode:
    return InterpolationMode(pre.interpolation)


def train_transform(pre: Preprocessing) -> Transform:
    """Augmentations on a resized image: random resized crop, flip, colour jitter, normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                pre.crop_size, scale=(0.35, 1.0), interpolation=_interpolation(pre), antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


def eval_transform(pre: Preprocessing) -> Transform:
    """The weights' own inference transform on a resized image: centre crop, normalise."""
    return CentreCropNormalise(pre)


class CentreCropNormalise:
    """The centre crop_size square of a resized uint8 image (..., 3, H, W), scaled to [0, 1] and
    normalised, as v2.CenterCrop, v2.ToDtype(scale=True) and v2.Normalize make it (to float
    rounding), in one pass: 0.19 ms instead of their 0.42 ms for a 256-pixel image on one thread,
    which took a query's preprocessing from 0.86 to 0.59 ms."""

    def __init__(self, pre: Preprocessing):
        self.crop_size = pre.crop_size
        std = torch.tensor(pre.std)
        self.scale = (1 / (255 * std)).view(3, 1, 1)
        self.shift = (-torch.tensor(pre.mean) / std).view(3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        square = v2.functional.center_crop(pixels, [self.crop_size])
        return torch.addcmul(self.shift, square.to(torch.float32), self.scale)
