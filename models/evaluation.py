"""Evaluate a bundle on held-out class folders: classifier, retrieval and kNN-vote metrics.

The caller embeds and classifies the images and finds each one's gallery neighbours (in the
bundle's index, or the evaluation images themselves with `leave_one_out`); `evaluate` turns
those arrays into the report record, which `models.report.write_report` writes as report.json
and renders as report.html. Folder names are matched to the bundle's classes by name: images
of other folders count only for retrieval.

The record (JSON-safe: nan and inf are null):

    bundle             dict        what was evaluated (path, backbone, fingerprint, data) and
                                   the gallery the neighbours came from
    num_images         int         evaluated images, every folder
    num_classes        int         C, the bundle's classes
    classes            list[str]   class names, index = label
    classified_images  int         images in a folder named after one of the classes
    foreign_folders    list[str]   the other folders (retrieval only)
    top1, top5         float       classifier top-k accuracy on the classified images (k
                                   clipped to C); null with none
    macro_f1           float       unweighted mean of the per-class F1
    per_class          list[dict]  one per class: class, precision, recall, f1, support
    confusion          list[list[int]]  C x C counts, rows true, columns predicted
    retrieval          dict        recall@1, recall@5, recall@10, map@r (null when no query
                                   could be scored), num_queries, num_excluded (R == 0),
                                   num_truncated (fewer neighbours than R: map@r is a lower
                                   bound), num_neighbours (K supplied)
    knn_top1           float       accuracy of the similarity-weighted kNN vote, classified
                                   images; knn_top1_all_folders over every folder
    knn_k              int         neighbours in that vote
    classify_knn_agreement float   share of classified images where classifier and vote agree
    unknown_threshold  dict        target_precision, threshold (null if unreachable) and, when
                                   reached, the coverage and precision of answers at it
    bundle_threshold   dict        the bundle's own threshold, its coverage and precision, and
                                   foreign_answered_unknown: share of foreign-folder images
                                   under it (null without such images)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import metrics
from models.data import check_images, list_class_folders
from models.report import to_jsonable

log = logging.getLogger(__name__)

NO_LABEL = "(no label)"  # gallery items outside any class folder
RECALL_KS = (1, 5, 10)


@dataclass
class EvalImages:
    """Readable images below a folder and the name of the class folder each one is in."""

    paths: list[Path]
    folders: list[str]


@dataclass
class Neighbours:
    """Each query's ranked gallery neighbours, nearest first, the query itself left out."""

    labels: list[list[str | None]]  # n rows of K labels
    scores: np.ndarray  # (n, K) cosine similarities
    in_gallery: np.ndarray  # (n,) bool: the query itself is a gallery item (and was left out)
    label_counts: Mapping[str | None, int]  # gallery items per label
    source: str  # what the gallery was, for the report


def list_eval_images(data_dir: Path) -> EvalImages:
    """Every readable image in data_dir's class subfolders."""
    folders, samples = list_class_folders(data_dir)
    good = set(check_images([sample.path for sample in samples])[0])
    kept = [sample for sample in samples if sample.path in good]
    return EvalImages([s.path for s in kept], [folders[s.label] for s in kept])


def neighbours_needed(label_counts: Mapping[str | None, int], knn_k: int) -> int:
    """Neighbours to ask per query for exact MAP@R (R <= largest label count) and Recall@10,
    plus one for the query itself when it is in the gallery."""
    return max([*label_counts.values(), max(RECALL_KS), knn_k]) + 1


def leave_one_out(embeddings: np.ndarray, folders: Sequence[str], knn_k: int) -> Neighbours:
    """The evaluation images as their own gallery, each query leaving itself out."""
    counts = Counter(folders)
    k = min(neighbours_needed(counts, knn_k) - 1, len(folders) - 1)
    similarities = embeddings @ embeddings.T
    np.fill_diagonal(similarities, -np.inf)
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return Neighbours(
        labels=[[folders[j] for j in row] for row in order],
        scores=np.take_along_axis(similarities, order, axis=1),
        in_gallery=np.ones(len(folders), dtype=bool),
        label_counts=dict(counts),
        source=f"leave-one-out over the {len(folders)} evaluation images (no index)",
    )


