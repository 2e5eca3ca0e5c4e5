"""Evaluation metrics for classification and retrieval, computed from numpy arrays.

Classification metrics take a score matrix ``scores[n, C]`` (higher = more likely) and integer
``labels[n]`` in ``[0, C)``. Retrieval metrics follow Musgrave et al., "A Metric Learning Reality
Check" (ECCV 2020): they take ``neighbour_labels[n, K]``, the labels of each query's ranked
neighbours in the gallery (nearest first, the query itself already left out), and the number of
gallery items of each label. Pure numpy: no torch, faiss or scikit-learn at runtime.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)


class ClassScores(NamedTuple):
    """Per-class precision, recall, F1 and support, each an array of length C."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


class MapAtR(NamedTuple):
    """MAP@R with the bookkeeping needed to judge it."""

    value: float  # mean over scored queries; nan when none could be scored
    num_queries: int  # queries scored (R >= 1)
    num_excluded: int  # queries left out because no other gallery item has their label (R == 0)
    num_truncated: int  # scored queries given fewer than R neighbours: value is a lower bound


def topk_accuracy(
    scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Fraction of rows whose true label ranks in the top k scores, for each k (clipped to C)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n, C], got shape {scores.shape}")
    labels = _check_labels(labels, len(scores), scores.shape[1])
    true_scores = scores[np.arange(len(labels)), labels]
    # Ties count against the model: the rank is the number of *other* classes scoring at least
    # as high as the true one, so constant scores never look accurate.
    rank = (scores >= true_scores[:, None]).sum(axis=1) - 1
    num_classes = scores.shape[1]
    return {k: float(np.mean(rank < min(k, num_classes))) for k in ks}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs as a C x C int64 matrix: rows true, columns predicted."""
    labels = _check_labels(labels, None, num_classes)
    predicted = _check_labels(predicted, len(labels), num_classes)
    flat = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_prf(confusion: np.ndarray) -> ClassScores:
    """Precision, recall, F1 and support per class from a confusion matrix; 0/0 gives 0.0."""
    confusion = np.asarray(confusion)
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * true_positives, predicted + support)
    return ClassScores(precision, recall, f1, support.astype(np.int64))


def relevant_counts(
    query_labels: np.ndarray, gallery_label_counts: np.ndarray, *, queries_in_gallery: bool
) -> np.ndarray:
    """R per query: gallery items sharing its label, not counting the query itself."""
    counts = np.asarray(gallery_label_counts, dtype=np.int64)
    query_labels = _check_labels(query_labels, None, len(counts))
    relevant = counts[query_labels] - int(queries_in_gallery)
    if (relevant < 0).any():
        raise ValueError("a query's label has no gallery item although queries_in_gallery=True")
    return relevant


def recall_at_k(
    neighbour_labels: np.ndarray,
    query_labels: np.ndarray,
    gallery_label_counts: np.ndarray,
    *,
    queries_in_gallery: bool,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Retrieval Recall@K: fraction of queries with a same-label item among their k nearest.

    This is Musgrave et al.'s Recall@K, a measure of the embedding; not the overlap of
    approximate with exact neighbours by which an ANN index is tuned. Queries with R == 0
    (see `relevant_counts`) cannot succeed and are left out, as in Musgrave et al.; the result
    is nan when every query is left out. A k larger than the K neighbours supplied uses all K,
    which is exact only when K covers the whole gallery.
    """
    relevant = relevant_counts(
        query_labels, gallery_label_counts, queries_in_gallery=queries_in_gallery
    )
    hits = _hits(neighbour_labels, query_labels)[relevant > 0]
    if len(hits) == 0:
        return {k: float("nan") for k in ks}
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def map_at_r(
    neighbour_labels: np.ndarray,
    query_labels: np.ndarray,
    gallery_label_counts: np.ndarray,
    *,
    queries_in_gallery: bool,
) -> MapAtR:
    """MAP@R (Musgrave et al. 2020): mean over queries of (1/R) * sum_{i<=R} P(i) * rel(i).

    R is the number of gallery items with the query's label, not counting the query
    (`relevant_counts`); queries with R == 0 are left out and counted in `num_excluded`.
    Exact MAP@R needs at least R neighbours per query, so supply K >= max(R) columns. When a
    query has fewer than R neighbours, the missing ranks count as not relevant while the sum is
    still divided by R: its score, and so the mean, is a lower bound. Such queries are counted in
    `num_truncated` and a warning is logged.
    """
    relevant = relevant_counts(
        query_labels, gallery_label_counts, queries_in_gallery=queries_in_gallery
    )
    scored = relevant > 0
    hits, relevant = _hits(neighbour_labels, query_labels)[scored], relevant[scored]
    if len(hits) == 0:
        return MapAtR(float("nan"), 0, int((~scored).sum()), 0)
    hits = hits[:, : relevant.max()]
    ranks = np.arange(1, hits.shape[1] + 1)
    hits = hits & (ranks[None, :] <= relevant[:, None])  # only ranks 1..R count
    precision_at_i = np.cumsum(hits, axis=1) / ranks
    average_precision = (precision_at_i * hits).sum(axis=1) / relevant
    truncated = int((relevant > hits.shape[1]).sum())
    if truncated:
        logger.warning(
            "MAP@R is a lower bound: %d queries have fewer neighbours (%d) than R (up to %d)",
            truncated,
            hits.shape[1],
            relevant.max(),
        )
    return MapAtR(float(average_precision.mean()), len(hits), int((~scored).sum()), truncated)


