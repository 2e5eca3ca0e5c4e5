"""Where a bundle's forward pass runs: eager PyTorch, or its ONNX export under ONNX Runtime or
OpenVINO, in fp32, in bfloat16 (OpenVINO, on CPUs with bf16 instructions) or in int8 (statically
quantised on the bundle's own training images).

A runtime is a callable from a preprocessed batch (N, 3, S, S) to float32 numpy embeddings
(N, D) and logits (N, C); `Bundle.encode` calls it, so every stage gets it. The exports live in
the bundle folder (`BundleLayout.onnx`, `.onnx_int8`), made once and reused while their recorded
fingerprint is the bundle's: a retrained bundle is exported again. OpenVINO compiles the same
files at start-up. What each runtime costs and gains: benchmarks/runtime_accuracy.md and
benchmarks/serve_load.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from models.errors import BundleError
from models.files import atomic_write
from models.layout import BundleLayout
from models.network import EmbeddingNet

if TYPE_CHECKING:
    import onnxruntime
    import openvino

    from models.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    """How a runtime runs the model: which engine, on which model file, at which precision."""

    engine: str  # torch, onnxruntime or openvino
    int8: bool = False  # the statically quantised model (BundleLayout.onnx_int8)
    bf16: bool = False  # computed in bfloat16 (OpenVINO, on CPUs with bf16 instructions)


ENGINES = {
    "torch": Engine("torch"),
    "onnx": Engine("onnxruntime"),
    "onnx-int8": Engine("onnxruntime", int8=True),
    "openvino": Engine("openvino"),
    "openvino-bf16": Engine("openvino", bf16=True),
    "openvino-int8": Engine("openvino", int8=True),
}
RUNTIMES = ("auto", *ENGINES)
# What auto tries on the CPU, fastest first; each exact (fp32), so auto never changes answers.
# Batch-1 forwards on 2 cores, side by side: OpenVINO fp32 beat ONNX Runtime fp32 on a Xeon
# with AMX (efficientnet_lite0 3.9 against 6.6 ms) and on an AVX2 EPYC (5.8-8.2 against 7.8-8.0).
AUTO_ON_CPU = ("openvino", "onnx")
OPSET = 17
CALIBRATION_IMAGES = 128  # images the int8 ranges are calibrated on (seeded choice)
FINGERPRINT_KEY = "imgsim_fingerprint"  # ONNX metadata: the weights the file was made from
RECIPE_KEY = "imgsim_recipe"  # ONNX metadata: how it was made; another recipe is made again
EXPORT_RECIPE = f"torchscript-opset{OPSET}"
# int8: QDQ, per-channel int8 weights, uint8 activations whose ranges are the 0.01 % and
# 99.99 % points of the calibration images' histograms. Measured on efficientnet_lite0 (Tux Paint,
# 50 held-out drawings and 178 training images, on a Xeon with VNNI): with MinMax ranges (the
# extremes) OpenVINO int8 lost 4 points of top-1 (86.0 against 90.0); with percentile ranges
# both engines gave fp32's class on all 228 images and kept top-1 and R@10.
CALIBRATION_PERCENTILE = 99.99
INT8_RECIPE = f"qdq-u8s8-per-channel-percentile{CALIBRATION_PERCENTILE}"
# On CPUs without VNNI (AVX2, as on an EPYC measured) uint8 x int8 products saturate in
# VPMADDUBSW; 7-bit weights (reduce_range) avoid it: top-1 agreement with fp32 84 % without it,
# 96 % with it (MinMax ranges). With VNNI nothing saturates and the eighth bit is precision.
# QOperator failed to quantise the graph ("Graph is not a DAG"); u8u8 was 4x slower.
REDUCED_RANGE = "-reduce-range"
# Largest differences an export may show against PyTorch on the check batch (measured: ~4e-7
# on embeddings, ~2e-6 on logits, which the cosine head scales by 1/temperature).
EMBEDDING_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 2e-3


class Runtime(Protocol):
    """A forward pass: normalised images in, float32 embeddings and logits out."""

    name: str

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]: ...


def check_runtime(name: str) -> str:
    """The name if it is a runtime; ValueError listing the valid ones if not."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    return name


class TorchRuntime:
    """Eager PyTorch on the bundle's device."""

    name = "torch"

    def __init__(self, net: EmbeddingNet, device: str):
        self.net, self.device = net, device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = self.net(images.to(self.device))
        return out.embedding.float().cpu().numpy(), out.logits.float().cpu().numpy()


class OnnxRuntime:
    """An exported model under ONNX Runtime on the CPU."""

    def __init__(self, path: Path, name: str, threads: int | None = None):
        self.name, self.path = name, path
        self.session = _session(path, threads)

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        array = images.detach().cpu().numpy().astype(np.float32, copy=False)
        embeddings, logits = self.session.run(None, {"images": array})
        return embeddings, logits


