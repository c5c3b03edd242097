"""Face detection on real faces (from ../shared/data) and the canonical crop's geometry."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import faces_cut_by_the_edge
from facegender.detect import EYE_LINE, Face, FaceDetector, _distinct, canonical_box, detect_faces
from facegender.io import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCUT = SHARED / "scut_fbp5500" / "img"


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def utkface_paths() -> list[Path]:
    utkface = SHARED / "utkface"
    if not utkface.is_dir():
        pytest.skip(f"real data not available: {utkface} is absent (the corpora live in ../shared/data)")
    return sorted(utkface.glob("*.jpg"))


def portraits(n: int) -> list[Image.Image]:
    if not SCUT.is_dir():
        pytest.skip(f"real data not available: {SCUT} is absent (the corpora live in ../shared/data)")
    paths = sorted(SCUT.glob("*.jpg"))[::400][:n]
    return [Image.open(p).convert("RGB") for p in paths]


def composed(faces: list[Image.Image], places: list[tuple[int, int, int]], size=(640, 480)):
    canvas = Image.new("RGB", size, (128, 128, 128))
    for face, (x, y, side) in zip(faces, places):
        canvas.paste(face.resize((side, side)), (x, y))
    return canvas


def centre_inside(face: Face, place: tuple[int, int, int]) -> bool:
    x, y, side = place
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    return x < cx < x + side and y < cy < y + side


def test_a_portrait_has_one_face_with_both_eyes(detector):
    image = portraits(1)[0]
    (face,) = detector.detect(image)
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    assert face.score > 0
    for eye in (face.left_eye, face.right_eye):
        assert x0 < eye[0] < x1 and y0 < eye[1] < (y0 + y1) / 2  # eyes sit in the upper half of the box
    assert face.left_eye[0] < face.right_eye[0]


def test_every_face_of_a_group_is_found_where_it_was_pasted(detector):
    places = [(20, 140, 150), (230, 60, 190), (450, 250, 170)]
    faces = detector.detect(composed(portraits(3), places))
    assert len(faces) == 3
    assert all(sum(centre_inside(f, p) for f in faces) == 1 for p in places)
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas == sorted(areas, reverse=True)


def groups(picks: set[int]) -> list[Image.Image]:
    """Three SCUT-FBP5500 portraits of 150-190 px on a grey 640x480 canvas, the ``picks``-th canvases of a draw
    with seed 1."""
    if not SCUT.is_dir():
        pytest.skip(f"real data not available: {SCUT} is absent (the corpora live in ../shared/data)")
    paths, rng, out = sorted(SCUT.glob("*.jpg")), random.Random(1), []
    for i in range(max(picks) + 1):
        places = [(x, side, rng.choice(paths), rng.randint(20, 480 - side - 20)) for x, side in ((20, 150), (230, 190), (450, 170))]
        if i in picks:
            canvas = Image.new("RGB", (640, 480), (128, 128, 128))
            for x, side, path, y in places:
                canvas.paste(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC), (x, y))
            out.append(canvas)
    return out


def test_a_tilted_group_frames_each_face_once(detector):
    # In these, before _distinct, the 128 px pass boxed one face with the portrait around it and the larger pass
    # boxed it tightly: four faces, one of them twice
    for canvas in groups({21, 43, 53}):
        for degrees in (30, -30, 45, -45):
            faces = detector.detect(canvas.rotate(degrees, Image.BILINEAR, expand=True, fillcolor=(128, 128, 128)))
            assert len(faces) == 3, [(tuple(round(v) for v in f.box), round(f.score, 2)) for f in faces]


def test_every_face_of_a_group_thumbnail_is_found(detector):
    # 200x150: faces of 47-59 px, which the first pass (the only one, in so small a photo) scored 0.4-0.64 in
    # these, under its 0.65, until what it doubts got a second look
    for canvas in groups({6, 24, 44, 53, 56}):
        faces = detector.detect(canvas.resize((200, 150), Image.BILINEAR))
        assert len(faces) == 3, [(tuple(round(v) for v in f.box), round(f.score, 2)) for f in faces]


def test_a_group_thumbnail_of_small_faces_gets_a_pass_at_its_own_size(detector, monkeypatch):
    """In a 240x160 photo of four 42 px faces the first pass (128 px) misses some; where the faces it finds are
    a group's (GROUP_FACE_SHARE of the photo's side or less), a pass at the photo's own size finds the rest."""
    from facegender import detect

    paths, rng, photos = utkface_paths()[::500], random.Random(3), []
    for _ in range(30):
        canvas, places = Image.new("RGB", (240, 160), (128, 128, 128)), []
        for j, path in enumerate(rng.sample(paths, 4)):
            places.append((8 + j * 58, 20 + (j % 2) * 70, 42))
            canvas.paste(Image.open(path).convert("RGB").resize((42, 42), Image.BICUBIC), places[-1][:2])
        photos.append((canvas, places))
    share = detect.GROUP_FACE_SHARE
    monkeypatch.setattr(detect, "GROUP_FACE_SHARE", 0.0)
    assert sum(len(detector.detect(canvas)) < 4 for canvas, _ in photos) >= 3  # the first pass alone misses some
    monkeypatch.setattr(detect, "GROUP_FACE_SHARE", share)
    for canvas, places in photos:
        faces = detector.detect(canvas)
        assert len(faces) == 4 and all(sum(centre_inside(f, p) for f in faces) == 1 for p in places)