def evaluate(
    probabilities: np.ndarray,
    folders: Sequence[str],
    classes: Sequence[str],
    neighbours: Neighbours,
    *,
    knn_k: int = 5,
    target_precision: float = 0.95,
    threshold: float | None = None,
    bundle_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report record (see the module docstring) for these images."""
    class_index = {name: i for i, name in enumerate(classes)}
    known = np.array([folder in class_index for folder in folders], dtype=bool)
    labels = np.array([class_index.get(folder, -1) for folder in folders], dtype=np.int64)
    foreign = sorted({folder for folder in folders if folder not in class_index})
    if foreign:
        log.warning("folders that are not classes of the bundle (retrieval only): %s", foreign)
    scores, true = np.asarray(probabilities)[known], labels[known]
    vocabulary, query_ids, neighbour_ids, counts = _retrieval_labels(classes, folders, neighbours)
    voted = metrics.knn_vote(neighbour_ids, neighbours.scores, len(vocabulary), knn_k)
    best = metrics.calibrate_threshold(*_confidence(scores, true), target_precision)
    calibrated = _at_threshold(scores, true, best) if best is not None else {"threshold": None}
    report = {
        "bundle": {**(bundle_info or {}), "gallery": neighbours.source},
        "num_images": len(folders),
        "num_classes": len(classes),
        "classes": list(classes),
        "classified_images": int(known.sum()),
        "foreign_folders": foreign,
        **_classification(scores, true, classes),
        "retrieval": _retrieval(neighbour_ids, query_ids, counts, neighbours.in_gallery),
        "knn_top1": _mean(voted[known] == query_ids[known]),
        "knn_top1_all_folders": _mean(voted == query_ids),
        "knn_k": knn_k,
        "classify_knn_agreement": _mean(scores.argmax(axis=1) == voted[known]),
        "unknown_threshold": {"target_precision": target_precision, **calibrated},
        "bundle_threshold": {
            **_at_threshold(scores, true, threshold),
            "foreign_answered_unknown": _below(np.asarray(probabilities)[~known], threshold),
        },
    }
    return to_jsonable(report)


def _classification(scores: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Top-1/top-5, macro F1, per-class precision/recall/F1 and the confusion matrix."""
    num_classes = len(classes)
    if len(labels) == 0:
        empty = np.zeros((num_classes, num_classes), dtype=np.int64)
        return {"top1": None, "top5": None, "macro_f1": None, "per_class": [], "confusion": empty}
    topk = metrics.topk_accuracy(scores, labels, ks=(1, 5))
    confusion = metrics.confusion_matrix(labels, scores.argmax(axis=1), num_classes)
    per_class = metrics.per_class_prf(confusion)
    return {
        "top1": topk[1],
        "top5": topk[5],
        "macro_f1": float(per_class.f1.mean()),
        "per_class": [
            {"class": name, "precision": p, "recall": r, "f1": f, "support": s}
            for name, p, r, f, s in zip(classes, *per_class, strict=True)
        ],
        "confusion": confusion,
    }


def _retrieval_labels(
    classes: Sequence[str], folders: Sequence[str], neighbours: Neighbours
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """One integer label space for queries and gallery: the bundle's classes first, so a
    class's id is its class index, then every other folder or gallery label."""
    names = [NO_LABEL if name is None else name for name in neighbours.label_counts]
    others = sorted({*folders, *names} - set(classes))
    vocabulary = [*classes, *others]
    ids = {name: i for i, name in enumerate(vocabulary)}
    counts = np.zeros(len(vocabulary), dtype=np.int64)
    for name, count in neighbours.label_counts.items():
        counts[ids[NO_LABEL if name is None else name]] += count
    query_ids = np.array([ids[folder] for folder in folders], dtype=np.int64)
    neighbour_ids = np.array(
        [[ids[NO_LABEL if name is None else name] for name in row] for row in neighbours.labels],
        dtype=np.int64,
    ).reshape(len(folders), -1)
    return vocabulary, query_ids, neighbour_ids, counts


def _retrieval(
    neighbour_ids: np.ndarray, query_ids: np.ndarray, counts: np.ndarray, in_gallery: np.ndarray
) -> dict[str, Any]:
    """Recall@1/5/10 and MAP@R; queries that are and are not gallery items are scored apart
    (R differs by one) and the two groups averaged by their numbers of scored queries."""
    totals = {f"recall@{k}": 0.0 for k in RECALL_KS} | {"map@r": 0.0}
    tallies = {"num_queries": 0, "num_excluded": 0, "num_truncated": 0}
    for group in (True, False):
        members = in_gallery == group
        if not members.any():
            continue
        args = (neighbour_ids[members], query_ids[members], counts)
        recall = metrics.recall_at_k(*args, queries_in_gallery=group, ks=RECALL_KS)
        map_r = metrics.map_at_r(*args, queries_in_gallery=group)
        for k in RECALL_KS:
            totals[f"recall@{k}"] += recall[k] * map_r.num_queries if map_r.num_queries else 0.0
        totals["map@r"] += map_r.value * map_r.num_queries if map_r.num_queries else 0.0
        tallies["num_queries"] += map_r.num_queries
        tallies["num_excluded"] += map_r.num_excluded
        tallies["num_truncated"] += map_r.num_truncated
    scored = tallies["num_queries"]
    means = {key: value / scored if scored else float("nan") for key, value in totals.items()}
    return means | tallies | {"num_neighbours": neighbour_ids.shape[1]}


def _confidence(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return scores.max(axis=1), scores.argmax(axis=1) == labels


def _at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict:
    """Share of images answered (confidence >= threshold) and the precision of those answers."""
    confidences, correct = _confidence(scores, labels)
    kept = confidences >= threshold if threshold is not None else np.ones(len(scores), bool)
    return {
        "threshold": threshold,
        "coverage": _mean(kept),
        "precision": _mean(correct[kept]),
    }


def _below(probabilities: np.ndarray, threshold: float | None) -> float | None:
    """Share of images whose top probability is under the threshold (None: no such images)."""
    if threshold is None or len(probabilities) == 0:
        return None
    return _mean(probabilities.max(axis=1) < threshold)


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None
