"""dlib's descriptor network on OpenVINO (``FACEGENDER_DESCRIPTOR_RUNTIME=openvino``, the ``openvino`` extra):
bfloat16 where the CPU computes it natively, float32 elsewhere; onnxruntime's answers within that precision."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_mnn import astronaut, chips  # noqa: F401 (chips: a fixture, real faces' chips)

from facegender import cpu, mnn_runtime, onnx_model
from facegender.inference import Classifier
from facegender.io import UserError

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO is not installed (pip install 'facegender[openvino]')")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@needs_openvino
def test_openvino_gives_onnxruntimes_descriptors_to_its_precision(chips, descriptor_runtime):  # noqa: F811
    descriptor_runtime("openvino")
    graph = onnx_model.descriptor_network(1)
    assert isinstance(graph.fast, mnn_runtime.OpenVINONetwork)
    on_openvino = graph.fast(chips)
    on_onnxruntime = graph.session.run(["descriptor"], {"chips": chips})[0]
    assert on_openvino.shape == on_onnxruntime.shape == (len(chips), 128)
    assert cosines(on_openvino, on_onnxruntime).min() > 0.9995
    if cpu.native_bf16():  # bf16 in the network: the descriptors move, and are cached under a name of their own
        assert graph.fast.precision == "bf16" and graph.name.endswith("-bf16")
        assert np.abs(on_openvino - on_onnxruntime).max() > 1e-4
    else:
        assert graph.fast.precision == "f32" and not graph.name.endswith("-bf16")
        np.testing.assert_allclose(on_openvino, on_onnxruntime, atol=1e-4)
    head = Classifier.from_checkpoint()
    p = [head.probabilities(head.model.head.logits(d)) for d in (on_openvino, on_onnxruntime)]
    assert ((p[0] >= 0.5) == (p[1] >= 0.5)).all() and np.abs(p[0] - p[1]).max() < 0.02


@needs_openvino
def test_predict_on_openvino_labels_a_folder_as_onnxruntime(tmp_path):
    photo = astronaut().resize((256, 256))
    folder = tmp_path / "photos"
    folder.mkdir()
    n = mnn_runtime.START_CHIPS  # one face each, one batch of faces: it starts OpenVINO
    for i in range(n):
        photo.rotate(i % 9 - 4).save(folder / f"astronaut{i:02d}.jpg", quality=95)
    rows = {}
    for name in ("openvino", "onnxruntime"):
        env = os.environ | {mnn_runtime.RUNTIME_ENV: name}
        done = subprocess.run([sys.executable, "-m", "facegender.cli", "predict", str(folder)], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        rows[name] = [json.loads(line) for line in done.stdout.splitlines()]  # nothing but rows on stdout
        assert len(rows[name]) == n
    for a, b in zip(rows["openvino"], rows["onnxruntime"]):
        assert a["label"] == b["label"] == "female"
        assert abs(a["p_male"] - b["p_male"]) < 0.02
    if cpu.native_bf16():  # the rows are the network's own: bf16's P(male) differ from float32's
        assert any(a["p_male"] != b["p_male"] for a, b in zip(rows["openvino"], rows["onnxruntime"]))


def test_openvino_asked_for_but_missing_is_one_clear_error(monkeypatch, descriptor_runtime):
    descriptor_runtime("openvino")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(UserError, match=r"=openvino: OpenVINO is not installed; pip install 'facegender\[openvino\]'"):
        mnn_runtime.fast_network(onnx_model.DESCRIPTOR_NETWORK, "k")


@pytest.mark.parametrize("flags, bf16", [
    ("fpu avx2 avx512f avx512_bf16", True),  # AMD Zen 4, Intel Cooper Lake
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids: AMX
    ("fpu avx2 avx512f", False),
    ("fpu avx2", False),
])
def test_native_bf16_follows_the_cpus_flags(monkeypatch, flags, bf16):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: cpu.first_processor(f"vendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n"))
    assert cpu.native_bf16() is bf16


def test_auto_never_takes_openvino(monkeypatch, descriptor_runtime):
    """bf16's answers are not float32's to the bit: OpenVINO runs only where it is asked for by name."""
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: cpu.first_processor(
        "vendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n"))
    descriptor_runtime("auto")
    assert mnn_runtime.chosen_runtime() == "onnxruntime"
