import numpy as np
import pytest
import torch
from PIL import Image

from facegender.inference import Classifier, expand_inputs
from facegender.model import build_model

META = {"classes": ["female", "male"], "preprocessing": {"image_size": 128}, "threshold": 0.5, "temperature": 2.0}


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return Classifier(build_model("none"), META, precision="fp32")


def test_paths_pil_images_and_arrays_agree(clf, tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (150, 120, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    by_path, by_pil, by_array = clf.predict([tmp_path / "a.png", Image.fromarray(array), array])
    assert by_path.p_male == pytest.approx(by_pil.p_male, abs=1e-7) == pytest.approx(by_array.p_male, abs=1e-7)
    assert by_path.source == str(tmp_path / "a.png") and by_pil.source == "<image 1>"


def test_confidence_is_the_calibrated_probability_of_the_label(clf, tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(10)]
    preds = clf.predict(images, batch_size=3)
    logits = clf.logits(torch.from_numpy(np.stack([np.asarray(Image.fromarray(i).resize((128, 128), Image.BILINEAR))
                                                   for i in images])))
    for p, z in zip(preds, logits):
        assert p.p_male == pytest.approx(1 / (1 + np.exp(-z / 2.0)), abs=1e-6)  # temperature 2 applied
        assert p.label == ("male" if p.p_male >= 0.5 else "female")
        assert p.confidence == pytest.approx(max(p.p_male, 1 - p.p_male))


def test_a_bad_file_gets_an_error_and_the_rest_are_predicted(clf, tmp_path):
    Image.new("RGB", (50, 50), "white").save(tmp_path / "ok.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"")
    preds = clf.predict([tmp_path / "ok.jpg", tmp_path / "bad.jpg", tmp_path / "missing.jpg", tmp_path / "ok.jpg"])
    assert [p.error is None for p in preds] == [True, False, False, True]
    assert "bad.jpg" in preds[1].error and "missing.jpg" in preds[2].error
    assert preds[0].p_male == preds[3].p_male


def test_folders_expand_to_their_images_in_order(tmp_path):
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.jpeg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.PNG", "b.jpg", "c.jpeg"]
