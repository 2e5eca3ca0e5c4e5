"""Evaluation report: assemble the metrics into a dict, write it as report.json and report.html.

The report dict (`build_report` makes it; every value JSON-safe once `to_jsonable` has run):

    bundle            dict | None   what was evaluated, e.g. {"path", "backbone", "fingerprint"}
    num_images        int           evaluated images (rows of `scores`)
    num_classes       int           C
    classes           list[str]     class names, index = label
    top1, top5        float         classifier top-k accuracy (k clipped to C)
    macro_f1          float         unweighted mean of the per-class F1
    per_class         list[dict]    one per class: class, precision, recall, f1, support
    confusion         list[list[int]]  C x C counts, rows true, columns predicted
    retrieval         dict          recall@1, recall@5, recall@10, map@r (nan -> null when no
                                    query could be scored), num_queries, num_excluded (R == 0),
                                    num_truncated (fewer neighbours than R: map@r is a lower
                                    bound), num_neighbours (K supplied)
    knn_top1          float         accuracy of the similarity-weighted kNN vote
    knn_k             int           neighbours in that vote
    unknown_threshold dict          target_precision, threshold (null if unreachable), and the
                                    coverage and precision of answers at that threshold

`history` is the bundle's metrics.json: a list of per-epoch dicts with epoch (0 is the probe of
LP-FT, fine-tuning counts from 1), phase ("probe" | "warmup" | "finetune"), train_loss,
val_loss, val_top1 (null without a validation split), lr, seconds. Pictures need matplotlib
(the `report` extra); without it the page says so.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import metrics

logger = logging.getLogger(__name__)

ANNOTATE_MAX_CLASSES = 20  # confusion cells carry their count up to this many classes
TICK_LABELS_MAX_CLASSES = 60  # beyond this the axes show no class names: they would overlap


def build_report(
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    neighbour_labels: np.ndarray,
    neighbour_scores: np.ndarray,
    gallery_label_counts: np.ndarray,
    *,
    queries_in_gallery: bool,
    knn_k: int = 5,
    target_precision: float = 0.95,
    bundle: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute every metric from the evaluation arrays and lay them out as the report dict."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    num_classes = len(class_names)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be [n, {num_classes}], got shape {scores.shape}")
    predicted = scores.argmax(axis=1)
    confusion = metrics.confusion_matrix(labels, predicted, num_classes)
    per_class = metrics.per_class_prf(confusion)
    topk = metrics.topk_accuracy(scores, labels, ks=(1, 5))
    voted = metrics.knn_vote(neighbour_labels, neighbour_scores, num_classes, knn_k)
    return to_jsonable(
        {
            "bundle": dict(bundle) if bundle is not None else None,
            "num_images": len(labels),
            "num_classes": num_classes,
            "classes": list(class_names),
            "top1": topk[1],
            "top5": topk[5],
            "macro_f1": float(per_class.f1.mean()) if num_classes else math.nan,
            "per_class": [
                {"class": name, "precision": p, "recall": r, "f1": f, "support": s}
                for name, p, r, f, s in zip(class_names, *per_class, strict=True)
            ],
            "confusion": confusion,
            "retrieval": _retrieval_section(
                neighbour_labels, labels, gallery_label_counts, queries_in_gallery
            ),
            "knn_top1": float(np.mean(voted == labels)),
            "knn_k": knn_k,
            "unknown_threshold": _threshold_section(scores, predicted == labels, target_precision),
        }
    )


def write_report(
    out_dir: Path, report: dict[str, Any], history: list[dict[str, Any]] | None = None
) -> dict[str, Path]:
    """Write report.json and a self-contained report.html into out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = to_jsonable(report)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["html"].write_text(render_html(report, history), encoding="utf-8")
    logger.info("wrote %s and %s", paths["json"], paths["html"])
    return paths


def to_jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and paths as plain Python; nan and inf as None."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def render_html(report: dict[str, Any], history: list[dict[str, Any]] | None = None) -> str:
    """The report as one HTML page, pictures embedded as base64 PNG."""
    sections = [
        _headline_html(report),
        _notes_html(report),
        _picture_html("Confusion matrix", lambda: confusion_png(report)),
        _per_class_html(report),
    ]
    if history:
        sections.insert(2, _picture_html("Training", lambda: training_png(history)))
    body = "\n".join(section for section in sections if section)
    return _PAGE.format(style=_STYLE, body=body)


