"""The BlazeFace detector on real faces (from ../shared/data): what it finds that HOG misses, where it puts
the landmarks, and how it fails on bad input."""
from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import faces_cut_by_the_edge, serve_process, shared
from PIL import Image

from facegender import blazeface, detect, graph_edit
from facegender.blazeface import BlazeFace, Detection, anchors, letterbox
from facegender.detect import (
    DEFAULT_DETECTOR,
    DETECTORS,
    FACE_AT_INPUT,
    MAX_SIDE,
    MIN_FACE,
    PASS_RATIO,
    TILE_SIDE,
    FaceDetector,
)
from facegender.io import UserError


@pytest.fixture(scope="module")
def detectors() -> dict[str, FaceDetector]:
    return {kind: FaceDetector(kind) for kind in DETECTORS}


def portraits(n: int) -> list[Image.Image]:
    paths = sorted(shared("scut_fbp5500").joinpath("img").glob("*.jpg"))[::97][:n]
    return [Image.open(p).convert("RGB") for p in paths]


def turned(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, Image.BILINEAR, expand=True, fillcolor=(128, 128, 128))


def turned_point(p, degrees: float, before: Image.Image, after: Image.Image) -> tuple[float, float]:
    """Where ``p`` of ``before`` lands in ``after = turned(before, degrees)`` (counter-clockwise about the centre)."""
    t = math.radians(degrees)
    x, y = p[0] - before.width / 2, p[1] - before.height / 2
    return (x * math.cos(t) + y * math.sin(t) + after.width / 2, -x * math.sin(t) + y * math.cos(t) + after.height / 2)


def eye_distance(face) -> float:
    return math.dist(face.left_eye, face.right_eye)


def test_both_detectors_are_offered_and_the_default_is_one_of_them():
    assert set(DETECTORS) == {"blazeface", "hog"} and DEFAULT_DETECTOR in DETECTORS
    assert FaceDetector().kind == DEFAULT_DETECTOR


def test_faces_turned_45_degrees_are_found_where_hog_misses_some(detectors):
    faces = portraits(8)
    hog_found = blaze_found = 0
    for image in faces:
        for degrees in (45, -45):
            hog_found += len(detectors["hog"].detect(turned(image, degrees))) == 1
            blaze_found += len(detectors["blazeface"].detect(turned(image, degrees))) == 1
    assert blaze_found == 2 * len(faces)
    assert hog_found < blaze_found


def test_upright_landmarks_agree_with_hogs_own(detectors):
    for image in portraits(6):
        (hog,) = detectors["hog"].detect(image)
        (face,) = detectors["blazeface"].detect(image)
        error = np.linalg.norm(np.subtract(face.points, hog.points), axis=1).mean()
        assert error < 0.05 * eye_distance(hog)  # a few percent of the eye distance: the same chip
        x0, y0, x1, y1 = face.box
        assert 0 <= face.score <= 1
        assert x0 < face.left_eye[0] < face.right_eye[0] < x1  # left_eye: the one nearer the image's left edge
        assert y0 < face.left_eye[1] < (y0 + y1) / 2 and y0 < face.right_eye[1] < (y0 + y1) / 2
        # the box is drawn like HOG's, which the canonical crop was made with
        assert abs((x0 + x1) / 2 - (hog.box[0] + hog.box[2]) / 2) < 0.15 * (hog.box[2] - hog.box[0])
        assert 0.75 < (x1 - x0) / (hog.box[2] - hog.box[0]) < 1.3


@pytest.mark.parametrize("degrees", [30, -40])
def test_landmarks_of_a_turned_face_turn_with_it(detectors, degrees):
    for image in portraits(4):
        (hog,) = detectors["hog"].detect(image)
        rotated = turned(image, degrees)
        (face,) = detectors["blazeface"].detect(rotated)
        expected = [turned_point(p, degrees, image, rotated) for p in hog.points]
        error = np.linalg.norm(np.subtract(face.points, expected), axis=1).mean()
        assert error < 0.06 * eye_distance(hog)


def test_a_group_of_small_and_large_faces_is_found_where_it_was_pasted(detectors):
    canvas = Image.new("RGB", (640, 480), (110, 120, 100))
    places = [(30, 60, 56), (200, 250, 72), (380, 40, 200), (520, 330, 64)]
    for face, (x, y, side) in zip(portraits(4), places):
        canvas.paste(face.resize((side, side), Image.BICUBIC), (x, y))
    faces = detectors["blazeface"].detect(canvas)
    centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f in faces]
    assert len(faces) == len(places)
    for x, y, side in places:
        assert sum(x < cx < x + side and y < cy < y + side for cx, cy in centres) == 1
    assert len(detectors["hog"].detect(canvas)) < len(places)  # HOG's 80 px window misses the small ones


