"""Transfer benchmark on Tux Paint stamps: ImageNet features, frozen and fine-tuned.

Four stamp categories are the class set; each is split into train and a held-out test part by
drawing (a stamp's variants, e.g. ladybug / ladybug-2, stay together), not by file. For each
backbone and start:
- frozen kNN: the ImageNet model's GAP embedding indexes the training images; R@1, MAP@R and a
  5-NN vote are measured on the held-out drawings;
- frozen linear probe: only the probe of LP-FT (head fitted on frozen features, no epoch);
- fine-tuned: the full training run; top-1, R@1, MAP@R and kNN-vote top-1 on the held-out
  drawings against an index of its training images.

    python benchmarks/transfer.py [--stamps DIR] [--work DIR] [--epochs N] [--tune] [--reuse]

Writes benchmarks/transfer.md (with --tune: benchmarks/transfer_tuning.md, lite0 variants).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from app.stages import evaluate_folder, index_folder
from models.bundle import Bundle
from models.data import find_images
from models.layout import BundleLayout
from models.training import TrainConfig, train

STAMPS = Path("/work/data/stamps/usr/share/tuxpaint/stamps")
CLASSES = ("food", "plants", "vehicles", "household")
HERE = Path(__file__).parent

# (row name, backbone, weights, TrainConfig overrides)
MAIN_ROWS = [
    ("efficientnet_lite0", "efficientnet_lite0", "imagenet", {}),
    ("efficientnet_lite1", "efficientnet_lite1", "imagenet", {}),
    ("efficientnet_lite2", "efficientnet_lite2", "imagenet", {}),
    ("densenet121", "densenet121", "none", {"probe": False, "freeze_bn": False, "lr_factor": 1}),
    ("resnet18", "resnet18", "none", {"probe": False, "freeze_bn": False, "lr_factor": 1}),
]
TUNING_ROWS = [
    ("plain fine-tune", {"probe": False, "freeze_bn": False}),
    (
        "head-only warm-up 2 epochs, then fine-tune",
        {"probe": False, "freeze_bn": False, "warmup_epochs": 2},
    ),  # noqa: E501
    ("LP-FT, BatchNorm trained", {"freeze_bn": False}),
    ("LP-FT, BatchNorm frozen (default)", {}),
    ("LP-FT, BatchNorm frozen, lr 3e-4", {"lr": 3e-4}),
    ("LP-FT, BatchNorm frozen, no augmentation", {"augment": False}),
]


def drawing_of(path: Path) -> str:
    """A stamp's drawing: its name without variant suffixes (-2, _back, 3, ...)."""
    stem = re.sub(r"([-_ ]?(back|front|left|right|\d+))+$", "", path.stem.lower())
    return f"{path.parent.name}/{stem or path.stem.lower()}"


