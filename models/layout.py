"""The names of the files in a bundle folder, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BundleLayout:
    """Where each part of a bundle lives below its folder."""

    root: Path

    @property
    def config(self) -> Path:
        """Backbone, classes, preprocessing and the weights' fingerprint (JSON)."""
        return self.root / "config.json"

    @property
    def weights(self) -> Path:
        """The network's tensors (safetensors: no pickle)."""
        return self.root / "model.safetensors"

    @property
    def metrics(self) -> Path:
        """One record per training epoch (JSON)."""
        return self.root / "metrics.json"

    @property
    def checkpoint(self) -> Path:
        """The state an interrupted training run resumes from; removed once the bundle is saved."""
        return self.root / "checkpoint.pt"

    @property
    def index(self) -> Path:
        """The gallery index folder built with this bundle."""
        return self.root / "index"

    @property
    def eval(self) -> Path:
        """The evaluation report folder."""
        return self.root / "eval"

    def decoded(self, rank: int) -> Path:
        """A training process's cache of decoded images; removed when training ends."""
        return self.root / f".decoded-{rank}"
