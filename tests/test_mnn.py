"""dlib's descriptor network on MNN (``descriptor_runtime``): onnxruntime's answers, a conversion made once, clean stdout.

MNN is forced here (``FACEGENDER_DESCRIPTOR_RUNTIME=mnn``), so these run on CPUs with AVX-512 too, where
``auto`` keeps onnxruntime.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegender import io, descriptor_runtime, onnx_model
from facegender.inference import Classifier
from facegender.io import UserError

pytest.importorskip("MNN", reason="MNN is not installed (pip install MNN)")
needs_glibc = pytest.mark.skipif(
    descriptor_runtime._C_STDOUT is None, reason="MNN starts in the background only with glibc (its stdout can be pointed elsewhere)")


def astronaut() -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image")
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    """dlib chips of real faces: the astronaut mirrored, turned and lit differently (each its own chip)."""
    clf = Classifier.from_checkpoint()
    photo, out = astronaut(), []
    for angle in (0, 8, -8, 15):
        for variant in (photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo.point(lambda v: v * 0.7)):
            found = clf.faces("astronaut", np.asarray(variant.rotate(angle)))
            out += [face for _, face in found if face is not None]
    assert len(out) >= 10
    return np.stack(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def on_runtime(choose, name: str, kind: type, chips: np.ndarray) -> tuple[onnx_model.DescriptorGraph, np.ndarray, np.ndarray]:
    """The shared descriptor network made with FACEGENDER_DESCRIPTOR_RUNTIME=``name`` (``choose``: the
    choose_runtime fixture), its fast network a ``kind``; the chips' descriptors there and on onnxruntime."""
    choose(name)
    graph = onnx_model.descriptor_network(1)
    assert isinstance(graph.fast, kind)
    fast, reference = graph.fast(chips), graph.session.run(["descriptor"], {"chips": chips})[0]
    assert fast.shape == reference.shape == (len(chips), 128)
    return graph, fast, reference


def test_mnn_gives_onnxruntimes_descriptors_on_real_faces(chips, choose_runtime):
    graph, on_mnn, on_onnxruntime = on_runtime(choose_runtime, "mnn", descriptor_runtime.MNNNetwork, chips)
    np.testing.assert_allclose(on_mnn, on_onnxruntime, atol=1e-4)
    assert cosines(on_mnn, on_onnxruntime).min() > 0.99999
    assert np.array_equal(graph.fast(chips), on_mnn) and not np.array_equal(on_mnn, on_onnxruntime)


