import io
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from facegender.images import (BadImage, check_image, decode, decode_rgb, load_face, load_faces, open_image, open_rgb,
                               open_rgb_reduced)


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_rgb_jpeg_passes_through(tmp_path):
    path = _save(Image.new("RGB", (40, 30), (200, 10, 10)), tmp_path / "a.jpg", quality=95)
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.abs(np.asarray(img).astype(int) - (200, 10, 10)).max() < 6


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_colour_modes_become_rgb(tmp_path, mode, value, expected):
    suffix = ".tif" if mode == "CMYK" else ".png"
    path = _save(Image.new(mode, (8, 8), value), tmp_path / f"x{suffix}")
    a = np.asarray(open_rgb(path))
    assert a.shape == (8, 8, 3) and a.dtype == np.uint8
    assert (a == expected).all()


def test_palette_image(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    a = np.asarray(open_rgb(_save(img, tmp_path / "p.png")))
    assert (a == (10, 20, 30)).all()


def test_palette_with_transparency_composites_onto_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 20, 30, 40, 50, 60] + [0, 0, 0] * 254)
    img.putpixel((0, 0), 1)
    path = _save(img, tmp_path / "pt.png", transparency=0)
    a = np.asarray(open_rgb(path))
    assert (a[0, 0] == (40, 50, 60)).all()
    assert (a[4, 4] == (255, 255, 255)).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composites_onto_white(tmp_path, mode):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 0  # black where opaque
    rgba[:4, :, 3] = 255  # top half opaque, bottom half transparent
    img = Image.fromarray(rgba, "RGBA").convert(mode)
    a = np.asarray(open_rgb(_save(img, tmp_path / "a.png")))
    assert (a[:4] == 0).all()
    assert (a[4:] == 255).all()


def test_16_bit_png_is_scaled_by_range_not_clipped(tmp_path):
    grey16 = np.array([[0, 257 * 100], [257 * 200, 65535]], np.uint16)
    img = Image.fromarray(grey16)
    assert img.mode == "I;16"
    a = np.asarray(open_rgb(_save(img, tmp_path / "g16.png")))
    assert a[..., 0].tolist() == [[0, 100], [200, 255]]
    assert (a[..., 0] == a[..., 2]).all()


@pytest.mark.parametrize("mode, dtype", [("I", np.int32), ("F", np.float32)])
def test_32_bit_images_are_stretched_over_their_range(tmp_path, mode, dtype):
    data = np.array([[-1000, 0], [1000, 3000]], dtype)
    a = np.asarray(open_rgb(_save(Image.fromarray(data, mode), tmp_path / "w.tif")))
    assert a[..., 1].tolist() == [[0, 64], [128, 255]]


def test_exif_rotation_is_applied(tmp_path):
    # A landscape 40x20 stored image, left half black and right half white, tagged "rotate 90 CW".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(stored), tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    a = np.asarray(open_rgb(path))
    assert a.shape == (40, 20, 3)  # upright: portrait
    assert a[:15].mean() < 20 and a[25:].mean() > 235  # the left half rotated to the top


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(full)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(BadImage, match="truncated") as e:
        open_rgb(cut)
    assert str(cut) in str(e.value) and e.value.reason == "truncated"
    with pytest.raises(BadImage, match="truncated"):
        check_image(cut.read_bytes(), "cut.jpg")


