"""The imgsim command: help, one-paragraph errors, train -> index on a small folder, and index,
eval, serve and backup of a collection whose items are in PostgreSQL."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.cli import main
from index.folder import ITEMS_FILE
from index.gallery import GalleryIndex
from models.bundle import Bundle
from tests.servers import free_port, start_server
from tests.synthetic import noise_png


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "index", "serve", "demo"):
        assert f"imgsim {command}" in text


def test_errors_are_one_paragraph_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["train", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], capsys)
    assert code == 2
    assert "Traceback" not in err and "\n\n" not in err.strip()
    assert "is not a folder" in err and "one subfolder per class" in err


def test_offline_imagenet_weights_get_their_paragraph(
    shapes_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, _, err = run(
        ["index", str(shapes_dir), "--backbone", "resnet18", "--out", str(tmp_path / "idx")], capsys
    )
    assert code == 2 and "Traceback" not in err
    assert "resnet18-f37072fd.pth" in err and str(tmp_path / "torch") in err


def test_a_bundle_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["serve", "--model", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_then_index(
    shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle_dir = tmp_path / "bundle"
    tiny = ["--backbone", "resnet18", "--weights", "none", "--device", "cpu"]
    code, out, err = run(
        [
            "train",
            str(shapes_dir),
            "--out",
            str(bundle_dir),
            *tiny,
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--head",
            "linear",
            "--embed-dim",
            "16",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((bundle_dir / "config.json").read_text())["head"] == "linear"
    code, out, err = run(
        ["index", str(shapes_dir), "--model", str(bundle_dir), "--workers", "0", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    assert "indexed 40 images" in out
    bundle = Bundle.load(bundle_dir, "cpu")
    gallery = GalleryIndex.load(bundle_dir / "index", bundle.fingerprint)
    assert len(gallery) == 40 and gallery.dim == 16
    # Indexed by the default runtime (auto: an exported fp32 model on the CPU), each image's
    # PyTorch embedding finds its own file, as close as fp32 rounding leaves it.
    assert list(bundle_dir.glob("model.*onnx")) or list(bundle_dir.glob("*.xml"))
    paths = sorted(shapes_dir.rglob("*.png"))
    for path, hits in zip(paths, gallery.search(bundle.embed(paths), 1), strict=True):
        assert hits[0].path == str(path.resolve()) and hits[0].score > 1 - 1e-4


@pytest.mark.slow
def test_no_training_needed_imagenet_model_indexes_and_serves(
    shapes_dir: Path,
    tmp_path: Path,
    cached_resnet18: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    index_dir = tmp_path / "index-resnet18"
    code, out, err = run(
        [
            "index",
            str(shapes_dir / "star"),
            "--backbone",
            "resnet18",
            "--out",
            str(index_dir),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    assert "indexed 10 images" in out

    settings = Settings(backbone="resnet18", index_dir=index_dir, device="cpu")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["classes"] == 1000
        image = Image.open(shapes_dir / "star" / "star_004.png")
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)  # same pixels, other bytes than the file
        body = client.post("/similar?k=1", files={"file": ("s.png", buffer.getvalue())}).json()
        stored = client.get(body["neighbours"][0]["url"]).content
    assert stored == (shapes_dir / "star" / "star_004.png").read_bytes()
    assert body["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_options_and_their_defaults_come_from_the_training_config() -> None:
    from app.cli import DEMO_EPOCHS, build_parser
    from app.options import config_from
    from models.backbones import INSTALLED_BACKBONE
    from models.config import TrainConfig

    parser = build_parser()
    assert config_from(parser.parse_args(["train", "photos", "--out", "b"])) == TrainConfig()
    demo = config_from(parser.parse_args(["demo"]))
    assert demo == TrainConfig(backbone=INSTALLED_BACKBONE, epochs=DEMO_EPOCHS)
    tuned = parser.parse_args(
        ["train", "p", "--out", "b", "--no-probe", "--train-bn", "--lr", "0.01"]
    )
    assert config_from(tuned) == TrainConfig(probe=False, freeze_bn=False, lr=0.01)


@pytest.mark.slow
def test_a_collection_in_postgres_is_indexed_evaluated_served_and_backed_up(
    trained_bundle_dir: Path,
    shapes_dir: Path,
    tmp_path: Path,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """imgsim index --database, again with --rebuild, eval and classes --database, serve with
    IMGSIM_DATABASE_URL, and a backup that opens without the database."""
    index_dir = tmp_path / "index"
    fast = ["--device", "cpu", "--workers", "0", "--runtime", "torch"]
    where = ["--model", str(trained_bundle_dir), "--database", postgres_url]
    for again in ([], ["--rebuild"]):  # a rebuild is made aside and put in place
        code, out, err = run(
            ["index", str(shapes_dir), "--out", str(index_dir), *where, *fast, *again], capsys
        )
        assert code == 0, err
        assert "indexed 40 images" in out and "(items in postgresql://" in out
    assert not (index_dir / ITEMS_FILE).exists() and (index_dir / "snapshot.json").is_file()

    report = tmp_path / "eval"
    code, out, err = run(
        ["eval", str(shapes_dir), "--index", str(index_dir), "--out", str(report), *where, *fast],
        capsys,
    )
    assert code == 0, err
    gallery = json.loads((report / "report.json").read_text())["bundle"]["gallery"]
    assert gallery == f"index {index_dir} (40 images)"

    examples = tmp_path / "noise"
    examples.mkdir()
    (examples / "0.png").write_bytes(noise_png(0))
    code, out, err = run(
        [
            "classes",
            "add",
            "noise",
            str(examples),
            "--index",
            str(index_dir),
            *where,
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    assert "noise\tadded from 1 image(s)" in out

    port = free_port()
    env = {"IMGSIM_DATABASE_URL": postgres_url}
    server = start_server(trained_bundle_dir, index_dir, port, env, ["--runtime", "torch"])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/index").json()["size"] == 40
            assert client.get("/classes").json()["classes"][-1]["name"] == "noise"
            upload = [("files", ("new.png", noise_png(5), "image/png"))]
            response = client.post("/images", files=upload, data={"label": "new"})
            assert response.status_code == 201, response.text
            [added] = response.json()["images"]
            assert client.get(f"/images/{added['id']}").json()["label"] == "new"
    finally:
        server.terminate()
        server.wait(timeout=60)

    code, out, err = run(["backup", str(index_dir), str(tmp_path / "copy"), *where[2:]], capsys)
    assert code == 0, err
    assert "backed up 41 items" in out
    fingerprint = Bundle.load(trained_bundle_dir, "cpu").fingerprint
    copy = GalleryIndex.load(tmp_path / "copy", fingerprint)  # SQLite, no database
    assert len(copy) == 41 and copy.consistent() and copy.get(added["id"]).label == "new"
    copy.close()
