"""A model bundle: a directory with config.json and model.safetensors that loads itself."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.backbones import Preprocessing, check_backbone, imagenet_weights, preprocessing_for
from models.data import ImageDataset, Sample, eval_transform
from models.devices import resolve_device
from models.errors import BundleError
from models.network import DEFAULT_TEMPERATURE, EmbeddingNet, build_imagenet_net, build_net

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class BundleConfig:
    """Everything needed to rebuild the network and preprocess its input."""

    backbone: str
    classes: list[str]
    preprocessing: Preprocessing
    embed_dim: int | None = None  # projection size; None keeps the backbone's feature size
    head: str = "cosine"
    temperature: float = DEFAULT_TEMPERATURE
    pretrained_classifier: bool = False  # True: torchvision's own ImageNet classifier, untrained
    weights: str = "imagenet"  # what the backbone started from
    threshold: float | None = None  # below this top-1 score, /classify answers "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = {key: value for key, value in self.__dict__.items() if key != "preprocessing"}
        return {"format": FORMAT_VERSION, **data, "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleConfig:
        """Inverse of to_dict."""
        data = {key: value for key, value in data.items() if key not in ("format", "fingerprint")}
        data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
        return cls(**data)


def fingerprint_of(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor: identifies the weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class Bundle:
    """A trained (or pretrained) embedding network with its classes and preprocessing."""

    def __init__(self, config: BundleConfig, net: EmbeddingNet, device: str = "auto"):
        self.config = config
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.fingerprint = fingerprint_of(self.net.state_dict())
        self.transform = eval_transform(config.preprocessing)

    @property
    def embedding_dim(self) -> int:
        """Size of the embeddings this bundle produces."""
        return self.net.head.dim

    @classmethod
    def pretrained(cls, backbone: str, weights: str = "imagenet", device: str = "auto") -> Bundle:
        """No training: the backbone's ImageNet classifier and GAP embedding."""
        check_backbone(backbone)
        config = BundleConfig(
            backbone=backbone,
            classes=list(imagenet_weights(backbone).meta["categories"]),
            preprocessing=preprocessing_for(backbone),
            head="linear",
            pretrained_classifier=True,
            weights=str(weights),
        )
        return cls(config, build_imagenet_net(backbone, weights), device)

    def save(self, directory: Path) -> None:
        """Write config.json and model.safetensors; each file is replaced atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(state, str(path)))
        config = {**self.config.to_dict(), "fingerprint": self.fingerprint}
        text = json.dumps(config, indent=2)
        atomic_write(directory / CONFIG_FILE, lambda path: path.write_text(text))

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> Bundle:
        """Rebuild the network through the registry and load its weights (no pickle)."""
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise BundleError(
                f"{directory} is not a model bundle (it needs {CONFIG_FILE} and {WEIGHTS_FILE}). "
                "Create one with 'imgsim train DATA_DIR --out BUNDLE'."
            )
        raw = json.loads(config_path.read_text())
        config = BundleConfig.from_dict(raw)
        net = _build(config)
        try:
            net.load_state_dict(load_file(str(weights_path)))
        except RuntimeError as err:
            raise BundleError(f"{weights_path} does not match {config_path}: {err}") from err
        bundle = cls(config, net, device)
        if raw.get("fingerprint") not in (None, bundle.fingerprint):
            raise BundleError(
                f"{weights_path} has changed since the bundle was saved (fingerprint "
                f"{bundle.fingerprint}, config says {raw['fingerprint']}). Re-save or retrain it."
            )
        return bundle

    @torch.inference_mode()
    def embed(
        self, images: Image.Image | Sequence[Image.Image], batch_size: int = 32
    ) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of one image or many."""
        return self._run(images, batch_size)[0]

    @torch.inference_mode()
    def classify(
        self, images: Image.Image | Sequence[Image.Image], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N, C) and embeddings (N, D) of one image or many."""
        embeddings, logits = self._run(images, batch_size)
        return _softmax(logits), embeddings

    def _run(
        self, images: Image.Image | Sequence[Image.Image], batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        batch = [images] if isinstance(images, Image.Image) else list(images)
        embeddings, logits = [], []
        for start in range(0, len(batch), batch_size):
            x = torch.stack([self.transform(im) for im in batch[start : start + batch_size]])
            out = self.net(x.to(self.device))
            embeddings.append(out.embedding.float().cpu().numpy())
            logits.append(out.logits.float().cpu().numpy())
        return np.concatenate(embeddings), np.concatenate(logits)

    @torch.inference_mode()
    def embed_files(
        self, paths: Sequence[Path], batch_size: int = 32, workers: int = 2
    ) -> np.ndarray:
        """Embeddings of image files, decoded in DataLoader workers, with a progress bar."""
        dataset = ImageDataset(
            [Sample(path, 0) for path in paths],
            self.transform,
            self.config.preprocessing.resize_size * 2,
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=self.device.startswith("cuda"),
        )
        chunks = [np.zeros((0, self.embedding_dim), np.float32)]
        for x, _ in tqdm(loader, desc="embedding", unit="batch"):
            chunks.append(self.net(x.to(self.device)).embedding.float().cpu().numpy())
        return np.concatenate(chunks)

    @torch.inference_mode()
    def classify_files(
        self, paths: Sequence[Path], batch_size: int = 32, workers: int = 2
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N, C) and embeddings (N, D) of image files, decoded in workers."""
        dataset = ImageDataset(
            [Sample(path, 0) for path in paths],
            self.transform,
            self.config.preprocessing.resize_size * 2,
        )
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        embeddings = [np.zeros((0, self.embedding_dim), np.float32)]
        logits = [np.zeros((0, len(self.config.classes)), np.float32)]
        for x, _ in tqdm(loader, desc="classifying", unit="batch"):
            out = self.net(x.to(self.device))
            embeddings.append(out.embedding.float().cpu().numpy())
            logits.append(out.logits.float().cpu().numpy())
        return _softmax(np.concatenate(logits)), np.concatenate(embeddings)


def _build(config: BundleConfig) -> EmbeddingNet:
    if config.pretrained_classifier:
        return build_imagenet_net(config.backbone, "none")
    return build_net(
        config.backbone,
        len(config.classes),
        "none",
        embed_dim=config.embed_dim,
        head=config.head,
        temperature=config.temperature,
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
