"""Image decoding: the one decode + crop + resize that training, evaluation and prediction all use.

Every file is opened the same guarded way (``open_image``): only the formats of the allow-list, only up to a
pixel budget, and decoded without full-size copies: a JPEG is reduced by libjpeg while it decodes (when
the caller needs fewer pixels), any other format is converted to RGB and reduced strip by strip. Peak
memory while decoding one image is at most ``decoding_cost``: 4 bytes per decoded pixel (Pillow's
own storage, 1 for greyscale and palette, 2 for 16-bit) plus 4 per pixel of the RGB image handed on, plus
a few MiB of strips.
"""
from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from .config import IMAGE_SIZE
from .io import UserError, glibc

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; may extend beyond the image

# Pillow's names for the accepted formats. Every other reader stays off: some run interpreters (EPS hands
# the file to Ghostscript) or have seen far less hostile input than these. MPO (a JPEG carrying extra
# pictures, as many phones write) opens through the JPEG reader.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
DEFAULT_MAX_PIXELS = 50_000_000  # a 50 MP camera's photo; --max-pixels
_MAX_PIXELS_ENV = "FACEGENDER_MAX_PIXELS"  # the environment carries the budget to spawned worker processes
STRIP_PIXELS = 1 << 19  # converted at a time
_STRIP_BYTES = 64 * STRIP_PIXELS  # the strip, its float64 scaling or RGBA compositing, its RGB copy: 32 MiB
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # Pillow: 4 for the rest
_WEBP_BYTES = 12  # per pixel, beyond Pillow's 4: libwebp's canvases (made when the file is opened) and a copy
_WIDE = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
# formats Pillow has no reader for, named so that the answer says what was sent
_OTHER_FORMATS = ((b"%PDF-", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG"))
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transposition that makes the image upright


class BadImage(Exception):
    """A file that cannot be decoded into an RGB image; the message names the file and why."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail  # reason: a category reports can count
        super().__init__(f"{path}: {self.why}")

    @property
    def why(self) -> str:
        return self.reason + (f" ({self.detail})" if self.detail else "")

    def __reduce__(self):  # so it survives the trip back from a worker process
        return BadImage, (self.path, self.reason, self.detail)


def max_pixels() -> int:
    """The pixel budget: larger images are refused before they are decoded (``set_max_pixels``)."""
    return int(os.environ.get(_MAX_PIXELS_ENV) or DEFAULT_MAX_PIXELS)


def set_max_pixels(pixels: int) -> None:
    """Set the pixel budget of this process and of the worker processes it starts later (--max-pixels)."""
    if pixels < 1:
        raise UserError(f"--max-pixels {pixels}: must be at least 1 (default {DEFAULT_MAX_PIXELS:,})")
    os.environ[_MAX_PIXELS_ENV] = str(int(pixels))


def map_large_buffers(threshold: int = 1 << 20) -> None:
    """Have the C allocator map every buffer of ``threshold`` bytes or more on its own and unmap it when
    freed: then the memory of a large image (its pixels, its strips, its upload) goes back to the system as
    soon as it is done with. glibc's default raises the threshold each time such a buffer is freed, after
    which large images are carved from the heap, whose freed pieces stay resident and add up image after
    image (measured: +100 MB over seven large images). Process-wide; does nothing where malloc is not glibc's.
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also turns glibc's dynamic threshold off


# glibc gives freed memory at the top of its heap back to the system once a little is free there (128 KB, or
# twice the largest buffer it lately mapped), and the next photo's arrays (its pixels' copies, the detector's
# outputs, the chips) take it back page by page: about 500 page faults a 640x480 photo in predict.
KEEP_FREED = {-1: 64 << 20, -2: 16 << 20}  # M_TRIM_THRESHOLD, M_TOP_PAD: bytes


def keep_freed_memory() -> None:
    """Keep up to KEEP_FREED bytes of freed heap for reuse rather than hand them back after every photo.
    Beside ``map_large_buffers`` (which still sends buffers of its threshold and more back at once), so only
    the many smaller arrays of a photo stay. Process-wide (for a process of facegender's own: ``predict``);
    does nothing where malloc is not glibc's."""
    libc = glibc()
    if libc is not None:
        for parameter, value in KEEP_FREED.items():
            libc.mallopt(parameter, value)


def limit_png_text(total: int = 4 << 20) -> None:
    """Refuse a PNG whose text chunks (metadata, compressed) unpack to more than ``total`` bytes: Pillow's
    own limit, 64 MiB, lets a 200 KB file take 64 MiB while its header is read. Process-wide."""
    PngImagePlugin.MAX_TEXT_MEMORY = total


@contextlib.contextmanager
def _decoding(name) -> Iterator[None]:
    """Translate Pillow's many failure types into one BadImage that says what is wrong with ``name``."""
    try:
        yield
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(name, "decompression bomb, refused", str(e)) from None
    except OSError as e:
        if e.errno is not None:  # the operating system's error, not Pillow's
            raise BadImage(name, "unreadable", e.strerror) from None
        why = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadImage(name, why, f"{e.__class__.__name__}: {e}") from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError) as e:
        raise BadImage(name, "corrupt", f"{e.__class__.__name__}: {e}") from None
    except MemoryError:
        raise BadImage(name, "too large to decode", "out of memory") from None


class Opened(NamedTuple):
    """An image file whose header has been read and accepted, its pixels not yet decoded."""

    image: Image.Image  # reduced while decoding where ``min_side`` allows (a JPEG's draft)
    name: str  # what errors call it
    size: tuple[int, int]  # the file's own width and height
    min_side: int | None  # decode no smaller than this on the longer side; None: every pixel
    cost: int  # the most bytes decoding it holds at once (``decoding_cost``)


def open_image(source: str | os.PathLike | bytes, name, min_side: int | None = None, pixels: int | None = None,
               afford: Callable[[int], None] | None = None, most_reduced: int | None = None) -> Opened:
    """Read the header of a file (a path, or the bytes of one) and check it: a format of ``FORMATS`` (else
    BadImage "not a supported image" or "not an image": 415 to the API) and at most ``pixels`` (default
    ``max_pixels()``; else "decompression bomb, refused"). Cheap: nothing is decoded yet (``decode``).
    ``min_side``: decode no smaller than this on the longer side; ``most_reduced``: nor by more than this
    whole factor (None: any).

    ``afford(cost)`` is called with the bytes decoding will hold (``Opened.cost``) before any of them are
    taken, and may raise to refuse them: a server's memory budget.
    """
    pixels = pixels or max_pixels()
    with _decoding(name):
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise BadImage(name, "empty file")
            fp = io.BytesIO(source)
        else:
            if os.path.getsize(source) == 0:
                raise BadImage(name, "empty file")
            fp = source
        webp = _webp_size(_prefix(source, 30))
        if webp:  # checked before Pillow opens it: libwebp takes its memory then, not when it decodes
            _check_pixels(webp, name, pixels)
            if afford:
                afford(_cost(webp, 4 + _WEBP_BYTES, _floor(webp, min_side, most_reduced), as_is=False))
        try:
            image = Image.open(fp, formats=FORMATS)
        except UnidentifiedImageError:
            raise BadImage(name, *_unrecognised(_prefix(source, 4096))) from None
        try:
            opened = _checked(image, name, _floor(image.size, min_side, most_reduced), pixels)
            if afford and not webp:
                afford(opened.cost)
            return opened
        except BaseException:
            image.close()
            raise


def _check_pixels(size: tuple[int, int], name, budget: int) -> None:
    width, height = size
    # Pillow refuses beyond twice MAX_IMAGE_PIXELS and only warns between once and twice it: checked here
    # rather than by turning the warning into an error, because the warnings filters are global to the
    # process and images decode on several threads at once.
    pillow = Image.MAX_IMAGE_PIXELS or budget
    if width * height > min(budget, pillow):
        flag = " (--max-pixels)" if budget <= pillow else ""
        raise BadImage(name, "decompression bomb, refused",
                       f"{width} x {height} = {width * height / 1e6:.1f} M pixels, more than the "
                       f"{min(budget, pillow) / 1e6:g} M allowed{flag}")
    if width < 1 or height < 1:
        raise BadImage(name, "corrupt", f"{width} x {height} pixels")


def _checked(image: Image.Image, name, min_side: int | None, budget: int) -> Opened:
    _check_pixels(image.size, name, budget)
    width, height = size = image.size
    if min_side and image.format in ("JPEG", "MPO") and max(size) > 2 * min_side:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, skipping the detail: several times faster than decoding
        # it all and shrinking; the longer side stays at least min_side
        k = min_side / max(size)
        image.draft("RGB", (math.ceil(width * k), math.ceil(height * k)))
    return Opened(image, str(name), size, min_side, decoding_cost(image, min_side))


def decoding_cost(image: Image.Image, min_side: int | None) -> int:
    """Bytes that decoding ``image`` (header read, draft applied) holds at its peak: its pixels as Pillow
    stores them, the RGB image handed on, and the strips between the two."""
    stored = _STORED_BYTES.get(image.mode, 4) + (_WEBP_BYTES if image.format == "WEBP" else 0)
    return _cost(image.size, stored, min_side, as_is=image.mode == "RGB")


def _cost(size: tuple[int, int], stored: int, min_side: int | None, as_is: bool) -> int:
    """``decoding_cost`` of an image of ``size`` whose decoding holds ``stored`` bytes a pixel; ``as_is``: RGB
    already, handed on as decoded unless it is reduced."""
    width, height = size
    k = _reduction(size, min_side)
    if k == 1 and as_is:
        return width * height * stored
    return width * height * stored + 4 * math.ceil(width / k) * math.ceil(height / k) + _STRIP_BYTES


def _floor(size: tuple[int, int], min_side: int | None, most_reduced: int | None) -> int | None:
    """The ``min_side`` an image of ``size`` decodes to at least, for ``open_image``'s two bounds."""
    if not min_side or most_reduced is None:
        return min_side
    return max(min_side, math.ceil(max(size) / max(1, most_reduced)))


def _reduction(size: tuple[int, int], min_side: int | None) -> int:
    """The whole factor an image is shrunk by, its longer side kept at least ``min_side``."""
    return max(1, max(size) // min_side) if min_side else 1


def _prefix(source, n: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:n])
    with open(source, "rb") as f:
        return f.read(n)


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """A WebP file's width and height from its first 30 bytes (None for anything else)."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def _unrecognised(prefix: bytes) -> tuple[str, str]:
    """(reason, detail) for a file no accepted format reads: name the format where it is a known one."""
    head = prefix.lstrip(b"\xef\xbb\xbf \t\r\n")
    found = next((fmt for magic, fmt in _OTHER_FORMATS if head.startswith(magic)), None)
    if found == "SVG" and b"<svg" not in prefix.lower():
        found = None  # some other XML
    if prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS:
        found = "HEIF"
    if found is None:
        Image.init()
        for fmt, (_, accept) in Image.OPEN.items():
            # only the readers' signature checks run, on the first bytes, never the readers themselves
            with contextlib.suppress(Exception):
                if fmt not in FORMATS and accept and accept(prefix[:16]):
                    found = fmt
                    break
    if found is None:
        return "not an image", "unrecognised format"
    return "not a supported image", f"{found}; send {FORMAT_NAMES}"


def decode(opened: Opened) -> tuple[Image.Image, float]:
    """Decode an ``open_image`` into an upright 8-bit RGB image, reduced by a whole factor where its longer
    side is at least twice ``min_side``; also the factor from its pixels to the file's. BadImage if it
    does not decode (truncated, corrupt)."""
    image = opened.image
    with _decoding(opened.name), image:
        image.load()  # decode now, so that a truncated file fails here rather than later
        turn = _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation))
        rgb = _rgb(image, _reduction(image.size, opened.min_side))
        if rgb is not image:
            image.close()  # its pixels, now: the caller may hold ``opened`` a while longer
        if turn is not None:
            rgb = rgb.transpose(turn)
    return rgb, max(opened.size) / max(rgb.size)


def _rgb(image: Image.Image, k: int) -> Image.Image:
    """``image`` (decoded) in RGB, shrunk k times by averaging k x k blocks; converted strip by strip, so
    that no full-size intermediate (float, RGBA) ever exists."""
    if image.mode == "RGB" and k == 1:
        return image
    width, height = image.size
    lo, hi = _range(image)
    transparent = image.has_transparency_data
    out = Image.new("RGB", (math.ceil(width / k), math.ceil(height / k)))
    rows = max(1, STRIP_PIXELS // (width * k)) * k  # whole blocks of k rows, so strips reduce like the whole
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        strip = _strip_rgb(strip, lo, hi, transparent)
        out.paste(strip.reduce(k) if k > 1 else strip, (0, top // k))
    return out


def _range(image: Image.Image) -> tuple[float, float]:
    """The values that map to black and white: 16-bit data by its nominal range (brightness means what the
    file meant; converting directly clips), 32-bit data by what is there (it has no nominal range)."""
    if image.mode not in _WIDE:
        return 0.0, 255.0
    if image.mode.startswith("I;16"):
        return 0.0, 65535.0
    lo, hi = math.inf, -math.inf
    width, height = image.size
    rows = max(1, STRIP_PIXELS // width)
    for top in range(0, height, rows):
        a = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.float64)
        finite = a[np.isfinite(a)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _strip_rgb(strip: Image.Image, lo: float, hi: float, transparent: bool) -> Image.Image:
    if strip.mode.startswith("I;16"):  # x * 255 / 65535 is x / 257, never halfway: whole numbers round exactly
        grey = ((np.asarray(strip).astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if strip.mode in _WIDE:
        a = np.nan_to_num(np.asarray(strip, dtype=np.float64), nan=lo, posinf=hi, neginf=lo)
        grey = (np.zeros(a.shape, np.uint8) if hi <= lo else
                np.round((np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8))
        return Image.fromarray(grey, "L").convert("RGB")
    if transparent:
        # Transparent pixels carry arbitrary colour; a white background is what viewers show.
        white = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, strip.convert("RGBA")).convert("RGB")
    return strip if strip.mode == "RGB" else strip.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an upright 8-bit RGB image, or raise BadImage saying why not."""
    return open_rgb_reduced(path, None)[0]


def open_rgb_reduced(path: str | os.PathLike, min_side: int | None,
                     most_reduced: int | None = None) -> tuple[Image.Image, float]:
    """``open_rgb``, but an image whose longer side exceeds twice ``min_side`` is reduced while it decodes
    (a JPEG by libjpeg at 1/2, 1/4 or 1/8 scale: several times faster than decoding it all), its longer
    side kept at least ``min_side`` and the factor at most ``most_reduced``. Also returns the factor from
    the decoded image's pixels to the file's.
    """
    return decode(open_image(path, path, min_side, most_reduced=most_reduced))


def decode_rgb(data: bytes, name: str, min_side: int | None = None) -> Image.Image:
    """``open_rgb`` for an image's bytes already in memory (an upload, a file Ray read); ``name`` is what
    the errors call it. The bytes never touch the disk."""
    return decode(open_image(data, name, min_side))[0]


def check_image(data: bytes, name: str) -> None:
    """Raise BadImage if ``data`` does not decode; cheap: JPEGs decode at 1/8 scale, which still reads every byte."""
    opened = open_image(data, name)
    with _decoding(name), opened.image as img:
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (1, 1))
        img.load()


