"""Face descriptors, the descriptor head, the ensemble and distillation: real faces, real models."""
import importlib.util
import json
import os
import pathlib
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from facegender import chips, descriptors, descriptor_runtime, onnx_model
from facegender.config import load_config
from facegender.data import load_samples, prepare_csv
from facegender.detect import LANDMARK_MODEL, FaceDetector, packaged_model
from facegender.evaluate import evaluate_checkpoint
from facegender.heads import train_descriptor_head, train_ensemble
from facegender.inference import Classifier
from facegender.io import UserError
from facegender.train import distillation_loss, train

from conftest import scut_subset

ASTRONAUT = pathlib.Path(skimage.data.__file__).parent / "astronaut.png"
quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def scut_small(tmp_path_factory) -> pathlib.Path:
    """Every 20th SCUT-FBP5500 portrait (275 faces, both classes, both races), prepared with landmarks."""
    root = tmp_path_factory.mktemp("scut_small")
    prepare_csv(scut_subset(root, 20), root / "prepared")
    return root / "prepared"


@pytest.fixture(scope="module")
def descriptor_run(scut_small, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("descriptor") / "run"
    train_descriptor_head(load_config(weights="none"), [str(scut_small)], out, **quiet)
    return out


def test_the_chip_from_stored_landmarks_is_dlibs_own_chip():
    import dlib

    image = Image.open(ASTRONAUT).convert("RGB")
    (face,) = FaceDetector("hog").detect(image)  # compared with HOG's own detection and landmarks below
    flat = [v for p in face.points for v in p]
    a = np.asarray(image)
    hog = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(str(packaged_model(LANDMARK_MODEL)))(a, hog(a, 0)[0])  # 512 px: the detector runs unupsampled
    expected = dlib.get_face_chip(a, shape, size=150, padding=0.25)
    assert np.array_equal(chips.chip(image, flat), expected)
    assert chips.chip(image, None).shape == (150, 150, 3)  # no landmarks: the whole image


def test_descriptors_are_cached_by_content_and_a_lost_shard_is_recomputed(scut_small, tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "cache"))
    samples = load_samples(scut_small, "val")
    calls = []
    extractor = descriptors.default_extractor()
    counting = type("Counting", (), {"name": extractor.name,
                                     "__call__": lambda self, chips: calls.append(len(chips)) or extractor(chips)})()
    first = descriptors.cached_descriptors(samples, workers=1, extractor=counting, progress=False)
    assert sum(calls) == len(samples) and len(first.good) == len(samples)
    norms = np.linalg.norm(first.vectors, axis=1)
    assert (norms > 0.2).all() and (norms < 2).all()  # real descriptors, not zeros
    calls.clear()
    again = descriptors.cached_descriptors(samples[::-1], workers=1, extractor=counting, progress=False)
    assert calls == [] and np.array_equal(again.vectors[::-1], first.vectors)  # keyed by content, not position
    shards = sorted((tmp_path / "cache" / "descriptors" / extractor.name).glob("shard-*.npz"))
    shards[0].unlink()  # as if the run had been killed before writing it
    # ... and while writing it: its temporary file stays, and goes once older than any write takes
    stale, fresh = (shards[0].parent / f".{shards[0].name}.{n}.tmp" for n in ("a1", "b2"))
    for tmp in (stale, fresh):
        tmp.write_bytes(b"half a shard")
    old = time.time() - descriptors.STALE_SHARD - 60
    os.utime(stale, (old, old))
    descriptors.cached_descriptors(samples, workers=1, extractor=counting, progress=False)
    assert 0 < sum(calls) <= descriptors.SHARD_SIZE
    assert not stale.exists() and fresh.exists()


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="OpenVINO is not installed (pip install 'facegender[openvino]')")
def test_descriptors_a_failed_runtime_left_to_onnxruntime_are_cached_as_float32s(scut_small, tmp_path, monkeypatch):
    """A graph named for OpenVINO's bf16 descriptors whose OpenVINO cannot start computes float32's on
    onnxruntime instead: they go under float32's name, never among bf16's."""
    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(descriptor_runtime, "native_bf16", lambda: True)  # the name bf16 gives; it never runs here
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    network = onnx_model.descriptor_network(1)
    graph = onnx_model.DescriptorGraph(network.session, network.key, descriptor_runtime.OpenVINONetwork(broken, "broken"))
    bf16_name, float32_name = graph.name, f"onnx-{network.key}"
    assert bf16_name == float32_name + "-bf16"
    samples = load_samples(scut_small, "val")
    with pytest.warns(RuntimeWarning, match="descriptors on onnxruntime instead of MNN or OpenVINO"):
        got = descriptors.cached_descriptors(samples, workers=1, extractor=graph, progress=False)
    assert graph.fast is None and graph.name == float32_name
    folder = tmp_path / "cache" / "descriptors"
    assert list((folder / float32_name).glob("shard-*.npz")) and not list((folder / bf16_name).glob("shard-*.npz"))
    chips_ = np.stack([descriptors._chip_of((s.path, s.landmarks))[0] for s in samples[:4]])
    np.testing.assert_array_equal(got.vectors[:4], network.session.run(["descriptor"], {"chips": chips_})[0])


