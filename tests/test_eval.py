"""`imgsim eval`: its numbers against an independent computation (scikit-learn and loops), and
the report written from its record and read back."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from app.cli import main
from app.stages import index_folder
from models.backbones import preprocessing_for
from models.bundle import Bundle, BundleConfig
from models.evaluation import Neighbours, evaluate, leave_one_out
from models.images import load_image
from models.network import build_net
from models.report import to_jsonable, write_report
from models.samples import make_sample_dataset

CLASSES = ["circle", "square", "triangle"]


def _by_hand(
    query_labels: list[str],
    query_paths: list[str],
    gallery: list[tuple[str, str, np.ndarray]],
    queries: np.ndarray,
    k: int,
) -> dict[str, list[float]]:
    """Recall@1/5/10, MAP@R and the kNN vote, one query at a time, straight from definitions."""
    out: dict[str, list] = {"r1": [], "r5": [], "r10": [], "map": [], "vote": []}
    for label, path, query in zip(query_labels, query_paths, queries, strict=True):
        others = [(lab, float(emb @ query)) for p, lab, emb in gallery if p != path]
        others.sort(key=lambda item: -item[1])
        relevant = sum(1 for lab, _ in others if lab == label)
        votes: dict[str, float] = {}
        for lab, score in others[:k]:
            votes[lab] = votes.get(lab, 0.0) + score
        out["vote"].append(max(votes, key=votes.get))
        if relevant == 0:
            continue
        hits = [lab == label for lab, _ in others]
        for n in (1, 5, 10):
            out[f"r{n}"].append(any(hits[:n]))
        precision_sum = sum(sum(hits[: i + 1]) / (i + 1) for i in range(relevant) if hits[i])
        out["map"].append(precision_sum / relevant)
    return out


def test_evaluate_matches_sklearn_and_definitions() -> None:
    rng = np.random.default_rng(0)
    folders = ["circle"] * 4 + ["square"] * 4 + ["triangle"] * 3 + ["moon"] * 2
    probabilities = rng.dirichlet(np.ones(3), size=len(folders)).astype(np.float32)
    embeddings = rng.normal(size=(len(folders), 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    neighbours = leave_one_out(embeddings, folders, knn_k=3)
    report = evaluate(probabilities, folders, CLASSES, neighbours, knn_k=3, threshold=0.5)

    known = np.array([f in CLASSES for f in folders])
    labels = np.array([CLASSES.index(f) for f in np.array(folders)[known]])
    scores = probabilities[known]
    predicted = scores.argmax(axis=1)
    assert report["top1"] == pytest.approx(accuracy_score(labels, predicted))
    assert report["top5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=3))
    assert report["confusion"] == confusion_matrix(labels, predicted, labels=[0, 1, 2]).tolist()
    p, r, f, s = precision_recall_fscore_support(
        labels, predicted, labels=[0, 1, 2], zero_division=0
    )
    assert [row["precision"] for row in report["per_class"]] == pytest.approx(p)
    assert [row["recall"] for row in report["per_class"]] == pytest.approx(r)
    assert [row["f1"] for row in report["per_class"]] == pytest.approx(f)
    assert report["macro_f1"] == pytest.approx(f.mean())
    assert [row["support"] for row in report["per_class"]] == s.tolist()
    assert report["foreign_folders"] == ["moon"]
    assert report["classified_images"] == 11 and report["num_images"] == 13

    paths = [str(i) for i in range(len(folders))]
    gallery = list(zip(paths, folders, embeddings, strict=True))
    hand = _by_hand(folders, paths, gallery, embeddings, k=3)
    retrieval = report["retrieval"]
    for n in (1, 5, 10):
        assert retrieval[f"recall@{n}"] == pytest.approx(np.mean(hand[f"r{n}"]))
    assert retrieval["map@r"] == pytest.approx(np.mean(hand["map"]))
    assert retrieval["num_queries"] == len(folders) and retrieval["num_truncated"] == 0
    voted = np.array(hand["vote"])
    assert report["knn_top1"] == pytest.approx(np.mean(voted[known] == np.array(folders)[known]))

    bundle_threshold = report["bundle_threshold"]
    kept = scores.max(axis=1) >= 0.5
    assert bundle_threshold["coverage"] == pytest.approx(kept.mean())
    assert bundle_threshold["precision"] == pytest.approx((predicted == labels)[kept].mean())
    foreign = probabilities[~known].max(axis=1) < 0.5
    assert bundle_threshold["foreign_answered_unknown"] == pytest.approx(foreign.mean())


def test_evaluate_with_queries_partly_in_the_gallery() -> None:
    """R is one less for a query that is itself a gallery item; both kinds in one run."""
    rng = np.random.default_rng(1)
    folders = ["circle", "circle", "square", "square", "triangle"]
    queries = rng.normal(size=(5, 4))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    extra = rng.normal(size=(4, 4))
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    paths = [f"q{i}" for i in range(5)]
    gallery = [(paths[i], folders[i], queries[i]) for i in (0, 2)]  # two queries indexed
    gallery += [(f"g{i}", lab, extra[i]) for i, lab in enumerate(["circle", "square"] * 2)]
    rows, in_gallery = [], []
    for path, query in zip(paths, queries, strict=True):
        ranked = sorted(gallery, key=lambda item: -float(item[2] @ query))
        kept = [item for item in ranked if item[0] != path]
        in_gallery.append(len(kept) < len(ranked))
        rows.append(kept[:5])
    neighbours = Neighbours(
        labels=[[item[1] for item in row] for row in rows],
        scores=np.array(
            [[float(item[2] @ q) for item in row] for row, q in zip(rows, queries, strict=True)]
        ),
        in_gallery=np.array(in_gallery),
        label_counts={"circle": 3, "square": 3},
        source="test",
    )
    probabilities = np.full((5, 3), 1 / 3)
    report = evaluate(probabilities, folders, CLASSES, neighbours, knn_k=1)
    hand = _by_hand(folders, paths, gallery, queries, k=1)
    assert report["retrieval"]["map@r"] == pytest.approx(np.mean(hand["map"]))
    assert report["retrieval"]["recall@1"] == pytest.approx(np.mean(hand["r1"]))
    assert report["retrieval"]["num_excluded"] == 1  # the triangle has none in the gallery


def _random_bundle(directory: Path) -> Bundle:
    torch.manual_seed(0)
    pre = replace(preprocessing_for("resnet18"), crop_size=32, resize_size=36)
    config = BundleConfig(
        "resnet18", CLASSES[:2], pre, weights="none", temperature=1.0, threshold=0.6
    )
    bundle = Bundle(config, build_net("resnet18", 2, "none", temperature=1.0), "cpu")
    bundle.save(directory)
    history = [
        {
            "epoch": e,
            "phase": "finetune",
            "train_loss": 1.0 / e,
            "val_loss": 1.2 / e,
            "val_top1": 0.5,
            "lr": 1e-3,
            "seconds": 1.0,
        }
        for e in (1, 2)
    ]
    (directory / "metrics.json").write_text(json.dumps(history))
    return Bundle.load(directory, "cpu")


def test_eval_command_writes_the_report_against_the_index(tmp_path: Path) -> None:
    data = make_sample_dataset(tmp_path / "data", per_class=4, size=40)
    (data / "star").rename(data / "zebra")  # a folder that is not a class of the bundle
    bundle = _random_bundle(tmp_path / "bundle")
    files = sorted(data.rglob("*.png"))
    folders = [path.parent.name for path in files]
    images = [load_image(path) for path in files]
    probabilities, embeddings = bundle.classify(images)
    # The held-out images are indexed too: each query must leave its own file out.
    index_folder(data, bundle, tmp_path / "bundle" / "index", workers=0)

    assert (
        main(
            [
                "eval",
                str(data),
                "--model",
                str(tmp_path / "bundle"),
                "--workers",
                "0",
                "--knn-k",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "bundle" / "eval" / "report.json").read_text())
    page = (tmp_path / "bundle" / "eval" / "report.html").read_text()
    assert page.count("data:image/png;base64") >= 2  # confusion matrix and training curves

    known = np.array([f in CLASSES[:2] for f in folders])
    labels = np.array([CLASSES.index(f) for f in np.array(folders)[known]])
    predicted = probabilities[known].argmax(axis=1)
    assert report["top1"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    assert report["confusion"] == confusion_matrix(labels, predicted, labels=[0, 1]).tolist()
    assert report["foreign_folders"] == ["triangle", "zebra"]
    paths = [str(p.resolve()) for p in files]
    entries = list(zip(paths, folders, embeddings, strict=True))
    hand = _by_hand(folders, paths, entries, embeddings, k=3)
    assert report["retrieval"]["recall@1"] == pytest.approx(np.mean(hand["r1"]))
    assert report["retrieval"]["map@r"] == pytest.approx(np.mean(hand["map"]), abs=1e-6)
    voted = np.array(hand["vote"])
    assert report["knn_top1"] == pytest.approx(np.mean(voted[known] == np.array(folders)[known]))
    assert "index" in report["bundle"]["gallery"]
    assert report["bundle_threshold"]["threshold"] == pytest.approx(0.6)

    assert (
        main(
            [
                "eval",
                str(data),
                "--model",
                str(tmp_path / "bundle"),
                "--no-index",
                "--workers",
                "0",
                "--out",
                str(tmp_path / "loo"),
            ]
        )
        == 0
    )
    loo = json.loads((tmp_path / "loo" / "report.json").read_text())
    assert "leave-one-out" in loo["bundle"]["gallery"]


REPORT_CLASSES = ["<b>cats & dogs</b>", "birds", "fish", "$5 bills"]
HISTORY = [
    {"epoch": 1, "phase": "warmup", "train_loss": 1.3, "val_loss": 1.1, "val_top1": 0.5},
    {"epoch": 2, "phase": "finetune", "train_loss": 0.9, "val_loss": None, "val_top1": None},
    {"epoch": 3, "phase": "finetune", "train_loss": 0.6, "val_loss": 0.7, "val_top1": 0.8},
]


def _report_record() -> dict:
    """`evaluate`'s record for seeded embeddings of the 4 classes and one foreign folder."""
    rng = np.random.default_rng(3)
    folders = np.repeat([*REPORT_CLASSES, "<i>moon</i>"], 10).tolist()
    groups = np.repeat(np.arange(5), 10)
    centres = rng.normal(size=(5, 16))
    embeddings = centres[groups] + rng.normal(scale=1.2, size=(50, 16))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    logits = embeddings @ (centres[:4] / np.linalg.norm(centres[:4], axis=1, keepdims=True)).T * 5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    neighbours = leave_one_out(embeddings, folders, knn_k=5)
    return evaluate(
        probabilities,
        folders,
        REPORT_CLASSES,
        neighbours,
        threshold=0.5,
        bundle_info={"path": "b/"},
    )