def knn_vote(
    neighbour_labels: np.ndarray, neighbour_scores: np.ndarray, num_classes: int, k: int
) -> np.ndarray:
    """Predicted label per query by a similarity-weighted vote of its k nearest neighbours.

    Each class among the first k neighbours (nearest first) scores the sum of its neighbours'
    similarities (higher = closer; turn distances into similarities first); the highest sum
    wins, and an exact tie goes to the tied class with the nearest neighbour. Classes absent
    from the k neighbours never win, even when the similarities are negative.
    """
    neighbour_labels = np.asarray(neighbour_labels)
    neighbour_scores = np.asarray(neighbour_scores, dtype=np.float64)
    if neighbour_labels.ndim != 2 or neighbour_labels.shape != neighbour_scores.shape:
        raise ValueError("neighbour_labels and neighbour_scores must both be [n, K]")
    if k < 1 or neighbour_labels.shape[1] == 0:
        raise ValueError(f"knn_vote needs k >= 1 and at least one neighbour, got k={k}")
    neighbour_labels, neighbour_scores = neighbour_labels[:, :k], neighbour_scores[:, :k]
    num_queries, used = neighbour_labels.shape
    _check_labels(neighbour_labels.ravel(), None, num_classes)
    cell = (np.arange(num_queries)[:, None] * num_classes + neighbour_labels).ravel()
    size = num_queries * num_classes
    votes = np.bincount(cell, weights=neighbour_scores.ravel(), minlength=size)
    votes = votes.reshape(num_queries, num_classes)
    nearest_rank = np.full(size, used)
    np.minimum.at(nearest_rank, cell, np.tile(np.arange(used), num_queries))
    nearest_rank = nearest_rank.reshape(num_queries, num_classes)
    votes[nearest_rank == used] = -np.inf  # class not among the neighbours
    tied = votes == votes.max(axis=1, keepdims=True)
    return np.where(tied, nearest_rank, used + 1).argmin(axis=1)