def small_faces(n: int, side: int) -> tuple[Image.Image, list[tuple[int, int]]]:
    """A 640x480 canvas with ``n`` portraits pasted at ``side`` px in a row, and where each went."""
    canvas = Image.new("RGB", (640, 480), (110, 120, 100))
    places = [(40 + i * 150, 200) for i in range(n)]
    for face, place in zip(portraits(n), places):
        canvas.paste(face.resize((side, side), Image.BICUBIC), place)
    return canvas, places


@pytest.mark.parametrize("scale", [1, 2, 3])
@pytest.mark.parametrize("mirrored", [False, True])
def test_a_portrait_enlarged_has_one_face_not_textures_taken_for_small_ones(scale, mirrored):
    """The larger passes look at the astronaut's badges, suit and flag at the scale of small faces: none may
    come back as a face (they did at 0.65-0.74 before the larger passes' thresholds)."""
    skimage_data = pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image")
    pixels = skimage_data.astronaut()
    image = Image.fromarray(np.ascontiguousarray(pixels[:, ::-1] if mirrored else pixels))
    image = image.resize((image.width * scale, image.height * scale), Image.BICUBIC)
    detector = FaceDetector()
    assert len(detector.passes(max(image.size))) > 1  # the larger passes do run
    (face,) = detector.detect(image)
    assert face.box[2] - face.box[0] > 90 * scale  # hers: about 100 px at 512


def test_the_callers_array_of_a_photo_gives_the_faces_and_chips_of_the_photo(detectors, bundled_classifier):
    """predict converts a photo to an array once and hands it to the detector and the chips."""
    from facegender.chips import chip
    from facegender.detect import detect_faces
    from facegender.facemodels import face_points

    skimage_data = pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image")
    photo = Image.fromarray(skimage_data.astronaut())
    for image in (photo, turned(photo, 30)):  # landmarks read the array upright, through a warp turned
        for detector in detectors.values():
            assert detector.detect(image, lambda image=image: np.asarray(image)) == detector.detect(image)
    assert len(detectors["blazeface"].detect(turned(photo, 30))) == 1
    ((stub, cut),) = bundled_classifier.faces("astronaut", photo)
    ((face, _),) = detect_faces(photo, bundled_classifier.detector)
    assert stub.faces == 1 and np.array_equal(cut, chip(photo, face_points(face)))


def test_small_faces_are_found_by_the_larger_pass_that_min_face_asks_for():
    canvas, places = small_faces(4, 48)
    default, one_pass = FaceDetector(), FaceDetector(min_face=200)
    assert default.passes(640) == [128, 384] and one_pass.passes(640) == [128]
    found = default.detect(canvas)
    assert len(found) == len(places)
    for (x, y), face in zip(sorted(places), sorted(found, key=lambda f: f.box[0])):
        assert x < (face.box[0] + face.box[2]) / 2 < x + 48 and y < (face.box[1] + face.box[3]) / 2 < y + 48
    assert one_pass.detect(canvas) == []  # 48 px in 640 is 10 px at 128: below what one pass sees


