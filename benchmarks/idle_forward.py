"""A forward after the model sat idle: how much slower than back to back.

serve_load's raw forward is timed back to back; a server's forward follows a pause (one client's
request spends milliseconds in HTTP and decoding between two forwards). For each bundle and
runtime this times the batch-1 forward of a preprocessed image after idle gaps of 0, 1, 5 and 20
ms, the calling thread either sleeping (as the inference worker waits for work) or spinning (its
core busy, the others idle), in rounds alternating the gaps.

    python -m benchmarks.idle_forward [--model BUNDLE ...] [--runtimes torch,openvino,...]
        [--runs N]

Without --model: the bundles of benchmarks/serve_load.py. Writes benchmarks/idle_forward.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from app.settings import Settings, available_cpus
from benchmarks.machine import cpu_model
from benchmarks.serve_load import default_bundles
from benchmarks.transfer import STAMPS
from models.bundle import Bundle
from models.data import find_images
from models.memory import retain_freed_memory
from models.runtime import ENGINES

HERE = Path(__file__).parent
GAPS_MS = (0, 1, 5, 20)
ROUNDS = 5


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def forward_after_gaps(bundle: Bundle, pixels: torch.Tensor, runs: int) -> dict[str, list[float]]:
    """Median forward ms per idle gap, for each way of waiting (sleep, spin)."""
    times = {(wait.__name__, gap): [] for wait in (sleep, spin) for gap in GAPS_MS}
    for _ in range(3):
        bundle.forward(pixels)  # warm-up
    for _ in range(ROUNDS):
        for wait, gap in ((w, g) for w in (sleep, spin) for g in GAPS_MS):
            for _ in range(runs // ROUNDS):
                wait(gap / 1000)
                started = time.perf_counter()
                bundle.forward(pixels)
                times[wait.__name__, gap].append(1000 * (time.perf_counter() - started))
    return {
        wait: [statistics.median(times[wait, gap]) for gap in GAPS_MS] for wait in ("sleep", "spin")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="bundle(s) to time")
    parser.add_argument("--runtimes", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--runs", type=int, default=50, help="forwards per gap")
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-transfer"))
    args = parser.parse_args()
    retain_freed_memory()  # as `imgsim serve` runs
    bundles = args.model or default_bundles(args.work, STAMPS)[0]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    settings = Settings()
    threads = settings.threads
    image_path = find_images(STAMPS)[0]
    rows = []
    for bundle_dir in bundles:
        for runtime in runtimes:
            bundle = Bundle.load(bundle_dir, "cpu")
            try:
                bundle.use_runtime(runtime, threads=threads)
            except ValueError as refused:  # openvino-bf16 on a CPU without bf16
                print(f"{bundle_dir.name} {runtime}: skipped ({refused})", file=sys.stderr)
                continue
            torch.set_num_threads(settings.torch_threads(runtime))  # as the server's worker
            image = bundle.decode(image_path)
            medians = forward_after_gaps(bundle, bundle.preprocess(image)[None], args.runs)
            rows.append((bundle_dir.name, runtime, medians))
            print(bundle_dir.name, runtime, medians, flush=True)
    gaps = " | ".join(f"{gap} ms" for gap in GAPS_MS)
    lines = [
        "# A forward after the model sat idle",
        "",
        f"`python -m benchmarks.idle_forward {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"{available_cpus()} CPU cores ({cpu_model()}); {threads} runtime threads. Median "
        f"batch-1 forward ms of a preprocessed stamp ({args.runs} per gap, in {ROUNDS} rounds "
        "alternating the gaps) after the calling thread slept, or spun, for the gap.",
        "",
        f"| bundle | runtime | wait | {gaps} | 20 ms against 0 ms |",
        "|---|---|---|" + "---|" * len(GAPS_MS) + "---|",
    ]
    for bundle_name, runtime, medians in rows:
        for wait, ms in medians.items():
            cells = " | ".join(f"{m:.2f}" for m in ms)
            lines.append(
                f"| {bundle_name} | {runtime} | {wait} | {cells} | {ms[-1] / ms[0]:.2f}x |"
            )
    (HERE / "idle_forward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
