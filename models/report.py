"""Evaluation report: the record `models.evaluation.evaluate` returns, written as report.json
and rendered into report.html by the Jinja2 template `models/templates/report.html`.

`history` is the bundle's metrics.json: a list of per-epoch dicts with epoch (0 is the probe of
LP-FT, fine-tuning counts from 1), phase ("probe" | "warmup" | "finetune"), train_loss,
val_loss, val_top1 (null without a validation split), lr, seconds. Pictures need matplotlib
(the `report` extra); without it the page says so.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

logger = logging.getLogger(__name__)

ANNOTATE_MAX_CLASSES = 20  # confusion cells carry their count up to this many classes
TICK_LABELS_MAX_CLASSES = 60  # beyond this the axes show no class names: they would overlap


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


def render_html(
    report: Mapping[str, Any], history: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """The report record as one HTML page, pictures embedded as base64 PNG."""
    drawn = importlib.util.find_spec("matplotlib") is not None
    pictures = {
        "training": _base64(training_png(history)) if drawn and history else None,
        "confusion": _base64(confusion_png(report)) if drawn else None,
    }
    return _template().render(report=report, history=bool(history), pictures=pictures)


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


@functools.cache
def _template() -> jinja2.Template:
    """The page template, HTML-escaping every value, with the number formats as filters."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("models", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a key the record lacks fails loudly, never blank
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(percent=_percent, number=_number)
    return environment.get_template("report.html")


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


def _base64(png: bytes) -> str:
    """PNG bytes as the ASCII text of a data: URL."""
    return base64.b64encode(png).decode("ascii")


def _percent(value: Any) -> str:
    """0.8734 -> '87.3%'; None -> '-'."""
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _number(value: Any) -> str:
    """A threshold to three decimals; None -> '-'."""
    return "-" if value is None else f"{float(value):.3f}"