def test_empty_file(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="empty file"):
        open_rgb(tmp_path / "e.jpg")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "t.jpg").write_text("this is not a picture\n")
    with pytest.raises(BadImage, match="not an image"):
        open_rgb(tmp_path / "t.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(BadImage, match="unreadable"):
        open_rgb(tmp_path / "nope.jpg")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _save(Image.new("L", (100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # the warning zone: between 1x and 2x the limit
    with pytest.raises(BadImage, match="decompression bomb"):
        open_rgb(path)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_rgb(path.read_bytes(), "upload.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # beyond 2x: Pillow's own error
    with pytest.raises(BadImage, match="decompression bomb"):
        open_rgb(path)


def test_bombs_are_refused_while_other_threads_decode(tmp_path, monkeypatch):
    """The refusal holds under concurrency (a server decodes uploads on several threads): no thread's
    decoding can switch the check off for another."""
    bomb = _save(Image.new("L", (100, 100)), tmp_path / "bomb.png").read_bytes()
    fine = _save(Image.new("RGB", (60, 60), (200, 30, 30)), tmp_path / "fine.png").read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)

    def decode(i):
        data = bomb if i % 2 else fine
        try:
            return decode_rgb(data, f"{i}.png").size
        except BadImage as e:
            return e.reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(decode, range(400)))
    assert results[1::2] == ["decompression bomb, refused"] * 200
    assert results[0::2] == [(60, 60)] * 200


def test_load_face_resizes_deterministically(tmp_path):
    rng = np.random.default_rng(1)
    path = _save(Image.fromarray(rng.integers(0, 255, (90, 70, 3), np.uint8)), tmp_path / "f.png")
    a = load_face(path, size=32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, load_face(path, size=32))


def test_load_face_crops_with_edge_replication(tmp_path):
    stored = np.zeros((20, 20, 3), np.uint8)
    stored[:, 10:] = 200  # left half black, right half grey
    path = _save(Image.fromarray(stored), tmp_path / "c.png")
    inside = load_face(path, box=(10, 0, 20, 20), size=10)
    assert (inside == 200).all()
    beyond = load_face(path, box=(15, 5, 35, 25), size=20)  # extends 15 px past the right edge
    assert (beyond == 200).all()
    left = load_face(path, box=(-10, 0, 10, 20), size=20)  # extends 10 px past the left edge
    assert (left == 0).all()
    with pytest.raises(BadImage, match="empty crop box"):
        load_face(path, box=(5, 5, 5, 10))


def test_load_faces_reports_bad_files_and_keeps_order(tmp_path):
    good = [_save(Image.new("RGB", (16, 16), (i * 40, 0, 0)), tmp_path / f"g{i}.png") for i in range(4)]
    (tmp_path / "bad.jpg").write_bytes(b"")
    items = [(good[0], None), (tmp_path / "bad.jpg", None), (good[1], None), (good[2], (0, 0, 8, 8)), (good[3], None)]
    for workers in (1, 2):
        faces, bad = load_faces(items, size=8, workers=workers)
        assert faces.shape == (5, 8, 8, 3) and faces.dtype == np.uint8
        assert [i for i, _ in bad] == [1] and "empty file" in bad[0][1]
        assert (faces[1] == 0).all()
        assert [int(faces[i, 0, 0, 0]) for i in (0, 2, 3, 4)] == [0, 40, 80, 120]


def test_bad_image_pickles():
    e = pickle.loads(pickle.dumps(BadImage("x.jpg", "truncated", "detail")))
    assert (e.path, e.reason, str(e)) == ("x.jpg", "truncated", "x.jpg: truncated (detail)")


def test_check_image_accepts_good_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    check_image(buf.getvalue(), "ok.jpg")


def _noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "P":
        img = Image.frombytes("P", size, rng.integers(0, 64, (h, w), dtype=np.uint8).tobytes())
        img.putpalette(rng.integers(0, 256, 64 * 3, dtype=np.uint8).tobytes())
        return img
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P"])
def test_large_images_are_reduced_strip_by_strip_exactly_as_the_whole_would_be(tmp_path, mode):
    """Any format, not only JPEG, is reduced while it decodes; the strips add up to the whole image's reduce."""
    img = _noise(mode, (2900, 2700))
    data = _save(img, tmp_path / "big.png").read_bytes()
    full = open_rgb(tmp_path / "big.png")
    reduced, scale = open_rgb_reduced(tmp_path / "big.png", 1280)
    assert reduced.size == (1450, 1350) and scale == 2.0
    assert np.array_equal(np.asarray(reduced), np.asarray(full.reduce(2)))
    assert decode_rgb(data, "big.png", 1280).size == (1450, 1350)


def test_reduced_images_are_turned_upright_after_reducing(tmp_path):
    stored = np.zeros((1300, 2800, 3), np.uint8)
    stored[:, 1400:] = 255  # right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    path = _save(Image.fromarray(stored), tmp_path / "r.png", exif=exif.tobytes())
    img, scale = open_rgb_reduced(path, 1280)
    assert img.size == (650, 1400) and scale == 2.0
    a = np.asarray(img)
    assert a[:600].mean() < 5 and a[800:].mean() > 250  # the right half turned to the bottom


@pytest.mark.parametrize("data, named", [
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "EPS"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    (b"%PDF-1.7\n", "PDF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIF"),
    (lambda: _encoded(Image.new("RGB", (16, 16)), "ICO"), "ICO"),
    (lambda: _encoded(Image.new("RGB", (16, 16)), "PPM"), "PPM"),
])
def test_formats_off_the_allow_list_are_named_and_never_decoded(data, named):
    data = data() if callable(data) else data
    with pytest.raises(BadImage) as e:
        decode_rgb(data, "upload")
    assert e.value.reason == "not a supported image" and e.value.detail.startswith(f"{named}; send JPEG, PNG")
    with pytest.raises(BadImage, match="not an image"):
        decode_rgb(b"<html><body>hello</body></html>", "page")


def _encoded(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def test_the_decoding_cost_is_known_from_the_header_and_bounds_what_decoding_makes(tmp_path):
    jpeg = _encoded(_noise("RGB", (3000, 2000)), "JPEG")
    opened = open_image(jpeg, "a.jpg", 1280)
    assert opened.size == (3000, 2000) and opened.image.size == (1500, 1000)  # libjpeg's 1/2 scale
    assert opened.cost == 1500 * 1000 * 4  # decoded as RGB and handed on as it is
    rgb, scale = decode(opened)
    assert rgb.size == (1500, 1000) and scale == 2.0
    grey16 = _encoded(_noise("I;16", (3000, 2000)), "PNG")
    opened = open_image(grey16, "g.png", 1280)
    assert opened.cost >= 3000 * 2000 * 2 + 1500 * 1000 * 4  # its 16-bit pixels, then the reduced RGB
    with pytest.raises(BadImage, match=r"3000 x 2000 = 6.0 M pixels, more than the 5 M allowed \(--max-pixels\)"):
        open_image(grey16, "g.png", pixels=5_000_000)
    asked = []

    def over_budget(cost: int) -> None:  # a server's memory budget, full
        asked.append(cost)
        raise RuntimeError("over budget")

    with pytest.raises(RuntimeError, match="over budget"):
        open_image(grey16, "g.png", afford=over_budget)
    assert asked == [open_image(grey16, "g.png").cost]
