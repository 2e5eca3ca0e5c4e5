"""Why only the inference thread runs torch on several threads (app/batching.py).

PyTorch's OpenMP (libgomp) gives every thread that runs a parallel op its own team of threads,
kept for the thread's life. While libgomp manages no more threads than there are cores, a team
spins between ops; beyond that, every team sleeps between ops and is woken for the next, which
costs eager PyTorch dearly on a model of many small ops. This times the batch-1 forward of the
ImageNet efficientnet_lite0 (torch runtime) in a worker thread, as the server runs it, with:

- one team: the process loaded the model with torch on one thread, then gave the worker
  thread all the threads (what `imgsim serve` does);
- two teams: the model loaded with all the threads in the main thread (whose team stays), the
  worker thread as before;
- main thread: the forward in the thread that loaded the model, as in-process benchmarks run it.

Each case runs in a fresh process, in alternating rounds.

    python benchmarks/openmp_teams.py [--rounds N] [--forwards N]

Writes benchmarks/openmp_teams.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from app.batching import intra_op_threads
from models.bundle import Bundle
from models.memory import retain_freed_memory

HERE = Path(__file__).parent
CASES = ("one team", "two teams", "main thread")


def run_case(case: str, forwards: int) -> list[float]:
    """ms of each batch-1 forward in this process, set up as `case` says."""
    retain_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if case == "one team" else threads)
    bundle = Bundle.pretrained("efficientnet_lite0", "imagenet", "cpu")
    x = torch.randn(1, 3, 224, 224)

    def timed() -> list[float]:
        for _ in range(5):
            bundle.forward(x)
        times = []
        for _ in range(forwards):
            started = time.perf_counter()
            bundle.forward(x)
            times.append(1000 * (time.perf_counter() - started))
        return times

    if case == "main thread":
        return timed()
    bundle.forward(x)  # the loading thread's own ops, on its threads
    worker = ThreadPoolExecutor(1, initializer=intra_op_threads, initargs=(threads,))
    return worker.submit(timed).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=40)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.forwards)))
        return
    times: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            child = [sys.executable, __file__, "--case", case, "--forwards", str(args.forwards)]
            env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
            out = subprocess.run(child, check=True, capture_output=True, text=True, env=env)
            times[case] += json.loads(out.stdout.splitlines()[-1])
    lines = [
        "# OpenMP teams and the eager PyTorch forward",
        "",
        f"`python benchmarks/openmp_teams.py --rounds {args.rounds} --forwards {args.forwards}`",
        "",
        f"efficientnet_lite0 (ImageNet), torch runtime, batch 1, {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()} in the forward's thread; {args.rounds} rounds of "
        f"{args.forwards} forwards per case, each case in a fresh process, cases alternating.",
        "",
        "| case | median ms | best ms |",
        "|---|---|---|",
    ]
    for case, values in times.items():
        lines.append(f"| {case} | {statistics.median(values):.1f} | {min(values):.1f} |")
    (HERE / "openmp_teams.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
