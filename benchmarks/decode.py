"""Is decoding the bottleneck? A 12 MP photo vs one forward; a huge drawing's peak memory.

1. A 4000 x 3000 photo-like JPEG decoded with `load_image(path, draft_size=256)` (DCT
   scaling) and preprocessed as efficientnet_lite0 evaluates (resize 256 bicubic, crop 224,
   normalise), against one batch-1 forward of tf_efficientnet_lite0 (random weights) in eval
   mode. The target: decode + preprocess <= one forward. The full decode (no draft) is shown
   for comparison.
2. A PNG of a few MB declaring hundreds of megapixels, written row by row, decoded with
   `load_image(path, draft_size=256)` in a fresh process (libvips, shrinking while it reads):
   wall time and peak resident memory, against a bare `import pyvips, PIL`.

    python benchmarks/decode.py [--runs N] [--width W] [--height H] [--draft-size S]

Writes benchmarks/decode.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyvips
import timm
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from models.images import load_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ is not installed; its streaming PNG writer is reused
from tests.pngstream import write_large_png  # noqa: E402

OUT = Path(__file__).with_name("decode.md")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent process through exec.
PEAK_MB = "max(int(l.split()[1]) for l in open('/proc/self/status') if 'VmHWM' in l) / 1024"
CHILD_DECODE = (
    "import json, sys, time; from pathlib import Path; from models.images import load_image; "
    "t = time.perf_counter(); image = load_image(Path(sys.argv[1]), draft_size=int(sys.argv[2]));"
    f" print(json.dumps([image.size, time.perf_counter() - t, {PEAK_MB}]))"
)
CHILD_BASELINE = f"import json, pyvips, PIL; print(json.dumps([None, None, {PEAK_MB}]))"
VIPS_THREADS = (1, 4, 8)  # besides the default (one per core), to see how peak memory scales


def photo_jpeg(path: Path, width: int = 4000, height: int = 3000) -> None:
    """Write a seeded photo-like JPEG (smooth colour gradients plus noise, quality 90)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = [128 + 100 * np.sin(x / width * k + y / height * (4 - k)) for k in (1, 2, 3)]
    pixels = np.stack(base, axis=-1) + rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def median_ms(steps: dict[str, Callable[[], object]], runs: int, warmup: int = 2) -> dict:
    """Median wall time of each step in ms. Steps take turns within each run, so that the
    load of a shared machine weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for run in range(warmup + runs):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if run >= warmup:
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def photo_timings(path: Path, runs: int) -> dict[str, float]:
    """Median ms: decode (with and without draft), preprocess, one forward of the network."""
    preprocess = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(256, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    net = timm.create_model("tf_efficientnet_lite0").eval()
    batch = torch.randn(1, 3, 224, 224)
    data = path.read_bytes()
    pyvips.cache_set_max(0)  # or the repeated libvips load below is answered from its cache
    with torch.inference_mode():
        return median_ms(
            {
                "draft": lambda: preprocess(load_image(path, draft_size=256)),
                "draft decode": lambda: load_image(path, draft_size=256),
                "vips": lambda: pyvips.Image.jpegload_buffer(data, shrink=8).numpy(),
                "full": lambda: preprocess(load_image(path)),
                "full decode": lambda: load_image(path),
                "forward": lambda: net(batch),
            },
            runs,
        )


def child(code: str, *args: str, threads: int | None = None) -> tuple:
    """Run `code` in a fresh interpreter; it prints [decoded size, seconds, peak MB]."""
    env = dict(os.environ)
    if threads is not None:
        env["VIPS_CONCURRENCY"] = str(threads)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    size, seconds, peak = json.loads(done.stdout)
    return size, seconds, peak


def photo_lines(path: Path, t: dict[str, float], runs: int, load: float) -> list[str]:
    ratio = t["draft"] / t["forward"]
    drafted = "x".join(map(str, load_image(path, draft_size=256).size))
    return [
        f"## 1. 12 MP photo-like JPEG ({path.stat().st_size / 1e6:.1f} MB, 4000 x 3000, "
        "quality 90)",
        "",
        f"Median of {runs} runs; torch threads: {torch.get_num_threads()}; "
        f"CPU only, {os.cpu_count()} cores; load average before the run: {load:.1f} "
        "(with more runnable threads than cores, OpenMP's waiting threads slow the forward).",
        "",
        "| step | ms |",
        "|---|---|",
        f"| decode, `draft_size=256` (DCT scaling to {drafted}) | {t['draft decode']:.1f} |",
        f"| for reference: libvips `jpegload shrink=8`, same bytes | {t['vips']:.1f} |",
        f"| decode + preprocess, `draft_size=256` | {t['draft']:.1f} |",
        f"| decode, full (no draft) | {t['full decode']:.1f} |",
        f"| decode + preprocess, full (no draft) | {t['full']:.1f} |",
        f"| tf_efficientnet_lite0 forward, batch 1, 224 px | {t['forward']:.1f} |",
        f"| **decode + preprocess / forward** | **{ratio:.2f}** (target <= 1) |",
        "",
        "At 1/8 scale the inverse DCT is almost free; what is left is entropy-decoding every "
        "byte of the file, which no decoder skips for a baseline JPEG (libvips takes as long).",
    ]


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def drawing_lines(args: argparse.Namespace, size: int, rows: list[tuple[str, tuple]]) -> list:
    declared = args.width * args.height
    table = [
        f"| {name} | {'x'.join(map(str, s)) if s else '-'} | {_seconds(sec)} | {mb:.0f} |"
        for name, (s, sec, mb) in rows
    ]
    return [
        f"## 2. Huge PNG: {args.width} x {args.height} = {declared / 1e6:.0f} Mpx declared, "
        f"{size / 1e6:.2f} MB on disk",
        "",
        "White with a black rectangle, 8-bit RGB, written row by row (tests/pngstream.py); "
        f"a whole decode would be {declared * 3 / 1e9:.2f} GB. Each row is a fresh process; "
        "peak = VmHWM (ru_maxrss is carried over from the parent through exec on Linux).",
        "",
        "| run | decoded size | wall s | peak RSS MB |",
        "|---|---|---|---|",
        *table,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--width", type=int, default=36_000)
    parser.add_argument("--height", type=int, default=18_000)
    parser.add_argument("--draft-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        photo, drawing = Path(folder) / "photo.jpg", Path(folder) / "drawing.png"
        photo_jpeg(photo)
        timings = photo_timings(photo, args.runs)
        photo_report = photo_lines(photo, timings, args.runs, load)
        rect = (args.width // 4, args.height // 4, args.width // 2, args.height // 2)
        png_size = write_large_png(drawing, args.width, args.height, rect=rect)
        decode = (CHILD_DECODE, str(drawing), str(args.draft_size))
        rows = [("bare `import pyvips, PIL`", child(CHILD_BASELINE))]
        default = f"`load_image(draft_size={args.draft_size})`, {pyvips.concurrency_get()} threads"
        rows.append((default + " (libvips default: one per core)", child(*decode)))
        rows += [(f"same, VIPS_CONCURRENCY={n}", child(*decode, threads=n)) for n in VIPS_THREADS]
    lines = [
        "# Decode benchmark",
        "",
        f"`python benchmarks/decode.py --runs {args.runs} --width {args.width} "
        f"--height {args.height} --draft-size {args.draft_size}`",
        "",
        *photo_report,
        "",
        *drawing_lines(args, png_size, rows),
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
