"""The model that ships with the package: present, described, and right on real photos."""
import json
import pathlib

import numpy as np
import pytest
import skimage.data

from facegender.config import CLASSES
from facegender.data import load_samples
from facegender.inference import BUNDLED_MODEL, BUNDLED_MODELS, Classifier

ASTRONAUT = pathlib.Path(skimage.data.__file__).parent / "astronaut.png"  # public domain, NASA


@pytest.fixture(scope="module")
def bundled():
    return Classifier.from_checkpoint()


def test_the_default_is_the_descriptor_head_with_its_calibration_and_figures():
    meta = json.loads(BUNDLED_MODEL.with_suffix(".json").read_text())
    assert BUNDLED_MODEL == BUNDLED_MODELS["descriptor"] and meta["kind"] == "descriptor"
    assert meta["classes"] == ["female", "male"] and meta["threshold"] == 0.5 and 0.5 < meta["temperature"] < 2
    assert meta["descriptor"]["network"] == "dlib_face_recognition_resnet_model_v1.dat"
    assert sorted(meta["data"]) == ["celeba", "scut_fbp5500", "utkface"]
    assert set(meta["test_metrics"]["by_source"]) == {"celeba", "scut_fbp5500", "utkface"}
    assert meta["test_metrics"]["accuracy"] > 0.95
    assert meta["test_metrics"]["calibration"]["ece_after"] < 0.01


def test_the_bundled_resnet18_carries_its_recipe_calibration_and_figures():
    meta = json.loads(BUNDLED_MODELS["resnet18"].with_suffix(".json").read_text())
    assert meta.get("kind", "resnet18") == "resnet18"
    assert meta["classes"] == ["female", "male"] and meta["preprocessing"]["image_size"] == 128
    assert meta["export"]["dtype"] == "float16" and meta["export"]["max_probability_difference"] <= 1e-3
    assert meta["config"]["weights"] == "none" and 0.5 < meta["temperature"] < 2
    assert sorted(meta["data"]) == ["celeba", "scut_fbp5500", "utkface"]
    assert set(meta["test_metrics"]["by_source"]) == {"celeba", "scut_fbp5500", "utkface"}
    assert meta["test_metrics"]["accuracy"] > 0.9


def test_predict_without_a_checkpoint_uses_the_bundled_model(tmp_path):
    from test_cli import _cli

    result = _cli("predict", ASTRONAUT, "--annotate", tmp_path)
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["faces"] == 1 and row["label"] == "female" and row["confidence"] > 0.5
    x0, y0, x1, y1 = row["box"]
    assert 150 < x0 < x1 < 300 and 50 < y0 < y1 < 200  # her face, not the helmet or the badges
    assert (tmp_path / "astronaut.png").stat().st_size > 100_000


def test_predict_selects_a_bundled_model_by_name():
    from test_cli import _cli

    result = _cli("predict", "--model", "resnet18", ASTRONAUT)
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["label"] == "female" and row["faces"] == 1


def test_the_bundled_model_labels_real_photos_end_to_end(bundled, real_subsets):
    # Photos as files, through detection and the canonical crop, as a user would run them. Most of these
    # images were in the bundled model's training split, so this guards the pipeline, not the accuracy
    # (MODEL_CARD.md has the held-out figures).
    for name, folder in real_subsets.items():
        samples = load_samples(folder, None)[::4][:120]
        preds = {p.source: p for p in bundled.predict([s.path for s in samples]) if p.face in (None, 1)}
        found = [s for s in samples if preds[s.path].label is not None]
        assert len(found) >= 0.95 * len(samples), name
        accuracy = np.mean([preds[s.path].label == CLASSES[s.label] for s in found])
        assert accuracy > 0.9, f"{name}: {accuracy:.3f}"