def shuffled_tiles(path: Path, rng: random.Random, size=(240, 160), tile: int = 16) -> Image.Image:
    """A photo cut into tiles and shuffled: its colours and textures, pieces of its face, and no face."""
    a = np.asarray(Image.open(path).convert("RGB").resize(size, Image.BILINEAR))
    tiles = [a[y:y + tile, x:x + tile] for y in range(0, size[1], tile) for x in range(0, size[0], tile)]
    rng.shuffle(tiles)
    rows = [np.concatenate(tiles[i:i + size[0] // tile], axis=1) for i in range(0, len(tiles), size[0] // tile)]
    return Image.fromarray(np.ascontiguousarray(np.concatenate(rows, axis=0)))


def test_a_thumbnail_without_a_face_keeps_no_fallback_box_that_fails_its_checks(detector, monkeypatch):
    """In small face-less photos of shuffled face pieces the last looks (the full-range network, the padded retry,
    the turned look) see faces. Two checks drop them, each on its own: dlib's landmarks put their eyes elsewhere
    (FALLBACK_EYES_WITHIN), and the short-range network, looking closer, does not confirm the full-range network's
    boxes (FULL_CONFIRMED_SCORE). The tight crops whose faces those looks find keep them, boxes unchanged."""
    from facegender import detect

    celeba = SHARED / "celeba" / "img"
    if not celeba.is_dir():
        pytest.skip(f"real data not available: {celeba} is absent (the corpora live in ../shared/data)")
    rng = random.Random(5)
    empty = [shuffled_tiles(p, rng) for p in rng.sample(sorted(celeba.glob("1*.jpg")), 40)]
    crops = [Image.open(p).convert("RGB") for p in utkface_paths()[::40]]
    within, confirmed = detect.FALLBACK_EYES_WITHIN, detect.FULL_CONFIRMED_SCORE

    def boxes(images, eyes, look):
        monkeypatch.setattr(detect, "FALLBACK_EYES_WITHIN", eyes)
        monkeypatch.setattr(detect, "FULL_CONFIRMED_SCORE", look)
        return [[f.box for f in detector.detect(image)] for image in images]

    unchecked = sum(map(len, boxes(empty, None, None)))
    assert unchecked >= 8  # the last looks took shuffled pieces for faces (20 here)
    assert sum(map(len, boxes(empty, within, None))) <= unchecked // 4  # 2 here
    assert sum(map(len, boxes(empty, None, confirmed))) <= unchecked // 4  # 1 here
    found = boxes(crops, None, None)
    checks, agree = [], detect._eyes_agree
    monkeypatch.setattr(detect, "_eyes_agree", lambda *args: checks.append(agree(*args)) or checks[-1])
    looks, confirm = [], detect._confirmed
    monkeypatch.setattr(detect, "_confirmed", lambda short, rgb, ds: looks.append((ds, confirm(short, rgb, ds))) or looks[-1][1])
    assert boxes(crops, within, confirmed) == found
    assert len(checks) >= 2 and all(checks)  # crops whose faces the retry's full-range network found (4 here)
    # and whose faces the full-range network found: every box confirmed (54 here)
    assert sum(bool(ds) for ds, _ in looks) >= 10 and all(kept == ds for ds, kept in looks)


def test_a_full_range_box_at_a_small_photos_edge_is_confirmed_by_the_better_of_two_looks(monkeypatch):
    """The short-range network's look that confirms a full-range box sees black beyond the photo's edge, which
    leaves a face the edge cuts too little of itself; at the edge a second window repeats the edge pixels, and the
    better of the two looks counts."""
    from facegender import detect
    from facegender.blazeface import BlazeFace, Detection

    short, photos = BlazeFace("short"), []
    for canvas, _, (x0, y0, x1, y1) in faces_cut_by_the_edge(0.45, (320, 240), 120, 6, along=(60, 5, 20, 2)):
        m = 0.1 * (x1 - x0)  # the face's box as a network draws it, reaching beyond the edge
        photos.append((canvas, Detection((x0 + m, y0 + m, x1 - m, y1 - m), 0.6, np.zeros((6, 2), np.float32))))
    confirmed = sum(len(detect._confirmed(short, canvas, [d])) for canvas, d in photos)
    look = BlazeFace.second_look
    monkeypatch.setattr(BlazeFace, "second_look", lambda self, image, ds, window, side, repeat_edges=False:
                        look(self, image, ds, window, side, False))
    black = sum(len(detect._confirmed(short, canvas, [d])) for canvas, d in photos)
    assert confirmed >= black + 3 and confirmed >= 10  # 12 against 8 here


def test_a_face_framed_twice_keeps_its_likelier_frame():
    face = lambda box, score: Face(box, score)
    tight, loose = face((100, 100, 200, 200), 0.9), face((70, 60, 250, 240), 0.7)  # loose holds all of tight
    shifted = face((110, 105, 210, 205), 0.8)  # IoU 0.74 with tight
    beside = face((180, 100, 280, 200), 0.95)  # another face, overlapping tight by IoU 0.11
    assert _distinct([loose, tight, shifted, beside]) == [beside, tight]
    assert _distinct([face((0, 0, 10, 10), 0.5), face((20, 0, 30, 10), 0.6)]) == [face((20, 0, 30, 10), 0.6),
                                                                                   face((0, 0, 10, 10), 0.5)]


def test_a_large_photo_reports_boxes_in_its_own_pixels(detector):
    place = (2000, 900, 600)
    (face,) = detector.detect(composed(portraits(1), [place], size=(3200, 2400)))
    assert centre_inside(face, place)
    assert face.box[2] - face.box[0] > 200  # unscaled, it would be under 1280/3200 of that


def test_a_photo_upside_down_has_its_face_found_and_its_eyes_placed(detector, monkeypatch):
    """BlazeFace's passes find few faces upside down; where they find none, the photo turned 180 degrees is
    looked at too, and the face comes back in the photo's own pixels, its landmarks those of the upright face."""
    from facegender import detect

    upright = [Image.open(p).convert("RGB") for p in utkface_paths()[::2000][:6]]
    turned = [p.transpose(Image.Transpose.ROTATE_180) for p in upright]
    monkeypatch.setattr(detect, "LOOK_TURNED", False)
    missed = [i for i, p in enumerate(turned) if not detector.detect(p)]
    assert len(missed) >= 3  # the set holds faces the upright search alone misses (5 of 6 here)
    monkeypatch.setattr(detect, "LOOK_TURNED", True)
    for i in missed:
        (face,) = detector.detect(turned[i])
        (reference,) = detector.detect(upright[i])
        w, h = upright[i].size
        turn = lambda p: (w - p[0], h - p[1])  # noqa: E731
        eye_distance = abs(reference.left_eye[0] - reference.right_eye[0])
        for got, want in ((face.left_eye, reference.left_eye), (face.right_eye, reference.right_eye)):
            assert abs(got[0] - turn(want)[0]) < 0.1 * eye_distance and abs(got[1] - turn(want)[1]) < 0.1 * eye_distance
        assert face.left_eye[0] > face.right_eye[0] and face.left_eye[1] > face.box[1] + (face.box[3] - face.box[1]) / 2
    # what the turned look finds passes the eye check (above) and goes through it: refused there, the face is gone
    monkeypatch.setattr(detect, "_eyes_agree", lambda *args: False)
    assert not any(detector.detect(turned[i]) for i in missed)


def test_an_upside_down_face_that_the_padded_retry_reads_upright_is_taken_from_the_turned_look(detector, monkeypatch):
    """The padded retry takes some faces upside down for upright ones, framed over the forehead with the eyes in the
    box's upper half. Where it finds faces the turned look runs too, and its faces, scoring higher, replace them;
    in upright photos it never does."""
    from facegender import detect

    upright = [Image.open(p).convert("RGB") for p in utkface_paths()[::250]]
    turned = [p.transpose(Image.Transpose.ROTATE_180) for p in upright]
    read_upright = lambda face: face.left_eye[1] < (face.box[1] + face.box[3]) / 2  # noqa: E731
    monkeypatch.setattr(detect, "TURNED_OVER_RETRY", False)
    before = [detector.detect(p) for p in turned]
    unturned = [detector.detect(p) for p in upright]
    wrong = [i for i, faces in enumerate(before) if faces and all(map(read_upright, faces))]
    assert len(wrong) >= 8  # 26 of these 95 crops
    monkeypatch.setattr(detect, "TURNED_OVER_RETRY", True)
    assert [detector.detect(p) for p in upright] == unturned
    after = {i: detector.detect(turned[i]) for i in wrong}
    right = [i for i in wrong if len(after[i]) == 1 and not read_upright(after[i][0])]
    assert len(right) >= 3 * len(wrong) // 4  # 23 of the 26 (the others: the full-range network found them first, or the turned look none)
    for i in right:
        (face,), (reference,) = after[i], unturned[i]
        w, h = upright[i].size
        eye_distance = abs(reference.left_eye[0] - reference.right_eye[0])
        for got, want in ((face.left_eye, reference.left_eye), (face.right_eye, reference.right_eye)):
            assert math.dist(got, (w - want[0], h - want[1])) < 0.15 * eye_distance


def test_a_blank_image_has_no_face(detector):
    assert detector.detect(Image.new("RGB", (300, 200), (128, 128, 128))) == []
    assert detector.detect(Image.new("L", (50, 50))) == []


def test_detect_faces_pairs_each_face_with_its_canonical_box(detector):
    image = composed(portraits(2), [(40, 100, 200), (360, 120, 160)])
    pairs = detect_faces(image, detector)
    assert [box for _, box in pairs] == [canonical_box(face, image.size) for face, _ in pairs]
    assert len(pairs) == 2


def contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


@pytest.mark.parametrize(
    "face",
    [
        Face((50.3, 40.7, 130.2, 120.9), 1.0, (72.5, 65.0), (108.0, 66.5)),
        Face((50.3, 40.7, 130.2, 120.9), 1.0),  # no landmarks: placed by the box
        Face((50, 40, 130, 120), 1.0, (88, 60), (92, 60)),  # landmarks collapsed onto each other
        Face((-10, 5, 60, 75), 0.5, (10, 30), (40, 31)),  # cut by the image's edge
    ],
)
def test_canonical_box_is_a_deterministic_square_holding_the_face(face):
    box = canonical_box(face, (200, 160))
    assert all(isinstance(v, int) for v in box)
    assert box[2] - box[0] == box[3] - box[1] > 0
    assert contains(box, face.box)
    assert canonical_box(face, (200, 160)) == box


def test_canonical_box_puts_the_eyes_on_the_eye_line():
    face = Face((60, 60, 140, 140), 1.0, (82, 85), (118, 85))
    x0, y0, x1, y1 = canonical_box(face, (200, 200))
    assert (x0 + x1) / 2 == pytest.approx(100, abs=1)
    assert (85 - y0) / (y1 - y0) == pytest.approx(EYE_LINE, abs=0.02)


def test_canonical_crops_of_real_faces_contain_their_boxes(detector):
    for image in portraits(3):
        for face, box in detect_faces(image, detector):
            assert contains(box, face.box)


def test_a_missing_dlib_is_a_user_error_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(UserError, match="pip install"):
        FaceDetector().detect(Image.new("RGB", (32, 32)))


def test_threads_sharing_one_detector_find_what_one_thread_finds():
    from concurrent.futures import ThreadPoolExecutor

    images = portraits(8) * 3
    shared = FaceDetector()
    alone = [[f.box for f in FaceDetector().detect(im)] for im in images]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda im: [f.box for f in shared.detect(im)], images))
    assert together == alone and all(len(boxes) == 1 for boxes in alone)
    # at most one set of models per thread was loaded, and the threads of later pools reuse them
    loaded = {id(models) for models in shared._idle}
    assert 1 <= len(loaded) <= 4
    for image, boxes in zip(images[:3], alone):
        with ThreadPoolExecutor(1) as pool:
            assert [f.box for f in pool.submit(shared.detect, image).result()] == boxes
    assert {id(models) for models in shared._idle} == loaded