def test_a_descriptor_head_is_a_real_model_everywhere(descriptor_run, scut_small, tmp_path):
    meta = json.loads((descriptor_run / "best.json").read_text())
    assert meta["kind"] == "descriptor" and meta["head"]["model"] in ("logistic regression", "MLP, 256 hidden units")
    assert meta["descriptor"]["network"] == "dlib_face_recognition_resnet_model_v1.dat"
    trained = json.loads((descriptor_run / "metrics.json").read_text())
    assert trained["accuracy"] > 0.85 and trained["run"]["kind"] == "descriptor"
    evaluated = evaluate_checkpoint(descriptor_run, [str(scut_small)], out=tmp_path / "eval", **quiet)
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])
    (astronaut,) = Classifier.from_checkpoint(descriptor_run).predict([ASTRONAUT])
    assert astronaut.faces == 1 and astronaut.label == "female" and astronaut.confidence > 0.5


def test_evaluate_names_why_it_skipped_a_file(descriptor_run, scut_small, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    rows = (scut_small / "manifest.csv").read_text().splitlines()
    header = rows[0].split(",")
    extra = dict.fromkeys(header, "") | {"path": str(broken), "label": "female", "split": "test", "source": "scut"}
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows + [",".join(extra[k] for k in header)]) + "\n")
    metrics = evaluate_checkpoint(descriptor_run, [str(manifest)], out=tmp_path / "eval", **quiet)
    assert metrics["run"]["skipped_files"] == 1
    ((path, reason),) = metrics["run"]["skipped_examples"].items()
    assert path == str(broken) and "not an image" in reason  # the decoder's own words, not a generic one


def test_an_ensemble_combines_a_resnet_and_a_descriptor_head(descriptor_run, scut_small, tmp_path):
    resnet = tmp_path / "resnet"
    train(load_config(weights="none", epochs=1, batch_size=32, workers=2), [str(scut_small)], resnet, **quiet)
    out = tmp_path / "ensemble"
    metrics = train_ensemble(load_config(weights="none"), [str(scut_small)], out, [str(descriptor_run), str(resnet)],
                             **quiet)
    meta = json.loads((out / "best.json").read_text())
    assert meta["kind"] == "ensemble" and len(meta["ensemble"]["weights"]) == 2
    assert meta["ensemble"]["weights"][1] > 0  # the descriptor head carries weight
    assert metrics["accuracy"] > 0.8
    (astronaut,) = Classifier.from_checkpoint(out).predict([ASTRONAUT])
    assert astronaut.label in ("female", "male") and astronaut.box is not None
    with pytest.raises(UserError, match="one resnet18 and one descriptor"):
        train_ensemble(load_config(weights="none"), [str(scut_small)], tmp_path / "bad", [str(resnet), str(resnet)])


def test_distillation_pulls_towards_the_teacher_and_ignores_missing_targets():
    logits = torch.zeros(4, requires_grad=True)
    teacher = torch.tensor([4.0, -4.0, float("nan"), 0.0])
    loss = distillation_loss(logits, teacher, temperature=2.0)
    loss.backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # descent raises logit 0 and lowers logit 1, as the teacher says
    assert logits.grad[2] == 0 and abs(logits.grad[3]) < 1e-7  # no target; and a teacher at 0.5 already matched
    assert torch.isfinite(loss)


def test_a_student_trains_from_a_teacher_checkpoint(synthetic_dataset, tmp_path):
    teacher = tmp_path / "teacher"
    config = dict(weights="none", epochs=1, batch_size=16, workers=2)
    train(load_config(**config), [str(synthetic_dataset)], teacher, **quiet)
    lines = []
    student = tmp_path / "student"
    train(load_config(**config, distill=str(teacher), distill_weight=0.7), [str(synthetic_dataset)], student,
          log=lines.append)
    assert any("distilling from" in line and "teacher logits for 96" in line for line in lines)
    assert json.loads((student / "best.json").read_text())["config"]["distill_weight"] == 0.7
