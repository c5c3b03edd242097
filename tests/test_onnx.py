"""ONNX export of the bundled model and the onnxruntime backend, checked against PyTorch on real faces."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import shared
from facegender.cli import main
from facegender.data import load_samples_many
from facegender.export import export_model
from facegender.inference import BUNDLED_MODELS, Classifier
from facegender.io import UserError
from facegender.transforms import eval_batch

import torch


@pytest.fixture(scope="module")
def check_data(tmp_path_factory):
    """A tiny prepared-layout dataset of real faces for ``export --check``."""
    data = tmp_path_factory.mktemp("check")
    for split, faces in (("test", real_faces()[:4]), ("val", real_faces()[-4:])):  # val: int8 calibration
        for cls in ("female", "male"):
            (data / split / cls).mkdir(parents=True)
            for i, p in enumerate(faces):
                Image.open(p).convert("RGB").save(data / split / cls / f"{i}.png")
    return data


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, check_data):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(BUNDLED_MODELS["resnet18"]), str(out), "--check", str(check_data)]) == 0
    return out


def real_faces() -> list:
    """Faces of all three corpora, in their own framings (the model's input is a whole image here)."""
    picks = [sorted(shared("utkface").glob("*.jpg"))[::1500], sorted((shared("celeba") / "img").glob("*.jpg"))[::1100],
             sorted((shared("scut_fbp5500") / "img").glob("*.jpg"))[::350]]
    return [p for paths in picks for p in paths]


def test_the_graph_carries_the_contract_and_any_batch_size(onnx_file):
    model = onnx.load(str(onnx_file))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["facegender"])
    assert meta["classes"] == ["female", "male"] and json.loads(props["classes"]) == meta["classes"]
    assert int(props["image_size"]) == 128 and json.loads(props["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(props["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert float(props["threshold"]) == 0.5 and float(props["temperature"]) == pytest.approx(meta["temperature"])
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        logit, p_male = session.run(None, {"input": np.zeros((n, 3, 128, 128), np.float32)})
        assert logit.shape == p_male.shape == (n, 1)


def test_onnxruntime_matches_pytorch_fp32_on_real_faces(onnx_file):
    images = real_faces()
    assert len(images) >= 30
    torch_clf = Classifier.from_checkpoint("resnet18", backend="torch", precision="fp32", detect=False)
    onnx_clf = Classifier.from_checkpoint(onnx_file, backend="onnxruntime", detect=False)
    expected = np.array([p.p_male for p in torch_clf.predict(images)])
    got = np.array([p.p_male for p in onnx_clf.predict(images, batch_size=7)])
    assert np.abs(got - expected).max() <= 1e-4
    assert 0.05 < (expected >= 0.5).mean() < 0.95  # real faces of both kinds, not one saturated answer
    # the graph's own calibrated output, as a user without facegender would read it
    batch = eval_batch(torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((128, 128),
                                                  Image.BILINEAR)) for p in images]))).contiguous().numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    p_male = session.run(["p_male"], {"input": batch})[0][:, 0]
    assert np.abs(p_male - expected).max() <= 1e-4


def test_predict_with_the_onnx_file_gives_pytorchs_answers(onnx_file, tmp_path):
    from skimage.data import astronaut

    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    rows = {}
    for name, args in {"torch": ["--model", "resnet18"], "onnx": [str(onnx_file)]}.items():
        out = tmp_path / f"{name}.csv"
        assert main(["predict", *args, str(photo), "--format", "csv", "--output", str(out)]) == 0
        rows[name] = list(csv.DictReader(out.open()))
    assert len(rows["onnx"]) == len(rows["torch"]) == 1
    (t,), (o,) = rows["torch"], rows["onnx"]
    assert o["label"] == t["label"] == "female" and o["box"] == t["box"]
    # the torch backend runs bf16 on CPUs that have it, so the two agree to bf16's precision here
    assert abs(float(o["p_male"]) - float(t["p_male"])) < 0.02


def test_the_onnxruntime_backend_runs_the_graph_shipped_with_the_bundled_resnet18():
    faces = real_faces()[:6]
    onnx_clf = Classifier.from_checkpoint("resnet18", backend="onnxruntime", detect=False)
    torch_clf = Classifier.from_checkpoint("resnet18", backend="torch", precision="fp32", detect=False)
    assert type(onnx_clf.model.network).__name__ == "ResNetGraph"  # the graph shipped with the bundled model
    got = [p.p_male for p in onnx_clf.predict(faces)]
    assert np.abs(np.array(got) - [p.p_male for p in torch_clf.predict(faces)]).max() <= 1e-4