def a_crowd_of_small_faces(side: int) -> tuple[Image.Image, list[tuple[int, int]]]:
    """20 portraits pasted at ``side`` px (faces of about 0.6 x ``side``) in a 5 x 4 grid of a 640x480 canvas."""
    canvas = Image.new("RGB", (640, 480), (110, 120, 100))
    places = [(30 + i % 5 * 120, 30 + i // 5 * 120) for i in range(20)]
    for face, place in zip(portraits(20), places):
        canvas.paste(face.resize((side, side), Image.BICUBIC), place)
    return canvas, places


def found_at(faces, places, side: int) -> tuple[int, int]:
    """How many of ``places`` hold a face's centre, and how many faces are elsewhere."""
    centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f in faces]
    inside = [[x < cx < x + side and y < cy < y + side for x, y in places] for cx, cy in centres]
    return sum(any(column) for column in zip(*inside)) if inside else 0, sum(not any(row) for row in inside)


def test_faces_a_larger_pass_doubts_are_kept_where_a_second_look_sees_them(monkeypatch):
    """Faces of about 24 px in a 640x480 photo score under 0.7 in the 384 px pass; the second look, at 96 px on
    a window 2.2 times their size, keeps most of them and takes nothing else."""
    canvas, places = a_crowd_of_small_faces(40)
    detector = FaceDetector()
    found, false = found_at(detector.detect(canvas), places, 40)
    monkeypatch.setattr(detect, "DOUBTFUL_SCORE", detect.LARGER_PASS_MIN_SCORE)  # no second look
    without, false_without = found_at(detector.detect(canvas), places, 40)
    assert found >= 15 and false == false_without == 0
    assert found >= without + 5  # 17 of 20 with it, 7 without, when measured


def test_a_second_look_scores_small_faces_high_and_textures_low(detectors):
    """Windows on real textures (coffee, a cat, bricks, grass) score under the bar, the small faces' over it."""
    skimage_data = pytest.importorskip("skimage.data", reason="the texture photos come with scikit-image")
    network = detectors["blazeface"]._networks["short"]

    def look(image, boxes):
        doubtful = [Detection(box, detect.DOUBTFUL_SCORE, np.zeros((6, 2))) for box in boxes]
        return np.array(network.second_look(image, doubtful, detect.SECOND_LOOK_WINDOW, detect.SECOND_LOOK_SIDE))

    for name in ("coffee", "chelsea", "brick", "grass"):
        image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        boxes = [(x, y, x + side, y + side) for side in (24, 40)
                 for y in range(0, image.height - side, side) for x in range(0, image.width - side, side)]
        assert look(image, boxes).max() < detect.SECOND_LOOK_MIN_SCORE, name  # at most 0.59 when measured
    side, faces = 34, portraits(20)
    canvas, places = a_crowd_of_small_faces(side)
    boxes = []
    for face, (x, y) in zip(faces, places):  # each portrait's own face, shrunk with it: about 21 px
        (seen,) = detectors["blazeface"].detect(face)
        k = side / face.width
        boxes.append((x + seen.box[0] * k, y + seen.box[1] * k, x + seen.box[2] * k, y + seen.box[3] * k))
    assert (look(canvas, boxes) >= detect.SECOND_LOOK_MIN_SCORE).all()  # 0.85 and more when measured
    assert look(canvas, []).size == 0


def test_a_second_look_scores_each_window_alone_however_many_share_a_run(detectors):
    """More windows than one run takes go in several runs; each window's score is the one it gets alone."""
    network = detectors["blazeface"]._networks["short"]
    side = 34
    canvas, places = a_crowd_of_small_faces(side)
    boxes = [(x + dx, y + dy, x + dx + 0.6 * side, y + dy + 0.6 * side) for x, y in places for dx, dy in ((7, 9), (40, 60))]
    doubtful = [Detection(box, detect.DOUBTFUL_SCORE, np.zeros((6, 2))) for box in boxes]
    assert len(doubtful) > blazeface.SECOND_LOOK_BATCH * 2
    together = network.second_look(canvas, doubtful, detect.SECOND_LOOK_WINDOW, detect.SECOND_LOOK_SIDE)
    alone = [network.second_look(canvas, [d], detect.SECOND_LOOK_WINDOW, detect.SECOND_LOOK_SIDE)[0] for d in doubtful]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert min(together[::2]) >= detect.SECOND_LOOK_MIN_SCORE > max(together[1::2])  # the faces, then beside them


@pytest.mark.parametrize("tiled", [False, True], ids=["one pass", "tiled pass"])
def test_faces_the_photos_edge_cuts_are_found_by_a_second_look_beyond_it(monkeypatch, tiled):
    """A third of a face beyond the photo's edge: the passes score it under their thresholds; a box that reaches
    the edge gets a second look whose window repeats the edge pixels, which finds most such faces, and nothing in
    photos without one. So do a tiled pass's boxes at the tiles' edges that are the photo's (small faces sought in
    a big photo: the 1184 px pass over 1600x1200 photos at --min-face 32)."""
    photos = faces_cut_by_the_edge(0.35, (1600, 1200), 60, 3) if tiled else faces_cut_by_the_edge(0.35)
    detector = FaceDetector(min_face=32) if tiled else FaceDetector()
    if tiled:
        assert detector.passes(1600)[-1] > detect.TILE_SIDE

    def found() -> tuple[int, int]:
        hits = false = 0
        for photo, (x0, y0, x1, y1), _ in photos:
            centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f in detector.detect(photo)]
            inside = sum(x0 < cx < x1 and y0 < cy < y1 for cx, cy in centres)
            hits, false = hits + min(1, inside), false + len(centres) - min(1, inside)
        return hits, false

    looked, false = found()
    monkeypatch.setattr(detect, "EDGE_DOUBTFUL_SCORE", None)
    plain, false_plain = found()
    assert false == false_plain == 0
    # one pass: 10 of 16 against 5 when measured; tiled: 11 against 3 (7 before the tiles' edges had the look)
    assert looked >= plain + 3 and looked >= (10 if tiled else 8)


def test_a_window_beyond_the_photos_edge_repeats_the_edge_pixels():
    photo = portraits(1)[0].resize((400, 400), Image.BICUBIC)
    side = detect.SECOND_LOOK_SIDE
    inside = blazeface._window(photo, (50, 60, 250, 260), side, repeat_edges=True)
    assert np.array_equal(np.asarray(inside), np.asarray(photo.crop((50, 60, 250, 260)).resize((side, side), Image.BILINEAR)))
    beyond = np.asarray(blazeface._window(photo, (-100, -50, 100, 150), side, repeat_edges=True)).astype(int)
    left, top = round(100 * side / 200), round(50 * side / 200)
    assert beyond.shape == (side, side, 3)
    assert (beyond[:, :left] == beyond[:, left:left + 1]).all() and (beyond[:top] == beyond[top:top + 1]).all()
    expected = np.asarray(photo.crop((0, 0, 100, 150)).resize((side - left, side - top), Image.BILINEAR))
    assert np.array_equal(beyond[top:, left:], expected)


