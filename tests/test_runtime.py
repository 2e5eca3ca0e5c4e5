"""The exported paths (ONNX Runtime, OpenVINO) answer as the PyTorch one does: same classes, same
neighbours."""

from __future__ import annotations

import gc
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from pydantic import ValidationError

from app.cli import main
from app.main import create_app
from app.service import load_service
from app.settings import Settings
from models import export
from models.bundle import Bundle
from models.data import find_images
from models.errors import BundleError
from models.export import FINGERPRINT_KEY, INT8_RECIPE, RECIPE_KEY
from models.layout import BundleLayout
from models.runtime import RUNTIMES, check_runtime
from tests.synthetic import noise_png

EMBEDDING_TOLERANCE = 1e-4  # fp32 ONNX against eager PyTorch, on L2-normalised embeddings


@pytest.fixture
def bundle_dir(trained_bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle, so exports land in this test's folder."""
    return Path(shutil.copytree(trained_bundle_dir, tmp_path / "bundle"))


def _images(shapes_dir: Path) -> list[Path | bytes]:
    return [*find_images(shapes_dir), *(noise_png(seed) for seed in range(6))]


def _neighbours(embeddings: np.ndarray, k: int = 5) -> np.ndarray:
    scores = embeddings @ embeddings.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_fp32_export_gives_the_classes_and_neighbours_of_pytorch(
    bundle_dir: Path, shapes_dir: Path, runtime: str
):
    images = _images(shapes_dir)
    reference = Bundle.load(bundle_dir, "cpu")
    assert reference.runtime.name == "torch"
    exported = Bundle.load(bundle_dir, "cpu")
    assert exported.use_runtime(runtime) == runtime
    assert BundleLayout(bundle_dir).onnx.is_file()
    expected, got = reference.encode(images), exported.encode(images)
    assert got.embeddings.dtype == np.float32 and got.embeddings.shape == expected.embeddings.shape
    assert np.abs(got.embeddings - expected.embeddings).max() < EMBEDDING_TOLERANCE
    assert (got.logits.argmax(1) == expected.logits.argmax(1)).all()
    assert (_neighbours(got.embeddings) == _neighbours(expected.embeddings)).all()
    # one image at a time (batch 1 through the dynamic batch axis), through classify
    probabilities, embedding = exported.classify(images[0])
    assert probabilities.shape == (1, len(exported.config.classes))
    assert np.abs(embedding - expected.embeddings[:1]).max() < EMBEDDING_TOLERANCE


def test_auto_is_openvino_on_the_cpu_and_the_service_uses_it(bundle_dir: Path, monkeypatch):
    service = load_service(Settings(bundle_dir=bundle_dir, device="cpu"))
    assert service.bundle.runtime.name == "openvino"
    monkeypatch.setattr("models.runtime._has_engine", lambda package: package != "openvino")
    assert Bundle.load(bundle_dir, "cpu").use_runtime("auto") == "onnx"  # without openvino
    monkeypatch.undo()
    torch_service = load_service(Settings(bundle_dir=bundle_dir, device="cpu", runtime="torch"))
    assert torch_service.bundle.runtime.name == "torch"


def test_only_the_inference_thread_runs_torch_on_several_threads(bundle_dir: Path):
    """One OpenMP team in the process: the forward's (all the threads when torch runs the
    model, one beside ONNX Runtime); loading, decoding and preprocessing run torch on one."""
    before = torch.get_num_threads()
    try:
        for runtime, expected in (("onnx", 1), ("openvino", 1), ("torch", 2)):
            settings = Settings(bundle_dir=bundle_dir, device="cpu", runtime=runtime, threads=2)
            service = load_service(settings)
            seen: dict[str, list[int]] = {"forward": [], "preprocess": []}
            for name in seen:
                _record_threads(service.bundle, name, seen[name])
            with TestClient(create_app(settings, service)) as client:
                upload = {"file": ("x.png", noise_png(0), "image/png")}
                assert client.post("/classify", files=upload).status_code == 200
                assert _torch_threads_of_a_new_thread() == 1
            assert seen == {"forward": [expected], "preprocess": [1]}, runtime
    finally:
        torch.set_num_threads(before)


def _record_threads(bundle: Bundle, method: str, seen: list[int]) -> None:
    """Record torch's intra-op threads in the thread that calls bundle.<method>."""
    original = getattr(bundle, method)

    def recorded(*args):
        seen.append(torch.get_num_threads())
        return original(*args)

    setattr(bundle, method, recorded)


def _torch_threads_of_a_new_thread() -> int:
    """torch's intra-op threads as a thread started now sees them (each thread takes the
    process setting when it first runs a torch op)."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_a_read_only_bundle_keeps_its_export_in_the_cache(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    access = os.access  # the bundle folder as on a read-only mount (root may write anywhere)
    monkeypatch.setattr(
        os, "access", lambda path, mode: access(path, mode) and Path(path) != bundle_dir
    )
    monkeypatch.setenv("IMGSIM_CACHE_DIR", str(tmp_path / "cache"))
    BundleLayout(bundle_dir).onnx.unlink(missing_ok=True)  # an earlier test's, copied along
    first = Bundle.load(bundle_dir, "cpu")
    first.use_runtime("onnx")
    cached = tmp_path / "cache" / "exports" / first.fingerprint / "model.onnx"
    assert cached.is_file() and not BundleLayout(bundle_dir).onnx.exists()
    made = cached.stat().st_mtime_ns
    again = Bundle.load(bundle_dir, "cpu")
    again.use_runtime("onnx")
    assert cached.stat().st_mtime_ns == made  # the next start reuses it
    image = noise_png(2)
    expected = Bundle.load(bundle_dir, "cpu").encode(image).logits
    assert np.abs(again.encode(image).logits - expected).max() < 1e-3


def test_the_pretrained_models_exports_go_to_the_cache_or_else_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    pretrained = SimpleNamespace(directory=None, fingerprint="0123456789abcdef")  # no folder
    monkeypatch.setenv("IMGSIM_CACHE_DIR", str(tmp_path / "cache"))
    assert export.export_folder(pretrained) == tmp_path / "cache" / "exports" / "0123456789abcdef"
    blocked = tmp_path / "a-file"  # a cache that cannot be made, even by root
    blocked.write_text("")
    monkeypatch.setenv("IMGSIM_CACHE_DIR", str(blocked))
    folder = export.export_folder(pretrained)
    assert folder.is_dir() and os.access(folder, os.W_OK) and blocked not in folder.parents
    assert "cannot be written: the exports are made in a temporary folder" in caplog.text


def test_an_export_of_other_weights_is_made_again(bundle_dir: Path):
    first = Bundle.load(bundle_dir, "cpu")
    first.use_runtime("onnx")
    path = BundleLayout(bundle_dir).onnx
    made = path.stat().st_mtime_ns
    Bundle.load(bundle_dir, "cpu").use_runtime("onnx")
    assert path.stat().st_mtime_ns == made  # same weights: reused

    retrained = Bundle.load(bundle_dir, "cpu")
    with torch.no_grad():
        retrained.net.classifier.weight.mul_(-1.0)  # a different model, same architecture
    Bundle(retrained.config, retrained.net, "cpu").save(bundle_dir)
    again = Bundle.load(bundle_dir, "cpu")
    assert again.fingerprint != first.fingerprint
    again.use_runtime("onnx")
    assert _recorded_fingerprint(path) == again.fingerprint
    image = noise_png(1)
    expected = Bundle.load(bundle_dir, "cpu").encode(image).logits
    assert np.abs(again.encode(image).logits - expected).max() < 1e-3


def _recorded_fingerprint(path: Path) -> str | None:
    return _recorded(path, FINGERPRINT_KEY)


def _recorded(path: Path, key: str) -> str | None:
    import onnx

    model = onnx.load(str(path))
    return next((p.value for p in model.metadata_props if p.key == key), None)


def test_an_unknown_runtime_is_refused_with_the_valid_names(capsys: pytest.CaptureFixture):
    with pytest.raises(ValueError, match="choose one of: auto, torch, onnx, onnx-int8, openvino"):
        check_runtime("tensorrt")
    with pytest.raises(ValidationError, match="onnx-int8"):
        Settings(runtime="tensorrt")
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--runtime", "tensorrt"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and all(name in err for name in RUNTIMES)


def test_int8_without_calibration_images_says_what_to_do(tmp_path: Path, capsys):
    bundle = Bundle.pretrained("resnet18", "none", "cpu")  # records no training folder
    bundle.save(tmp_path / "plain")
    with pytest.raises(BundleError, match="--calibration"):
        Bundle.load(tmp_path / "plain", "cpu").use_runtime("onnx-int8")
    assert main(["quantize", str(tmp_path / "plain")]) == 2
    assert "imgsim quantize BUNDLE --calibration DATA_DIR" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx-int8", "openvino-int8"])
def test_int8_is_calibrated_on_the_training_images_and_mostly_agrees(
    bundle_dir: Path, shapes_dir: Path, runtime: str
):
    images = find_images(shapes_dir)
    expected = Bundle.load(bundle_dir, "cpu").encode(images)
    int8 = Bundle.load(bundle_dir, "cpu")
    assert int8.config.extra["data_dir"] == str(shapes_dir.resolve())  # recorded at training
    assert int8.use_runtime(runtime) == runtime
    assert _recorded_fingerprint(BundleLayout(bundle_dir).onnx_int8) == int8.fingerprint
    got = int8.encode(images)
    agreement = (got.logits.argmax(1) == expected.logits.argmax(1)).mean()
    assert agreement >= 0.8, agreement
    cosines = (got.embeddings * expected.embeddings).sum(1)
    assert np.median(cosines) > 0.95, np.median(cosines)


@pytest.mark.slow
def test_int8_with_8_bit_weights_is_made_again_where_they_would_saturate(
    bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """A bundle quantised on a CPU with VNNI (8-bit weights) and moved to one without is
    quantised again with 7-bit weights, which every CPU then keeps."""
    path = BundleLayout(bundle_dir).onnx_int8
    for vnni, recipe in ((True, INT8_RECIPE), (False, INT8_RECIPE + "-reduce-range")):
        monkeypatch.setattr(export, "_has_vnni", lambda vnni=vnni: vnni)
        Bundle.load(bundle_dir, "cpu").use_runtime("onnx-int8")
        assert _recorded(path, RECIPE_KEY) == recipe
    made = path.stat().st_mtime_ns
    monkeypatch.setattr(export, "_has_vnni", lambda: True)
    Bundle.load(bundle_dir, "cpu").use_runtime("onnx-int8")
    assert path.stat().st_mtime_ns == made  # 7-bit weights run well with VNNI too: reused


@pytest.mark.slow
def test_quantize_command_with_a_calibration_folder(
    tmp_path: Path, shapes_dir: Path, capsys: pytest.CaptureFixture
):
    Bundle.pretrained("resnet18", "none", "cpu").save(tmp_path / "plain")
    assert main(["quantize", str(tmp_path / "plain"), "--calibration", str(shapes_dir)]) == 0
    assert "--runtime openvino-int8" in capsys.readouterr().out
    assert BundleLayout(tmp_path / "plain").onnx_int8.is_file()


def test_bf16_agrees_with_fp32_or_is_refused_on_a_cpu_without_it(
    bundle_dir: Path, shapes_dir: Path
):
    """bfloat16 where the CPU computes it (AMX, AVX512-BF16); elsewhere OpenVINO would quietly
    run fp32 under the bf16 name, so the runtime is refused, saying what to use instead."""
    images = _images(shapes_dir)
    expected = Bundle.load(bundle_dir, "cpu").encode(images)
    bf16 = Bundle.load(bundle_dir, "cpu")
    try:
        bf16.use_runtime("openvino-bf16")
    except ValueError as err:
        assert "no bfloat16 instructions" in str(err) and "--runtime openvino" in str(err)
        return
    got = bf16.encode(images)
    assert (got.logits.argmax(1) == expected.logits.argmax(1)).mean() >= 0.9
    cosines = (got.embeddings * expected.embeddings).sum(1)
    assert cosines.min() > 0.99, cosines.min()
    assert np.abs(got.embeddings - expected.embeddings).max() > EMBEDDING_TOLERANCE  # not fp32


def test_openvino_leaves_the_signal_stack_as_it_was(bundle_dir: Path):
    """OpenVINO's CPU plugin swaps in a signal stack of its own and puts back the one it found
    when destroyed; runtimes dropped out of order left a freed stack in place, and the test
    run died of SIGSEGV at the next SIGCHLD. Opening and dropping runtimes changes nothing."""
    before = _signal_stack()
    first = Bundle.load(bundle_dir, "cpu")
    first.use_runtime("openvino")
    second = Bundle.load(bundle_dir, "cpu")
    second.use_runtime("openvino-int8")
    assert _signal_stack() == before
    del first
    gc.collect()
    del second
    gc.collect()
    assert _signal_stack() == before


def _signal_stack() -> tuple[int | None, int]:
    """Where this thread's alternate signal stack is, and its bytes."""
    import ctypes

    class Stack(ctypes.Structure):
        _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

    current = Stack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current)) == 0
    return current.sp, current.size


