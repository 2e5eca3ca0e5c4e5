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

Imprinted rows take answers from the trained classes (5 examples each: their top-1 87.7 ->
84.1), so the added rows are then fitted on the collection: cross-entropy over its labelled
images of the trained classes and each added class's mean example, classes weighted alike,
the trained rows fixed, the added rows held near where imprinting put them. The trained
classes get back 1.5 of the 3.6 points for 8 of the new ones' (84.1 -> 85.6, 68.6 -> 60.7,
benchmarks/few_shot.md; the new ones keep 77 % of what retraining gives them): every other
way tried lies on the same curve (benchmarks/few_shot_frontier.md).

Also the other way to classify with what the collection holds: a similarity-weighted vote of
the k nearest labelled images.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from models.network import CosineClassifier

MAX_NAME_LENGTH = 64
RESERVED_NAMES = {"unknown"}  # what /classify answers below the threshold
# The fit of the added rows: Adam steps, their rate, and the pull back to the imprinted rows
# (the weight of their squared distance); FIT_IMAGES of the collection's labelled images at
# most (as many of each label; 0.68 s then, benchmarks/few_shot.md). few_shot_frontier.md: a
# weaker pull keeps more of the trained classes' answers and fewer of the new ones'.
FIT_STEPS, FIT_RATE, FIT_PULL = 100, 0.05, 1.0
FIT_IMAGES = 5_000


@dataclass(frozen=True)
class AddedClass:
    """A class added from examples: the sum of their unit embeddings, how many, and the
    collection's mean embedding when it was added (kept, so the row does not drift as the
    collection grows)."""

    name: str
    total: np.ndarray  # (D,) float64
    examples: int
    centre: np.ndarray  # (D,) float64
    fitted: np.ndarray | None = None  # (D,) float32, unit: the row fitted on the collection

    @property
    def imprinted(self) -> np.ndarray:
        """The imprinted row: the examples' mean less the centre, normalised."""
        row = self.total / self.examples - self.centre
        return (row / max(np.linalg.norm(row), 1e-12)).astype(np.float32)

    @property
    def weight(self) -> np.ndarray:
        """The classifier row: fitted where it was (Classifier.fitted), else imprinted."""
        return self.fitted if self.fitted is not None else self.imprinted

    def with_examples(self, embeddings: np.ndarray) -> AddedClass:
        """This class with more examples (unit embeddings, (N, D)), its row to be fitted again."""
        total = self.total + embeddings.astype(np.float64).sum(0)
        return AddedClass(self.name, total, self.examples + len(embeddings), self.centre)

    def to_dict(self) -> dict:
        kept = {
            "name": self.name,
            "examples": self.examples,
            "total": _encoded(self.total),
            "centre": _encoded(self.centre),
        }
        if self.fitted is not None:
            kept["fitted"] = _encoded(self.fitted)
        return kept

    @classmethod
    def from_dict(cls, data: dict) -> AddedClass:
        """From to_dict's; one kept before rows were fitted has none (its row is imprinted)."""
        total, centre = _decoded(data["total"]), _decoded(data["centre"])
        fitted = _decoded(data["fitted"]).astype(np.float32) if "fitted" in data else None
        return cls(data["name"], total, int(data["examples"]), centre, fitted)


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
    rows: np.ndarray | None = field(default=None, compare=False, repr=False)  # trained, unit

    @classmethod
    def of(cls, classes: Sequence[str], head: object, fingerprint: str) -> Classifier:
        if not isinstance(head, CosineClassifier):
            return cls(tuple(classes), (), None, fingerprint)
        weight = head.weight.detach().float().cpu().numpy()
        rows = weight / np.linalg.norm(weight, axis=1, keepdims=True)
        return cls(tuple(classes), (), head.temperature, fingerprint, rows)

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
        return replace(self, added=tuple(added))

    def fitted(
        self,
        added: Sequence[AddedClass],
        labels: np.ndarray,
        embeddings: np.ndarray,
        pull: float = FIT_PULL,
    ) -> list[AddedClass]:
        """The added classes with their rows fitted together on the collection's labelled
        images (labels and unit embeddings, StoredItems.labelled_sample); imprinted where the
        collection holds no image of a trained class (there are no answers to keep)."""
        ours = np.isin(labels, self.trained)
        if not added or self.rows is None or self.temperature is None or not ours.any():
            return [replace(c, fitted=None) for c in added]
        names = [*self.trained, *(c.name for c in added)]
        index = {name: i for i, name in enumerate(names)}
        sample = np.concatenate([embeddings[ours], [c.total / c.examples for c in added]])
        targets = [index[label] for label in labels[ours]] + [index[c.name] for c in added]
        start = np.stack([c.imprinted for c in added])
        rows = fit_rows(self.rows, start, sample, np.asarray(targets), self.temperature, pull)
        return [replace(c, fitted=row) for c, row in zip(added, rows, strict=True)]

    def probabilities(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Softmax over the trained classes' logits and the added classes' cosines over the
        temperature, (N, trained + added)."""
        if self.added and self.temperature is not None:
            weights = np.stack([c.weight for c in self.added])
            logits = np.concatenate([logits, embeddings @ weights.T / self.temperature], axis=1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


def fit_rows(
    fixed: np.ndarray,
    start: np.ndarray,
    sample: np.ndarray,
    targets: np.ndarray,
    temperature: float,
    pull: float = FIT_PULL,
) -> np.ndarray:
    """New unit rows (A, D) beside the fixed ones (C, D), from start: FIT_STEPS of Adam on
    the cross-entropy of the sample's images (N, D) against their targets (0..C+A-1), each
    class weighted alike, plus pull times the rows' squared distance from start."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(sample, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.long)
    classes, trained = len(fixed) + len(start), len(fixed)
    weight = len(y) / (classes * torch.bincount(y, minlength=classes).clamp(min=1).float())[y]
    # The fixed rows' part of the softmax is the same at every step: their log-sum-exp and
    # the true class's logit where it is a trained one are taken once (exactly what the
    # cross-entropy over all the rows would take), so a step costs the added rows' alone.
    known = x @ torch.as_tensor(fixed, dtype=torch.float32).T / temperature
    known_lse = torch.logsumexp(known, dim=1)
    ours = y < trained
    known_true = known[torch.arange(len(y)), y.clamp(max=trained - 1)]
    del known
    begin = torch.as_tensor(start, dtype=torch.float32)
    moving = begin.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([moving], lr=FIT_RATE)
    added_true = (y - trained).clamp(min=0)
    for _ in range(FIT_STEPS):
        logits = x @ F.normalize(moving, dim=1).T / temperature
        lse = torch.logaddexp(known_lse, torch.logsumexp(logits, dim=1))
        true = torch.where(ours, known_true, logits[torch.arange(len(y)), added_true])
        loss = (weight * (lse - true)).sum() / weight.sum()  # F.cross_entropy's weighted mean
        loss = loss + pull * ((moving - begin) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.normalize(moving, dim=1).detach().numpy()


class Collection(Protocol):
    """What a fit reads of a collection (index/items.py's StoredItems has it)."""

    def labelled_sample(self, images: int) -> tuple[np.ndarray, np.ndarray]: ...


def fit_in(
    classifier: Classifier, added: Sequence[AddedClass], collection: Collection
) -> list[AddedClass]:
    """The added classes fitted on the collection's labelled images (its labelled_sample, at
    most FIT_IMAGES): what every change of the added classes keeps."""
    if not added:
        return []
    labels, embeddings = collection.labelled_sample(FIT_IMAGES)
    return classifier.fitted(added, labels, embeddings)


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
