"""dlib's face-descriptor network in PyTorch against dlib itself, on real faces, and its .dat reader on bad files."""
from __future__ import annotations

import os
from pathlib import Path

import dlib  # a core dependency (dlib-bin): without it the install is broken; no skip
import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import shared
from facegender.detect import LANDMARK_MODEL, FaceDetector, packaged_model
from facegender.chips import MODEL_FILE, face_chips, full_object_detection
from facegender.dlibnet import DescriptorNet, converted_state, read_dat
from facegender.io import UserError
from facegender.io import cache_dir

FACES_PER_CORPUS = 20


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def dlib_net():
    return dlib.face_recognition_model_v1(str(packaged_model(MODEL_FILE)))


@pytest.fixture(scope="module")
def net() -> DescriptorNet:
    return DescriptorNet.from_dat(device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def landmarks():
    """facegender's detector for the box, dlib's 5-point model for the landmarks, as the lead's pipeline will."""
    detector, predictor = FaceDetector(), dlib.shape_predictor(str(packaged_model(LANDMARK_MODEL)))

    def faces(rgb: np.ndarray) -> list:
        found = []
        for face in detector.detect(Image.fromarray(rgb)):
            x0, y0, x1, y1 = (int(round(v)) for v in face.box)
            shape = predictor(rgb, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
            found.append(full_object_detection(face.box, [(p.x, p.y) for p in shape.parts()]))
        return found

    return faces


def corpus_chips(folder: Path, pattern: str, landmarks, n: int) -> np.ndarray:
    """Chips of the largest face of every 97th image until ``n`` faces (spread over the corpus)."""
    chips = []
    for path in sorted(folder.glob(pattern))[::97]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        faces = landmarks(rgb)
        if faces:
            chips.append(face_chips(rgb, faces[:1])[0])
        if len(chips) == n:
            break
    assert len(chips) == n, f"only {len(chips)} faces found in {folder}"
    return np.stack(chips)


@pytest.fixture(scope="module")
def real_chips(landmarks) -> np.ndarray:
    """60 chips: 20 faces from each of UTKFace, CelebA and SCUT-FBP5500."""
    folders = [(shared("utkface"), "*.jpg"), (shared("celeba") / "img", "*.jpg"), (shared("scut_fbp5500") / "img", "*.jpg")]
    return np.concatenate([corpus_chips(f, p, landmarks, FACES_PER_CORPUS) for f, p in folders])


@pytest.fixture(scope="module")
def astronaut_chip(landmarks) -> np.ndarray:
    rgb = skimage.data.astronaut()
    faces = landmarks(rgb)
    assert len(faces) == 1
    return face_chips(rgb, faces)


def dlib_descriptors(dlib_net, chips: np.ndarray) -> np.ndarray:
    return np.array([np.array(dlib_net.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])


@pytest.fixture(scope="module")
def real_reference(dlib_net, real_chips) -> np.ndarray:
    """dlib's own descriptors of the real chips, one at a time as dlib computes them."""
    return dlib_descriptors(dlib_net, real_chips)


def test_astronaut_descriptor_matches_dlib(net, dlib_net, astronaut_chip, landmarks):
    ours = net.descriptors(astronaut_chip)
    assert ours.shape == (1, 128) and ours.dtype == np.float32
    assert cosines(ours, dlib_descriptors(dlib_net, astronaut_chip))[0] >= 0.999
    # dlib's own whole path (its chip extraction inside compute_face_descriptor) gives the same descriptor
    rgb = skimage.data.astronaut()
    whole = np.array(dlib_net.compute_face_descriptor(rgb, landmarks(rgb)[0]))[None]
    assert cosines(ours, whole)[0] >= 0.999


def test_real_faces_match_dlib_in_fp32(net, real_chips, real_reference):
    ours = net.descriptors(real_chips, batch_size=32)
    cos = cosines(ours, real_reference)
    print(f"\nfp32 cosine to dlib over {len(cos)} faces: min {cos.min():.7f} median {np.median(cos):.7f}")
    assert len(cos) >= 50 and cos.min() >= 0.999


def test_real_faces_in_bf16(real_chips, real_reference):
    """bf16 is what runs on CPUs with native bf16; where it is emulated it is slow, but the numbers are the same."""
    net16 = DescriptorNet.from_dat(device="cpu", precision="bf16")
    cos = cosines(net16.descriptors(real_chips), real_reference)
    print(f"\nbf16 cosine to dlib over {len(cos)} faces: min {cos.min():.5f} median {np.median(cos):.5f}")
    assert cos.min() >= 0.99


def test_batches_give_the_descriptors_of_single_chips(net, real_chips):
    chips = real_chips[::15]  # four faces, from all three corpora
    batched = net.descriptors(chips)
    single = np.concatenate([net.descriptors(c[None]) for c in chips])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert not np.allclose(batched[0], batched[1], atol=1e-2)  # different faces, different descriptors
    # as the extractor facegender.descriptors calls: numpy chips in, numpy descriptors out, a name per precision
    np.testing.assert_array_equal(net(chips), batched)
    assert net.name == "dlibnet-fp32"


def test_the_shipped_graph_is_the_exported_network_kept_in_channel_blocks(real_chips):
    """The shipped ONNX graph against the network as the exporter writes it, both on onnxruntime: the same
    descriptors of real faces up to float32 rounding, with no Pad and no normalisation before the first
    convolution left in it (onnxruntime would leave its blocked layout there)."""
    import onnx
    import onnxruntime as ort

    from facegender.onnx_export import descriptor_network_graph
    from facegender.onnx_model import DESCRIPTOR_NETWORK

    shipped = onnx.load(str(DESCRIPTOR_NETWORK))
    assert not {n.op_type for n in shipped.graph.node} & {"Pad", "Sub", "Div"}
    assert [n.op_type for n in shipped.graph.node][:3] == ["Transpose", "Cast", "Conv"]
    run = lambda graph: ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(
        ["descriptor"], {"chips": real_chips})[0]
    exported, ours = run(descriptor_network_graph(blocked=False)), run(DESCRIPTOR_NETWORK.read_bytes())
    assert np.abs(ours - exported).max() <= 1e-5
    assert cosines(ours, exported).min() >= 0.99999


def test_chip_from_box_and_points_is_dlibs_chip(astronaut_chip):
    """full_object_detection rebuilt from a (float, right-exclusive) box and 5 points cuts dlib's own chip."""
    rgb = skimage.data.astronaut()
    rect = dlib.get_frontal_face_detector()(rgb, 1)[0]
    shape = dlib.shape_predictor(str(packaged_model(LANDMARK_MODEL)))(rgb, rect)
    box = (rect.left(), rect.top(), rect.right() + 1.0, rect.bottom() + 1.0)
    rebuilt = full_object_detection(box, [(p.x + 0.2, p.y - 0.2) for p in shape.parts()])
    np.testing.assert_array_equal(face_chips(rgb, [rebuilt])[0], dlib.get_face_chip(rgb, shape, size=150, padding=0.25))
    with pytest.raises(UserError, match="5 .*landmarks"):
        full_object_detection(box, [(1, 2)] * 4)
    with pytest.raises(UserError, match="H x W x 3 uint8"):
        face_chips(rgb.astype(np.float32), [rebuilt])


def test_converted_weights_are_cached_by_the_files_hash(tmp_path):
    source = packaged_model(MODEL_FILE)
    state = converted_state(source)
    entries = list((cache_dir() / "dlibnet").glob("*.safetensors"))
    assert len(entries) == 1
    fresh = read_dat(source)
    assert state.keys() == fresh.keys() and all((state[k] == fresh[k]).all() for k in state)
    # a damaged cache entry is rebuilt, not trusted
    entries[0].write_bytes(entries[0].read_bytes()[:1000])
    again = converted_state(source)
    assert all((again[k] == fresh[k]).all() for k in fresh)
    assert entries[0].stat().st_size > 1_000_000
    # another file (here: the same bytes under another name) with the same content shares the entry
    copy = tmp_path / "copy.dat"
    os.symlink(source, copy)
    converted_state(copy)
    assert len(list((cache_dir() / "dlibnet").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "bad version", "garbage", "another dlib model", "missing"])
def test_bad_model_file_is_a_clear_user_error(tmp_path, damage):
    good = packaged_model(MODEL_FILE).read_bytes()
    path = tmp_path / "model.dat"
    expected = {
        "truncated": (good[: len(good) // 2], "truncated"),
        "bad version": (good.replace(b"con_4", b"con_9", 1), "'con_9'"),
        "garbage": (bytes(range(256)) * 100, "version"),
        "another dlib model": (packaged_model(LANDMARK_MODEL).read_bytes(), "not dlib's face recognition"),
        "missing": (None, "cannot read"),
    }
    data, message = expected[damage]
    if data is not None:
        path.write_bytes(data)
    cached = set((cache_dir() / "dlibnet").glob("*"))
    with pytest.raises(UserError, match=message) as error:
        DescriptorNet.from_dat(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert set((cache_dir() / "dlibnet").glob("*")) == cached  # nothing cached for a bad file


def test_chips_of_the_wrong_shape_are_refused(net):
    with pytest.raises(UserError, match="150 x 150 x 3 uint8"):
        net.descriptors(np.zeros((2, 128, 128, 3), np.uint8))
    with pytest.raises(UserError, match="uint8"):
        net.descriptors(np.zeros((2, 150, 150, 3), np.float32))
    assert net.descriptors(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
