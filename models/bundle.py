"""A model bundle: a directory with config.json and model.safetensors that loads itself."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image
from pydantic import (
    AfterValidator,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass as checked_dataclass
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.backbones import (
    STRICT,
    PositiveFinite,
    Preprocessing,
    Size,
    check_backbone,
    imagenet_categories,
    one_of,
    preprocessing_for,
)
from models.config import BATCH_SIZE
from models.data import ImageDataset, Readable
from models.devices import resolve_device
from models.errors import BundleError, UnsupportedImage
from models.files import atomic_write
from models.images import DEFAULT_MAX_PIXELS
from models.layout import BundleLayout
from models.network import (
    DEFAULT_TEMPERATURE,
    HEADS,
    EmbeddingNet,
    build_imagenet_net,
    build_net,
)
from models.runtime import Runtime, TorchRuntime, open_runtime
from models.transforms import decode, eval_transform
from models.workers import loader

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
Input = Image.Image | Path | bytes  # what encode takes: a decoded image, a file or its bytes


Score = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]


@checked_dataclass(config=STRICT)
class BundleConfig:
    """Everything needed to rebuild the network and preprocess its input; checked (types,
    ranges, known keys) when built and when a bundle is loaded."""

    backbone: Annotated[str, AfterValidator(check_backbone)]
    classes: Annotated[list[Annotated[str, Field(strict=True)]], Field(min_length=1)]
    preprocessing: Preprocessing
    embed_dim: Size | None = None  # projection size; None keeps the backbone's feature size
    head: Annotated[str, one_of(HEADS, "head")] = "cosine"
    temperature: PositiveFinite = DEFAULT_TEMPERATURE
    pretrained_classifier: bool = False  # True: torchvision's own ImageNet classifier, untrained
    weights: str = "imagenet"  # what the backbone started from
    threshold: Score | None = None  # below this top-1 score, /classify answers "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_classes(self) -> BundleConfig:
        # ImageNet's own 1000 names repeat two ("crane", "maillot"); a trained bundle's cannot.
        if not self.pretrained_classifier and len(set(self.classes)) != len(self.classes):
            seen: set[str] = set()
            twice = sorted({name for name in self.classes if name in seen or seen.add(name)})
            raise ValueError(f"classes must be unique; repeated: {', '.join(twice)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = {key: value for key, value in self.__dict__.items() if key != "preprocessing"}
        return {"format": FORMAT_VERSION, **data, "preprocessing": self.preprocessing.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleConfig:
        """Inverse of to_dict; ValidationError naming each field that is missing, unknown or
        out of range."""
        data = {key: value for key, value in data.items() if key not in ("format", "fingerprint")}
        return TypeAdapter(cls).validate_python(data)


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
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.config = config
        self._weights = fingerprint_of(self.net.state_dict())
        self.directory: Path | None = None  # the folder it was loaded from, if any
        self.runtime: Runtime = TorchRuntime(self.net, self.device)
        self._transform = eval_transform(config.preprocessing)

    @property
    def config(self) -> BundleConfig:
        return self._config

    @config.setter
    def config(self, config: BundleConfig) -> None:
        self._config = config
        self.net.mirror = config.preprocessing.mirror

    @property
    def fingerprint(self) -> str:
        """What the embeddings are a function of: the weights, and mirror averaging when on
        (it changes every embedding, so an index or an export made without it is another
        model's). Without it, the weights' fingerprint as bundles have always had."""
        if not self.config.preprocessing.mirror:
            return self._weights
        return hashlib.sha256(f"{self._weights}|mirror".encode()).hexdigest()[:16]

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
            classes=imagenet_categories(backbone),
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
        layout = BundleLayout(directory)
        atomic_write(layout.weights, lambda path: save_file(state, str(path)))
        config = {**self.config.to_dict(), "fingerprint": self.fingerprint}
        text = json.dumps(config, indent=2)
        atomic_write(layout.config, lambda path: path.write_text(text))

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> Bundle:
        """Rebuild the network through the registry and load its weights (no pickle)."""
        layout = BundleLayout(directory)
        config_path, weights_path = layout.config, layout.weights
        if not config_path.is_file() or not weights_path.is_file():
            raise BundleError(
                f"{directory} is not a model bundle (it needs {config_path.name} and "
                f"{weights_path.name}). Create one with 'imgsim train DATA_DIR --out BUNDLE'."
            )
        config, raw = _read_config(config_path)
        net = _build(config)
        try:
            net.load_state_dict(load_file(str(weights_path)))
        except RuntimeError as err:
            raise BundleError(f"{weights_path} does not match {config_path}: {err}") from err
        bundle = cls(config, net, device)
        bundle.directory = directory
        if raw.get("fingerprint") not in (None, bundle.fingerprint):
            raise BundleError(
                f"{weights_path} has changed since the bundle was saved (fingerprint "
                f"{bundle.fingerprint}, config says {raw['fingerprint']}). Re-save or retrain it."
            )
        return bundle

    def use_runtime(
        self, name: str = "auto", threads: int | None = None, calibration: Path | None = None
    ) -> str:
        """Run every later forward with the named runtime (models.runtime.RUNTIMES), exporting
        it into the bundle folder on first use; returns the runtime chosen (auto resolved)."""
        self.runtime = open_runtime(self, name, threads, calibration)
        log.info("runtime: %s", self.runtime.name)
        return self.runtime.name

    def decode(self, source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode a file or upload the way every stage does (see models.transforms.decode)."""
        return decode(source, self.config.preprocessing, max_pixels)

    def embed(
        self, inputs: Input | Sequence[Input], batch_size: int = BATCH_SIZE, workers: int = 0
    ) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of one image or many."""
        return self.encode(inputs, batch_size, workers).embeddings

    def classify(
        self, inputs: Input | Sequence[Input], batch_size: int = BATCH_SIZE, workers: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N, C) and embeddings (N, D) of one image or many."""
        encoded = self.encode(inputs, batch_size, workers)
        return _softmax(encoded.logits), encoded.embeddings

    def encode(
        self,
        inputs: Input | Sequence[Input],
        batch_size: int = BATCH_SIZE,
        workers: int = 0,
        skip_unreadable: bool = False,
    ) -> Encoded:
        """The one encode path: decode (files and bytes), resize, crop, normalise (`batches`),
        forward in batches (`forward`). workers > 0 decodes in DataLoader processes, with a
        progress bar. With skip_unreadable, an image that cannot be decoded is left out and
        listed in `failed` instead of raising UnsupportedImage."""
        embeddings = [np.zeros((0, self.embedding_dim), np.float32)]
        logits = [np.zeros((0, len(self.config.classes)), np.float32)]
        reasons: list[str] = []
        for x, why in self.batches(
            inputs, batch_size, workers=workers, skip_unreadable=skip_unreadable
        ):
            encoded = self.forward(x)
            embeddings.append(encoded.embeddings)
            logits.append(encoded.logits)
            reasons += why
        kept = [i for i, why in enumerate(reasons) if not why]
        failed = [(i, why) for i, why in enumerate(reasons) if why]
        return Encoded(np.concatenate(embeddings)[kept], np.concatenate(logits)[kept], failed)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded image as `batches` prepares it (resized, cropped, normalised: 3, S, S),
        for callers that batch images themselves (the server's micro-batching)."""
        return ImageDataset([image], self.config.preprocessing, self._transform)[0][0]

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> Encoded:
        """Embeddings and logits of preprocessed images (N, 3, S, S): one forward of the
        runtime."""
        embeddings, logits = self.runtime(pixels)
        return Encoded(embeddings, logits)

    def batches(
        self,
        inputs: Input | Sequence[Input],
        batch_size: int = BATCH_SIZE,
        *,
        workers: int = 0,
        skip_unreadable: bool = False,
    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """The preprocessed batches encode runs (and int8 calibration reads): normalised images
        (N, 3, S, S) on the CPU with, per image, why it could not be read ('' if it could)."""
        many = [inputs] if isinstance(inputs, Input) else list(inputs)
        pre = self.config.preprocessing
        dataset = Readable(ImageDataset(many, pre, self._transform), pre.crop_size)
        batched = loader(
            dataset, workers, batch_size=batch_size, pin_memory=self.device.startswith("cuda")
        )
        for x, _, why in tqdm(batched, desc="encoding", unit="batch", disable=workers == 0):
            if any(why) and not skip_unreadable:
                raise UnsupportedImage(next(reason for reason in why if reason))
            yield x, list(why)


@dataclass
class Encoded:
    """What the network makes of a batch of images."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised, of the readable inputs in order
    logits: np.ndarray  # (N, C) float32
    failed: list[tuple[int, str]] = field(default_factory=list)  # (input position, reason)

    def rows(self, start: int, end: int) -> Encoded:
        """The embeddings and logits of inputs start..end-1 (of an encode that skipped none)."""
        return Encoded(self.embeddings[start:end], self.logits[start:end])

    def probabilities(self) -> np.ndarray:
        """Class probabilities (N, C): the softmax of the logits."""
        return _softmax(self.logits)


def _read_config(path: Path) -> tuple[BundleConfig, dict[str, Any]]:
    """The bundle's config.json, checked, and as read; or BundleError saying what is wrong."""
    fix = "Fix it, or save the bundle again with 'imgsim train DATA_DIR --out BUNDLE'."
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BundleError(f"{path} cannot be read as JSON ({err}). {fix}") from err
    if not isinstance(raw, dict):
        raise BundleError(f"{path} holds a JSON {type(raw).__name__}, not an object. {fix}")
    if raw.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise BundleError(f"{path} has format {raw['format']!r}; this imgsim reads "
                          f"format {FORMAT_VERSION}. {fix}")  # fmt: skip
    try:
        return BundleConfig.from_dict(raw), raw
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'config'}: {e['msg']}"
            for e in err.errors()
        )
        raise BundleError(f"{path} is not a valid bundle config: {problems}. {fix}") from err


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