@pytest.mark.parametrize("min_face", [20, 32, 40, 64, 100, None])
def test_passes_grow_in_bounded_steps_to_the_input_that_shows_min_face(min_face):
    for longer in (200, 399, 640, 800, 1280, 4000):
        detector = FaceDetector(min_face=min_face)
        sides = detector.passes(longer)
        assert sides[0] == 128 and sides == sorted(set(sides)) and all(s % 32 == 0 for s in sides)
        assert all(b / a <= PASS_RATIO + 0.3 for a, b in zip(sides, sides[1:]))  # rounding to 32 px
        assert sides[-1] <= max(128, longer)
        # an explicit min_face counts in the photo's px; the default's grows with photos over MAX_SIDE
        smallest = min_face or MIN_FACE * max(1, longer / MAX_SIDE)
        assert detector.smallest(longer) == pytest.approx(smallest)
        shown = smallest * sides[-1] / longer  # the smallest face sought, px at the last input
        step = 32 * smallest / longer  # what one 32 px step of the input changes it by
        capped = sides[-1] == longer // 32 * 32  # the whole image, unenlarged: it cannot show more
        assert len(sides) == 1 or shown <= FACE_AT_INPUT and (shown >= FACE_AT_INPUT - step or capped)


def test_a_tight_chip_is_found_through_the_padded_retry(detectors):
    chips = sorted(shared("utkface").glob("*.jpg"))[::1500][:8]
    for path in chips:
        image = Image.open(path).convert("RGB")
        found = detectors["blazeface"].detect(image)
        assert found, path
        x0, _, x1, _ = found[0].box
        assert x1 - x0 > image.width / 2  # the chip's face fills it


def test_faceless_images_have_no_face(detectors):
    assert detectors["blazeface"].detect(Image.new("RGB", (300, 200), (128, 128, 128))) == []
    assert detectors["blazeface"].detect(Image.new("L", (50, 50))) == []
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert detectors["blazeface"].detect(Image.fromarray(noise)) == []
    for side in (8, 16, 24):  # enlarged to the networks' input, tiny images would turn noise into faces
        tiny = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        assert detectors["blazeface"].detect(tiny.resize((4 * side, 4 * side), Image.BICUBIC).resize((side, side))) == []


def test_anchors_follow_the_input_size():
    assert len(anchors("short", 128, 128)) == 896  # MediaPipe's counts at the trained sizes
    assert len(anchors("full", 192, 192)) == 2304
    assert len(anchors("full", 480, 640)) == 120 * 160
    assert tuple(anchors("full", 192, 192)[0]) == (2.0, 2.0)


@pytest.mark.needs_train
@pytest.mark.parametrize("network", sorted(blazeface.NETWORKS))
def test_the_shipped_networks_keep_their_inner_layers_in_whole_16_channel_blocks(network):
    """tools/blazeface_to_onnx.py widens them so that onnxruntime keeps its blocked layout throughout, splits the
    shortcuts that widening made identity convolutions, and declares the maps' sizes so that it fuses every
    residual Add into its convolution."""
    onnx = pytest.importorskip("onnx", reason="reading the graph needs onnx (the train extra)")
    from onnx import numpy_helper

    graph = onnx.load(str(blazeface.WEIGHTS / blazeface.NETWORKS[network].file)).graph
    kernels = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
    readers = {name: n.op_type for n in graph.node for name in n.input}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    inner = [n for n in convs if readers[n.output[0]] != "Transpose"]
    assert len(inner) > 30 and len(convs) - len(inner) in (2, 4)  # the score and box outputs per anchor grid
    assert all(kernels[n.input[1]][0] % 16 == 0 for n in inner), "an inner layer's width is not a whole block"
    assert not any(n.op_type == "Pad" for n in graph.node)  # the shortcuts' channel pads are gone
    assert _identity_widenings(graph.SerializeToString()) == 0  # and so are the identity convolutions
    # each block that widened its shortcut now joins two parts, each of whole blocks, with their sizes declared
    relus = {n.output[0] for n in graph.node if n.op_type == "Relu"}
    joins = [n for n in graph.node if n.op_type == "Concat" and set(n.input) <= relus]
    assert len(joins) == {"short": 4, "full": 8}[network]
    # every map's size is declared as a fraction of the input's, the same for both sides of each residual Add
    declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert adds and all(declared.get(a) is not None and declared.get(a) == declared.get(b) for a, b in (n.input for n in adds))
    assert declared.get(convs[0].output[0], [])[2:] == ["height/2", "width/2"]
    assert all(declared[x][1] % 16 == 0 and declared[x][2:] == declared[n.output[0]][2:] for n in joins for x in n.input)


