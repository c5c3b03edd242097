"""The inference core: predict, serve, evaluate and Classifier without PyTorch, with the PyTorch path's answers.

`make test` runs these tests in `make test-core`'s clean environment, where only `pip install '.[serve]'` (then
`.[eval]`) is installed: there, what they check of a subprocess is checked of a real install without torch.
Those marked ``needs_train`` compare with PyTorch, and run in the development environment instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import serve_process, shared

from facegender.inference import BUNDLED_MODELS

HEAVY = ("torch", "torchvision", "sklearn", "scipy", "matplotlib")
EVAL_LIBRARIES = ("sklearn", "scipy", "matplotlib")  # evaluate's metrics and plots: the eval extra
# a subprocess where `import torch` fails as if it were not installed (in the core environment it is not)
WITHOUT_TORCH = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None\n"


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"PYTHONWARNINGS": "ignore"})


def loaded_after(call: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Which of HEAVY a fresh interpreter has imported after ``call`` (Python code using ``main``)."""
    done = run_python("import json, sys\nfrom facegender.cli import main\n" + call +
                      f"\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done


def real_photos(count: int = 4) -> list[Path]:
    return [p for corpus in (shared("utkface"), shared("celeba") / "img", shared("scut_fbp5500") / "img")
            for p in sorted(corpus.iterdir())[:count]]


@pytest.mark.parametrize("model", ["descriptor", "resnet18"])
def test_predict_never_imports_torch_or_the_evaluation_libraries(model, tmp_path):
    photos = " ".join(map(str, real_photos(2)))
    call = (f"rc = main(['predict', '--model', {model!r}, '--output', {str(tmp_path / 'out.jsonl')!r}, "
            f"'--annotate', {str(tmp_path / 'annotated')!r}, *{photos.split()!r}])\nassert rc == 0, rc")
    heavy, _ = loaded_after(call)
    assert heavy == []
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["label"] in ("female", "male") and r["faces"] == 1 for r in rows)
    assert len(list((tmp_path / "annotated").glob("*.png"))) == 6


def test_the_python_api_never_imports_torch():
    photo = real_photos(1)[0]
    heavy, done = loaded_after("from facegender.inference import Classifier\n"
                               f"preds = Classifier.from_checkpoint().predict([{str(photo)!r}])\n"
                               "print(preds[0].label, preds[0].p_male)")
    assert heavy == []
    label, p_male = done.stdout.split()[:2]
    assert label in ("female", "male") and 0 <= float(p_male) <= 1


def test_serve_never_loads_torch(tmp_path):
    """A real `facegender serve` process answers a prediction; its memory map shows no PyTorch library."""
    pytest.importorskip("fastapi", reason="the serving extra (fastapi) is not installed")
    with serve_process(tmp_path / "serve.log") as (url, server):
        photo = real_photos(1)[0]
        body = json.dumps({"image": __import__("base64").b64encode(photo.read_bytes()).decode()}).encode()
        request = urllib.request.Request(f"{url}/v1/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["predictions"][0]["label"] in ("female", "male")
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        for library in ("libtorch", "/torch/", "/torchvision/", "/sklearn/", "/scipy/", "/matplotlib/"):
            assert library not in maps, f"the server loaded {library}"


@pytest.mark.needs_eval
def test_evaluate_never_imports_torch(real_subsets, tmp_path):
    pytest.importorskip("sklearn", reason="the evaluation extra (scikit-learn) is not installed")
    out = tmp_path / "eval"
    heavy, done = loaded_after(f"rc = main(['evaluate', 'descriptor', {str(real_subsets['scut'])!r}, "
                               f"'--out', {str(out)!r}])\nassert rc == 0, rc")
    assert "torch" not in heavy and "torchvision" not in heavy
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["kind"] == "descriptor" and metrics["accuracy"] > 0.9
    assert {"confusion_matrix.png", "roc_curve.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("argv, extra", [
    (["train", "--data", "d", "--out", "o"], "train"),
    (["export", "descriptor", "m.onnx"], "train"),
])
def test_a_command_whose_extra_is_missing_says_which_in_one_line(argv, extra):
    done = run_python(WITHOUT_TORCH + f"from facegender.cli import main\nsys.exit(main({argv!r}))")
    assert done.returncode == 2
    assert done.stderr == (f"facegender {argv[0]} needs the training extra: pip install 'facegender[{extra}]'\n")