def confusion_png(report: Mapping[str, Any]) -> bytes:
    """Heatmap of the confusion matrix, coloured by fraction of each true class, as PNG."""
    from matplotlib.figure import Figure

    counts = np.asarray(report["confusion"], dtype=np.int64)
    size = len(counts)
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    side = float(np.clip(2.5 + 0.42 * size, 5, 14))
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
    axes.set_xlabel("predicted class #")
    axes.set_ylabel("true class #")
    if size <= TICK_LABELS_MAX_CLASSES:
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        names = [_axis_text(name) for name in report["classes"]]
        font = 9 if size <= ANNOTATE_MAX_CLASSES else 6
        axes.set_xticks(range(size), names, rotation=45, ha="right", fontsize=font)
        axes.set_yticks(range(size), names, fontsize=font)
    if size <= ANNOTATE_MAX_CLASSES:
        for (row, col), count in np.ndenumerate(counts):
            if count == 0:
                continue  # blank cells read faster than a sea of zeros
            colour = "white" if fractions[row, col] > 0.5 else "black"
            axes.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    return _png(figure)


def training_png(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Train/val loss and val top-1 per epoch, with the start of fine-tuning marked, as PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    loss_axes, top1_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, _series(history, "train_loss"), "o-", label="train loss")
    loss_axes.plot(epochs, _series(history, "val_loss"), "s-", label="val loss")
    top1_axes.plot(epochs, _series(history, "val_top1"), "o-", color="tab:green", label="val top-1")
    top1_axes.set_ylim(0, 1.02)
    for axes, title in ((loss_axes, "loss"), (top1_axes, "validation top-1")):
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        _mark_finetune_start(axes, history)
        axes.legend(loc="best", fontsize=8)
    return _png(figure)


def _retrieval_section(
    neighbour_labels: np.ndarray,
    query_labels: np.ndarray,
    gallery_label_counts: np.ndarray,
    queries_in_gallery: bool,
) -> dict[str, Any]:
    """Recall@1/5/10 and MAP@R with their query counts."""
    args = (neighbour_labels, query_labels, gallery_label_counts)
    recall = metrics.recall_at_k(*args, queries_in_gallery=queries_in_gallery, ks=(1, 5, 10))
    map_r = metrics.map_at_r(*args, queries_in_gallery=queries_in_gallery)
    return {
        **{f"recall@{k}": value for k, value in recall.items()},
        "map@r": map_r.value,
        "num_queries": map_r.num_queries,
        "num_excluded": map_r.num_excluded,
        "num_truncated": map_r.num_truncated,
        "num_neighbours": np.asarray(neighbour_labels).shape[1],
    }


def _threshold_section(
    scores: np.ndarray, correct: np.ndarray, target_precision: float
) -> dict[str, Any]:
    """Confidence threshold below which to answer "unknown", and what it keeps."""
    confidences = scores.max(axis=1)
    threshold = metrics.calibrate_threshold(confidences, correct, target_precision)
    kept = confidences >= threshold if threshold is not None else np.zeros(len(scores), bool)
    return {
        "target_precision": target_precision,
        "threshold": threshold,
        "coverage": float(kept.mean()) if len(kept) else math.nan,
        "precision": float(correct[kept].mean()) if kept.any() else math.nan,
    }


def _headline_html(report: Mapping[str, Any]) -> str:
    """Title, bundle description and the headline numbers as tiles, in three groups."""
    retrieval = report.get("retrieval") or {}
    threshold = report.get("unknown_threshold") or {}
    groups = {
        "data": [
            ("images", str(report.get("num_images", "-"))),
            ("classes", str(report.get("num_classes", "-"))),
        ],
        "classifier": [
            ("top-1", _percent(report.get("top1"))),
            ("top-5", _percent(report.get("top5"))),
            ("macro F1", _percent(report.get("macro_f1"))),
            (
                f"unknown below, for {_percent(threshold.get('target_precision'))} precision",
                _number(threshold.get("threshold")),
            ),
        ],
        "retrieval": [
            ("Recall@1", _percent(retrieval.get("recall@1"))),
            ("Recall@5", _percent(retrieval.get("recall@5"))),
            ("Recall@10", _percent(retrieval.get("recall@10"))),
            ("MAP@R", _percent(retrieval.get("map@r"))),
            (f"kNN vote top-1 (k={report.get('knn_k', '?')})", _percent(report.get("knn_top1"))),
        ],
    }
    rows = "".join(
        f'<div class="group"><div class="caption">{group}</div>{_tiles_html(tiles)}</div>'
        for group, tiles in groups.items()
    )
    return f"<h1>imgsim evaluation</h1>\n{_bundle_html(report.get('bundle'))}\n{rows}"


def _tiles_html(tiles: list[tuple[str, str]]) -> str:
    """Number tiles, each a big value over a small name."""
    return "".join(
        f'<div class="tile"><div class="value">{html.escape(value)}</div>'
        f'<div class="name">{html.escape(name)}</div></div>'
        for name, value in tiles
    )


def _bundle_html(bundle: Any) -> str:
    """One line describing the evaluated bundle, if known."""
    if not bundle:
        return ""
    if not isinstance(bundle, Mapping):
        return f'<p class="bundle">bundle: <code>{html.escape(str(bundle))}</code></p>'
    items = ", ".join(
        f"{html.escape(str(key))}: <code>{html.escape(str(value))}</code>"
        for key, value in bundle.items()
    )
    return f'<p class="bundle">{items}</p>'


