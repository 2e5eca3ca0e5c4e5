"""Quality benchmark: every Tux Paint stamp category with at least MIN_IMAGES stamps, split by
drawing, over several seeds: the benchmark the training defaults are chosen on.

Each seed draws its own split (30 % of each category's drawings held out as test; a stamp's
variants stay together) and trains with that seed; the validation split comes from the
training part only. Rows:
- frozen: the ImageNet model's GAP embedding indexes the training images (R@1, MAP@R, kNN);
- probe: the linear probe of LP-FT alone (classifier top-1), no fine-tuning epoch;
- every other row: a fine-tune with the levers the row sets (TrainConfig fields), the rest at
  their defaults.
Figures are on the held-out drawings against an index of the training drawings, as the mean and
standard deviation over the seeds. Each (row, seed) result is kept in benchmarks/quality.json,
so a later run adds rows or seeds without training the others again (--again to redo them).

    python -m benchmarks.quality [--rows NAME ...] [--seeds 0 1 2] [--work DIR] [--again]
                                 [--device cuda --results benchmarks/quality_cuda.json]

Writes benchmarks/quality.md from every result in benchmarks/quality.json (and the levers'
table in transfer_tuning.md); another --results file gets its own .md beside it, levers and all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from app.stages import evaluate_folder, index_folder
from benchmarks.machine import cpu_model
from benchmarks.transfer import LEVERS, STAMPS, copy_split, write_section
from models.bundle import Bundle
from models.data import find_images
from models.layout import BundleLayout
from models.training import TrainConfig, train
from models.workers import preload_in_workers

HERE = Path(__file__).parent
RESULTS = HERE / "quality.json"
MIN_IMAGES = 15
TEST_SHARE = 0.3
BACKBONE = "efficientnet_lite0"
# The defaults chosen on this benchmark; later rows change one lever from them. Every row
# names each lever it sets, so its kept results stay true when a default changes.
DEFAULTS = {"fit": "letterbox", "metric_loss": "multi-similarity"}
# name: (kind, TrainConfig overrides); a "frozen" row takes only the fit and backbone
# overrides. "mirror" is the bundle's test-time mirror averaging, set after training.
ROWS: dict[str, tuple[str, dict]] = {
    "frozen": ("frozen", {"fit": "crop"}),
    "probe": ("probe", {"fit": "crop"}),
    "crop (the old defaults)": ("fine-tune", {"fit": "crop", "metric_loss": "none"}),
    "frozen, letterbox": ("frozen", {"fit": "letterbox"}),
    "probe, letterbox": ("probe", {"fit": "letterbox"}),
    "letterbox": ("fine-tune", {"fit": "letterbox", "metric_loss": "none"}),
    "frozen, resize": ("frozen", {"fit": "resize"}),
    "resize": ("fine-tune", {"fit": "resize", "metric_loss": "none"}),
    "multi-similarity": ("fine-tune", {"fit": "crop", "metric_loss": "multi-similarity"}),
    "letterbox, multi-similarity (defaults)": ("fine-tune", DEFAULTS),
    "defaults, 12 epochs": ("fine-tune", {**DEFAULTS, "epochs": 12}),
    "defaults, trunk lr x3": ("fine-tune", {**DEFAULTS, "backbone_lr_factor": 0.3}),
    "defaults, embedding 256": ("fine-tune", {**DEFAULTS, "embed_dim": 256}),
    "defaults, embedding 128": ("fine-tune", {**DEFAULTS, "embed_dim": 128}),
    "defaults, 288 px": ("fine-tune", {**DEFAULTS, "image_size": 288}),
    "defaults, no augmentation": ("fine-tune", {**DEFAULTS, "augment": False}),
    "defaults, embedding 512": ("fine-tune", {**DEFAULTS, "embed_dim": 512}),
    "frozen, letterbox, mirror": ("frozen", {"fit": "letterbox", "mirror": True}),
    "defaults, mirror": ("fine-tune", {**DEFAULTS, "mirror": True}),
    "defaults, proxy-anchor": ("fine-tune", {**DEFAULTS, "metric_loss": "proxy-anchor"}),
    "defaults, top half of the trunk moves": ("fine-tune", {**DEFAULTS, "trunk_share": 0.5}),
    "defaults, efficientnet_lite1": ("fine-tune", {**DEFAULTS, "backbone": "efficientnet_lite1"}),
    "defaults, efficientnet_lite2": ("fine-tune", {**DEFAULTS, "backbone": "efficientnet_lite2"}),
    "defaults, 288 px, mirror": ("fine-tune", {**DEFAULTS, "image_size": 288, "mirror": True}),
    "defaults, margin 0.1": ("fine-tune", {**DEFAULTS, "margin": 0.1}),
    "defaults, margin 0.25": ("fine-tune", {**DEFAULTS, "margin": 0.25}),
}
METRICS = ("top1", "recall@1", "map@r", "knn_top1", "answered", "precision")


def categories(stamps: Path) -> list[str]:
    """The stamp categories with at least MIN_IMAGES images."""
    folders = sorted(p for p in stamps.iterdir() if p.is_dir())
    return [p.name for p in folders if len(find_images(p)) >= MIN_IMAGES]


def run_row(name: str, seed: int, data: Path, test: Path, work: Path, device: str) -> dict:
    """Train (or not) and evaluate one row on one seed's split: its metrics and timing."""
    kind, overrides = ROWS[name]
    overrides = dict(overrides)
    mirror = overrides.pop("mirror", False)
    out = row_folder(work, name, seed)
    started = time.perf_counter()
    if kind == "frozen":
        bundle = Bundle.pretrained(overrides.get("backbone", BACKBONE), "imagenet", device)
        pre = replace(bundle.config.preprocessing, fit=overrides.get("fit", "crop"))
        bundle.config = replace(bundle.config, preprocessing=pre)
        bundle.save(out)
    else:
        config = replace(TrainConfig(backbone=BACKBONE, device=device, seed=seed), **overrides)
        train(data, out, replace(config, epochs=0) if kind == "probe" else config)
    train_s = time.perf_counter() - started
    bundle = Bundle.load(out, device)
    if mirror:  # the bundle's config turns it on in its network and fingerprint alike
        pre = replace(bundle.config.preprocessing, mirror=True)
        bundle.config = replace(bundle.config, preprocessing=pre)
        bundle.save(out)
    index_folder(data, bundle, BundleLayout(out).index)
    report = evaluate_folder(test, out, device=device)
    retrieval = report["retrieval"]
    return {
        "top1": None if kind == "frozen" else report["top1"],
        "recall@1": retrieval["recall@1"],
        "map@r": retrieval["map@r"],
        # Over every folder: for the frozen ImageNet model no folder is one of its classes.
        "knn_top1": report["knn_top1_all_folders"],
        # At the bundle's "unknown" threshold: the share of test images answered, their precision.
        "answered": None if kind == "frozen" else report["bundle_threshold"]["coverage"],
        "precision": None if kind == "frozen" else report["bundle_threshold"]["precision"],
        "train_s": train_s,
        "machine": machine(device),
    }


