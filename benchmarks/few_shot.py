"""New classes from a few images, without retraining: imprinting and the neighbour vote against
retraining with every class, on the quality benchmark (benchmarks/quality.py's split).

Per seed: the quality split of the 10 Tux Paint categories; the model is trained with the
defaults on all but HELD_OUT; then each held-out class is added from K of its training images
(K = 1, 5, 10, drawn with the seed), by imprinting (POST /classes: the examples' mean
embedding less the collection's, normalised, as a classifier row) and by the neighbour vote
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
its own .md beside it). Each seed's embeddings are kept in --work for later analysis.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
from pathlib import Path

import numpy as np

from benchmarks.quality import ROWS, TEST_SHARE, categories, machine, row_folder
from benchmarks.transfer import STAMPS, copy_split
from models.bundle import Bundle
from models.data import find_images
from models.imprint import Classifier, added_from, neighbour_vote
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
    new = np.isin(test_labels, HELD_OUT)
    base = Classifier.of(bundle.config.classes, bundle.net.classifier, bundle.fingerprint)
    before = np.asarray(base.names)[test_logits.argmax(1)]
    result = {"trained before": float((before == test_labels)[~new].mean())}
    result["machine"] = machine(device)
    np.savez(  # for analyses beyond this script's
        embeddings_file(work, row, seed),
        test_emb=test_emb,
        test_logits=test_logits,
        test_labels=test_labels,
        train_emb=train_emb,
        train_labels=train_labels,
        rows=bundle.net.classifier.weight.detach().cpu().numpy(),
        temperature=base.temperature,
        trained=np.asarray(base.trained),
    )

    for shots, examples in draws(seed, train_labels).items():
        voters = np.concatenate(
            [np.flatnonzero(~np.isin(train_labels, HELD_OUT)), *examples.values()]
        )
        centre = train_emb[voters].mean(0)  # the collection: trained images and the examples
        added = [added_from(name, train_emb[rows], centre) for name, rows in examples.items()]
        classifier = base.replaced(added)
        chosen = np.asarray(classifier.names)[
            classifier.probabilities(test_logits, test_emb).argmax(1)
        ]
        result[f"imprint {shots} new"] = float((chosen == test_labels)[new].mean())
        result[f"imprint {shots} trained"] = float((chosen == test_labels)[~new].mean())
        # Two ways tried to keep the trained classes' answers, not in the product: both trade
        # the new classes' top-1 for the trained ones' along about the same line.
        trained_rows = _unit(bundle.net.classifier.weight.detach().cpu().numpy())
        rows = np.stack([c.weight for c in added])
        sample, labels = train_emb[voters], train_labels[voters]
        shifts = _shifts(trained_rows, rows, sample, labels, base.trained)
        names = [*base.trained, *HELD_OUT]
        fitted = _fitted(trained_rows, rows, sample, labels, names, base.temperature)
        for method, (kept, shift) in {"shifted": (rows, shifts), "fitted": (fitted, 0.0)}.items():
            scores = np.concatenate(
                [test_logits, (test_emb @ kept.T + shift) / base.temperature], axis=1
            )
            chosen = np.asarray(classifier.names)[scores.argmax(1)]
            result[f"{method} {shots} new"] = float((chosen == test_labels)[new].mean())
            result[f"{method} {shots} trained"] = float((chosen == test_labels)[~new].mean())
        voted = _vote(test_emb, train_emb[voters], train_labels[voters])
        result[f"vote {shots} new"] = float((voted == test_labels)[new].mean())
        result[f"vote {shots} trained"] = float((voted == test_labels)[~new].mean())

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


SHIFT_QUANTILE = 90


def _shifts(
    trained: np.ndarray, rows: np.ndarray, sample: np.ndarray, labels: np.ndarray, names: tuple
) -> np.ndarray:
    """Per new row, the shift of its cosine that puts its SHIFT_QUANTILE-th percentile over
    the collection's images of other classes at the trained rows' (their mean one)."""
    cosines = sample @ trained.T
    target = np.mean(
        [np.percentile(cosines[labels != n, j], SHIFT_QUANTILE) for j, n in enumerate(names)]
    )
    own = [
        np.percentile(sample[labels != name] @ row, SHIFT_QUANTILE)
        for name, row in zip(HELD_OUT, rows, strict=True)
    ]
    return target - np.asarray(own)


FIT_STEPS, FIT_ANCHOR = 100, 1.0


def _fitted(
    trained: np.ndarray,
    rows: np.ndarray,
    sample: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    temperature: float,
    anchor: float = FIT_ANCHOR,
) -> np.ndarray:
    """The new rows fitted on the collection (its images and the examples): class-balanced
    cross-entropy over every class, the trained rows fixed, from the imprinted rows and held
    near them (anchor times the squared distance), FIT_STEPS Adam steps."""
    import torch
    import torch.nn.functional as F

    x, fixed = torch.tensor(sample), torch.tensor(trained, dtype=torch.float32)
    y = torch.tensor([names.index(label) for label in labels])
    start = torch.tensor(rows, dtype=torch.float32)
    moving = start.clone().requires_grad_(True)
    weight = len(y) / (len(names) * torch.bincount(y, minlength=len(names)).clamp(min=1))
    optimizer = torch.optim.Adam([moving], lr=0.05)
    for _ in range(FIT_STEPS):
        logits = torch.cat([x @ fixed.T, x @ F.normalize(moving, dim=1).T], 1) / temperature
        loss = F.cross_entropy(logits, y, weight=weight.float())
        loss = loss + anchor * ((moving - start) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.normalize(moving, dim=1).detach().numpy()


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
    args = parser.parse_args()
    args.results = args.results.resolve()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    preload_in_workers("benchmarks.quality", "models.training")
    kept = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results = kept.get(args.row, {})
    for seed in args.seeds:
        if f"{seed}" not in results:
            run = run_seed(seed, args.stamps, args.work, args.reuse, args.row, args.device)
            results[f"{seed}"] = run
            kept[args.row] = results
            args.results.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    write_table(kept, args.results)


def _cell(runs: list[dict], key: str) -> str:
    values = [100 * run[key] for run in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def write_table(kept: dict, path: Path = RESULTS) -> None:
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
        "- Imprinting: the examples' mean less the collection's mean (the trained categories' "
        "training images and the examples), normalised, as a cosine-classifier row (the "
        f"product). Tried to keep the trained categories' answers: shifted, each new row's "
        f"cosine moved so that its {SHIFT_QUANTILE}th percentile over the collection's images of "
        "other categories is the trained rows'; fitted, the new rows trained on the collection "
        f"(class-balanced cross-entropy, trained rows fixed, {FIT_STEPS} Adam steps, held near "
        f"the imprinted rows with weight {FIT_ANCHOR}). Vote: the "
        f"{VOTERS} nearest among the trained categories' training images and the examples, "
        "similarity-weighted. Retrained: the model trained with all 10 categories "
        "(the quality benchmark's row of the same training).",
    ]
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
        "imprint": "imprinting",
        "shifted": "imprinting, shifted",
        "fitted": "imprinting, fitted",
        "vote": "neighbour vote",
    }
    for method in shown:
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
