"""A bundle's network as ONNX files: the fp32 export and the int8 model, statically quantised on
the bundle's own training images.

Each file is made once, in the bundle folder (`BundleLayout.onnx`, `.onnx_int8`) or imgsim's
cache, and records the fingerprint of the weights and the recipe it was made from; a retrained
bundle, or another recipe, is made again. The runtimes of models/runtime.py run these files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from models.errors import BundleError
from models.files import atomic_write
from models.network import EmbeddingNet

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

OPSET = 17
CALIBRATION_IMAGES = 128  # images the int8 ranges are calibrated on (seeded choice)
FINGERPRINT_KEY = "imgsim_fingerprint"  # ONNX metadata: the weights the file was made from
RECIPE_KEY = "imgsim_recipe"  # ONNX metadata: how it was made; another recipe is made again
EXPORT_RECIPE = f"torchscript-opset{OPSET}"
# int8: QDQ, per-channel int8 weights, uint8 activations whose ranges are the 0.01 % and
# 99.99 % points of the calibration images' histograms. MinMax ranges (the extremes) lost
# 4 points of top-1 under OpenVINO int8 on the Tux Paint drawings; these keep fp32's
# (benchmarks/runtime_accuracy.md).
CALIBRATION_PERCENTILE = 99.99
INT8_RECIPE = f"qdq-u8s8-per-channel-percentile{CALIBRATION_PERCENTILE}"
# On CPUs without VNNI uint8 x int8 products saturate (VPMADDUBSW); 7-bit weights
# (reduce_range) avoid it. With VNNI nothing saturates and the eighth bit is precision.
# QOperator failed to quantise the graph ("Graph is not a DAG"); u8u8 ran 4x slower.
REDUCED_RANGE = "-reduce-range"
# Largest differences an export may show against PyTorch on the check batch (measured: ~4e-7
# on embeddings, ~2e-6 on logits, which the cosine head scales by 1/temperature).
EMBEDDING_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 2e-3


class Exportable(Protocol):
    """What exporting needs of a bundle (models.bundle.Bundle is one): its network, where it
    lives, the fingerprint of its weights, its config, and its batched preprocessing."""

    net: EmbeddingNet
    device: str
    directory: Path | None
    config: Any

    @property
    def fingerprint(self) -> str: ...

    def batches(
        self, inputs: Sequence[Path], *, skip_unreadable: bool = False
    ) -> Iterator[tuple[torch.Tensor, list[str]]]: ...


def export_folder(bundle: Exportable) -> Path:
    """Where the bundle's exports are kept: its own folder, or, when it has none (the pretrained
    model) or it may not be written (a read-only mount), exports/FINGERPRINT in imgsim's cache,
    so that the next start reuses them; a temporary folder only when the cache cannot be made."""
    folder = bundle.directory
    if folder is not None and os.access(folder, os.W_OK):
        return folder
    cache = cache_home() / "exports" / bundle.fingerprint
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
    if not os.access(cache, os.W_OK):
        log.warning("%s cannot be written: the exports are made in a temporary folder", cache)
        return Path(_scratch_folder())
    if folder is not None:
        log.info("%s is read-only: its exports are kept in %s", folder, cache)
    return cache


def cache_home() -> Path:
    """imgsim's cache: IMGSIM_CACHE_DIR, else $XDG_CACHE_HOME/imgsim, else ~/.cache/imgsim (read
    where it is used, as torch reads TORCH_HOME, since `imgsim eval` exports too)."""
    if os.environ.get("IMGSIM_CACHE_DIR"):
        return Path(os.environ["IMGSIM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "imgsim"


def exported(bundle: Exportable, path: Path) -> Path:
    """path, holding this bundle's ONNX export: reused if made from the same weights, else
    exported again and checked against PyTorch."""
    if _made_of(path) == (bundle.fingerprint, EXPORT_RECIPE):
        return path
    log.info("exporting %s to ONNX at %s", bundle.config.backbone, path)
    size = bundle.config.preprocessing.crop_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    atomic_write(path, lambda tmp: _export(bundle.net, example, tmp, bundle.fingerprint))
    _check_export(bundle.net, path, example)
    return path


def quantized(bundle: Exportable, fp32: Path, path: Path, calibration: Path | None = None) -> Path:
    """path, holding the int8 model: reused if made from the same weights by a recipe this CPU
    runs well (and no calibration folder is given), else quantised statically from fp32,
    calibrated on the bundle's training images (or calibration's)."""
    recipes = int8_recipes()
    if calibration is None and _made_of(path) in {(bundle.fingerprint, r) for r in recipes}:
        return path
    from onnxruntime.quantization import CalibrationDataReader, quant_pre_process

    images = calibration_images(bundle, calibration)
    log.info("quantising %s to int8 on %d calibration images", fp32.name, len(images))
    inputs = [{"images": image[None]} for x in _calibration_batches(bundle, images) for image in x]

    class Reader(CalibrationDataReader):
        """The images one at a time (_quantize's stride): the percentile calibrator keeps every
        intermediate tensor of what it is given until it adds them to its histograms, and all
        128 at once took 8.6 GB for efficientnet_lite0 (one at a time, `imgsim quantize`:
        1.1 GB and 21 s in all)."""

        def __init__(self) -> None:
            self.set_range(0, len(inputs))

        def __len__(self) -> int:
            return len(inputs)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(inputs[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.pending, None)

    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        atomic_write(
            path, lambda tmp: _quantize(prepared, tmp, Reader(), bundle.fingerprint, recipes[0])
        )
    return path


def int8_recipes() -> tuple[str, ...]:
    """The int8 recipes this CPU runs well, the one it makes first: 8-bit weights with VNNI,
    7-bit ones (which run well everywhere) without. A bundle quantised on one CPU is quantised
    again on a CPU that would saturate on its weights."""
    reduced = INT8_RECIPE + REDUCED_RANGE
    return (INT8_RECIPE, reduced) if _has_vnni() else (reduced,)


@functools.cache
def _has_vnni() -> bool:
    """Whether the CPU multiplies uint8 by int8 without saturating (AVX512-VNNI, AVX-VNNI,
    AMX), as Linux's /proc/cpuinfo says; elsewhere assumed not (7-bit weights are safe)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def calibration_images(bundle: Exportable, folder: Path | None = None) -> list[Path]:
    """Up to CALIBRATION_IMAGES images (a seeded choice): below folder if given, else the
    training split of the folder the bundle was trained on, as its config records it."""
    from models.data import find_images, load_splits

    if folder is not None:
        if not folder.is_dir():
            raise BundleError(f"calibration folder {folder} does not exist.")
        paths = find_images(folder)
    else:
        extra = bundle.config.extra
        data_dir = extra.get("data_dir")
        if data_dir is None or not Path(data_dir).is_dir():
            raise BundleError(_NO_CALIBRATION.format(where=data_dir or "not recorded"))
        training = extra.get("training", {})
        split = load_splits(
            Path(data_dir), training.get("val_fraction", 0.2), training.get("seed", 0)
        )
        paths = [sample.path for sample in split[1]]
    if not paths:
        raise BundleError(_NO_CALIBRATION.format(where=f"{folder} has no images"))
    rng = np.random.default_rng(0)
    chosen = rng.permutation(len(paths))[:CALIBRATION_IMAGES]
    return [paths[i] for i in sorted(chosen)]


_NO_CALIBRATION = (
    "int8 quantisation is calibrated on the bundle's training images, and none were found "
    "(training folder: {where}). Pass a folder of images like those it will serve, e.g. "
    "'imgsim quantize BUNDLE --calibration DATA_DIR', or serve with --runtime onnx."
)


def _calibration_batches(bundle: Exportable, images: list[Path]) -> Iterator[np.ndarray]:
    for x, why in bundle.batches(images, skip_unreadable=True):
        readable = [i for i, reason in enumerate(why) if not reason]
        if readable:
            yield x[readable].numpy()


class _Exported(nn.Module):
    """The network with plain tensor outputs, as ONNX needs them."""

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(images)
        return out.embedding, out.logits


def _export(net: EmbeddingNet, example: torch.Tensor, path: Path, fingerprint: str) -> None:
    # The TorchScript exporter: 0.4 s for a small network where the dynamo one took 5 s, and
    # the same ONNX Runtime speed; serving exports on first start.
    batch = {0: "batch"}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        torch.onnx.export(
            _Exported(net).eval(),
            (example,),
            str(path),
            input_names=["images"],
            output_names=["embedding", "logits"],
            dynamic_axes={"images": batch, "embedding": batch, "logits": batch},
            opset_version=OPSET,
            dynamo=False,
        )
    _stamp(path, fingerprint, EXPORT_RECIPE)


def _quantize(prepared: Path, path: Path, reader: object, fingerprint: str, recipe: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared),
        str(path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=recipe.endswith(REDUCED_RANGE),
        calibrate_method=CalibrationMethod.Percentile,
        # The stride, despite its name, serves every calibrator: images given one at a time.
        extra_options={"CalibPercentile": CALIBRATION_PERCENTILE, "CalibStridedMinMax": 1},
    )
    _stamp(path, fingerprint, recipe)


def _stamp(path: Path, fingerprint: str, recipe: str) -> None:
    """Record the bundle fingerprint and the recipe in the model's metadata."""
    import onnx

    model = onnx.load(str(path))
    stamps = {FINGERPRINT_KEY: fingerprint, RECIPE_KEY: recipe}
    kept = [p for p in model.metadata_props if p.key not in stamps]  # the int8 model's, from fp32
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in stamps.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _made_of(path: Path) -> tuple[str | None, str | None]:
    """The (fingerprint, recipe) a model file records; (None, None) for no file."""
    if not path.is_file():
        return None, None
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return props.get(FINGERPRINT_KEY), props.get(RECIPE_KEY)


def _check_export(net: EmbeddingNet, path: Path, example: torch.Tensor) -> None:
    with torch.inference_mode():
        out = net(example)
    embeddings, logits = onnx_session(path, None).run(None, {"images": example.numpy()})
    gaps = (
        float(np.abs(embeddings - out.embedding.numpy()).max()),
        float(np.abs(logits - out.logits.numpy()).max()),
    )
    if gaps[0] > EMBEDDING_TOLERANCE or gaps[1] > LOGIT_TOLERANCE:
        path.unlink()
        raise BundleError(
            f"the ONNX export differs from PyTorch by {gaps[0]:.2g} (embeddings) and "
            f"{gaps[1]:.2g} (logits); serve this bundle with --runtime torch."
        )
    log.info("ONNX export matches PyTorch within %.2g (embeddings), %.2g (logits)", *gaps)


def onnx_session(path: Path, threads: int | None) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: on 2 busy cores spinning took time from the
    # request threads and from itself (efficientnet_lite0 batch 1: 14.0 ms spinning, 9.1 not).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def _scratch_folder() -> str:
    """A folder for exports when imgsim's cache cannot be written, kept for the life of the
    process."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="imgsim-onnx-"))
    return _SCRATCH[0].name