def test_mnn_starts_on_a_folders_batch_then_takes_batches_of_min_batch_chips(chips):
    """Answers tell the runtimes apart: each gives its own bits, which differ from the other's."""
    graph = onnx_model.descriptor_network(1)
    sess, key = graph.session, graph.key
    fresh = onnx_model.DescriptorGraph(sess, key, descriptor_runtime.MNNNetwork(onnx_model.DESCRIPTOR_NETWORK, key))
    many = np.resize(chips, (descriptor_runtime.START_CHIPS, *chips.shape[1:]))
    few = chips[:descriptor_runtime.MIN_BATCH]
    on_onnxruntime = sess.run(["descriptor"], {"chips": many})[0]
    few_on_onnxruntime = sess.run(["descriptor"], {"chips": few})[0]
    # a photo's few faces: onnxruntime, and MNN is not even loaded
    assert np.array_equal(fresh(few), few_on_onnxruntime) and fresh.fast._session is None
    # a folder's batch starts it; from then on a batch of MIN_BATCH runs there too, a smaller one never
    on_mnn = fresh(many)
    assert fresh.fast._session is not None and not np.array_equal(on_mnn, on_onnxruntime)
    np.testing.assert_allclose(on_mnn, on_onnxruntime, atol=1e-4)
    assert np.array_equal(fresh(few), fresh.fast(few)) and not np.array_equal(fresh(few), few_on_onnxruntime)
    assert np.array_equal(fresh(few[:-1]), sess.run(["descriptor"], {"chips": few[:-1]})[0])
    assert np.array_equal(fresh(few[:1]), sess.run(["descriptor"], {"chips": few[:1]})[0])
    # a server's batches start it once START_AFTER chips have come in batches it would take
    served = onnx_model.DescriptorGraph(sess, key, descriptor_runtime.MNNNetwork(onnx_model.DESCRIPTOR_NETWORK, key))
    for _ in range(50):
        served(few[:-1])
    assert served.fast._session is None
    calls = -(-descriptor_runtime.START_AFTER // len(few))
    for _ in range(calls - 1):
        served(few)
    assert served.fast._session is None
    served(few)
    assert served.fast._session is not None


def started_in_the_background(chips: np.ndarray, kind: type) -> None:
    """A stream of small calls starts a ``kind`` of fast network in a thread of its own, onnxruntime answering
    every call meanwhile, and from then on the calls run on it."""
    graph = onnx_model.descriptor_network(1)
    sess, key = graph.session, graph.key
    served = onnx_model.DescriptorGraph(sess, key, kind(onnx_model.DESCRIPTOR_NETWORK, key, background=True))
    few = chips[:descriptor_runtime.MIN_BATCH]
    on_onnxruntime = sess.run(["descriptor"], {"chips": few})[0]
    calls = -(-descriptor_runtime.START_AFTER // len(few))
    for _ in range(calls - 1):
        assert np.array_equal(served(few), on_onnxruntime)
    assert not served.fast._started
    # the call that earns it starts the load and is answered by onnxruntime, without waiting for it
    assert np.array_equal(served(few), on_onnxruntime) and served.fast._started
    served.fast.load()  # waits for the loading thread
    on_fast = served(few)
    assert not np.array_equal(on_fast, on_onnxruntime) and np.array_equal(on_fast, served.fast(few))
    assert cosines(on_fast, on_onnxruntime).min() > 0.9995  # MNN: float32's within 1e-4 (above); OpenVINO: bf16's


@needs_glibc
def test_a_stream_of_small_calls_starts_mnn_in_the_background_and_stays_on_onnxruntime_meanwhile(chips):
    started_in_the_background(chips, descriptor_runtime.MNNNetwork)


# A process that writes rows on stdout while MNN starts beside it (fresh cache: the conversion too).
BACKGROUND_START = """
import json, sys
import numpy as np
from facegender import descriptor_runtime, onnx_model
graph = onnx_model.descriptor_network(1)
network = descriptor_runtime.MNNNetwork(onnx_model.DESCRIPTOR_NETWORK, graph.key, background=True)
served = onnx_model.DescriptorGraph(graph.session, graph.key, network)
chips = np.load(sys.argv[1])
rows = 0
while not network._loaded.is_set() or rows < 40:
    served(chips)
    rows += 1
    print(json.dumps({"row": rows}))
network.load()
print(json.dumps({"row": rows + 1, "mnn": bool(np.array_equal(served(chips), network(chips)))}))
"""


@needs_glibc
def test_mnn_starting_in_the_background_writes_nothing_on_stdout_and_loses_no_row(chips, tmp_path):
    np.save(tmp_path / "chips.npy", chips[:descriptor_runtime.MIN_BATCH])
    for unbuffered in ("", "1"):  # C's stdout buffered by block, and unbuffered (python -u)
        env = os.environ | {descriptor_runtime.RUNTIME_ENV: "mnn", "FACEGENDER_CACHE": str(tmp_path / f"cache{unbuffered}"),
                            "PYTHONUNBUFFERED": unbuffered}
        done = subprocess.run([sys.executable, "-c", BACKGROUND_START, str(tmp_path / "chips.npy")],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]  # nothing but rows
        assert [r["row"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > 40
        assert rows[-1]["mnn"] is True


def test_the_runtime_follows_the_environment_and_refuses_other_names(choose_runtime):
    choose_runtime("onnxruntime")
    assert descriptor_runtime.chosen_runtime() == "onnxruntime"
    assert descriptor_runtime.fast_network(onnx_model.DESCRIPTOR_NETWORK, "k") is None
    choose_runtime("MNN")
    assert descriptor_runtime.chosen_runtime() == "mnn"
    choose_runtime("auto")
    from facegender.cpu import first_processor  # the parsing only: the rule below is this test's own

    info = first_processor(Path("/proc/cpuinfo").read_text(errors="replace"))
    flags, zen_4 = info.get("flags", "").split(), info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    expected = "mnn" if ("avx2" in flags and "avx512f" not in flags) or (zen_4 and "avx512f" in flags) else "onnxruntime"
    assert descriptor_runtime.chosen_runtime() == expected
    choose_runtime("tensorrt")
    with pytest.raises(UserError, match=f"{descriptor_runtime.RUNTIME_ENV}=tensorrt: must be one of auto, mnn, onnxruntime, openvino"):
        descriptor_runtime.chosen_runtime()


def test_the_stem_over_space_to_depth_computes_what_the_shipped_graph_does(chips, tmp_path):
    """graph_edit's edit of the shipped graph: on onnxruntime the same descriptors (within float32's rounding);
    a graph that no longer starts as the edit expects (here: already edited) is left alone, nothing written."""
    import onnxruntime as ort

    from facegender.chips import CHIP_SIZE
    from facegender.graph_edit import stem_over_space_to_depth

    edited, again = tmp_path / "edited.onnx", tmp_path / "again.onnx"
    assert stem_over_space_to_depth(onnx_model.DESCRIPTOR_NETWORK, edited, CHIP_SIZE)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    run = lambda path: ort.InferenceSession(str(path), options).run(["descriptor"], {"chips": chips})[0]
    before, after = run(onnx_model.DESCRIPTOR_NETWORK), run(edited)
    assert np.abs(after - before).max() < 1e-5 and np.abs(before).max() > 0.1
    ops = [n.op_type for n in _nodes(edited)[:5]]
    assert ops == ["Reshape", "Transpose", "Reshape", "Cast", "Conv"]
    assert not stem_over_space_to_depth(edited, again, CHIP_SIZE) and not again.exists()
    assert not stem_over_space_to_depth(onnx_model.DESCRIPTOR_NETWORK, again, CHIP_SIZE + 1) and not again.exists()


def _nodes(path) -> list:
    from facegender.graph_edit import _messages

    return list(_messages()["ModelProto"].FromString(path.read_bytes()).graph.node)


def test_the_conversion_is_made_once_and_a_failed_one_leaves_no_file(tmp_path, monkeypatch):
    import MNN

    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "cache"))
    first = descriptor_runtime.converted(onnx_model.DESCRIPTOR_NETWORK, "k1", MNN.version())
    stamp = first.stat().st_mtime_ns
    assert first.stat().st_size > 20_000_000  # the network's weights, in float32
    assert descriptor_runtime.converted(onnx_model.DESCRIPTOR_NETWORK, "k1", MNN.version()) == first
    assert first.stat().st_mtime_ns == stamp
    # a process killed while converting leaves its temporary file: swept once no converter can be at work
    stale, fresh = (first.parent / f".{first.name}.{n}.tmp" for n in ("a1", "b2"))
    for tmp in (stale, fresh):
        tmp.write_bytes(b"half a network")
    old = time.time() - descriptor_runtime.CONVERT_TIMEOUT - 120
    os.utime(stale, (old, old))
    assert descriptor_runtime.converted(onnx_model.DESCRIPTOR_NETWORK, "k1", MNN.version()) == first
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(RuntimeError, match="MNN could not convert"):
        descriptor_runtime.converted(broken, "k2", MNN.version())
    assert sorted(p.name for p in (tmp_path / "cache" / "mnn").iterdir()) == [first.name]


def test_converted_networks_of_other_versions_go_once_unused_for_a_month(tmp_path, monkeypatch):
    import MNN

    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "mnn"
    folder.mkdir(parents=True)
    month = time.time() - io.UNUSED_FOR - 3600
    # what an upgrade left: an earlier MNN's and an unedited graph's conversions, one of them still in use
    older, recent = folder / "net-k0-mnn3.5.0.mnn", folder / "net-k0-s2d-mnn3.5.0.mnn"
    unrelated = folder / "notes.txt"
    for path in (older, recent, unrelated):
        path.write_bytes(b"a network")
    for path in (older, unrelated):
        os.utime(path, (month, month))
    first = descriptor_runtime.converted(onnx_model.DESCRIPTOR_NETWORK, "k1", MNN.version())
    assert sorted(p.name for p in folder.iterdir()) == sorted([first.name, recent.name, unrelated.name])
    # a use marks the entry it reads, so that its own turn to go waits for a month without one
    os.utime(first, (month, month))
    os.utime(recent, (month, month))
    assert descriptor_runtime.converted(onnx_model.DESCRIPTOR_NETWORK, "k1", MNN.version()) == first
    assert time.time() - first.stat().st_mtime < 60
    assert sorted(p.name for p in folder.iterdir()) == sorted([first.name, unrelated.name])


def test_a_network_mnn_cannot_convert_falls_back_to_onnxruntime_with_a_warning(chips, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    graph = onnx_model.descriptor_network(1)
    sess, key = graph.session, graph.key
    fallback = onnx_model.DescriptorGraph(sess, key, descriptor_runtime.MNNNetwork(broken, "broken"))
    many = np.resize(chips, (descriptor_runtime.START_CHIPS, *chips.shape[1:]))
    with pytest.warns(RuntimeWarning, match="descriptors on onnxruntime instead of MNN"):
        got = fallback(many)
    assert fallback.fast is None
    assert np.array_equal(got, sess.run(["descriptor"], {"chips": many})[0])


@needs_glibc
def test_a_background_start_that_fails_falls_back_to_onnxruntime_with_a_warning(chips, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    graph = onnx_model.descriptor_network(1)
    sess, key = graph.session, graph.key
    served = onnx_model.DescriptorGraph(sess, key, descriptor_runtime.MNNNetwork(broken, "broken", background=True))
    few = chips[:descriptor_runtime.MIN_BATCH]
    on_onnxruntime = sess.run(["descriptor"], {"chips": few})[0]
    for _ in range(-(-descriptor_runtime.START_AFTER // len(few))):
        assert np.array_equal(served(few), on_onnxruntime)
    assert served.fast._loaded.wait(300) and served.fast._failure is not None  # its thread failed, quietly
    with pytest.warns(RuntimeWarning, match="descriptors on onnxruntime instead of MNN"):
        assert np.array_equal(served(few), on_onnxruntime)
    assert served.fast is None


def predicted_folder(tmp_path: Path, runtimes: tuple[str, ...]) -> dict[str, list[dict]]:
    """`facegender predict`'s rows over a folder of START_CHIPS photos of one face each (one batch of faces: it
    starts MNN or OpenVINO), once with the descriptor network on each runtime, each with a cache of its own
    (``tmp_path / "cache-NAME"``); stdout must hold nothing but the rows."""
    photo = astronaut().resize((256, 256))
    folder = tmp_path / "photos"
    folder.mkdir()
    n = descriptor_runtime.START_CHIPS
    for i in range(n):
        photo.rotate(i % 9 - 4).save(folder / f"astronaut{i:02d}.jpg", quality=95)
    rows = {}
    for name in runtimes:
        env = os.environ | {descriptor_runtime.RUNTIME_ENV: name, "FACEGENDER_CACHE": str(tmp_path / f"cache-{name}")}
        done = subprocess.run([sys.executable, "-m", "facegender.cli", "predict", str(folder)], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        rows[name] = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(rows[name]) == n
    return rows


def test_predict_on_mnn_keeps_stdout_to_its_rows_and_labels_as_onnxruntime(tmp_path):
    rows = predicted_folder(tmp_path, ("mnn", "onnxruntime"))
    assert (tmp_path / "cache-mnn" / "mnn").is_dir() and not (tmp_path / "cache-onnxruntime" / "mnn").exists()
    for a, b in zip(rows["mnn"], rows["onnxruntime"]):
        assert a["label"] == b["label"] == "female"
        assert abs(a["p_male"] - b["p_male"]) < 1e-4


def test_mnn_labels_faces_of_every_corpus_as_onnxruntime_does(choose_runtime):
    """P(male) of the bundled model within 1e-3 of onnxruntime's (2e-4 measured), the same labels, on
    real faces of the three corpora."""
    from conftest import shared

    photos = [p for corpus in ("utkface", "celeba/img", "scut_fbp5500/img")
              for p in sorted(shared(corpus).glob("*.jpg"))[::997][:8]]
    p_male = {}
    for name in ("mnn", "onnxruntime"):
        choose_runtime(name)
        p_male[name] = np.array([p.p_male for p in Classifier.from_checkpoint().predict(photos) if p.p_male is not None])
    assert len(p_male["mnn"]) == len(p_male["onnxruntime"]) >= 20
    assert np.abs(p_male["mnn"] - p_male["onnxruntime"]).max() < 1e-3
    assert ((p_male["mnn"] >= 0.5) == (p_male["onnxruntime"] >= 0.5)).all()


def test_a_bad_runtime_name_stops_predict_with_one_line(tmp_path):
    photo = tmp_path / "astronaut.jpg"
    astronaut().save(photo)
    env = os.environ | {descriptor_runtime.RUNTIME_ENV: "gpu"}
    done = subprocess.run([sys.executable, "-m", "facegender.cli", "predict", str(photo)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{descriptor_runtime.RUNTIME_ENV}=gpu: must be one of auto, mnn, onnxruntime, openvino" in done.stderr


ZEN_4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu avx avx2 fma avx512f avx512bw\n"


@pytest.mark.parametrize("cpuinfo, without_avx512, in_halves, runtime", [
    (ZEN_4, False, True, "mnn"),  # AVX-512 as two 256-bit halves: MNN's AVX2 kernels were faster
    (ZEN_4.replace(" avx512f avx512bw", ""), True, False, "mnn"),  # the same CPU with AVX-512 hidden (a VM's)
    (ZEN_4.replace("25", "26"), False, False, "onnxruntime"),  # Zen 5: not measured, onnxruntime's AVX-512
    (ZEN_4.replace("AuthenticAMD", "GenuineIntel").replace("25", "6"), False, False, "onnxruntime"),  # a Xeon
    (ZEN_4 + "\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n", False, True, "mnn"),  # the first processor's
    ("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n", False, False, "onnxruntime"),  # arm64
])
def test_the_runtime_that_auto_takes_follows_the_cpu(monkeypatch, choose_runtime, cpuinfo, without_avx512,
                                                     in_halves, runtime):
    from facegender import cpu

    monkeypatch.setattr(cpu, "_cpuinfo", lambda: cpu.first_processor(cpuinfo))
    choose_runtime("auto")
    assert (cpu.x86_without_avx512(), cpu.avx512_in_halves()) == (without_avx512, in_halves)
    assert descriptor_runtime.chosen_runtime() == runtime