class OpenVinoRuntime:
    """An exported model compiled by OpenVINO for the CPU, at fp32 or (bf16) bfloat16."""

    def __init__(self, path: Path, name: str, threads: int | None = None, bf16: bool = False):
        import openvino

        self.name, self.path = name, path
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
        }
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.model = _compiled(path, config)
        precision = self.model.get_property("INFERENCE_PRECISION_HINT")
        if bf16 and precision != openvino.Type.bf16:  # OpenVINO falls back without a word
            raise ValueError(
                f"runtime {name!r}: this CPU has no bfloat16 instructions (OpenVINO would run "
                f"{precision.to_string()}); use --runtime openvino"
            )
        self._requests = threading.local()  # an infer request serves one thread at a time

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.model.create_infer_request()
        array = images.detach().cpu().numpy().astype(np.float32, copy=False)
        # The request reads the batch where it lies (share_inputs) instead of copying it into
        # its own input tensor first, in the inference worker's thread between forwards: served
        # efficientnet_lite0 under openvino-int8, 16 clients, +3.6-5.2 % req/s at max_batch 4
        # (3 interleaved A/B rounds). The outputs are copied out.
        outputs = request.infer({"images": array}, share_inputs=True)
        return outputs["embedding"], outputs["logits"]


def _compiled(path: Path, config: dict) -> openvino.CompiledModel:
    """The model compiled for the CPU by the process's one OpenVINO core, in a thread of its
    own. OpenVINO's CPU plugin swaps the creating thread's signal stack for a 20 KB one of its
    own and, when destroyed, puts back the one it found: plugins created and destroyed out of
    order left the main thread on a freed stack, and the next signal handled there (SIGCHLD
    when a DataLoader worker ends) killed the process with SIGSEGV. One core keeps one plugin
    for the life of the process, created in a thread that ends."""
    with ThreadPoolExecutor(1, "imgsim-openvino-compile") as thread:
        return thread.submit(_core().compile_model, str(path), "CPU", config).result()


@functools.cache
def _core() -> openvino.Core:
    import openvino

    return openvino.Core()


def open_runtime(
    bundle: Bundle, name: str, threads: int | None = None, calibration: Path | None = None
) -> Runtime:
    """The named runtime for this bundle, exporting (and quantising) on first use.

    auto: on the CPU the first of AUTO_ON_CPU whose package imports and export works, else
    PyTorch; PyTorch on a GPU. threads: the engine's intra-op threads (default: its own)."""
    name = check_runtime(name)
    if name == "torch" or (name == "auto" and bundle.device != "cpu"):
        return TorchRuntime(bundle.net, bundle.device)
    if name == "auto":
        for candidate in AUTO_ON_CPU:
            if not _has_engine(ENGINES[candidate].engine):
                continue
            try:
                return _exported_runtime(bundle, candidate, threads, None)
            except (BundleError, RuntimeError, OSError) as err:
                log.warning("runtime auto: %s failed (%s)", candidate, err)
        log.warning("runtime auto: no exported model runs here; running PyTorch")
        return TorchRuntime(bundle.net, bundle.device)
    if bundle.device != "cpu":
        raise ValueError(f"runtime {name!r} runs on the CPU; serve with --device cpu")
    package = ENGINES[name].engine
    if not _has_engine(package):
        raise ValueError(f"runtime {name!r} needs the {package} package; use --runtime torch")
    return _exported_runtime(bundle, name, threads, calibration)


def _exported_runtime(
    bundle: Bundle, name: str, threads: int | None, calibration: Path | None
) -> OnnxRuntime | OpenVinoRuntime:
    layout = BundleLayout(export_folder(bundle))
    engine = ENGINES[name]
    model = exported(bundle, layout.onnx)
    if engine.int8:
        model = quantized(bundle, model, layout.onnx_int8, calibration)
    if engine.engine == "openvino":
        return OpenVinoRuntime(model, name, threads, engine.bf16)
    return OnnxRuntime(model, name, threads)


def export_folder(bundle: Bundle) -> Path:
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


def exported(bundle: Bundle, path: Path) -> Path:
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


def quantized(bundle: Bundle, fp32: Path, path: Path, calibration: Path | None = None) -> Path:
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


def calibration_images(bundle: Bundle, folder: Path | None = None) -> list[Path]:
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


def _calibration_batches(bundle: Bundle, images: list[Path]) -> Iterator[np.ndarray]:
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
    embeddings, logits = OnnxRuntime(path, "onnx")(example)
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


def _session(path: Path, threads: int | None) -> onnxruntime.InferenceSession:
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


def _has_engine(package: str) -> bool:
    """Whether the engine's package imports, and onnxruntime, which checks every export and
    makes the int8 model."""
    try:
        __import__(package)
        __import__("onnxruntime")
    except ImportError:
        return False
    return True


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def _scratch_folder() -> str:
    """A folder for exports when imgsim's cache cannot be written, kept for the life of the
    process."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="imgsim-onnx-"))
    return _SCRATCH[0].name
