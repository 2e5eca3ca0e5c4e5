"""A bundle's config.json is checked when it is loaded: a bad one refuses to start, saying why."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from app.cli import main
from models.backbones import preprocessing_for
from models.bundle import Bundle, BundleConfig
from models.errors import BundleError
from models.network import build_net


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained resnet18 bundle with two classes, saved once."""
    config = BundleConfig(
        backbone="resnet18",
        classes=["cat", "dog"],
        preprocessing=preprocessing_for("resnet18"),
        embed_dim=8,
        threshold=0.5,
    )
    net = build_net("resnet18", 2, "none", embed_dim=8, head=config.head)
    directory = tmp_path_factory.mktemp("good") / "bundle"
    Bundle(config, net, "cpu").save(directory)
    return directory


Edit = Callable[[dict], None]


@pytest.fixture
def bad_bundle(good_bundle: Path, tmp_path: Path) -> Callable[[Edit], Path]:
    """A copy of the good bundle with its config.json edited."""

    def make(edit: Edit) -> Path:
        directory = tmp_path / "bad"
        shutil.copytree(good_bundle, directory)
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        edit(config)
        config_path.write_text(json.dumps(config))
        return directory

    return make


def _set(*path: str, value: object) -> Edit:
    def edit(config: dict) -> None:
        for key in path[:-1]:
            config = config[key]
        config[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_set("preprocessing", "crop_size", value=0), "preprocessing.crop_size: Input should be"),
        (_set("preprocessing", "std", value=[0.2, 0.0, 0.2]), "preprocessing.std.1: Input should"),
        (_set("preprocessing", "mean", value=[0.5, "x", 0.5]), "preprocessing.mean.1"),
        (_set("preprocessing", "interpolation", value="fuzzy"), "unknown interpolation 'fuzzy'"),
        (_set("preprocessing", "fit", value="zoom"), "unknown fit 'zoom'; choose one of: crop"),
        (_set("threshold", value="abc"), "threshold: Input should be a valid number"),
        (_set("threshold", value=1.5), "threshold: Input should be less than or equal to 1"),
        (_set("temperature", value=float("nan")), "temperature: Input should be a finite number"),
        (_set("temperature", value=0), "temperature: Input should be greater than 0"),
        (_set("colour", value="blue"), "colour: Unexpected keyword argument"),
        (_set("classes", value=[]), "classes: List should have at least 1 item"),
        (_set("classes", value=["cat", "cat"]), "classes must be unique; repeated: cat"),
        (_set("classes", value=["cat", 2]), "classes.1: Input should be a valid string"),
        (_set("backbone", value="vgg99"), "unknown backbone 'vgg99'"),
        (_set("head", value="mlp"), "unknown head 'mlp'"),
        (_set("embed_dim", value=-3), "embed_dim: Input should be greater than 0"),
        (lambda config: config.pop("preprocessing"), "preprocessing: Field required"),
        (_set("format", value=7), "has format 7"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(
    bad_bundle: Callable[[Edit], Path], edit: Edit, words: str
) -> None:
    directory = bad_bundle(edit)
    with pytest.raises(BundleError, match="config.json") as caught:
        Bundle.load(directory, "cpu")
    assert words in str(caught.value)


def test_the_good_bundle_loads(good_bundle: Path) -> None:
    bundle = Bundle.load(good_bundle, "cpu")
    assert bundle.config.threshold == 0.5 and bundle.config.classes == ["cat", "dog"]


def test_a_bundle_saved_before_fit_existed_crops(
    bad_bundle: Callable[[Edit], Path], good_bundle: Path
) -> None:
    """An old config.json has no preprocessing.fit: it keeps its centre crop and embeddings."""
    old = bad_bundle(lambda config: config["preprocessing"].pop("fit"))
    assert Bundle.load(old, "cpu").config.preprocessing.fit == "crop"
    assert Bundle.load(old, "cpu").fingerprint == Bundle.load(good_bundle, "cpu").fingerprint


@pytest.mark.parametrize(
    ("content", "words"), [("{not json", "cannot be read as JSON"), ("[1, 2]", "not an object")]
)
def test_a_config_that_is_not_a_json_object(
    good_bundle: Path, tmp_path: Path, content: str, words: str
) -> None:
    directory = tmp_path / "bad"
    shutil.copytree(good_bundle, directory)
    (directory / "config.json").write_text(content)
    with pytest.raises(BundleError, match=words):
        Bundle.load(directory, "cpu")


def test_a_missing_config_is_named(good_bundle: Path, tmp_path: Path) -> None:
    directory = tmp_path / "bad"
    shutil.copytree(good_bundle, directory)
    (directory / "config.json").unlink()
    with pytest.raises(BundleError, match="needs config.json"):
        Bundle.load(directory, "cpu")


@pytest.mark.parametrize("command", ["serve", "index", "eval"])
def test_the_cli_refuses_a_bad_bundle_in_one_paragraph(
    bad_bundle: Callable[[Edit], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    directory = bad_bundle(_set("preprocessing", "crop_size", value=0))
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")  # never read: the bundle is refused first
    argv = {
        "serve": ["serve", "--model", str(directory), "--device", "cpu"],
        "index": ["index", str(tmp_path / "images"), "--model", str(directory), "--device", "cpu"],
        "eval": ["eval", str(tmp_path / "images"), "--model", str(directory), "--device", "cpu"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imgsim {command}: ") and "Traceback" not in err
    assert "\n\n" not in err.strip() and "preprocessing.crop_size" in err