@pytest.mark.needs_train
@pytest.mark.parametrize("network", sorted(blazeface.NETWORKS))
def test_the_declared_map_sizes_hold_at_every_input_size(network):
    """The graphs as shipped (their maps' sizes declared, so that onnxruntime fuses the residual Adds) against
    the same graphs with no sizes declared, on real faces at inputs of several sizes and aspects: the same
    outputs up to float rounding in the fused sums."""
    onnx = pytest.importorskip("onnx", reason="rewriting the graph needs onnx (the train extra)")
    import onnxruntime as ort

    path = blazeface.WEIGHTS / blazeface.NETWORKS[network].file
    undeclared = onnx.load(str(path))
    del undeclared.graph.value_info[:]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(g, options, providers=["CPUExecutionProvider"])
                for g in (path.read_bytes(), undeclared.SerializeToString())]
    for image, side in zip(portraits(4), (128, 384, 256, 192)):
        for tensor in (letterbox(image, side)[0], letterbox(image.crop((0, 0, 200, 330)), side)[0]):
            shipped, plain = (s.run(None, {"input": tensor}) for s in sessions)
            for a, b in zip(shipped, plain):  # boxes in input pixels (up to hundreds), score logits
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def _same_outputs_on_faces(*graphs) -> None:
    """Each graph (a path or a serialised graph) gives the first one's outputs on real faces, at inputs of
    several sizes and aspects, up to float rounding."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 2  # a shape an edit left declared wrong would be a warning
    sessions = [ort.InferenceSession(g if isinstance(g, bytes) else str(g), options, providers=["CPUExecutionProvider"])
                for g in graphs]
    for image, side in zip(portraits(4), (128, 384, 256, 192)):
        for tensor in (letterbox(image, side)[0], letterbox(image.crop((0, 0, 200, 330)), side)[0]):
            shipped, *edited = (s.run(None, {"input": tensor}) for s in sessions)
            for outputs in edited:
                for a, b in zip(shipped, outputs):  # boxes in input pixels (up to hundreds), score logits
                    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.needs_train
def test_the_short_range_graph_narrowed_to_8_channel_blocks_computes_what_the_shipped_one_does():
    """graph_edit.narrowed drops the zero channels tools/blazeface_to_onnx.py widened the first layers by (24 to
    32): on real faces, at inputs of several sizes and aspects, the same outputs up to float rounding."""
    path = blazeface.WEIGHTS / blazeface.NETWORKS["short"].file
    narrow = graph_edit.narrowed(path)
    assert narrow is not None and len(narrow) < path.stat().st_size
    # every channel of the full-range network's first layer carries weights: nothing to drop
    assert graph_edit.narrowed(blazeface.WEIGHTS / blazeface.NETWORKS["full"].file) is None
    assert graph_edit.narrowed(path, block=16) is None  # 24 channels round up to the 32 shipped
    _same_outputs_on_faces(path, narrow)
    onnx = pytest.importorskip("onnx", reason="reading the graph needs onnx (the train extra)")
    graph = onnx.load_from_string(narrow).graph
    assert [i.dims for i in graph.initializer if i.name == graph.node[0].input[1]] == [[24, 3, 5, 5]]


def _identity_widenings(data: bytes) -> int:
    """How many 1 x 1 convolutions of the graph copy their input and append zero channels."""
    messages = graph_edit._messages()
    graph = messages["ModelProto"].FromString(data).graph
    weights = {t.name: np.frombuffer(t.raw_data, "<f4").reshape(tuple(t.dims)) for t in graph.initializer
               if t.data_type == 1 and t.raw_data}
    count = 0
    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) == 3 else None
        if w is not None and w.shape[2:] == (1, 1) and w.shape[0] > w.shape[1]:
            count += np.array_equal(w[:, :, 0, 0], np.eye(*w.shape[:2], dtype=np.float32)) and not weights[node.input[2]].any()
    return count


def test_the_short_range_graph_narrowed_and_split_computes_what_the_shipped_one_does():
    """The shipped graphs come with their widened shortcuts split (tools/blazeface_to_onnx.py); narrowing the
    short-range one to 8-channel blocks widens one shortcut again, 24 to 32 channels, by an identity convolution.
    graph_edit.split_shortcuts writes that block as two convolutions and a concatenation: no identity convolution
    is left, and on real faces, at inputs of several sizes and aspects, the outputs are the shipped graph's up to
    float rounding."""
    path = blazeface.WEIGHTS / blazeface.NETWORKS["short"].file
    source = graph_edit.narrowed(path)
    assert _identity_widenings(path.read_bytes()) == 0 and _identity_widenings(source) == 1
    assert graph_edit.split_shortcuts(path.read_bytes(), block=16) is None  # nothing left to split
    split = graph_edit.split_shortcuts(source)
    assert split is not None and _identity_widenings(split) == 0
    assert graph_edit.split_shortcuts(split) is None
    assert graph_edit.split_shortcuts(source, block=16) is None  # 24 channels are no whole block of 16
    assert graph_edit.split_shortcuts(b"not a graph") is None
    _same_outputs_on_faces(path, split)


def test_the_shipped_8_float_graph_is_the_short_range_one_narrowed_and_split():
    """blazeface-short-8.onnx (tools/blazeface_to_onnx.py --narrow-only): 24 channels where the shipped graph has
    32, no identity convolution, and on real faces the shipped graph's outputs up to float rounding."""
    spec = blazeface.NETWORKS["short"]
    path, narrow = blazeface.WEIGHTS / spec.file, blazeface.WEIGHTS / spec.narrow_file
    data = narrow.read_bytes()
    assert _identity_widenings(data) == 0
    graph = graph_edit._messages()["ModelProto"].FromString(data).graph
    assert [list(t.dims) for t in graph.initializer if t.name == graph.node[0].input[1]] == [[24, 3, 5, 5]]
    _same_outputs_on_faces(path, narrow)


