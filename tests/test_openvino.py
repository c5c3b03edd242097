"""dlib's descriptor network on OpenVINO (``FACEGENDER_DESCRIPTOR_RUNTIME=openvino``, the ``openvino`` extra):
bfloat16 where the CPU computes it natively, float32 elsewhere; onnxruntime's answers within that precision."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from test_mnn import chips, cosines, on_runtime, predicted_folder, started_in_the_background  # noqa: F401 (chips: a fixture)

from facegender import cpu, descriptor_runtime, onnx_model
from facegender.inference import Classifier
from facegender.io import UserError

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO is not installed (pip install 'facegender[openvino]')")


@needs_openvino
def test_openvino_gives_onnxruntimes_descriptors_to_its_precision(chips, choose_runtime):  # noqa: F811
    graph, on_openvino, on_onnxruntime = on_runtime(choose_runtime, "openvino", descriptor_runtime.OpenVINONetwork, chips)
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
    rows = predicted_folder(tmp_path, ("openvino", "onnxruntime"))
    for a, b in zip(rows["openvino"], rows["onnxruntime"]):
        assert a["label"] == b["label"] == "female"
        assert abs(a["p_male"] - b["p_male"]) < 0.02
    if cpu.native_bf16():  # the rows are the network's own: bf16's P(male) differ from float32's
        assert any(a["p_male"] != b["p_male"] for a, b in zip(rows["openvino"], rows["onnxruntime"]))


@needs_openvino
def test_a_stream_of_small_calls_starts_openvino_in_the_background_and_stays_on_onnxruntime_meanwhile(chips):  # noqa: F811
    started_in_the_background(chips, descriptor_runtime.OpenVINONetwork)


@needs_openvino
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "f32"])
def test_openvino_takes_single_chips_where_it_computes_in_bf16(chips, monkeypatch, bf16):  # noqa: F811
    """Once a folder's batch has started it: in bf16 a single chip runs on OpenVINO too (faster than onnxruntime
    there, and the same face gets the same answer in a call of any size); in float32 one stays on onnxruntime."""
    if bf16 and not cpu.native_bf16():
        pytest.skip("this CPU computes no bf16 natively (AVX-512 BF16 or AMX)")
    monkeypatch.setattr(descriptor_runtime, "native_bf16", lambda: bf16)
    graph = onnx_model.descriptor_network(1)
    sess, key = graph.session, graph.key
    fresh = onnx_model.DescriptorGraph(sess, key, descriptor_runtime.OpenVINONetwork(onnx_model.DESCRIPTOR_NETWORK, key))
    one = chips[:1]
    on_onnxruntime = sess.run(["descriptor"], {"chips": one})[0]
    assert np.array_equal(fresh(one), on_onnxruntime) and fresh.fast._request is None  # one photo does not start it
    fresh(np.resize(chips, (descriptor_runtime.START_CHIPS, *chips.shape[1:])))
    on_openvino = fresh.fast(one)
    assert not np.array_equal(on_openvino, on_onnxruntime)  # each runtime's own bits tell them apart
    assert fresh.fast.precision == ("bf16" if bf16 else "f32")
    assert np.array_equal(fresh(one), on_openvino if bf16 else on_onnxruntime)
    assert np.array_equal(fresh(chips[:2]), fresh.fast(chips[:2]))  # two run there either way


def test_openvino_asked_for_but_missing_is_one_clear_error(monkeypatch, choose_runtime):
    choose_runtime("openvino")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(UserError, match=r"=openvino: OpenVINO is not installed; pip install 'facegender\[openvino\]'"):
        descriptor_runtime.fast_network(onnx_model.DESCRIPTOR_NETWORK, "k")


@pytest.mark.parametrize("flags, bf16", [
    ("fpu avx2 avx512f avx512_bf16", True),  # AMD Zen 4, Intel Cooper Lake
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids: AMX
    ("fpu avx2 avx512f", False),
    ("fpu avx2", False),
])
def test_native_bf16_follows_the_cpus_flags(monkeypatch, flags, bf16):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: cpu.first_processor(f"vendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n"))
    assert cpu.native_bf16() is bf16


def test_auto_never_takes_openvino(monkeypatch, choose_runtime):
    """bf16's answers are not float32's to the bit: OpenVINO runs only where it is asked for by name."""
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: cpu.first_processor(
        "vendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n"))
    choose_runtime("auto")
    assert descriptor_runtime.chosen_runtime() == "onnxruntime"
