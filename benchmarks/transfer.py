"""Transfer benchmark on Tux Paint stamps: from scratch vs --init-from, linear vs cosine head.

Classes are top-level stamp categories. Four of them pre-train a bundle (the "earlier
collection"); four others are the new class set. Each new class is split into train and a
held-out test part by drawing (a stamp's variants, e.g. ladybug / ladybug-2, stay together),
not by file. Every target run trains on the same images, is indexed over its training images,
and is evaluated with `evaluate_folder` on the held-out drawings (queries not in the index).

    python benchmarks/transfer.py [--stamps DIR] [--work DIR] [--epochs N] [--image-size PX]

Writes benchmarks/transfer.md. ImageNet weights are not available offline: from scratch is the
baseline.
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
from dataclasses import replace
from pathlib import Path

from app.stages import evaluate_folder, index_folder
from models.data import find_images
from models.training import METRICS_FILE, TrainConfig, train

STAMPS = Path("/work/data/stamps/usr/share/tuxpaint/stamps")
SOURCE = ("animals", "symbols", "town", "seasonal")
TARGET = ("food", "plants", "vehicles", "household")
OUT = Path(__file__).with_name("transfer.md")


def drawing_of(path: Path) -> str:
    """A stamp's drawing: its name without variant suffixes (-2, _back, 3, ...)."""
    stem = re.sub(r"([-_ ]?(back|front|left|right|\d+))+$", "", path.stem.lower())
    return f"{path.parent.name}/{stem or path.stem.lower()}"


def link_split(stamps: Path, classes: tuple[str, ...], work: Path, test_share: float,
               cap: int, seed: int) -> tuple[Path, Path | None]:  # fmt: skip
    """Copy each class's images into work/train/<class> and work/test/<class>, splitting
    by drawing; at most `cap` images per class."""
    rng = random.Random(seed)
    train_dir, test_dir = work / "train", work / "test"
    for name in classes:
        groups: dict[str, list[Path]] = defaultdict(list)
        for path in find_images(stamps / name):
            groups[drawing_of(path)].append(path)
        keys = sorted(groups)
        rng.shuffle(keys)
        n_test = round(test_share * len(keys))
        chosen = 0
        for i, key in enumerate(keys):
            part = test_dir if i < n_test else train_dir
            for path in groups[key]:
                if chosen >= cap:
                    break
                target = part / name / "__".join(path.relative_to(stamps / name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # copies: index_folder resolves symlinks
                chosen += 1
    return train_dir, (test_dir if test_share > 0 else None)


def run(name: str, data: Path, test: Path, work: Path, config: TrainConfig) -> dict:
    """Train, index the training images, evaluate on the held-out drawings."""
    out = work / name
    started = time.perf_counter()
    bundle = train(data, out, config)
    train_s = time.perf_counter() - started
    index_folder(data, bundle, out / "index", workers=config.workers)
    report = evaluate_folder(test, out, workers=config.workers, device=config.device)
    history = json.loads((out / METRICS_FILE).read_text())
    per_epoch = sum(r["seconds"] for r in history) / len(history)
    return {"name": name, "report": report, "s_per_epoch": per_epoch, "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-transfer"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cap", type=int, default=70, help="images per source class")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = args.work
    source_train, _ = link_split(args.stamps, SOURCE, work / "source", 0.0, args.cap, 0)
    target_train, target_test = link_split(args.stamps, TARGET, work / "target", 0.3, 10**6, 0)
    config = TrainConfig(
        backbone="resnet18",
        weights="none",
        epochs=args.epochs,
        warmup_epochs=1,
        batch_size=32,
        lr=1e-3,
        backbone_lr_factor=1.0,  # the trunk trains at the head's rate: scratch needs it
        image_size=args.image_size,
        device="cpu",
        workers=2,
    )
    pretrain = train(source_train, work / "pretrained", config)
    rows = []
    for head in ("linear", "cosine"):
        for start in ("scratch", "init-from"):
            init = str(work / "pretrained") if start == "init-from" else None
            cfg = replace(config, head=head, init_from=init)
            rows.append(run(f"{start}-{head}", target_train, target_test, work, cfg))
    write_markdown(rows, args, pretrain.config.extra, target_train, target_test)


def _count(folder: Path) -> int:
    return len(find_images(folder))


def write_markdown(rows: list[dict], args: argparse.Namespace, pretrain: dict,
                   target_train: Path, target_test: Path) -> None:  # fmt: skip
    """The results table with the settings that produced it."""
    lines = [
        "# Transfer benchmark (Tux Paint stamps)",
        "",
        f"`python benchmarks/transfer.py` (resnet18, weights none, CPU, {os.cpu_count()} cores).",
        "",
        f"- Pre-training classes: {', '.join(SOURCE)} (at most {args.cap} images each; "
        f"{pretrain['train_images']} train / {pretrain['val_images']} val images), "
        f"{args.epochs} epochs, cosine head.",
        f"- New classes: {', '.join(TARGET)}; {_count(target_train)} training images (20 % of "
        f"them are the val split), {_count(target_test)} held-out test images, split by drawing.",
        f"- {args.epochs} epochs (1 head-only warm-up), batch 32, AdamW lr 1e-3 for trunk and "
        f"head, {args.image_size} px crops, augmentation on, 2 DataLoader workers.",
        "- Metrics on the held-out drawings: classifier top-1; Recall@1 and MAP@R of the test "
        "images against an index of the training images; top-1 of a similarity-weighted 5-NN "
        "vote. s/epoch: mean wall time of an epoch (train + val).",
        "",
        "| start | head | top-1 | R@1 | MAP@R | kNN-vote top-1 | s/epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        report = row["report"]
        start, head = row["name"].rsplit("-", 1)
        lines.append(
            f"| {start} | {head} | {_pct(report['top1'])} | "
            f"{_pct(report['retrieval']['recall@1'])} | {_pct(report['retrieval']['map@r'])} | "
            f"{_pct(report['knn_top1'])} | {row['s_per_epoch']:.1f} |"
        )
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


if __name__ == "__main__":
    main()
