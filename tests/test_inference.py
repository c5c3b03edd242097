import numpy as np
import pytest
import torch
from PIL import Image

from facegender.torchmodels import TorchResNetModel
from facegender.inference import Classifier, annotate, expand_inputs
from facegender.model import build_model

from conftest import shared

META = {"classes": ["female", "male"], "preprocessing": {"image_size": 128}, "threshold": 0.5, "temperature": 2.0}


def resnet():
    return TorchResNetModel(build_model("none"), META, torch.device("cpu"), "fp32")


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return Classifier(resnet(), META, detect=False)


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


def _two_faces(tmp_path):
    """Two real portraits side by side on a grey canvas, at known places."""
    faces = sorted((shared("scut_fbp5500") / "img").iterdir())[:2]
    canvas = Image.new("RGB", (700, 400), (128, 128, 128))
    canvas.paste(Image.open(faces[0]).convert("RGB").resize((300, 300)), (20, 50))
    canvas.paste(Image.open(faces[1]).convert("RGB").resize((150, 150)), (450, 125))
    path = tmp_path / "two.png"
    canvas.save(path)
    return path


def test_every_detected_face_gets_a_prediction_with_its_box(tmp_path):
    torch.manual_seed(0)
    clf = Classifier(resnet(), META, detect=True)
    path = _two_faces(tmp_path)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (200, 200, 200)).save(blank)
    preds = clf.predict([path, blank])
    assert [(p.source, p.faces, p.face) for p in preds] == [(str(path), 2, 1), (str(path), 2, 2), (str(blank), 0, None)]
    big, small = preds[0].box, preds[1].box
    assert 20 <= big[0] < big[2] <= 320 and 450 <= small[0] < small[2] <= 600  # largest first, where pasted
    assert preds[2].label is None and preds[2].error is None  # no face is an answer, not an error
    drawn = annotate(Image.open(path).convert("RGB"), preds[:2])
    assert drawn.size == (700, 400) and drawn.tobytes() != Image.open(path).convert("RGB").tobytes()


def test_min_confidence_turns_weak_guesses_into_uncertain(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    sure = Classifier(resnet(), META, detect=False)
    cautious = Classifier(sure.model, META, detect=False, min_confidence=0.99)
    for a, b in zip(sure.predict(images), cautious.predict(images)):
        assert b.label == ("uncertain" if a.confidence < 0.99 else a.label) and b.p_male == a.p_male


def test_annotate_enlarges_a_thumbnail_so_its_labels_fit(tmp_path):
    """A 64x48 photo's label in the smallest legible type would be wider than the photo: it is drawn on a copy
    enlarged by a whole factor, its box scaled with it."""
    from facegender.inference import ANNOTATED_MIN_SIDE, Prediction

    thumb = Image.new("RGB", (64, 48), (90, 90, 90))
    face = Prediction("thumb.jpg", faces=1, face=1, box=(20.0, 14.0, 44.0, 38.0), label="female", confidence=0.97)
    drawn = annotate(thumb, [face])
    f = -(-ANNOTATED_MIN_SIDE // 64)
    assert drawn.size == (64 * f, 48 * f) and f > 1
    colour = np.array([230, 60, 140])
    pixels = np.asarray(drawn).astype(int)
    assert (np.abs(pixels[38 * f - 1, 30 * f] - colour) < 8).all()  # the box's lower edge, scaled
    # the label's band (above the box, or below it at the top edge) lies within the drawn image
    band = np.argwhere((np.abs(pixels - colour) < 8).all(axis=2))
    assert band[:, 1].max() < drawn.width and band[:, 1].min() >= 20 * f - 1
    # a photo of ANNOTATED_MIN_SIDE px and more is drawn on at its own size
    assert annotate(thumb.resize((ANNOTATED_MIN_SIDE, 300)), []).size == (ANNOTATED_MIN_SIDE, 300)


def test_the_annotate_help_gives_the_side_under_which_a_photo_is_enlarged(capsys):
    """``cli`` keeps its imports light for start-up, so its help writes the side out: it must stay the one used."""
    from facegender.cli import main
    from facegender.inference import ANNOTATED_MIN_SIDE

    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert f"one under {ANNOTATED_MIN_SIDE} px enlarged" in " ".join(capsys.readouterr().out.split())
