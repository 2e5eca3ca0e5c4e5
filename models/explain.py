"""Why this answer: Grad-CAM heatmaps (pytorch_grad_cam) over what the model sees.

For a class: Grad-CAM, the regions whose activations raise that class's logit. For a pair of
images: the regions of each whose activations raise the cosine similarity of its embedding to
the other's (a similarity CAM on the embedding), by LayerCAM, which weighs each location by its
own positive gradients: the channel-mean weights of Grad-CAM mix signs when two embeddings are
already close, and its heat then falls beside the shared object as often as on it. The layer
weighed is the family's `cam_layer`, so every backbone family is explained the same way. The
CAM hooks into the network, so it runs on a private copy, one explanation at a time, and never
disturbs the serving network.
"""

from __future__ import annotations

import copy
import io
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam import GradCAM, LayerCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torchvision.transforms import v2

from models.backbones import get_backbone
from models.bundle import Bundle
from models.network import EmbeddingNet
from models.transforms import eval_transform, resized


def gap(width: int) -> int:
    """Pixels between the two images of a pair: a thin line at any model size."""
    return max(2, width // 32)


class _Output(nn.Module):
    """The network with one output, as Grad-CAM expects: class logits or the embedding."""

    def __init__(self, net: EmbeddingNet, output: str):
        super().__init__()
        self.net, self.output = net, output

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.net(x), self.output)


class SimilarTo:
    """Grad-CAM target: the cosine similarity of an image's embedding to a fixed embedding."""

    def __init__(self, embedding: Tensor):
        self.embedding = embedding

    def __call__(self, output: Tensor) -> Tensor:
        return F.cosine_similarity(output, self.embedding, dim=0)


@dataclass(frozen=True)
class Heatmap:
    """One explanation: the heat (crop x crop, 0..1) over the image the model saw."""

    heat: np.ndarray
    seen: np.ndarray  # the model's input before normalising: (crop, crop, 3) float 0..1

    def overlay(self) -> Image.Image:
        """The heat in colour over the image."""
        return Image.fromarray(show_cam_on_image(self.seen, self.heat, use_rgb=True))

    def grey(self) -> Image.Image:
        """The heat alone, 0 black to 1 white, for a client to composite itself."""
        return Image.fromarray(np.uint8(np.clip(self.heat, 0.0, 1.0) * 255), "L")


class Explainer:
    """Grad-CAM for a bundle's classes and embeddings, on a copy of its network."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.net = copy.deepcopy(bundle.net).eval()
        for module in self.net.modules():  # Grad-CAM keeps activations an in-place op would edit
            if getattr(module, "inplace", False):
                module.inplace = False
        family = get_backbone(bundle.config.backbone).family
        self.layer = family.cam_layer(self.net.trunk.body)
        self._lock = threading.Lock()

    def _inputs(self, image: Image.Image) -> tuple[Tensor, np.ndarray]:
        pre = self.bundle.config.preprocessing
        pixels = resized(image, pre)
        seen = v2.functional.center_crop(pixels, [pre.crop_size]).permute(1, 2, 0).numpy()
        x = eval_transform(pre)(pixels)[None].to(self.bundle.device)
        return x, seen.astype(np.float32) / 255.0

    def _cam(self, method: type[BaseCAM], output: str, x: Tensor, target: object) -> np.ndarray:
        with self._lock, method(_Output(self.net, output), [self.layer]) as cam:
            return cam(x, [target])[0]

    def for_class(self, image: Image.Image, class_index: int | None = None) -> tuple[Heatmap, int]:
        """The regions that drove a class (default: the predicted one), and that class."""
        x, seen = self._inputs(image)
        if class_index is None:
            with torch.inference_mode():
                class_index = int(self.net(x).logits[0].argmax())
        heat = self._cam(GradCAM, "logits", x, ClassifierOutputTarget(class_index))
        return Heatmap(heat, seen), class_index

    def for_pair(self, query: Image.Image, other: Image.Image) -> tuple[Heatmap, Heatmap, float]:
        """The regions of each image that make it similar to the other, and their similarity."""
        (xq, seen_q), (xo, seen_o) = self._inputs(query), self._inputs(other)
        with torch.inference_mode():
            eq, eo = self.net(xq).embedding[0], self.net(xo).embedding[0]
        score = float(eq @ eo)
        heat_q = self._cam(LayerCAM, "embedding", xq, SimilarTo(eo.clone()))
        heat_o = self._cam(LayerCAM, "embedding", xo, SimilarTo(eq.clone()))
        return Heatmap(heat_q, seen_q), Heatmap(heat_o, seen_o), score


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two images of one mode in a row, a gap apart: on white, or on no heat (black)."""
    space = gap(left.width)
    size = (left.width + space + right.width, max(left.height, right.height))
    canvas = Image.new(left.mode, size, "white" if left.mode == "RGB" else 0)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + space, 0))
    return canvas


def png(image: Image.Image) -> bytes:
    """PNG bytes of an image."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