@pytest.mark.parametrize("args, message", [
    (["export", str(BUNDLED_MODELS["resnet18"]), "{tmp}/model.bin"], "name it .safetensors or .onnx"),
    (["export", str(BUNDLED_MODELS["resnet18"]), "{tmp}/model.onnx", "--dtype", "float16"], "float32 only"),
    (["predict", "{tmp}/missing.onnx", "x.jpg"], "no such ONNX file"),
    (["predict", "--backend", "torch", "--model", "{tmp}/model.onnx", "x.jpg"], "onnxruntime backend"),
    (["predict", "{tmp}/fake.onnx", "x.jpg"], "not a readable ONNX file"),
])
def test_mistakes_get_one_line_and_no_file(args, message, tmp_path, capsys):
    (tmp_path / "fake.onnx").write_bytes(b"not a protobuf at all")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "model.bin").exists() and not (tmp_path / "model.onnx").exists()


def test_export_check_records_parity_and_refuses_a_graph_beyond_the_tolerance(onnx_file, check_data, tmp_path):
    meta = json.loads({p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}["facegender"])
    assert meta["export"]["checked_images"] == 8 and meta["export"]["max_probability_difference"] <= 1e-4
    bundled = json.loads(BUNDLED_MODELS["resnet18"].with_suffix(".json").read_text())
    assert meta["export"]["format"] == "onnx" and meta["temperature"] == bundled["temperature"]
    # zero tolerance: float32 in another runtime is never bit-identical, so the check must refuse
    with pytest.raises(UserError, match="not written"):
        export_model(BUNDLED_MODELS["resnet18"], tmp_path / "m.onnx", check=[str(check_data)], tolerance=0.0, log=lambda *_: None)
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- the descriptor model (the bundled default)


@pytest.fixture(scope="module")
def descriptor_onnx(tmp_path_factory, check_data):
    out = tmp_path_factory.mktemp("onnx") / "descriptor.onnx"
    assert main(["export", str(BUNDLED_MODELS["descriptor"]), str(out), "--check", str(check_data)]) == 0
    return out


@pytest.fixture(scope="module")
def detected():
    """The faces the bundled model's detector finds in real photos of the three corpora: (stub, chip) pairs."""
    clf = Classifier.from_checkpoint(precision="fp32")
    found = [pair for p in real_faces() for pair in clf.faces(str(p), p) if pair[1] is not None]
    assert len(found) >= 30
    return found


@pytest.fixture(scope="module")
def ensemble_checkpoint(tmp_path_factory):
    """An ensemble of the two bundled models, as `train --kind ensemble` would save it."""
    from facegender import checkpoint

    (resnet, resnet_meta), (head, head_meta) = (checkpoint.load_torch(BUNDLED_MODELS[k]) for k in ("resnet18", "descriptor"))
    meta = resnet_meta | {"kind": "ensemble", "head": head_meta["head"], "descriptor": head_meta["descriptor"],
                          "ensemble": {"weights": [0.4, 0.7], "bias": -0.1}}
    path = tmp_path_factory.mktemp("ensemble") / "ensemble.safetensors"
    checkpoint.save(path, resnet | head, meta)
    return path


def test_the_descriptor_graph_takes_chips_and_carries_its_contract(descriptor_onnx, detected):
    model = onnx.load(str(descriptor_onnx))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in model.metadata_props}
    bundled = json.loads(BUNDLED_MODELS["descriptor"].with_suffix(".json").read_text())
    assert props["kind"] == "descriptor" and int(props["chip_size"]) == 150 and float(props["chip_padding"]) == 0.25
    assert "shape_predictor_5_face_landmarks" in props["landmarks"] and "get_face_chip" in props["input"]
    assert json.loads(props["classes"]) == ["female", "male"] and float(props["threshold"]) == 0.5
    assert float(props["temperature"]) == pytest.approx(bundled["temperature"])
    export = json.loads(props["facegender"])["export"]
    assert export["checked_images"] == 8 and export["max_probability_difference"] <= 1e-4
    (chips,) = model.graph.input
    assert chips.name == "chips" and chips.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert chips.type.tensor_type.shape.dim[0].dim_param  # any batch size
    # run as a user without facegender would: chips in, calibrated P(male) and dlib's descriptor out
    from facegender.dlibnet import DescriptorNet

    batch = np.stack([chip for _, chip in detected])
    session = ort.InferenceSession(str(descriptor_onnx), providers=["CPUExecutionProvider"])
    torch_clf = Classifier.from_checkpoint(backend="torch", precision="fp32", detect=False)
    expected = torch_clf.probabilities(torch_clf.logits(batch))
    for n in (1, len(batch)):
        logit, p_male, descriptor = session.run(["logit", "p_male", "descriptor"], {"chips": batch[:n]})
        assert logit.shape == p_male.shape == (n, 1) and descriptor.shape == (n, 128)
        assert np.abs(p_male[:, 0] - expected[:n]).max() <= 1e-4
    reference = DescriptorNet.from_dat(device="cpu", precision="fp32").descriptors(batch)
    assert np.abs(descriptor - reference).max() <= 1e-4