def row_folder(work: Path, name: str, seed: int) -> Path:
    """Where a row's bundle of one seed is kept under --work."""
    return work / f"{name.replace(' ', '_').replace(',', '')}-{seed}"


def _how(kept: Path, machines: set[str]) -> str:
    """The options that made another results file."""
    if kept == RESULTS:
        return ""
    gpu = any(not m.startswith("CPU only") for m in machines)
    return f"{' --device cuda' if gpu else ''} --results benchmarks/{kept.name}"


def machine(device: str) -> str:
    """Where a result was measured: the GPU, or the CPU's cores and model."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    return f"CPU only, {os.cpu_count()} cores, {cpu_model()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-quality"))
    parser.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--again", action="store_true", help="redo results already kept")
    parser.add_argument("--device", default="cpu", help="train and embed here (cpu, cuda)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results kept")
    args = parser.parse_args()
    args.results = args.results.resolve()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    preload_in_workers("app.stages", "models.training")  # what this module imports, as the CLI
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    classes = categories(args.stamps)
    for seed in args.seeds:
        todo = [r for r in args.rows if args.again or f"{seed}" not in results.get(r, {})]
        if not todo:
            continue
        data, test = copy_split(args.stamps, args.work / f"data-{seed}", TEST_SHARE, seed, classes)
        for name in todo:
            row = run_row(name, seed, data, test, args.work, args.device)
            results.setdefault(name, {})[f"{seed}"] = row
            args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_table(results, classes, args.stamps, args.results)


def _cell(values: list[float | None]) -> str:
    """Mean ± standard deviation, in per cent."""
    kept = [100 * v for v in values if v is not None]
    if not kept:
        return "-"
    spread = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return f"{statistics.mean(kept):.1f} ± {spread:.1f}"


def write_table(results: dict, classes: list[str], stamps: Path, kept: Path = RESULTS) -> None:
    """benchmarks/quality.md from every kept result (another results file: its own .md, with
    the levers' table in it rather than in transfer_tuning.md)."""
    counts = {name: len(find_images(stamps / name)) for name in classes}
    defaults = TrainConfig()
    machines = {
        run.get("machine", machine("cpu")) for row in results.values() for run in row.values()
    }
    lines = [
        "# Quality benchmark (all Tux Paint categories, split by drawing)",
        "",
        f"`python -m benchmarks.quality [--rows NAME ...]{_how(kept, machines)}` (results kept in "
        f"`{kept.name}`)",
        "",
        f"- {len(classes)} classes, {sum(counts.values())} stamps: "
        + ", ".join(f"{name} {count}" for name, count in counts.items())
        + f". Per seed, {100 * TEST_SHARE:.0f} % of each class's drawings are held out as test"
        f" (a stamp's variants stay together); {100 * defaults.val_fraction:.0f} % of the rest"
        " is the validation split.",
        f"- {BACKBONE}, ImageNet weights; product defaults but for the levers each row sets "
        f"({defaults.epochs} epochs, LP-FT). Figures: mean ± standard deviation over the seeds "
        "(n), in per cent, on the held-out drawings against an index of the training drawings. "
        "top-1: the classifier; kNN top-1: a similarity-weighted 5-NN vote; answered and "
        "precision: the share of test images the classifier answers at the bundle's 'unknown' "
        "threshold, and the top-1 of those.",
        f"- {'; '.join(sorted(machines))}."
        + (
            ""
            if all(m.startswith("CPU only") for m in machines)
            else " On CUDA, training runs with AMP (fp16), as the product does there; the seeds"
            " ran as three processes at once (`--seeds N` each, results merged), so train s is"
            " with the GPU shared."
        ),
        "",
        "| row | overrides | n | top-1 | R@1 | MAP@R | kNN top-1 | answered | precision "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, overrides) in ROWS.items():
        runs = list(results.get(name, {}).values())
        if not runs:
            continue
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "-"
        cells = [_cell([run.get(m) for run in runs]) for m in METRICS]
        train_s = statistics.mean(run["train_s"] for run in runs)
        lines.append(f"| {name} | {shown} | {len(runs)} | {' | '.join(cells)} | {train_s:.0f} |")
    if kept == RESULTS:
        (HERE / "quality.md").write_text("\n".join(lines) + "\n")
        write_section(LEVERS, [*levers(results), *_on_the_gpu(results)])
    else:
        lines += ["", "## Each lever against the defaults", "", *levers(results)]
        kept.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


BASELINE = "letterbox, multi-similarity (defaults)"
COMPARED = (("top1", "top-1"), ("recall@1", "R@1"), ("map@r", "MAP@R"))


def levers(results: dict) -> list[str]:
    """Each fine-tuning row against the defaults: a metric pays or costs only where the means
    differ by more than the larger of the two spreads."""
    base = list(results.get(BASELINE, {}).values())
    lines = [
        "`python -m benchmarks.quality` (every column and the frozen rows: `quality.md`). Each "
        f"row against `{BASELINE}`: a change counts only beyond the larger of the two standard "
        "deviations over the seeds.",
        "",
        "| row | n | top-1 | R@1 | MAP@R | train s | against the defaults |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (kind, _) in ROWS.items():
        runs = list(results.get(name, {}).values())
        if kind != "fine-tune" or not runs or not base:
            continue
        cells = [_cell([run[m] for run in runs]) for m, _ in COMPARED]
        said = [] if name == BASELINE else _verdict(runs, base)
        train_s = statistics.mean(run["train_s"] for run in runs)
        lines.append(
            f"| {name} | {len(runs)} | {' | '.join(cells)} | {train_s:.0f} "
            f"| {', '.join(said) or ('-' if name == BASELINE else 'within the spread')} |"
        )
    return lines


def _on_the_gpu(results: dict) -> list[str]:
    """A pointer to the levers measured on a GPU only (quality_cuda.json), if any."""
    path = HERE / "quality_cuda.json"
    elsewhere = (
        [n for n in json.loads(path.read_text()) if n not in results] if path.is_file() else []
    )
    if not elsewhere:
        return []
    return [
        "",
        f"Measured on a GPU only, with the defaults beside them (`{path.with_suffix('.md').name}`,"
        f" `--device cuda --results benchmarks/{path.name}`): {'; '.join(elsewhere)}.",
    ]


def _verdict(runs: list[dict], base: list[dict]) -> list[str]:
    said = []
    for metric, shown in COMPARED:
        ours, theirs = [100 * r[metric] for r in runs], [100 * r[metric] for r in base]
        spread = max(_sd(ours), _sd(theirs))
        gap = statistics.mean(ours) - statistics.mean(theirs)
        if abs(gap) > spread:
            said.append(f"{shown} {gap:+.1f}")
    return said


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