def test_every_session_runs_the_8_float_graph_where_vectors_hold_8_floats(monkeypatch):
    """Where NARROW_WHERE holds, the any-size session and the sized ones load ``narrow_file``; elsewhere the
    shipped graph; the faces found are the same either way."""
    photo = portraits(1)[0].resize((384, 384))
    found = {}
    for narrow in (True, False):
        monkeypatch.setattr(blazeface, "NARROW_WHERE", lambda narrow=narrow: narrow)
        detector = BlazeFace("short")
        first = detector.detect(photo, 384)  # the any-size session
        own = detector.session((384, 384))
        assert own is not detector.session()
        expected = detector.spec.narrow_file if narrow else detector.spec.file
        assert {Path(s._model_path).name for s in (own, detector.session())} == {expected}
        again = detector.detect(photo, 384)  # the sized session
        np.testing.assert_allclose([d.box for d in again], [d.box for d in first], atol=1e-2)
        found[narrow] = first
    assert len(found[True]) == len(found[False]) >= 1
    for a, b in zip(found[True], found[False]):
        np.testing.assert_allclose(a.box, b.box, atol=1e-2)
        assert a.score == pytest.approx(b.score, abs=1e-4)
    # the full-range network has no such file: its shipped graph everywhere
    monkeypatch.setattr(blazeface, "NARROW_WHERE", lambda: True)
    assert Path(BlazeFace("full").session()._model_path).name == blazeface.NETWORKS["full"].file


def test_a_large_size_seen_again_gets_a_session_of_its_own_that_finds_the_same_faces():
    """The first SIZED_SESSIONS large sizes seen SIZED_AFTER times run on sessions made for them, which give
    the any-size session's outputs; small sizes, and large ones beyond the first few, keep sharing it."""
    detector = BlazeFace("short")
    shared_session = detector.session()
    images = portraits(3)
    large = [(384, 288), (288, 384), (320, 320), (416, 416)]
    assert all(h * w >= blazeface.SIZED_MIN_PIXELS for h, w in large) and len(large) > blazeface.SIZED_SESSIONS
    for (h, w), image in zip(large, images * 2):
        photo = image.resize((w, h))
        tensor = letterbox(photo, max(h, w))[0]
        assert tensor.shape[2:] == (h, w)
        before = [detector.session((h, w)) for _ in range(blazeface.SIZED_AFTER - 1)]
        own = detector.session((h, w))
        assert all(s is shared_session for s in before)
        if own is not shared_session:
            assert detector.session((h, w)) is own  # kept
            for a, b in zip(own.run(None, {"input": tensor}), shared_session.run(None, {"input": tensor})):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    assert len(detector._sized) == blazeface.SIZED_SESSIONS
    assert set(detector._sized) == set(large[:blazeface.SIZED_SESSIONS])
    assert all(detector.session((96, 128)) is shared_session for _ in range(blazeface.SIZED_AFTER + 1))
    # and the faces found through them are those found through the shared session
    photo = images[0].resize((384, 384))  # a portrait whose face the network finds at a 384 px input too
    fresh = BlazeFace("short")
    first = fresh.detect(photo, 384)  # the shared session
    assert fresh.session((384, 384)) is not fresh.session()  # earned its own on the second sighting
    again = fresh.detect(photo, 384)
    assert len(first) == len(again) >= 1
    for a, b in zip(first, again):
        np.testing.assert_allclose(a.box, b.box, atol=1e-3)
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_letterbox_keeps_the_aspect_and_pads_to_multiples_of_32():
    tensor, k = letterbox(Image.new("RGB", (300, 190), (255, 255, 255)), 192)  # resized to 192 x 122
    assert tensor.shape == (1, 3, 128, 192) and k == pytest.approx(192 / 300)
    assert (tensor[0, :, :122, :] == 1.0).all() and (tensor[0, :, 122:, :] == -1.0).all()  # white, black padding