def test_the_descriptor_graph_gives_pytorchs_answers_on_real_faces(descriptor_onnx, detected):
    torch_clf = Classifier.from_checkpoint(backend="torch", precision="fp32", detect=False)
    by_file = Classifier.from_checkpoint(descriptor_onnx, backend="onnxruntime", detect=False)
    in_memory = Classifier.from_checkpoint(backend="onnxruntime", detect=False)  # the bundled default, its shipped graph
    expected = np.array([p.p_male for p in torch_clf.classify(detected)])
    assert 0.05 < (expected >= 0.5).mean() < 0.95  # real faces of both kinds, not one saturated answer
    for clf in (by_file, in_memory):
        assert type(clf.model.extractor).__name__ == "DescriptorGraph"  # onnxruntime runs it, not torch
        got = [clf.classify(detected[i:i + 7]) for i in range(0, len(detected), 7)]
        assert np.abs(np.array([p.p_male for batch in got for p in batch]) - expected).max() <= 1e-4


def test_an_ensemble_runs_both_members_on_onnxruntime(ensemble_checkpoint, detected):
    paths = [stub.source for stub, _ in detected][:12]
    torch_clf = Classifier.from_checkpoint(ensemble_checkpoint, backend="torch", precision="fp32")
    onnx_clf = Classifier.from_checkpoint(ensemble_checkpoint, backend="onnxruntime")
    assert type(onnx_clf.model.resnet.network).__name__ == "ResNetGraph"  # converted on first use (cached)
    assert type(onnx_clf.model.descriptor.extractor).__name__ == "DescriptorGraph"
    expected, got = torch_clf.predict(paths), onnx_clf.predict(paths)
    assert [p.box for p in got] == [p.box for p in expected]
    assert np.abs(np.array([p.p_male for p in got]) - [p.p_male for p in expected]).max() <= 1e-4