def _notes_html(report: Mapping[str, Any]) -> str:
    """Caveats a reader needs to trust the numbers: left-out queries, truncation, coverage."""
    retrieval = report.get("retrieval") or {}
    threshold = report.get("unknown_threshold") or {}
    notes = []
    if retrieval.get("num_excluded"):
        notes.append(
            f"{retrieval['num_excluded']} queries have no other gallery image of their class and "
            "are left out of Recall@K and MAP@R."
        )
    neighbours = retrieval.get("num_neighbours")
    if neighbours is not None and neighbours < 10:
        notes.append(
            f"Only {neighbours} neighbours per query were supplied: Recall@K for K > {neighbours}"
            f" is Recall@{neighbours}."
        )
    if retrieval.get("num_truncated"):
        notes.append(
            f"{retrieval['num_truncated']} queries got fewer neighbours "
            f"({retrieval.get('num_neighbours')}) than images of their class: MAP@R is a lower "
            "bound."
        )
    if threshold:
        if threshold.get("threshold") is None:
            notes.append(
                f"No confidence threshold reaches {_percent(threshold.get('target_precision'))} "
                "precision on these images."
            )
        else:
            notes.append(
                f"Answering only when confidence ≥ {_number(threshold['threshold'])} answers "
                f"{_percent(threshold.get('coverage'))} of images with "
                f"{_percent(threshold.get('precision'))} precision."
            )
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return f'<ul class="notes">{items}</ul>' if notes else ""


def _per_class_html(report: Mapping[str, Any]) -> str:
    """Per-class precision/recall/F1/support table."""
    rows = "".join(
        f"<tr><td>{index}</td><td>{html.escape(str(row['class']))}</td>"
        f"<td>{_percent(row['precision'])}</td>"
        f"<td>{_percent(row['recall'])}</td><td>{_percent(row['f1'])}</td>"
        f"<td>{row['support']}</td></tr>"
        for index, row in enumerate(report.get("per_class", []))
    )
    return (
        "<h2>Per class</h2>\n<table><thead><tr><th>#</th><th>class</th><th>precision</th>"
        f"<th>recall</th><th>F1</th><th>support</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _picture_html(title: str, make_png: Callable[[], bytes]) -> str:
    """A titled <img> with the PNG inlined, or a note when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        note = "Pictures need matplotlib: pip install 'imgsim[report]'."
        return f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(note)}</p>"
    encoded = base64.b64encode(make_png()).decode("ascii")
    return (
        f"<h2>{html.escape(title)}</h2>\n"
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">'
    )


def _mark_finetune_start(axes: Any, history: Sequence[Mapping[str, Any]]) -> None:
    """Dashed vertical line between the last head-only epoch (probe or warm-up) and the first
    fine-tune epoch."""
    for before, after in zip(history, history[1:], strict=False):
        if before.get("phase") in ("probe", "warmup") and after.get("phase") == "finetune":
            middle = (before["epoch"] + after["epoch"]) / 2
            axes.axvline(middle, color="grey", linestyle="--", linewidth=1, label="fine-tune")
            return


def _series(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """One column of the history, missing or null values as nan so the line breaks there."""
    return [math.nan if row.get(key) is None else float(row[key]) for row in history]


def _axis_text(name: str, limit: int = 24) -> str:
    """A class name safe for a matplotlib label: shortened, '$' not read as mathtext."""
    name = name if len(name) <= limit else name[: limit - 1] + "…"
    return name.replace("$", r"\$")


def _png(figure: Any) -> bytes:
    """Render a matplotlib Figure to PNG bytes with the Agg canvas."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _percent(value: Any) -> str:
    """0.8734 -> '87.3%'; None -> '-'."""
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _number(value: Any) -> str:
    """A threshold to three decimals; None -> '-'."""
    return "-" if value is None else f"{float(value):.3f}"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; }
.bundle { color: #555; margin-top: 0; }
.group { display: flex; flex-wrap: wrap; gap: 0.6rem; margin: 0.6rem 0; align-items: center; }
.caption { width: 6rem; color: #666; font-size: 0.85rem; text-transform: uppercase; }
.tile { border: 1px solid #ddd; border-radius: 6px; padding: 0.5rem 0.9rem; min-width: 7rem; }
.tile .value { font-size: 1.5rem; font-weight: 600; }
.tile .name { color: #666; font-size: 0.85rem; }
.notes { color: #7a4b00; }
table { border-collapse: collapse; }
th, td { padding: 0.25rem 0.8rem; text-align: right; border-bottom: 1px solid #eee; }
th:nth-child(2), td:nth-child(2) { text-align: left; }
tbody tr:nth-child(even) { background: #f7f7f7; }
img { max-width: 100%; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>imgsim evaluation</title>
<style>{style}</style>
</head>
<body>
{body}
</body>
</html>
"""
