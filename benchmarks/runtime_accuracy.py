"""What the CPU runtimes cost and gain: eager PyTorch vs ONNX Runtime and OpenVINO, on real images.

An efficientnet_lite0 bundle is trained with the `imgsim train` defaults on the Tux Paint split
of benchmarks/transfer.py (or, with --reuse, the one an earlier run left in --work). For each
runtime it reports: the largest difference of its embeddings from PyTorch's on the held-out
images, top-1 on the val split and on the held-out drawings, Recall@10 of the held-out drawings
against the training images (class-based, and overlap with fp32 PyTorch's top 10), and the
in-process forward time at batch 1 and 32. A densenet121 bundle with random weights is timed
too (speed only: its accuracy means nothing).

    python -m benchmarks.runtime_accuracy [--work DIR] [--reuse] [--runs N]

Writes benchmarks/runtime_accuracy.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
import openvino
import torch

from benchmarks.machine import cpu_model
from benchmarks.transfer import CLASSES, STAMPS, configure, copy_split
from models.backbones import preprocessing_for
from models.bundle import Bundle, BundleConfig
from models.data import list_class_folders, load_splits
from models.export import CALIBRATION_IMAGES, CALIBRATION_PERCENTILE, INT8_RECIPE, int8_recipes
from models.layout import BundleLayout
from models.memory import retain_freed_memory
from models.metrics import recall_at_k
from models.network import build_net
from models.runtime import ENGINES
from models.training import TrainConfig, train

HERE = Path(__file__).parent
NAMES = tuple(ENGINES)
K = 10


def trained_lite0(work: Path, train_dir: Path, reuse: bool) -> Path:
    """The efficientnet_lite0 bundle of the `imgsim train` defaults on the training drawings."""
    out = work / "efficientnet_lite0"
    if not (reuse and BundleLayout(out).weights.is_file()):
        train(train_dir, out, configure("efficientnet_lite0", "imagenet", TrainConfig.epochs, {}))
    return out


def random_densenet(work: Path, train_dir: Path) -> Path:
    """A densenet121 bundle with random weights (--weights none): for timing only. Its config
    names train_dir as its training folder, so its int8 model is calibrated there."""
    out = work / "densenet121-random"
    if not BundleLayout(out).weights.is_file():
        torch.manual_seed(0)
        config = BundleConfig("densenet121", list(CLASSES), preprocessing_for("densenet121"))
        config.weights = "none"
        config.extra["data_dir"] = str(train_dir.resolve())
        Bundle(config, build_net("densenet121", len(CLASSES), "none"), "cpu").save(out)
    return out


def runtimes(bundle_dir: Path) -> dict[str, Bundle]:
    """One loaded bundle per runtime (exports and the int8 model made on first use)."""
    loaded = {}
    for name in NAMES:
        bundle = Bundle.load(bundle_dir, "cpu")
        bundle.use_runtime(name)
        loaded[name] = bundle
    return loaded


def forward_all(bundle: Bundle, batches: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and logits of preprocessed batches through the bundle's runtime."""
    outputs = [bundle.runtime(x) for x in batches]
    return np.concatenate([e for e, _ in outputs]), np.concatenate([lg for _, lg in outputs])


def accuracy(loaded: dict[str, Bundle], train_dir: Path, test_dir: Path) -> dict[str, dict]:
    """Per runtime: embedding gap to PyTorch, val and test top-1, Recall@10 two ways."""
    reference = loaded["torch"]
    classes, _, val = load_splits(train_dir, 0.2, 0)
    _, gallery = list_class_folders(train_dir, classes)
    _, test = list_class_folders(test_dir, classes)
    sets = {"val": val, "gallery": gallery, "test": test}
    batches = {k: [x for x, _ in reference.batches([s.path for s in v])] for k, v in sets.items()}
    labels = {k: np.array([s.label for s in v]) for k, v in sets.items()}
    counts = np.bincount(labels["gallery"], minlength=len(classes))
    expected = {k: forward_all(reference, b) for k, b in batches.items()}
    reference_top = _top(expected["test"][0], expected["gallery"][0])
    results = {}
    for name, bundle in loaded.items():
        out = {k: forward_all(bundle, b) for k, b in batches.items()}
        top = _top(out["test"][0], out["gallery"][0])
        mixed = _top(out["test"][0], expected["gallery"][0])  # gallery indexed by PyTorch
        results[name] = {
            "gap": float(np.abs(out["test"][0] - expected["test"][0]).max()),
            "val_top1": float((out["val"][1].argmax(1) == labels["val"]).mean()),
            "test_top1": float((out["test"][1].argmax(1) == labels["test"]).mean()),
            "recall10": recall_at_k(
                labels["gallery"][top], labels["test"], counts, queries_in_gallery=False, ks=(K,)
            )[K],
            "overlap10": _overlap(top, reference_top),
            "overlap10_mixed": _overlap(mixed, reference_top),
        }
    results["sizes"] = {k: len(v) for k, v in sets.items()}
    return results


def _top(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :K]


def _overlap(top: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(top, reference, strict=True)]))


