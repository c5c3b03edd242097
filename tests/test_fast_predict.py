"""The fast prediction path: native-scale detection first, detection threads, reduced decoding of big JPEGs."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import shared
from facegender.detect import MAX_SIDE, FaceDetector
from facegender.images import open_rgb, open_rgb_reduced
from facegender.io import glibc
from facegender import inference
from facegender.inference import Classifier


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier.from_checkpoint(None, precision="fp32")


def astronaut_photo(path, side: int | None = None):
    from skimage.data import astronaut

    image = Image.fromarray(astronaut())
    if side:
        image = image.resize((side, side), Image.BICUBIC)
    image.save(path, quality=92)
    return path


def test_threads_give_the_same_predictions_in_the_same_order(clf, tmp_path):
    files = sorted((shared("scut_fbp5500") / "img").glob("*.jpg"))[::500] + [astronaut_photo(tmp_path / "a.jpg")]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.new("RGB", (300, 200), (90, 140, 200)).save(tmp_path / "sky.png")  # a photo without a face
    files[3:3] = [tmp_path / "broken.jpg", tmp_path / "sky.png"]
    inline = [p.to_dict() for p in clf.iter_predict(files, batch_size=4, workers=0)]
    threaded = [p.to_dict() for p in clf.iter_predict(files, batch_size=4, workers=3)]
    assert threaded == inline
    assert [r["source"] for r in inline if r["face"] in (None, 1)] == [str(f) for f in files]
    assert inline[3]["error"] and inline[4]["faces"] == 0 and sum(r["label"] is not None for r in inline) >= 12


def test_photos_detected_together_give_what_each_photo_gives_alone(clf, tmp_path, monkeypatch):
    """``faces_many`` decodes photos and detects their faces together, a group holding at most
    DETECTED_TOGETHER_PIXELS of decoded pixels: the same stubs and model inputs as ``faces`` photo by photo,
    in order, with an unreadable file and a photo without a face among them."""
    files = sorted((shared("scut_fbp5500") / "img").glob("*.jpg"))[::600] + [astronaut_photo(tmp_path / "a.jpg")]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.new("RGB", (300, 200), (90, 140, 200)).save(tmp_path / "sky.png")
    files[2:2] = [tmp_path / "broken.jpg", tmp_path / "sky.png"]
    alone = [clf.faces(str(f), f) for f in files]
    groups: list[int] = []
    detect_many = clf.detector.detect_many
    monkeypatch.setattr(clf.detector, "detect_many", lambda images: groups.append(len(images)) or detect_many(images))
    with Image.open(files[0]) as first:  # SCUT's photos are all one size: three of them to a group
        monkeypatch.setattr(inference, "DETECTED_TOGETHER_PIXELS", 3 * first.width * first.height)
    together = clf.faces_many([(str(f), f, 1.0) for f in files])
    # one group a time the budget is reached (held pixels, counted after each photo), several photos to a group
    assert len(together) == len(files) and len(groups) >= 3 and max(groups) == 3
    assert sum(groups) == len(files) - 1  # every photo that decodes, once
    for one, many in zip(alone, together):
        assert [stub.to_dict() for stub, _ in one] == [stub.to_dict() for stub, _ in many]
        for (_, a), (_, b) in zip(one, many):
            assert (a is None and b is None) or np.array_equal(a, b)
    assert together[2][0][0].error and together[3][0][0].faces == 0
    assert sum(stub.faces == 1 for one in together for stub, _ in one) >= len(files) - 3


def test_a_shared_detector_gives_each_thread_the_same_answer():
    images = [Image.open(p).convert("RGB") for p in sorted((shared("celeba") / "img").glob("*.jpg"))[::700]]
    detector = FaceDetector()
    expected = [detector.detect(im) for im in images]
    results: dict[int, list] = {}

    def work(k: int):
        results[k] = [detector.detect(im) for im in images]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == expected for k in range(3)) and sum(map(bool, expected)) >= 0.9 * len(images)


def test_small_images_are_upsampled_only_where_native_scale_finds_nothing():
    # CelebA's aligned crops (89x109) hold faces below dlib's 80 px window: only the doubled search finds them
    aligned = [Image.open(p).convert("RGB") for p in sorted((shared("celeba") / "img").glob("0*.jpg"))[::400]]
    chips = [Image.open(p).convert("RGB") for p in sorted(shared("utkface").glob("*.jpg"))[::1000]]
    fast, thorough = FaceDetector(), FaceDetector(always_upsample=True)
    for images in (aligned, chips):
        found = [bool(fast.detect(im)) for im in images]
        assert found == [bool(thorough.detect(im)) for im in images] and sum(found) >= 0.9 * len(images)


def test_big_jpegs_are_decoded_reduced_and_boxes_come_back_in_the_files_pixels(clf, tmp_path):
    big = astronaut_photo(tmp_path / "big.jpg", side=3000)
    reduced, scale = open_rgb_reduced(big, MAX_SIDE)
    assert MAX_SIDE <= max(reduced.size) < 2 * MAX_SIDE and scale == pytest.approx(3000 / max(reduced.size))
    assert open_rgb_reduced(tmp_path / "big.jpg", None)[0].size == (3000, 3000)
    (fast,) = clf.predict([big])  # from the file: reduced decode
    (full,) = clf.predict([open_rgb(big)])  # the fully decoded image
    assert fast.label == full.label and abs(fast.p_male - full.p_male) < 0.05
    assert np.allclose(fast.box, full.box, atol=0.02 * (full.box[2] - full.box[0]))
    small = astronaut_photo(tmp_path / "small.jpg")  # 512 px: decoded whole
    assert open_rgb_reduced(small, MAX_SIDE)[1] == 1.0


REUSE = """
import resource, sys, numpy as np
from facegender.cli import main
if len(sys.argv) > 1:
    main(["predict", *sys.argv[1:]])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    held = [np.ones(1 << 19, np.uint8) for _ in range(16)]
    del held
before = faults()
for _ in range(20):  # a photo's arrays, 16 of 512 KB (larger ones are mapped on their own: map_large_buffers)
    held = [np.ones(1 << 19, np.uint8) for _ in range(16)]
    del held
print(faults() - before)
"""


@pytest.mark.skipif(glibc() is None, reason="predict keeps freed memory through glibc's mallopt")
def test_predict_keeps_freed_memory_for_the_next_photo(tmp_path):
    """glibc gives a freed heap top back to the system, and the next photo's arrays fault it in again page by
    page; predict's process keeps it."""
    photo = astronaut_photo(tmp_path / "a.jpg")
    run = lambda *args: int(subprocess.run([sys.executable, "-c", REUSE, *args], capture_output=True, text=True,
                                            check=True).stdout.split()[-1])
    assert run() > 20 * 1000  # each round's 8 MB (2,048 pages) faulted in again
    assert run(str(photo), "--output", str(tmp_path / "out.csv")) < 100
    assert "female" in (tmp_path / "out.csv").read_text()
