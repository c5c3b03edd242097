"""Image decoding: the one decode + crop + resize that training, evaluation and prediction all use."""
from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import IMAGE_SIZE

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; may extend beyond the image

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_WIDE = {"I", "F"}


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


@contextlib.contextmanager
def _decoding(name) -> Iterator[None]:
    """Translate Pillow's many failure types into one BadImage that says what is wrong with ``name``."""
    try:
        yield
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(name, "decompression bomb, refused", str(e)) from None
    except UnidentifiedImageError:
        raise BadImage(name, "not an image", "unrecognised format") from None
    except OSError as e:
        if e.errno is not None:  # the operating system's error, not Pillow's
            raise BadImage(name, "unreadable", e.strerror) from None
        why = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadImage(name, why, f"{e.__class__.__name__}: {e}") from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadImage(name, "corrupt", f"{e.__class__.__name__}: {e}") from None


def _scale_to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        # Scale by the full 16-bit range so brightness means what the file meant; converting directly clips.
        grey = _scale_to_uint8(np.asarray(img), 0, 65535)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in _WIDE:
        # 32-bit data has no nominal range: stretch what is there.
        a = np.asarray(img, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        grey = _scale_to_uint8(np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo), lo, hi)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.has_transparency_data:
        # Transparent pixels carry arbitrary colour; a white background is what viewers show.
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an upright 8-bit RGB image, or raise BadImage saying why not."""
    return open_rgb_reduced(path, None)[0]


def open_rgb_reduced(path: str | os.PathLike, min_side: int | None) -> tuple[Image.Image, float]:
    """``open_rgb``, but a JPEG whose longer side exceeds twice ``min_side`` is decoded at 1/2, 1/4 or 1/8
    scale (libjpeg skips the detail while decoding: several times faster than decoding it all and
    shrinking), the longer side kept at least ``min_side``. Also returns the factor from the decoded
    image's pixels to the file's.
    """
    with _decoding(path):
        if os.path.getsize(path) == 0:
            raise BadImage(path, "empty file")
        with Image.open(path) as img:
            return _loaded_rgb(img, min_side)


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """``open_rgb`` for an image's bytes already in memory (an upload, a file Ray read); ``name`` is what
    the errors call it. The bytes never touch the disk."""
    with _decoding(name):
        if not data:
            raise BadImage(name, "empty file")
        with Image.open(io.BytesIO(data)) as img:
            return _loaded_rgb(img, None)[0]


def _loaded_rgb(img: Image.Image, min_side: int | None) -> tuple[Image.Image, float]:
    # Pillow refuses beyond twice MAX_IMAGE_PIXELS and only warns between once and twice it; no face photo
    # is that large. Checked here rather than by turning the warning into an error, because the warnings
    # filters are global to the process and images decode on several threads at once.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"{img.width} x {img.height} pixels is more than the {limit} allowed")
    full = max(img.size)
    if min_side and img.format == "JPEG" and full > 2 * min_side:
        k = min_side / full
        img.draft("RGB", (math.ceil(img.width * k), math.ceil(img.height * k)))
    img.load()  # decode now, so a truncated file fails here rather than later
    return _to_rgb(ImageOps.exif_transpose(img)), full / max(img.size)


def check_image(data: bytes, name: str) -> None:
    """Raise BadImage if ``data`` does not decode; cheap: JPEGs decode at 1/8 scale, which still reads every byte."""
    if not data:
        raise BadImage(name, "empty file")
    with _decoding(name), Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
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