def speed(loaded: dict[str, Bundle], runs: int) -> dict[str, dict[int, tuple[float, float]]]:
    """Median and fastest forward ms per runtime at batch 1 and 32; runtimes interleaved run by
    run, so a busy moment on the shared machine falls on all of them alike."""
    size = next(iter(loaded.values())).config.preprocessing.crop_size
    times: dict[str, dict[int, list[float]]] = {n: {1: [], 32: []} for n in loaded}
    for batch, repeats in ((1, runs), (32, max(3, runs // 5))):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        for bundle in loaded.values():
            bundle.runtime(x)  # warm-up
        for _ in range(repeats):
            for name, bundle in loaded.items():
                started = time.perf_counter()
                bundle.runtime(x)
                times[name][batch].append(1000 * (time.perf_counter() - started))
    return {
        n: {b: (statistics.median(t), min(t)) for b, t in per.items()} for n, per in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-runtime"))
    parser.add_argument("--reuse", action="store_true", help="reuse the bundle in --work")
    parser.add_argument("--runs", type=int, default=30, help="batch-1 forwards per runtime")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    retain_freed_memory()  # as `imgsim serve` runs: eager PyTorch keeps its activations' pages
    data = args.work / "data"
    if args.reuse and (data / "train").is_dir():
        train_dir, test_dir = data / "train", data / "test"
    else:
        train_dir, test_dir = copy_split(args.stamps, data, 0.3, 0)
    lite0 = runtimes(trained_lite0(args.work, train_dir, args.reuse))
    measured = {"lite0": accuracy(lite0, train_dir, test_dir)}
    lite0_speed = speed(lite0, args.runs)
    del lite0
    densenet = runtimes(random_densenet(args.work, train_dir))
    write(measured["lite0"], {"efficientnet_lite0": lite0_speed,
                              "densenet121": speed(densenet, args.runs)}, args)  # fmt: skip


def write(acc: dict, speeds: dict[str, dict], args: argparse.Namespace) -> None:
    """The accuracy and speed tables, with how they were measured."""
    sizes = acc["sizes"]
    lines = [
        "# CPU runtimes: eager PyTorch, ONNX Runtime and OpenVINO (fp32, bf16, int8)",
        "",
        "`python -m benchmarks.runtime_accuracy`" + (" --reuse" if args.reuse else ""),
        "",
        f"- efficientnet_lite0 trained with the `imgsim train` defaults on the Tux Paint split "
        f"of benchmarks/transfer.py ({', '.join(CLASSES)}): {sizes['gallery']} training images "
        f"({sizes['val']} of them the val split), {sizes['test']} held-out drawings.",
        f"- int8: ONNX Runtime static quantisation, QDQ, per-channel int8 weights "
        f"({'8-bit' if int8_recipes()[0] == INT8_RECIPE else '7-bit (reduce_range)'} on this "
        f"CPU), uint8 activations, ranges at the {100 - CALIBRATION_PERCENTILE:g} % and "
        f"{CALIBRATION_PERCENTILE:g} % points of {CALIBRATION_IMAGES} (at "
        "most) of the bundle's training-split images, preprocessed by the bundle's own eval "
        "path (densenet121: the training-split images of the same folder, recorded as its "
        "training folder); OpenVINO runs the same int8 file. bf16: OpenVINO computing model.onnx "
        f"in bfloat16. CPU: {cpu_model()}.",
        "- max |emb diff|: largest absolute difference of an embedding component from eager "
        "PyTorch's, over the held-out drawings (embeddings are L2-normalised).",
        f"- Recall@{K} (class): share of held-out drawings with an image of their class among "
        f"their {K} nearest training images (Musgrave et al.). Overlap@{K}: mean share of "
        f"fp32 PyTorch's {K} nearest training images that the runtime also returns, with "
        "the training images embedded by the runtime too, and (last column) by PyTorch, as "
        "when a gallery indexed with `imgsim index` is searched by a service on another runtime.",
        "- Forward ms: median in-process time of the runtime on a preprocessed batch "
        f"({args.runs} runs at batch 1, {max(3, args.runs // 5)} at 32, runtimes interleaved), "
        f"torch with {torch.get_num_threads()} threads, ONNX Runtime "
        f"{onnxruntime.__version__} and OpenVINO {openvino.__version__.split('-')[0]} with "
        f"their default threads; {os.cpu_count()} CPU cores "
        f"shared with other engineers' jobs (load average {os.getloadavg()[1]:.1f} at the end), "
        "so absolute times are noisy: the best run is given beside the median.",
        "",
        "| runtime | max abs emb diff | val top-1 | test top-1 | Recall@10 (class) "
        "| Overlap@10 with fp32 | Overlap@10, PyTorch gallery |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in NAMES:
        r = acc[name]
        lines.append(
            f"| {name} | {r['gap']:.1e} | {100 * r['val_top1']:.1f} | {100 * r['test_top1']:.1f}"
            f" | {100 * r['recall10']:.1f} | {100 * r['overlap10']:.1f} "
            f"| {100 * r['overlap10_mixed']:.1f} |"
        )
    lines += [
        "",
        "| backbone | runtime | batch 1 ms median (best) | speed-up median (best) "
        "| batch 32 ms median (best) | speed-up median (best) |",
        "|---|---|---|---|---|---|",
    ]
    for backbone, per in speeds.items():
        base = per["torch"]
        for name in NAMES:
            ms = per[name]
            label = f"{backbone} (random weights)" if backbone == "densenet121" else backbone
            lines.append(
                f"| {label} | {name} | {ms[1][0]:.1f} ({ms[1][1]:.1f}) "
                f"| {base[1][0] / ms[1][0]:.2f}x ({base[1][1] / ms[1][1]:.2f}x) "
                f"| {ms[32][0]:.0f} ({ms[32][1]:.0f}) "
                f"| {base[32][0] / ms[32][0]:.2f}x ({base[32][1] / ms[32][1]:.2f}x) |"
            )
    (HERE / "runtime_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