def calibrate_threshold(
    confidences: np.ndarray, correct: np.ndarray, target_precision: float = 0.95
) -> float | None:
    """Lowest threshold t with precision >= target among predictions of confidence >= t.

    Candidates are the observed confidences, so t is one of them. Returns None when no
    threshold reaches the target (or there are no predictions): then no answer is safe to give.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidences.shape != correct.shape or confidences.ndim != 1:
        raise ValueError("confidences and correct must be 1-D arrays of the same length")
    order = np.argsort(-confidences, kind="stable")
    sorted_confidences = confidences[order]
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # A threshold keeps every prediction with an equal confidence: look only at the last
    # position of each run of equal confidences.
    last_of_run = np.append(sorted_confidences[1:] != sorted_confidences[:-1], True)
    reached = last_of_run & (precision >= target_precision)
    if not reached.any():
        return None
    return float(sorted_confidences[np.flatnonzero(reached)[-1]])


# The rule for a threshold that leaves the service useful: the lowest one that reaches the
# target precision on the val split, if it still answers MIN_COVERAGE of the val images and the
# split has MIN_CALIBRATION_IMAGES to say so; else the one that answers MIN_COVERAGE (or more,
# if the target's does). benchmarks/quality.md shows coverage and precision on held-out images.
MIN_COVERAGE = 0.8
MIN_CALIBRATION_IMAGES = 50


@dataclass(frozen=True)
class Calibration:
    """The "unknown" threshold training chose, by which rule, and what it gives on the val
    split: the share of images answered and the precision of those answers."""

    threshold: float | None
    rule: str
    coverage: float | None = None
    precision: float | None = None
    images: int = 0

    def to_dict(self) -> dict:
        """JSON-ready form, kept in the bundle and metrics.json."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the training log."""
        if self.threshold is None:
            return f"no 'unknown' threshold: {self.rule}"
        return (
            f"'unknown' below confidence {self.threshold:.4f} ({self.rule}): answers "
            f"{100 * (self.coverage or 0):.0f}% of {self.images} val images at "
            f"{100 * (self.precision or 0):.0f}% precision"
        )


def choose_threshold(
    confidences: np.ndarray,
    correct: np.ndarray,
    target_precision: float = 0.95,
    min_coverage: float = MIN_COVERAGE,
    min_images: int = MIN_CALIBRATION_IMAGES,
) -> Calibration:
    """The threshold by the rule above, from the val split's confidences and correctness."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    count = len(confidences)
    if count == 0:
        return Calibration(None, "no validation images")
    best = calibrate_threshold(confidences, correct, target_precision)
    target = f"{100 * target_precision:g}% precision"
    if best is not None and count >= min_images and np.mean(confidences >= best) >= min_coverage:
        rule = f"the lowest that reaches {target}"
        threshold = best
    else:
        floor = float(np.sort(confidences)[::-1][math.ceil(min_coverage * count) - 1])
        threshold = floor if best is None else min(best, floor)
        if count < min_images:
            why = f"{count} val images are too few to calibrate {target}"
        elif best is None:
            why = f"no threshold reaches {target}"
        else:
            why = f"{target} only when answering {100 * np.mean(confidences >= best):.0f}%"
        rule = f"{why}; chosen to answer at least {100 * min_coverage:.0f}%"
    kept = confidences >= threshold
    return Calibration(threshold, rule, float(kept.mean()), float(correct[kept].mean()), int(count))


def _hits(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Boolean [n, K] matrix: does neighbour j of query i share the query's label."""
    neighbour_labels = np.asarray(neighbour_labels)
    query_labels = np.asarray(query_labels)
    if neighbour_labels.ndim != 2 or len(neighbour_labels) != len(query_labels):
        raise ValueError("neighbour_labels must be [n, K] with one row per query label")
    return neighbour_labels == query_labels[:, None]


def _check_labels(labels: np.ndarray, length: int | None, num_classes: int) -> np.ndarray:
    """Labels as a 1-D int64 array, checked against the expected length and class range."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (length is not None and len(labels) != length):
        raise ValueError(f"expected 1-D labels of length {length}, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and len(labels):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return labels


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0.0 wherever the denominator is 0."""
    result = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=result, where=denominator != 0)
    return result
