import json

import numpy as np
import pytest

from facegender.config import load_config
from facegender.export import export_model
from facegender.inference import Classifier
from facegender.train import train


@pytest.fixture(scope="module")
def run(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(load_config(weights="none", epochs=1), [str(synthetic_dataset)], out, log=lambda *_: None)
    return out


def _p_male(model, images):
    clf = Classifier.from_checkpoint(model, precision="fp32", detect=False)
    return np.array([p.p_male for p in clf.predict(images)])


def test_half_precision_export_keeps_predictions_and_drops_training_state(run, synthetic_dataset, tmp_path):
    out = tmp_path / "model.safetensors"
    report = export_model(run, out, check=[str(synthetic_dataset)], log=lambda *_: None)
    assert report["dtype"] == "float16" and report["checked_images"] == 32
    assert report["max_probability_difference"] <= 1e-3
    assert out.stat().st_size < 0.3 * (run / "last.safetensors").stat().st_size  # no optimizer, half the bytes
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["export"] == report and meta["classes"] == ["female", "male"]
    assert meta["data"] == [synthetic_dataset.name]  # names, not the training machine's paths
    images = sorted((synthetic_dataset / "test" / "female").iterdir())[:8]
    assert np.abs(_p_male(out, images) - _p_male(run, images)).max() <= 1e-3


def test_export_falls_back_to_float32_beyond_the_tolerance(run, synthetic_dataset, tmp_path):
    out = tmp_path / "model.safetensors"
    report = export_model(run, out, check=[str(synthetic_dataset)], tolerance=0.0, log=lambda *_: None)
    assert report["max_probability_difference"] > 0 and report["dtype"] == "float32"
    images = sorted((synthetic_dataset / "test" / "male").iterdir())[:8]
    assert np.array_equal(_p_male(out, images), _p_male(run, images))