def copy_split(
    stamps: Path, work: Path, test_share: float, seed: int, classes: Sequence[str] = CLASSES
) -> tuple[Path, Path]:
    """Copy each class's images into work/train/<class> and work/test/<class>, by drawing."""
    rng = random.Random(seed)
    train_dir, test_dir = work / "train", work / "test"
    shutil.rmtree(work, ignore_errors=True)
    for name in classes:
        groups: dict[str, list[Path]] = defaultdict(list)
        for path in find_images(stamps / name):
            groups[drawing_of(path)].append(path)
        keys = sorted(groups)
        rng.shuffle(keys)
        n_test = round(test_share * len(keys))
        for i, key in enumerate(keys):
            part = test_dir if i < n_test else train_dir
            for path in groups[key]:
                target = part / name / "__".join(path.relative_to(stamps / name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # copies: index_folder resolves symlinks
    return train_dir, test_dir


def frozen(backbone: str, data: Path, test: Path, work: Path) -> dict:
    """The ImageNet model's GAP embedding: index the training images, search the test ones."""
    out = work / f"frozen-{backbone}"
    Bundle.pretrained(backbone, "imagenet", "cpu").save(out)
    bundle = Bundle.load(out, "cpu")
    index_folder(data, bundle, BundleLayout(out).index)
    return evaluate_folder(test, out, device="cpu")


def fine_tuned(name: str, data: Path, test: Path, work: Path, config: TrainConfig,
               reuse: bool = False) -> dict:  # fmt: skip
    """Train (or, with reuse, take the bundle an earlier run trained), index the training
    images, evaluate on the held-out drawings."""
    out = work / name.replace(" ", "_").replace(",", "")
    started = time.perf_counter()
    if not (reuse and BundleLayout(out).weights.is_file()):
        train(data, out, config)
    train_s = time.perf_counter() - started
    bundle = Bundle.load(out, "cpu")
    index_folder(data, bundle, BundleLayout(out).index)
    report = evaluate_folder(test, out, device="cpu")
    history = [r for r in json.loads(BundleLayout(out).metrics.read_text()) if r["epoch"] > 0]
    per_epoch = sum(r["seconds"] for r in history) / len(history) if history else None
    return {"report": report, "s_per_epoch": per_epoch, "train_s": train_s}


def configure(backbone: str, weights: str, epochs: int, overrides: dict) -> TrainConfig:
    """The benchmark's TrainConfig: the product defaults plus the row's overrides."""
    overrides = dict(overrides)
    if overrides.pop("lr_factor", None):  # from scratch the trunk trains at the head's rate
        overrides["backbone_lr_factor"] = 1.0
    base = TrainConfig(backbone=backbone, weights=weights, device="cpu", workers=2)
    return replace(base, epochs=epochs, **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-transfer"))
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--tune", action="store_true", help="compare training variants (lite0)")
    parser.add_argument("--rows", nargs="*", help="only these main rows")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate the bundles an earlier run left in --work instead of training again "
        "(same split; s/epoch is read from their metrics.json)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train_dir, test_dir = copy_split(args.stamps, args.work / "data", 0.3, 0)
    reuse = args.reuse
    rows = []
    if args.tune:
        for name, overrides in TUNING_ROWS:
            config = configure("efficientnet_lite0", "imagenet", args.epochs, overrides)
            fine = fine_tuned(name, train_dir, test_dir, args.work, config, reuse)
            rows.append({"name": name, **fine})
        write_tuning(rows, args, train_dir, test_dir)
        return
    for name, backbone, weights, overrides in MAIN_ROWS:
        if args.rows and name not in args.rows:
            continue
        config = configure(backbone, weights, args.epochs, overrides)
        row = {"name": name, "weights": weights, "config": config}
        if weights == "imagenet":
            row["frozen"] = frozen(backbone, train_dir, test_dir, args.work)
            probe = replace(config, epochs=0)
            row["probe"] = fine_tuned(f"{name}-probe", train_dir, test_dir, args.work, probe, reuse)
        rows.append({**row, **fine_tuned(name, train_dir, test_dir, args.work, config, reuse)})
    write_main(rows, args, train_dir, test_dir)


def _count(folder: Path) -> int:
    return len(find_images(folder))


def _setup(args: argparse.Namespace, train_dir: Path, test_dir: Path) -> list[str]:
    defaults = TrainConfig()
    return [
        f"- Classes: {', '.join(CLASSES)}; {_count(train_dir)} training images (20 % of them "
        f"are the val split), {_count(test_dir)} held-out test images, split by drawing.",
        f"- Product defaults unless the row says otherwise: {args.epochs} epochs, LP-FT probe "
        f"({defaults.probe_steps} full-batch AdamW steps at lr {defaults.probe_lr}), then "
        f"fine-tuning at lr {defaults.lr} (head) and {defaults.lr * defaults.backbone_lr_factor:g}"
        f" (trunk), cosine schedule, BatchNorm statistics frozen, batch {defaults.batch_size}, "
        "the weights' image size, augmentation on, 2 DataLoader workers. From scratch: no probe, "
        "BatchNorm trained, trunk at the head's rate.",
        "- Metrics on the held-out drawings: classifier top-1; Recall@1 and MAP@R of the test "
        "images against an index of the training images; top-1 of a similarity-weighted 5-NN "
        "vote. s/epoch: mean wall time of a fine-tuning epoch (train + val).",
        f"- CPU only, {os.cpu_count()} cores.",
        "",
    ]


def write_main(rows: list[dict], args: argparse.Namespace, train_dir: Path, test_dir: Path) -> None:
    """The comparison table, per backbone and start."""
    lines = [
        "# Transfer benchmark (Tux Paint stamps)",
        "",
        "`python benchmarks/transfer.py`",
        "",
        *_setup(args, train_dir, test_dir),
        "| backbone | start | frozen linear probe top-1 | frozen R@1 | frozen MAP@R "
        "| frozen kNN-vote top-1 | fine-tuned top-1 | R@1 | MAP@R | kNN-vote top-1 | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        start = "ImageNet (packaged)" if row["weights"] == "imagenet" else "scratch"
        frozen_report = row.get("frozen")
        probe = row["probe"]["report"]["top1"] if "probe" in row else None
        frozen_cells = [_pct(probe), *_retrieval(frozen_report)] if frozen_report else ["-"] * 4
        report = row["report"]
        lines.append(
            f"| {row['name']} | {start} | {' | '.join(frozen_cells)} | {_pct(report['top1'])} | "
            f"{' | '.join(_retrieval(report))} | {_seconds(row['s_per_epoch'])} |"
        )
    _write(HERE / "transfer.md", lines)


TUNING = HERE / "transfer_tuning.md"
TUNING_TITLE = "# Choosing the fine-tuning defaults (efficientnet_lite0, packaged ImageNet weights)"
LEVERS = "## Every lever on the quality benchmark (10 categories, 3 seeds)"  # benchmarks/quality.py
HISTORY = "## History: the 4-class benchmark LP-FT was chosen on"  # transfer.py --tune


def write_section(heading: str, lines: list[str]) -> None:
    """Replace one section of transfer_tuning.md (LEVERS or HISTORY), keeping the other: two
    benchmarks write it."""
    sections = {LEVERS: [], HISTORY: []}
    current = None
    for line in TUNING.read_text().splitlines() if TUNING.is_file() else []:
        if line in sections:
            current = line
        elif current is not None:
            sections[current].append(line)
    sections[heading] = ["", *lines, ""]
    text = [TUNING_TITLE, ""]
    for name, body in sections.items():
        if any(body):
            text += [name, *body]
    _write(TUNING, text)


def write_tuning(
    rows: list[dict], args: argparse.Namespace, train_dir: Path, test_dir: Path
) -> None:  # noqa: E501
    """The variants table that LP-FT was chosen from."""
    lines = [
        "`python benchmarks/transfer.py --tune`",
        "",
        *_setup(args, train_dir, test_dir),
        "| variant | top-1 | R@1 | MAP@R | kNN-vote top-1 | s/epoch | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        report = row["report"]
        lines.append(
            f"| {row['name']} | {_pct(report['top1'])} | {' | '.join(_retrieval(report))} | "
            f"{_seconds(row['s_per_epoch'])} | {row['train_s']:.0f} |"
        )
    write_section(HISTORY, lines)


def _retrieval(report: dict) -> list[str]:
    retrieval = report["retrieval"]
    # Over every test folder: for the frozen ImageNet model no folder is one of its classes.
    knn = report["knn_top1_all_folders"]
    return [_pct(retrieval["recall@1"]), _pct(retrieval["map@r"]), _pct(knn)]


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