def test_a_reused_input_is_each_call_s_own_in_each_thread():
    """The passes' inputs live in memory each thread keeps: every call writes all of it (padding included, over
    what an earlier, larger input left there); another thread has its own; what does not fit is new."""
    photo = Image.open(sorted((shared("scut_fbp5500") / "img").glob("*.jpg"))[0]).convert("RGB")
    white, narrow = Image.new("RGB", (384, 288), (255, 255, 255)), photo.crop((0, 0, 200, 330))
    first = letterbox(white, 384, reuse=True)[0]
    assert (first == 1.0).all()
    again, k = letterbox(narrow, 384, reuse=True)
    expected, k_new = letterbox(narrow, 384)
    assert np.shares_memory(first, again) and k == k_new and np.array_equal(again, expected)
    padding = again[0, :, :, round(narrow.width * k):]  # 233 px wide, padded to 256, over the white input's memory
    assert padding.shape[2] == 23 and (padding == -1.0).all()
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(letterbox(photo, 128, reuse=True)[0]))
    thread.start()
    thread.join()
    assert not np.shares_memory(elsewhere[0], again) and np.array_equal(elsewhere[0], letterbox(photo, 128)[0])
    big = letterbox(photo, 1024, reuse=True)[0]  # 12 MB: more than the thread keeps
    assert big.nbytes > blazeface.SCRATCH_BYTES and not np.shares_memory(big, again)


def test_an_unknown_detector_is_a_user_error():
    with pytest.raises(UserError, match="blazeface, hog"):
        FaceDetector("cnn")
    with pytest.raises(UserError, match="short, full"):
        BlazeFace("medium")
    with pytest.raises(UserError, match="--min-face 0: must be a number of px above 0"):
        FaceDetector(min_face=0)


def test_a_missing_onnxruntime_is_a_user_error_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match="pip install onnxruntime"):
        BlazeFace("short").detect(Image.new("RGB", (64, 64)))


def test_a_missing_network_file_is_a_user_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setattr(blazeface, "WEIGHTS", tmp_path)
    with pytest.raises(UserError, match="blazeface-full.onnx is missing"):
        BlazeFace("full").detect(Image.new("RGB", (64, 64)))


def test_the_classifier_takes_either_detector(bundled_classifier):
    from facegender.inference import Classifier

    image = turned(portraits(1)[0], 20)
    hog = Classifier(bundled_classifier.model, bundled_classifier.meta, detector="hog")
    blaze = Classifier(bundled_classifier.model, bundled_classifier.meta, detector="blazeface")
    assert hog.detector.kind == "hog" and blaze.detector.kind == "blazeface"
    (a,), (b,) = hog.predict([image]), blaze.predict([image])
    assert a.faces == b.faces == 1 and a.label == b.label
    assert abs(a.p_male - b.p_male) < 0.1  # the same face, aligned by nearly the same landmarks


