"""Bulk embedding, as `imgsim index` runs it: images/s of Bundle.encode over real images with
decoding in DataLoader workers beside the forward, for eager PyTorch and the runtime auto,
against the ideal on this machine: 1 / (decode + forward per image), each measured alone.

decode: one image decoded, resized and cropped in this process (the workers' work), per image
over the whole set. forward: the runtime on batches already in memory, per image. The target
(issue 31) is auto at 0.8 of its ideal or better.

    python -m benchmarks.bulk_embed [--stamps DIR] [--repeat N] [--batch-size B] [--workers N]

Writes benchmarks/bulk_embed.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu_model
from benchmarks.transfer import STAMPS
from models.bundle import Bundle
from models.config import BATCH_SIZE, WORKERS
from models.data import ImageDataset, find_images
from models.workers import preload_in_workers

OUT = Path(__file__).with_name("bulk_embed.md")
BACKBONE = "efficientnet_lite0"


def decode_seconds(bundle: Bundle, paths: list[Path]) -> float:
    """Per image: decode, resize and crop, one after another in this process."""
    dataset = ImageDataset(paths, bundle.config.preprocessing, bundle._transform)
    started = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return (time.perf_counter() - started) / len(paths)


def forward_seconds(bundle: Bundle, paths: list[Path], batch_size: int) -> float:
    """Per image: the runtime's forward on preprocessed batches held in memory."""
    batches = [x for x, _ in bundle.batches(paths[: 4 * batch_size], batch_size)]
    bundle.forward(batches[0])  # warm-up
    started = time.perf_counter()
    for x in batches:
        bundle.forward(x)
    return (time.perf_counter() - started) / sum(len(x) for x in batches)


def encode_rate(bundle: Bundle, paths: list[Path], batch_size: int, workers: int) -> float:
    """Images/s of the whole encode path, as index runs it."""
    started = time.perf_counter()
    encoded = bundle.encode(paths, batch_size, workers)
    assert len(encoded.embeddings) == len(paths)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--repeat", type=int, default=3, help="times the stamps are listed")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preload_in_workers("benchmarks.machine", "benchmarks.transfer")  # as the CLI preloads its own
    paths = find_images(args.stamps) * args.repeat
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        Bundle.pretrained(BACKBONE, "imagenet", "cpu").save(Path(folder) / "bundle")
        bundle = Bundle.load(Path(folder) / "bundle", "cpu")
        decode = decode_seconds(bundle, paths[: len(paths) // args.repeat])
        for runtime in ("torch", "auto"):
            chosen = bundle.use_runtime(runtime)
            forward = forward_seconds(bundle, paths, args.batch_size)
            rate = encode_rate(bundle, paths, args.batch_size, args.workers)
            ideal = 1 / (decode + forward)
            rows.append(
                f"| {runtime} ({chosen}) | {1000 * decode:.1f} | {1000 * forward:.1f} "
                f"| {ideal:.1f} | {rate:.1f} | {rate / ideal:.2f} |"
            )
            print(rows[-1], flush=True)
    OUT.write_text(
        "# Bulk embedding (the encode path of `imgsim index`)\n\n"
        f"`python -m benchmarks.bulk_embed --repeat {args.repeat} --batch-size "
        f"{args.batch_size} --workers {args.workers}`\n\n"
        f"{len(paths)} images: the {len(paths) // args.repeat} Tux Paint stamps listed "
        f"{args.repeat} times; {BACKBONE}, ImageNet weights; batches of {args.batch_size}, "
        f"{args.workers} decoding workers; torch threads {torch.get_num_threads()}; "
        f"{os.cpu_count()} cores, {cpu_model()}. decode and forward: ms per image, each measured "
        "alone; ideal = 1 / (decode + forward); encode: images/s of Bundle.encode.\n\n"
        "| runtime | decode ms | forward ms | ideal img/s | encode img/s | encode / ideal |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
