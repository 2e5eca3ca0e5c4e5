"""New classes from a few examples, without retraining: weight imprinting (Qi, Brown and Lowe,
CVPR 2018), centred.

The cosine classifier scores a class by the cosine between the image's L2-normalised embedding
and the class's weight row, divided by the temperature. A new class's row is its examples' mean
embedding less the collection's mean embedding (its centre), normalised: the trained rows point
away from what all images share (their cosine with their own class's mean is about 0.3 on the
quality benchmark), and a raw mean, which shares it, took every answer there (trained classes'
top-1 0.89 -> 0.00; centred: 0.86, benchmarks/few_shot.md). The row joins the softmax beside
the trained ones, and the embedding (so the index) does not change. Adding examples later
moves the row to the mean of all of them. A linear classifier (the pretrained ImageNet
model's) has rows of another scale; there, only the neighbour vote answers with added labels.

Also the other way to classify with what the collection holds: a similarity-weighted vote of
the k nearest labelled images.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.network import CosineClassifier

MAX_NAME_LENGTH = 64
RESERVED_NAMES = {"unknown"}  # what /classify answers below the threshold


@dataclass(frozen=True)
class AddedClass:
    """A class added from examples: the sum of their unit embeddings, how many, and the
    collection's mean embedding when it was added (kept, so the row does not drift as the
    collection grows)."""

    name: str
    total: np.ndarray  # (D,) float64
    examples: int
    centre: np.ndarray  # (D,) float64

    @property
    def weight(self) -> np.ndarray:
        """The classifier row: the examples' mean less the centre, normalised."""
        row = self.total / self.examples - self.centre
        return (row / max(np.linalg.norm(row), 1e-12)).astype(np.float32)

    def with_examples(self, embeddings: np.ndarray) -> AddedClass:
        """This class with more examples (unit embeddings, (N, D))."""
        total = self.total + embeddings.astype(np.float64).sum(0)
        return AddedClass(self.name, total, self.examples + len(embeddings), self.centre)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "examples": self.examples,
            "total": _encoded(self.total),
            "centre": _encoded(self.centre),
        }

    @classmethod
    def from_dict(cls, data: dict) -> AddedClass:
        total, centre = _decoded(data["total"]), _decoded(data["centre"])
        return cls(data["name"], total, int(data["examples"]), centre)


def _encoded(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype(np.float64).tobytes()).decode()


def _decoded(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float64).copy()


def added_from(name: str, embeddings: np.ndarray, centre: np.ndarray) -> AddedClass:
    """A new class from its examples' unit embeddings (N, D), N >= 1, and the collection's
    mean embedding (zeros for an empty collection)."""
    if not len(embeddings):
        raise ValueError("a class needs at least one example image")
    total = embeddings.astype(np.float64).sum(0)
    return AddedClass(name, total, len(embeddings), centre.astype(np.float64))


def checked_name(name: str, taken: Sequence[str]) -> str:
    """The class name, stripped; ValueError with what is wrong when it cannot be one."""
    name = name.strip()
    if not name:
        raise ValueError("a class name cannot be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"a class name has at most {MAX_NAME_LENGTH} characters")
    if name.lower() in RESERVED_NAMES:
        raise ValueError(f"{name!r} is what /classify answers below the threshold: choose another")
    if name in taken:
        raise ValueError(f"there is already a class named {name!r}")
    return name


@dataclass(frozen=True)
class Classifier:
    """The trained classes and the added ones, scored together. Immutable: a change makes a
    new one, so a request reads one consistent set."""

    trained: tuple[str, ...]
    added: tuple[AddedClass, ...]
    temperature: float | None  # the cosine head's; None for a linear head
    fingerprint: str  # the model's

    @classmethod
    def of(cls, classes: Sequence[str], head: object, fingerprint: str) -> Classifier:
        temperature = head.temperature if isinstance(head, CosineClassifier) else None
        return cls(tuple(classes), (), temperature, fingerprint)

    @property
    def names(self) -> list[str]:
        return [*self.trained, *(c.name for c in self.added)]

    @property
    def can_imprint(self) -> bool:
        return self.temperature is not None

    @property
    def version(self) -> str:
        """The model's fingerprint, and a hash of the added classes when there are any: what
        answered, beside the embedding's fingerprint (which adding a class leaves alone)."""
        if not self.added:
            return self.fingerprint
        state = json.dumps([c.to_dict() for c in self.added], sort_keys=True).encode()
        return f"{self.fingerprint}+{hashlib.sha256(state).hexdigest()[:8]}"

    def find(self, name: str) -> AddedClass | None:
        return next((c for c in self.added if c.name == name), None)

    def replaced(self, added: Sequence[AddedClass]) -> Classifier:
        return Classifier(self.trained, tuple(added), self.temperature, self.fingerprint)

    def probabilities(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Softmax over the trained classes' logits and the added classes' cosines over the
        temperature, (N, trained + added)."""
        if self.added and self.temperature is not None:
            weights = np.stack([c.weight for c in self.added])
            logits = np.concatenate([logits, embeddings @ weights.T / self.temperature], axis=1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


def dump(added: Sequence[AddedClass]) -> str:
    """The added classes as kept with the collection (JSON)."""
    return json.dumps([c.to_dict() for c in added])


def load(text: str | None) -> list[AddedClass]:
    return [AddedClass.from_dict(d) for d in json.loads(text)] if text else []


def neighbour_vote(labels: Sequence[str | None], scores: Sequence[float]) -> dict[str, float]:
    """Each label's share of the similarity of the labelled neighbours (negative similarities
    count nothing), best first; empty when no neighbour has a label."""
    votes: dict[str, float] = defaultdict(float)
    for label, score in zip(labels, scores, strict=True):
        if label is not None:
            votes[label] += max(float(score), 0.0)
    total = sum(votes.values())
    if not votes:
        return {}
    if total == 0:  # every labelled neighbour dissimilar: an even split
        return {label: 1 / len(votes) for label in votes}
    return dict(sorted(((k, v / total) for k, v in votes.items()), key=lambda kv: -kv[1]))
