"""Where the quality benchmark's fine-tuned models go wrong: per category, over the seeds, the
test drawings the classifier misfiles, with what it answered, and the first neighbour's
category. Reads the bundles `python -m benchmarks.quality` leaves in its --work folder.

    python -m benchmarks.quality_errors [--work /tmp/imgsim-quality] [--row NAME]

Writes benchmarks/quality_errors.md.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from benchmarks.quality import ROWS
from index.gallery import GalleryIndex
from models.bundle import Bundle
from models.data import find_images
from models.layout import BundleLayout

OUT = Path(__file__).with_name("quality_errors.md")


def misfiled(bundle_dir: Path, test: Path) -> list[tuple[str, str, str, str]]:
    """(category, file, the classifier's answer, the first neighbour's category) of every
    test drawing the classifier gets wrong."""
    bundle = Bundle.load(bundle_dir, "cpu")
    bundle.use_runtime("auto")
    paths = find_images(test)
    probabilities, embeddings = bundle.classify(paths, workers=2)
    gallery = GalleryIndex.load(BundleLayout(bundle_dir).index, bundle.fingerprint)
    firsts = gallery.search(embeddings, 1)
    gallery.close()
    wrong = []
    for path, row, first in zip(paths, probabilities, firsts, strict=True):
        answer = bundle.config.classes[int(np.argmax(row))]
        if answer != path.parent.name:
            wrong.append((path.parent.name, path.name, answer, first[0].label or "-"))
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-quality"))
    parser.add_argument("--row", choices=ROWS, default="letterbox, multi-similarity (defaults)")
    args = parser.parse_args()
    prefix = args.row.replace(" ", "_").replace(",", "")
    runs = sorted(args.work.glob(f"{prefix}-[0-9]*"))
    if not runs:
        raise SystemExit(
            f"no bundles of the row {args.row!r} in {args.work}: run benchmarks.quality"
        )
    tested: Counter[str] = Counter()
    wrong: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for run in runs:
        test = args.work / f"data-{run.name.rsplit('-', 1)[1]}" / "test"
        tested.update(p.parent.name for p in find_images(test))
        for category, name, answer, neighbour in misfiled(run, test):
            wrong[category].append((name, answer, neighbour))
    total = sum(len(w) for w in wrong.values())
    lines = [
        "# Where the fine-tuned models go wrong (quality benchmark)",
        "",
        f"`python -m benchmarks.quality_errors --row '{args.row}'`: the bundles of "
        f"{len(runs)} seeds of `benchmarks.quality`; {sum(tested.values())} test drawings in all, "
        f"{total} misfiled by the classifier ({100 * total / sum(tested.values()):.1f} %).",
        "",
        "| category | test drawings | misfiled | answered instead | first neighbour's category"
        " agrees with the answer |",
        "|---|---|---|---|---|",
    ]
    for category in sorted(tested, key=lambda c: -len(wrong[c]) / tested[c]):
        errors = wrong[category]
        answers = Counter(answer for _, answer, _ in errors).most_common()
        agree = sum(answer == neighbour for _, answer, neighbour in errors)
        lines.append(
            f"| {category} | {tested[category]} | {len(errors)} "
            f"({100 * len(errors) / tested[category]:.0f} %) "
            f"| {', '.join(f'{a} {n}' for a, n in answers) or '-'} | {agree} of {len(errors)} |"
        )
    worst = sorted(tested, key=lambda c: -len(wrong[c]) / tested[c])[:3]
    held = sum(len(wrong[c]) for c in worst)
    drawings = sum(tested[c] for c in worst)
    share = drawings / sum(tested.values())
    rest = 1 - (total - held) / (sum(tested.values()) - drawings)
    lines += [
        "",
        f"The three categories misfiled most often ({', '.join(worst)}) hold {held} of the "
        f"{total} errors and {100 * share:.0f} % of the test drawings; without them top-1 would "
        f"be {100 * rest:.1f} %.",
        "",
        "Every misfiled drawing (category: file -> answer):",
        "",
    ]
    for category in sorted(c for c in wrong if wrong[c]):
        shown = sorted({f"{name} -> {answer}" for name, answer, _ in wrong[category]})
        lines.append(f"- {category}: {'; '.join(shown)}")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
