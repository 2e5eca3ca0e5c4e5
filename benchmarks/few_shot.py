"""New classes from a few images, without retraining: imprinting and the neighbour vote against
retraining with every class, on the quality benchmark (benchmarks/quality.py's split).

Per seed: the quality split of the 10 Tux Paint categories; the model is trained with the
defaults on all but HELD_OUT; then each held-out class is added from K of its training images
(K = 1, 5, 10, drawn with the seed) as POST /classes adds it (models/imprint.py: imprinted,
the examples' mean embedding less the collection's, normalised, as a classifier row; then
fitted on the collection), imprinted alone (without the fit), and by the neighbour vote
(/classify?by=neighbours: the 10 nearest of the trained classes' training images and the K
examples, similarity-weighted).
Top-1 over all 10 classes on the held-out test drawings, for the new classes and for the trained
ones, against the trained classes' top-1 before any class was added, and against the model
trained with every class (the quality benchmark's defaults row: reused from --reuse when its
bundle is there, else trained here).

    python -m benchmarks.few_shot [--seeds 0 1 2] [--reuse /tmp/imgsim-quality]
                                  [--row "defaults, margin 0.1"] [--device cuda]
                                  [--results benchmarks/few_shot_cuda.json]

--row trains with another of the quality benchmark's rows than its defaults. Writes
benchmarks/few_shot.md (results kept in benchmarks/few_shot.json; another --results file gets
its own .md beside it). Each seed's embeddings are kept in --work: --remeasure measures
again from them, without training (after a change to models/imprint.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.quality import ROWS, TEST_SHARE, categories, machine, row_folder
from benchmarks.transfer import STAMPS, copy_split
from models.bundle import Bundle
from models.data import find_images
from models.imprint import (
    FIT_IMAGES,
    FIT_PULL,
    FIT_STEPS,
    AddedClass,
    Classifier,
    added_from,
    fit_rows,
    neighbour_vote,
)
from models.layout import BundleLayout
from models.training import TrainConfig, train
from models.workers import preload_in_workers

HERE = Path(__file__).parent
RESULTS = HERE / "few_shot.json"
BACKBONE = "efficientnet_lite0"
HELD_OUT = ("food", "plants", "vehicles")  # mid-sized categories, unlike one another
SHOTS = (1, 5, 10)
VOTERS = 10  # neighbours in the vote, /classify's default k
DEFAULT_ROW = "letterbox, multi-similarity (defaults)"


def encode(
    bundle: Bundle, folder: Path, classes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings and logits of every image of these class folders, and each one's class."""
    paths = [p for name in classes for p in find_images(folder / name)]
    encoded = bundle.encode(paths, workers=min(os.cpu_count() or 1, 4))
    labels = np.asarray([p.parent.name for p in paths])
    return encoded.embeddings, encoded.logits, labels


def run_seed(
    seed: int, stamps: Path, work: Path, reuse: Path | None, row: str, device: str
) -> dict:
    kind, overrides = ROWS[row]
    if kind != "fine-tune" or "mirror" in overrides:
        raise SystemExit(f"--row {row!r}: only rows that fine-tune, without mirror, are measured")
    classes = categories(stamps)
    trained = [c for c in classes if c not in HELD_OUT]
    data, test = copy_split(stamps, work / f"data-{seed}", TEST_SHARE, seed, classes)
    part = work / f"trained-{seed}"  # the training folders of the trained classes only
    shutil.rmtree(part, ignore_errors=True)
    for name in trained:
        shutil.copytree(data / name, part / name)
    config = TrainConfig(**{"backbone": BACKBONE, "device": device, "seed": seed, **overrides})
    few = row_folder(work, f"{row} 7 classes", seed)
    if not BundleLayout(few).weights.is_file():
        train(part, few, config)
    every = row_folder(reuse, row, seed) if reuse else None  # the quality benchmark's bundle
    if every is None or not BundleLayout(every).weights.is_file():
        every = row_folder(work, f"{row} all classes", seed)
        if not BundleLayout(every).weights.is_file():
            train(data, every, config)

    bundle = Bundle.load(few, device)
    bundle.use_runtime("auto")
    test_emb, test_logits, test_labels = encode(bundle, test, classes)
    train_emb, _, train_labels = encode(bundle, data, classes)
    kept = embeddings_file(work, row, seed)
    np.savez(  # measure() reads them; so does benchmarks/few_shot_frontier.py
        kept,
        test_emb=test_emb,
        test_logits=test_logits,
        test_labels=test_labels,
        train_emb=train_emb,
        train_labels=train_labels,
        rows=bundle.net.classifier.weight.detach().cpu().numpy(),
        temperature=bundle.net.classifier.temperature,
        trained=np.asarray(bundle.config.classes),
    )
    result = {"machine": machine(device), **measure(np.load(kept, allow_pickle=True), seed)}

    retrained = Bundle.load(every, device)
    retrained.use_runtime("auto")
    emb, logits, labels = encode(retrained, test, classes)
    answers = np.asarray(retrained.config.classes)[logits.argmax(1)]
    held = np.isin(labels, HELD_OUT)
    result["retrained new"] = float((answers == labels)[held].mean())
    result["retrained trained"] = float((answers == labels)[~held].mean())
    return result