def test_write_report_renders_the_evaluate_record(tmp_path: Path) -> None:
    report = _report_record()
    assert set(report["retrieval"]) >= {"recall@1", "recall@5", "recall@10", "map@r"}
    assert report["classified_images"] == 40 and report["top5"] == 1.0  # top-5 clips to C=4
    assert sum(map(sum, report["confusion"])) == 40

    paths = write_report(tmp_path / "out", report, HISTORY)
    assert json.loads(paths["json"].read_text()) == report
    page = paths["html"].read_text()
    assert "&lt;b&gt;cats &amp; dogs&lt;/b&gt;" in page and "<b>cats" not in page
    assert "&lt;i&gt;moon&lt;/i&gt;" in page and "<i>moon" not in page
    pictures = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(pictures) == 2
    assert all(base64.b64decode(png).startswith(b"\x89PNG") for png in pictures)

    without_history = write_report(tmp_path / "plain", report, None)["html"].read_text()
    assert without_history.count("<img") == 1


def test_report_page_without_matplotlib_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args),
    )
    page = write_report(tmp_path, _report_record(), HISTORY)["html"].read_text()
    assert "<img" not in page and page.count("Pictures need matplotlib") == 2


def test_to_jsonable_turns_numpy_and_nan_into_plain_json() -> None:
    value = {"a": np.float32(0.5), "b": np.arange(3), "c": math.nan, 1: [np.int64(2)]}
    assert to_jsonable(value) == {"a": 0.5, "b": [0, 1, 2], "c": None, "1": [2]}
