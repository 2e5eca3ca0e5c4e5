"""What starting DataLoader workers costs, by start method: fork (unsafe after libvips or any
thread pool has run in the parent), forkserver (imgsim's, models/workers.py; with and without
preloading what the main module imports) and spawn.

Each method runs in a fresh interpreter, as a command would: the first pass over the images
starts the workers (and, for forkserver, the server); later passes start fresh workers, as
every training epoch, probe and validation pass does (persistent_workers is off). Timed: the
first batch of each pass, and each whole pass (decode, resize, crop of every image).

    python -m benchmarks.worker_start [--stamps DIR] [--workers N] [--passes N]

Writes benchmarks/worker_start.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import cpu_model
from benchmarks.transfer import STAMPS

OUT = Path(__file__).with_name("worker_start.md")
# (row, start method, whether the fork server preloads what this module imports, as the CLI's)
METHODS = {
    "fork": ("fork", False),
    "forkserver (imgsim's)": ("forkserver", True),
    "forkserver, main's imports not preloaded": ("forkserver", False),
    "spawn": ("spawn", False),
}


def one_method(row: str, stamps: Path, workers: int, passes: int) -> dict[str, list[float]]:
    """In this process: per pass, seconds to the first batch and to the end."""
    import multiprocessing

    from models.backbones import preprocessing_for
    from models.data import ImageDataset, find_images
    from models.transforms import eval_transform
    from models.workers import loader, preload_in_workers

    method, preload = METHODS[row]
    if preload:
        preload_in_workers("benchmarks.machine", "benchmarks.transfer")

    pre = preprocessing_for("efficientnet_lite0")
    dataset = ImageDataset(find_images(stamps), pre, eval_transform(pre))
    context = multiprocessing.get_context(method)
    times: dict[str, list[float]] = {"first": [], "whole": []}
    for _ in range(passes):
        started = time.perf_counter()
        batches = iter(loader(dataset, workers, batch_size=32, multiprocessing_context=context))
        next(batches)
        times["first"].append(time.perf_counter() - started)
        for _ in batches:
            pass
        times["whole"].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--row", choices=METHODS, help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    if args.row:
        print(json.dumps(one_method(args.row, args.stamps, args.workers, args.passes)))
        return
    rows = []
    for row in METHODS:
        command = [sys.executable, "-m", "benchmarks.worker_start", "--row", row]
        command += ["--stamps", str(args.stamps), "--workers", str(args.workers)]
        command += ["--passes", str(args.passes)]
        times = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
        first, whole = times["first"], times["whole"]
        rows.append(
            f"| {row} | {first[0]:.2f} | {statistics.median(first[1:]):.2f} "
            f"| {whole[0]:.2f} | {statistics.median(whole[1:]):.2f} |"
        )
        print(rows[-1], flush=True)
    count = sum(1 for _ in args.stamps.rglob("*.png"))
    OUT.write_text(
        "# Starting DataLoader workers\n\n"
        f"`python -m benchmarks.worker_start --workers {args.workers} --passes {args.passes}`\n\n"
        f"{count} Tux Paint stamps decoded, resized and centre-cropped for efficientnet_lite0 "
        f"(224 px) by {args.workers} workers in batches of 32; each method in a fresh "
        f"interpreter; later passes: the median of {args.passes - 1}. {cpu_model()}.\n\n"
        "| start method | first batch, first pass (s) | first batch, later passes (s) "
        "| first pass (s) | later passes (s) |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