def embeddings_file(work: Path, row: str, seed: int) -> Path:
    """Where a seed's embeddings are kept (benchmarks/few_shot_frontier.py reads them)."""
    return work / f"{row_folder(work, f'{row} embeddings', seed).name}.npz"


def draws(seed: int, train_labels: np.ndarray) -> dict[int, dict[str, list[int]]]:
    """For each number of shots, the training images taken as each held-out class's examples."""
    rng = random.Random(seed)
    return {
        shots: {n: rng.sample(list(np.flatnonzero(train_labels == n)), shots) for n in HELD_OUT}
        for shots in SHOTS
    }


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def measure(kept: np.lib.npyio.NpzFile, seed: int) -> dict:
    """Top-1 of the new and the trained classes for each method and number of examples, from
    a seed's kept embeddings."""
    test_emb, test_logits, test_labels = kept["test_emb"], kept["test_logits"], kept["test_labels"]
    train_emb, train_labels = kept["train_emb"], kept["train_labels"]
    trained, temperature = tuple(kept["trained"]), float(kept["temperature"])
    base = Classifier(trained, (), temperature, "", _unit(kept["rows"]))
    new = np.isin(test_labels, HELD_OUT)
    before = np.asarray(base.names)[test_logits.argmax(1)]
    result = {"trained before": float((before == test_labels)[~new].mean())}

    def top1(method: str, shots: int, chosen: np.ndarray) -> None:
        result[f"{method} {shots} new"] = float((chosen == test_labels)[new].mean())
        result[f"{method} {shots} trained"] = float((chosen == test_labels)[~new].mean())

    collection = ~np.isin(train_labels, HELD_OUT)  # the trained classes' labelled images
    for shots, examples in draws(seed, train_labels).items():
        voters, added = imprinted(train_emb, train_labels, examples)
        fitted = base.fitted(added, train_labels[collection], train_emb[collection])
        for method, classes in (("imprint", added), ("fitted", fitted)):
            classifier = base.replaced(classes)
            scores = classifier.probabilities(test_logits, test_emb)
            top1(method, shots, np.asarray(classifier.names)[scores.argmax(1)])
        top1("vote", shots, _vote(test_emb, train_emb[voters], train_labels[voters]))
    return result


def imprinted(
    train_emb: np.ndarray, train_labels: np.ndarray, examples: dict[str, list[int]]
) -> tuple[np.ndarray, list[AddedClass]]:
    """The collection's images (the trained classes' training images and the examples) and
    the held-out classes imprinted from their examples against its mean, as POST /classes."""
    collection = np.flatnonzero(~np.isin(train_labels, HELD_OUT))
    voters = np.concatenate([collection, *examples.values()])
    centre = train_emb[voters].mean(0)
    return voters, [added_from(name, train_emb[rows], centre) for name, rows in examples.items()]