def test_auto_runs_pytorch_when_the_export_fails(bundle_dir: Path, monkeypatch):
    def broken(bundle: Bundle, path: Path) -> Path:
        raise BundleError("the ONNX export differs from PyTorch")

    monkeypatch.setattr("models.runtime.exported", broken)
    assert Bundle.load(bundle_dir, "cpu").use_runtime("auto") == "torch"
    with pytest.raises(BundleError, match="differs"):
        Bundle.load(bundle_dir, "cpu").use_runtime("onnx")


def test_eval_measures_the_runtime_asked_for(bundle_dir: Path, shapes_dir: Path, tmp_path: Path):
    from app.stages import evaluate_folder

    reports = {
        name: evaluate_folder(
            shapes_dir, bundle_dir, tmp_path / name, use_index=False, device="cpu", runtime=name
        )
        for name in ("torch", "onnx")
    }
    assert BundleLayout(bundle_dir).onnx.is_file()
    assert reports["onnx"]["top1"] == reports["torch"]["top1"]
    assert reports["onnx"]["retrieval"] == pytest.approx(reports["torch"]["retrieval"])


@pytest.mark.parametrize("runtime", ["torch", "onnx", "openvino"])
def test_a_mirrored_bundle_embeds_an_image_and_its_mirror_alike(
    bundle_dir: Path, shapes_dir: Path, runtime: str
):
    """With the preprocessing's mirror set, every runtime embeds an image as the mean of it and
    its mirror image: the image and its mirror get one embedding, as in eager PyTorch."""
    plain = Bundle.load(bundle_dir, "cpu")
    config = plain.config
    plain.config = replace(config, preprocessing=replace(config.preprocessing, mirror=True))
    plain.save(bundle_dir)
    mirrored = Bundle.load(bundle_dir, "cpu")
    assert mirrored.use_runtime(runtime) == runtime
    square = Image.open(find_images(shapes_dir)[0]).convert("RGB").resize((224, 224))
    both = mirrored.embed([square, ImageOps.mirror(square)])
    np.testing.assert_allclose(both[0], both[1], atol=EMBEDDING_TOLERANCE)
    eager = Bundle.load(bundle_dir, "cpu").embed([square])
    np.testing.assert_allclose(both[:1], eager, atol=EMBEDDING_TOLERANCE)
    unmirrored = Bundle(config, plain.net, "cpu")
    apart = unmirrored.embed([square, ImageOps.mirror(square)])
    assert np.abs(apart[0] - apart[1]).max() > 10 * EMBEDDING_TOLERANCE
    # Another embedding function: an index or an export made without mirroring is not its own.
    assert mirrored.fingerprint != unmirrored.fingerprint