@pytest.mark.parametrize("detector", DETECTORS)
def test_predict_takes_the_detector_from_the_command_line(detector, tmp_path):
    import json

    from facegender.cli import main

    photo = tmp_path / "turned.jpg"
    turned(portraits(1)[0], 20).save(photo)
    out = tmp_path / "rows.jsonl"
    assert main(["predict", str(photo), "--detector", detector, "--output", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["faces"] == 1 and row["label"] in ("female", "male")


def test_min_face_on_the_command_line_reaches_the_detector(tmp_path, capsys):
    import json

    from facegender.cli import main

    canvas, places = small_faces(3, 48)
    photo, out = tmp_path / "small.png", tmp_path / "rows.jsonl"
    canvas.save(photo)
    faces = {}
    for min_face in ("40", "200"):
        assert main(["predict", str(photo), "--min-face", min_face, "--output", str(out)]) == 0
        faces[min_face] = json.loads(out.read_text().splitlines()[0])["faces"]
    assert faces == {"40": len(places), "200": 0}
    assert main(["predict", str(photo), "--min-face", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--min-face 0.0: must be a number of px above 0")
    for bad in ("nan", "inf", "-5"):
        assert main(["predict", str(photo), "--min-face", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(f"--min-face {float(bad)}: must be a number of px above 0")


def a_big_group_photo(face: int) -> tuple[Image.Image, list[tuple[int, int]]]:
    """A 3200 x 2400 photo with 12 portraits pasted at ``face`` px, most across an edge of the tiles that a
    min_face=48 pass (1600 px, half the photo's scale) cuts (edges at the photo's x 1152, 1536, 1664, 2688 and
    y 864, 1536)."""
    canvas = Image.new("RGB", (3200, 2400), (110, 120, 100))
    places = [(x, y) for y in (300, 830, 1480) for x in (200, 1100, 1490, 2640)]
    for portrait, place in zip(portraits(len(places)), places):
        canvas.paste(portrait.resize((face, face), Image.BICUBIC), place)
    return canvas, places


def test_min_face_counts_in_the_photos_pixels_and_big_passes_run_in_tiles():
    """In a photo over MAX_SIDE the default seeks faces of the same share of the photo as in one of MAX_SIDE
    (here 100 px); an explicit min_face is px of the photo, whatever its size. The 1600 px pass it takes runs
    on tiles of TILE_SIDE, and each face, across a tile's edge or not, comes back once."""
    canvas, places = a_big_group_photo(80)  # faces of about 48 px
    default, asked = FaceDetector(), FaceDetector(min_face=48)
    assert default.smallest(3200) == MIN_FACE * 3200 / MAX_SIDE and asked.smallest(3200) == 48
    assert default.passes(3200)[-1] == 768 and asked.passes(3200)[-1] == 1600 > TILE_SIDE
    faces = asked.detect(canvas)
    assert found_at(faces, places, 80) == (len(places), 0) and len(faces) == len(places)  # each once
    assert found_at(default.detect(canvas), places, 80)[0] < len(places) // 2
    # a copy at half the size, said to be reduced by 2 while decoding, is searched as the photo was
    half = canvas.resize((1600, 1200), Image.BOX)
    halved = asked.detect(half, scale=2.0)
    assert found_at(halved, [(x // 2, y // 2) for x, y in places], 40) == (len(places), 0)
    assert asked.largest_reduction() == 2 and default.largest_reduction() is None


def test_a_big_jpeg_decodes_no_more_reduced_than_min_face_allows(tmp_path):
    import json

    from facegender.cli import main
    from facegender.images import open_rgb_reduced

    canvas, places = a_big_group_photo(80)
    photo, out = tmp_path / "group.jpg", tmp_path / "rows.jsonl"
    canvas.save(photo, quality=92)
    assert open_rgb_reduced(photo, MAX_SIDE)[0].size == (1600, 1200)  # libjpeg's 1/2: at least MAX_SIDE
    assert open_rgb_reduced(photo, MAX_SIDE, most_reduced=1)[0].size == (3200, 2400)
    faces = {}
    for option in ([], ["--min-face", "48"]):
        assert main(["predict", str(photo), "--output", str(out), *option]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        faces[len(option)] = rows[0]["faces"]
    assert faces[0] < len(places) // 2 and faces[2] == len(places)
    boxes = [row["box"] for row in rows]  # in the file's pixels
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in boxes]
    assert all(any(x < cx < x + 80 and y < cy < y + 80 for x, y in places) for cx, cy in centres)


def test_a_server_started_with_min_face_detects_with_it(tmp_path):
    """A real `facegender serve --min-face 200` on loopback: the 48 px faces that predict's default finds are
    below what it looks for."""
    import base64
    import json
    import urllib.request

    pytest.importorskip("fastapi", reason="the serving extra (fastapi) is not installed")
    canvas, places = small_faces(3, 48)
    photo = tmp_path / "small.png"
    canvas.save(photo)
    with serve_process(tmp_path / "serve.log", "--min-face", "200") as (url, _):
        body = json.dumps({"image": base64.b64encode(photo.read_bytes()).decode()}).encode()
        request = urllib.request.Request(f"{url}/v1/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["faces"] == 0
    assert len(FaceDetector().detect(canvas)) == len(places)  # what the default finds in the same picture


def test_a_server_with_min_face_finds_small_faces_in_a_big_upload(tmp_path):
    """A real `facegender serve --min-face 48`: a 3200 px JPEG decodes at no less than half its size, and its
    48 px faces come back with boxes in the upload's pixels."""
    import base64
    import json
    import urllib.request

    pytest.importorskip("fastapi", reason="the serving extra (fastapi) is not installed")
    canvas, places = a_big_group_photo(80)
    photo = tmp_path / "group.jpg"
    canvas.save(photo, quality=92)
    with serve_process(tmp_path / "serve.log", "--min-face", "48") as (url, _):
        body = json.dumps({"image": base64.b64encode(photo.read_bytes()).decode()}).encode()
        request = urllib.request.Request(f"{url}/v1/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    assert (answer["width"], answer["height"], answer["faces"]) == (3200, 2400, len(places))
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in (p["box"] for p in answer["predictions"])]
    assert all(any(x < cx < x + 80 and y < cy < y + 80 for x, y in places) for cx, cy in centres)


def test_the_command_lines_spelled_out_detector_options_are_detects_own():
    from facegender import cli, detect

    assert cli.DETECTOR_OPTION["choices"] == list(detect.DETECTORS)
    assert cli.DETECTOR_OPTION["default"] == detect.DEFAULT_DETECTOR
    assert cli.MIN_FACE == detect.MIN_FACE and cli.MAX_SIDE == detect.MAX_SIDE


def test_an_unknown_detector_on_the_command_line_is_refused(capsys):
    from facegender.cli import main

    with pytest.raises(SystemExit) as e:
        main(["predict", "photo.jpg", "--detector", "cnn"])
    assert e.value.code == 2 and "--detector" in capsys.readouterr().err