def _vote(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The neighbour vote of each query among the gallery's VOTERS nearest (inner product)."""
    scores = queries @ gallery.T
    nearest = np.argsort(-scores, axis=1)[:, :VOTERS]
    answers = []
    for row, order in zip(scores, nearest, strict=True):
        votes = neighbour_vote(list(labels[order]), list(row[order]))
        answers.append(next(iter(votes)))
    return np.asarray(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-few-shot"))
    parser.add_argument("--reuse", type=Path, help="the quality benchmark's --work folder")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--row", choices=ROWS, default=DEFAULT_ROW, help="how to train")
    parser.add_argument("--device", default="cpu", help="train and embed here (cpu, cuda)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results kept")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure again from the embeddings kept in --work, without training",
    )
    args = parser.parse_args()
    args.results = args.results.resolve()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    preload_in_workers("benchmarks.quality", "models.training")
    kept = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results = kept.get(args.row, {})
    for seed in args.seeds:
        if args.remeasure and f"{seed}" in results:
            old = results[f"{seed}"]  # the retrained model's figures and the machine stay
            stays = {k: v for k, v in old.items() if k.startswith(("retrained", "machine"))}
            embeddings = np.load(embeddings_file(args.work, args.row, seed))
            results[f"{seed}"] = {**stays, **measure(embeddings, seed)}
            kept[args.row] = results
            args.results.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
        elif f"{seed}" not in results:
            run = run_seed(seed, args.stamps, args.work, args.reuse, args.row, args.device)
            results[f"{seed}"] = run
            kept[args.row] = results
            args.results.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    write_table(kept, args.results, fit_seconds())


def _cell(runs: list[dict], key: str) -> str:
    values = [100 * run[key] for run in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def fit_seconds(classes: int = 100, dim: int = 1280, repeat: int = 3) -> float:
    """The product's fit of 3 added rows on FIT_IMAGES labelled images of `classes` trained
    classes (random unit embeddings: the time does not depend on them), best of `repeat`."""
    rng = np.random.default_rng(0)
    fixed = _unit(rng.normal(size=(classes, dim)).astype(np.float32))
    sample = _unit(rng.normal(size=(FIT_IMAGES, dim)).astype(np.float32))
    targets = rng.integers(0, classes + 3, FIT_IMAGES)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fit_rows(fixed, sample[:3], sample, targets, 0.05)
        times.append(time.perf_counter() - started)
    return min(times)


def write_table(kept: dict, path: Path = RESULTS, fit_s: float | None = None) -> None:
    """The .md beside the results file: the product's row first, then any other."""
    lines = [
        "# New classes from a few images (imprinting and the neighbour vote)",
        "",
        f"`python -m benchmarks.few_shot --reuse /tmp/imgsim-quality{_how(path, kept)}` (results "
        f"kept in `{path.name}`)",
        "",
        f"- The quality benchmark's split (`quality.md`), {BACKBONE} trained on 7 categories; "
        f"{', '.join(HELD_OUT)} held out, then added from K of their training images each. "
        "Top-1 over all 10 categories on the held-out test drawings, mean ± standard deviation "
        "over the seeds, in per cent.",
        "- Imprinted and fitted (the product, models/imprint.py): each new row starts as its "
        "examples' mean less the collection's mean (the trained categories' training images "
        "and the examples), normalised; then the new rows are fitted on the collection "
        f"(cross-entropy over the trained categories' training images and each new class's "
        f"mean example, classes weighted alike, trained rows fixed, {FIT_STEPS} Adam steps, "
        f"held near the imprinted rows with weight {FIT_PULL}). Imprinted alone: without the "
        f"fit (the product before it). Vote: the {VOTERS} nearest among the trained "
        "categories' training images and the examples, similarity-weighted. Retrained: the "
        "model trained with all 10 categories "
        "(the quality benchmark's row of the same training).",
    ]
    if fit_s is not None:
        lines.append(
            f"- The fit's time at its largest ({FIT_IMAGES} labelled images, 100 trained "
            f"classes, 3 added, 1280 dimensions), on this machine's CPU ({os.cpu_count()} "
            f"cores): {fit_s:.2f} s."
        )
    order = sorted(kept, key=lambda row: row != DEFAULT_ROW)
    for row in order:
        title = f"## Trained as the quality benchmark's row {row!r}"
        lines += ["", title, "", *_section(kept[row])]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _how(path: Path, kept: dict) -> str:
    """The options that made these results."""
    runs = [run for results in kept.values() for run in results.values()]
    gpu = any(not run.get("machine", "CPU").startswith("CPU") for run in runs)
    rows = " --row ROW" if set(kept) != {DEFAULT_ROW} else ""
    results = f" --results benchmarks/{path.name}" if path != RESULTS else ""
    return f"{' --device cuda' if gpu else ''}{results}{rows}"


def _section(results: dict) -> list[str]:
    runs = list(results.values())
    machines = sorted({run.get("machine", "CPU only, 2 cores") for run in runs})
    lines = [
        f"- {len(runs)} seeds, on {'; '.join(machines)}. The trained categories' top-1 before "
        f"any was added: {_cell(runs, 'trained before')}; with every category trained: "
        f"{_cell(runs, 'retrained trained')}. The new categories' top-1 when retrained: "
        f"{_cell(runs, 'retrained new')}.",
        "",
        "| method | examples | new categories | against retraining | trained categories |",
        "|---|---|---|---|---|",
    ]
    shown = {
        "fitted": "imprinted and fitted (the product)",
        "imprint": "imprinted alone",
        "vote": "neighbour vote",
    }
    for method in (m for m in shown if all(f"{m} 1 new" in run for run in runs)):
        for shots in SHOTS:
            share = statistics.mean(r[f"{method} {shots} new"] for r in runs) / statistics.mean(
                r["retrained new"] for r in runs
            )
            lines.append(
                f"| {shown[method]} | {shots} "
                f"| {_cell(runs, f'{method} {shots} new')} | {100 * share:.0f} % "
                f"| {_cell(runs, f'{method} {shots} trained')} |"
            )
    return lines


if __name__ == "__main__":
    main()