def test_an_ensemble_is_not_exported_as_one_graph(ensemble_checkpoint, tmp_path, capsys):
    assert main(["export", str(ensemble_checkpoint), str(tmp_path / "e.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "export each member" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e.onnx").exists()


def test_predict_and_evaluate_take_the_descriptor_onnx_file(descriptor_onnx, check_data, tmp_path):
    from skimage.data import astronaut

    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    rows = {}
    for name, args in {"torch": [], "onnx": [str(descriptor_onnx)]}.items():
        out = tmp_path / f"{name}.csv"
        assert main(["predict", *args, str(photo), "--format", "csv", "--output", str(out)]) == 0
        rows[name] = list(csv.DictReader(out.open()))
    (t,), (o,) = rows["torch"], rows["onnx"]
    assert o["label"] == t["label"] == "female" and o["box"] == t["box"]
    assert abs(float(o["p_male"]) - float(t["p_male"])) <= 1e-4  # the descriptor model is fp32 in torch too
    # evaluate reads the .onnx file too, and scores the test split as PyTorch does
    assert main(["evaluate", str(descriptor_onnx), str(check_data), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    torch_clf = Classifier.from_checkpoint(backend="torch", precision="fp32", detect=False)
    logits, labels, _ = torch_clf.model.dataset_logits(load_samples_many([str(check_data)], "test"))
    assert report["run"]["kind"] == "descriptor" and report["count"] == len(labels) == 8
    assert report["accuracy"] == ((torch_clf.probabilities(logits) >= 0.5) == labels).mean()


def test_serve_runs_the_default_model_on_onnxruntime_with_torchs_answers(tmp_path):
    import httpx
    from skimage.data import astronaut

    from conftest import serving
    from facegender.inference import resolve_backend
    from facegender.serve import create_app

    assert resolve_backend("auto", None) == "onnxruntime"  # the bundled models ship their graphs
    assert resolve_backend("auto", "resnet18") == "onnxruntime" and resolve_backend("torch", None) == "torch"
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    (expected,) = Classifier.from_checkpoint(backend="torch", precision="fp32").predict([photo])
    with serving(create_app(Classifier.from_checkpoint(backend="onnxruntime"))) as server:
        r = httpx.post(f"{server.url}/v1/predict", files={"file": ("astronaut.png", photo.read_bytes())}, timeout=60)
    assert r.status_code == 200
    (got,) = r.json()["predictions"]
    assert got["label"] == expected.label == "female" and tuple(got["box"]) == expected.box
    assert abs(got["p_male"] - expected.p_male) <= 1e-4


def test_int8_export_is_calibrated_checked_and_labels_like_fp32(descriptor_onnx, check_data, detected, tmp_path):
    out = tmp_path / "int8.onnx"
    # 8 test faces: one changed answer is 12.5 points, which --tolerance 13 lets through
    assert main(["export", "descriptor", str(out), "--int8", str(check_data), "--check", str(check_data),
                 "--tolerance", "13"]) == 0
    export = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["facegender"])["export"]
    assert export["dtype"] == "int8" and export["calibration_images"] == 8 and export["checked_images"] == 8
    assert export["test_accuracy_fp32"] - export["test_accuracy_int8"] <= 13
    assert out.stat().st_size < 0.5 * descriptor_onnx.stat().st_size  # int8 weights
    fp32 = np.array([p.p_male for p in Classifier.from_checkpoint(descriptor_onnx, backend="onnxruntime").classify(detected)])
    int8 = np.array([p.p_male for p in Classifier.from_checkpoint(out, backend="onnxruntime").classify(detected)])
    assert 0 < np.abs(int8 - fp32).mean() < 0.05  # really quantised, and close
    assert ((int8 >= 0.5) == (fp32 >= 0.5)).mean() >= 0.9


def _library(folder: Path, name: str, needs: str | None = None) -> Path:
    """A real shared library built by the C compiler, linked against ``needs`` (a library built beside it)."""
    source = folder / f"{name}.c"
    source.write_text(f"int {name.replace('.', '_').replace('-', '_')}(void) {{ return 1; }}\n")
    out = folder / f"{name}.so" if needs is None else folder / "libonnxruntime_providers_cuda.so"
    # found beside it, as CUDA's libraries are where the loader looks
    link = [] if needs is None else [f"-L{folder}", "-Wl,--no-as-needed", f"-l{needs.removeprefix('lib')}", "-Wl,-rpath,$ORIGIN"]
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(source), *link], check=True, capture_output=True)
    return out


@pytest.mark.skipif(shutil.which("cc") is None or sys.platform != "linux", reason="needs a C compiler on Linux")
def test_a_gpu_build_without_its_cuda_libraries_runs_on_the_cpu_with_one_line(tmp_path):
    """onnxruntime-gpu lists CUDA whatever the machine has; where its provider library's CUDA dependencies are
    missing, the sessions leave CUDA out and one warning names what is missing. Here the provider library is a
    real one linked against a library that is then removed, as libcublasLt is missing on a machine without CUDA."""
    from facegender import onnx_model

    present, absent = tmp_path / "present", tmp_path / "absent"
    for folder in (present, absent):
        folder.mkdir()
        _library(folder, "libfakecublasLt")
        _library(folder, "provider", needs="libfakecublasLt")
    (absent / "libfakecublasLt.so").unlink()
    with pytest.warns(RuntimeWarning, match=r"cannot use CUDA here \(libfakecublasLt\.so is missing\).*CPU") as caught:
        assert onnx_model.cuda_missing(absent) == "libfakecublasLt.so"
        assert onnx_model.cuda_missing(absent) == "libfakecublasLt.so"  # decided once a process
    assert len(caught) == 1
    # (after: once loaded, a library of that name is the process's, wherever the next one asks for it)
    assert onnx_model.cuda_missing(present) is None  # it loads, and stays loaded for onnxruntime
    assert onnx_model.cuda_missing(tmp_path) is None  # no provider library there: onnxruntime's to find out
