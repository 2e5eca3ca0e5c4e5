"""Where a bundle's forward pass runs: eager PyTorch, or its ONNX export under ONNX Runtime or
OpenVINO, in fp32, in bfloat16 (OpenVINO, on CPUs with bf16 instructions) or in int8.

A runtime is a callable from a preprocessed batch (N, 3, S, S) to float32 numpy embeddings
(N, D) and logits (N, C); `Bundle.encode` calls it, so every stage gets it. The files the
exported runtimes run are made by models/export.py; OpenVINO compiles them at start-up. What
each runtime costs and gains: benchmarks/runtime_accuracy.md and benchmarks/serve_load.md.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from models.errors import BundleError
from models.export import Exportable, export_folder, exported, onnx_session, quantized
from models.layout import BundleLayout
from models.network import EmbeddingNet

if TYPE_CHECKING:
    import openvino

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
# OpenVINO fp32 ran faster than ONNX Runtime fp32 at batch 1 on every CPU measured
# (benchmarks/runtime_accuracy.md).
AUTO_ON_CPU = ("openvino", "onnx")


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
        self.session = onnx_session(path, threads)

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
        # its own input tensor first: +4-5 % req/s served at 16 clients under openvino-int8.
        # The outputs are copied out.
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
    bundle: Exportable, name: str, threads: int | None = None, calibration: Path | None = None
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
    bundle: Exportable, name: str, threads: int | None, calibration: Path | None
) -> OnnxRuntime | OpenVinoRuntime:
    layout = BundleLayout(export_folder(bundle))
    engine = ENGINES[name]
    model = exported(bundle, layout.onnx)
    if engine.int8:
        model = quantized(bundle, model, layout.onnx_int8, calibration)
    if engine.engine == "openvino":
        return OpenVinoRuntime(model, name, threads, engine.bf16)
    return OnnxRuntime(model, name, threads)


def _has_engine(package: str) -> bool:
    """Whether the engine's package imports, and onnxruntime, which checks every export and
    makes the int8 model."""
    try:
        __import__(package)
        __import__("onnxruntime")
    except ImportError:
        return False
    return True