def test_your_own_descriptor_head_runs_without_torch_and_a_resnet18_says_to_export(tmp_path):
    """A user's descriptor checkpoint (here a copy of the bundled one) runs on the core; a ResNet18
    checkpoint, which needs PyTorch, stops with what to do."""
    head, resnet = tmp_path / "head.safetensors", tmp_path / "resnet.safetensors"
    shutil.copy(BUNDLED_MODELS["descriptor"], head)
    shutil.copy(BUNDLED_MODELS["resnet18"], resnet)
    photos = [str(p) for p in real_photos(2)]
    code = WITHOUT_TORCH + (
        "import json\nfrom facegender.inference import Classifier\n"
        f"mine = [p.p_male for p in Classifier.from_checkpoint({str(head)!r}).predict({photos!r})]\n"
        f"bundled = [p.p_male for p in Classifier.from_checkpoint().predict({photos!r})]\n"
        "print(json.dumps([mine, bundled]))\n"
        "from facegender.cli import main\n"
        f"sys.exit(main(['predict', {str(resnet)!r}, {photos[0]!r}]))")
    done = run_python(code)
    mine, bundled = json.loads(done.stdout.splitlines()[0])
    assert len(mine) == 6 and mine == bundled
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"facegender export {resnet} model.onnx" in done.stderr and "facegender[train]" in done.stderr


def _faces_of_every_corpus(clf) -> list:
    found = [pair for p in real_photos(12) for pair in clf.faces(str(p), p) if pair[1] is not None]
    assert len(found) >= 30
    return found


@pytest.mark.needs_train
@pytest.mark.parametrize("name", ["descriptor", "resnet18", "ensemble"])
def test_the_core_gives_the_pytorch_answers_on_real_faces(name, tmp_path, choose_runtime):
    """P(male) per face within 1e-4 of PyTorch's float32, for every bundled model (and an ensemble of
    the two, whose ResNet18 is converted to ONNX on first use), on onnxruntime: the graphs are the networks.
    (MNN's Winograd arithmetic moves P(male) up to 2e-4 more: tests/test_mnn.py holds it to onnxruntime's.)"""
    pytest.importorskip("torch", reason="PyTorch (the training extra) is needed to compare with its answers")
    from facegender.inference import Classifier

    choose_runtime("onnxruntime")

    model = name
    if name == "ensemble":
        from facegender import checkpoint

        (resnet, resnet_meta), (head, head_meta) = (checkpoint.load_torch(BUNDLED_MODELS[k])
                                                    for k in ("resnet18", "descriptor"))
        meta = resnet_meta | {"kind": "ensemble", "head": head_meta["head"], "descriptor": head_meta["descriptor"],
                              "ensemble": {"weights": [0.4, 0.7], "bias": -0.1}}
        model = tmp_path / "ensemble.safetensors"
        checkpoint.save(model, resnet | head, meta)
    from facegender.inference import resolve_backend

    # auto: the core for a bundled model; PyTorch, where installed, for a ResNet18 of your own
    assert resolve_backend("auto", model) == ("torch" if name == "ensemble" else "onnxruntime")
    core = Classifier.from_checkpoint(model, backend="onnxruntime")
    reference = Classifier.from_checkpoint(model, backend="torch", device="cpu", precision="fp32")
    assert type(core.model).__module__ == "facegender.facemodels"
    faces = _faces_of_every_corpus(core)
    inputs = [x for _, x in faces]
    got, want = (c.probabilities(c.logits(inputs)) for c in (core, reference))
    assert np.abs(got - want).max() < 1e-4
    assert 0.05 < (want >= 0.5).mean() < 0.95  # both classes among the faces: the comparison means something
