"""The names of the files in a bundle folder, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_NAMES = {
    "config": "config.json",
    "weights": "model.safetensors",
    "metrics": "metrics.json",
    "checkpoint": "checkpoint.pt",
    "index": "index",
    "eval": "eval",
    "onnx": "model.onnx",
    "onnx_int8": "model.int8.onnx",
}


@dataclass(frozen=True)
class BundleLayout:
    """Where each part of a bundle lives below its folder."""

    root: Path
    config: Path = field(init=False)  # backbone, classes, preprocessing, fingerprint (JSON)
    weights: Path = field(init=False)  # the network's tensors (safetensors: no pickle)
    metrics: Path = field(init=False)  # one record per training epoch (JSON)
    checkpoint: Path = field(init=False)  # what an interrupted run resumes from
    index: Path = field(init=False)  # the gallery index built with this bundle
    eval: Path = field(init=False)  # the evaluation report folder
    onnx: Path = field(init=False)  # the network exported for ONNX Runtime (models/runtime.py)
    onnx_int8: Path = field(init=False)  # the same, statically quantised to int8

    def __post_init__(self) -> None:
        for part, name in _NAMES.items():
            object.__setattr__(self, part, self.root / name)

    def decoded(self, rank: int) -> Path:
        """A training process's cache of decoded images; removed when training ends."""
        return self.root / f".decoded-{rank}"