def _crop(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Crop to ``box``; parts outside the image are filled by replicating its edge pixels."""
    x0, y0, x1, y1 = box
    w, h = img.size
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return img.crop(box)
    left, top = max(0, -x0), max(0, -y0)
    padded = np.pad(
        np.asarray(img),
        ((top, max(0, y1 - h)), (left, max(0, x1 - w)), (0, 0)),
        mode="edge",
    )
    return Image.fromarray(padded[y0 + top : y1 + top, x0 + left : x1 + left])


def load_face(path: str | os.PathLike, box: Box | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """The model's view of an image file: see ``face_array``."""
    return face_array(open_rgb(path), box, size, name=path)


def face_array(img: Image.Image, box: Box | None = None, size: int = IMAGE_SIZE, name="<image>") -> np.ndarray:
    """RGB image -> uint8 (size, size, 3): cropped to ``box`` (edge-replicated beyond the image), resized.

    PIL's bilinear resize filters over the whole source footprint when shrinking (antialiased) and is
    deterministic, so caches, evaluation and prediction see the same pixels.
    """
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise BadImage(name, "empty crop box", str(tuple(box)))
        img = _crop(img, (x0, y0, x1, y1))
    img = img.resize((size, size), Image.BILINEAR)
    return np.array(img, dtype=np.uint8)


MIN_PARALLEL_ITEMS = 256  # below this, starting the processes (each imports numpy and PIL) costs more than it saves


def parallel_map(fn: Callable, items: Sequence, workers: int) -> list:
    """``[fn(x) for x in items]`` over ``workers`` processes (in-process when workers <= 1).

    Spawned, not forked: the caller may already hold torch threads, which a fork would copy mid-state.
    ``fn`` must be a module-level function.
    """
    if workers <= 1 or len(items) < MIN_PARALLEL_ITEMS:
        return [fn(x) for x in items]
    workers = min(workers, len(items))
    chunksize = max(1, min(256, len(items) // (workers * 8)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(fn, items, chunksize=chunksize))


def _load_item(job: tuple) -> tuple[np.ndarray | None, str]:
    path, box, size = job
    try:
        return load_face(path, box, size), ""
    except BadImage as e:
        return None, e.why


def load_faces(
    items: Sequence[tuple[str | os.PathLike, Box | None]], size: int = IMAGE_SIZE, workers: int = 1
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode many (path, box) items into an (N, size, size, 3) uint8 array.

    Never raises for a bad file: its slot stays black and (index, reason) is listed in the second result.
    """
    out = np.zeros((len(items), size, size, 3), np.uint8)
    bad: list[tuple[int, str]] = []
    jobs = [(path, box, size) for path, box in items]
    for i, (face, reason) in enumerate(parallel_map(_load_item, jobs, workers)):
        if face is None:
            bad.append((i, reason))
        else:
            out[i] = face
    return out, bad
