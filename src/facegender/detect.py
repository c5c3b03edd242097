"""Face detection and the one canonical face crop that training and prediction both use.

The detector is dlib's HOG frontal-face detector (built into dlib, no model file) refined by dlib's
5-point landmark model (shipped in the face-recognition-models package), which gives both eyes. Both run
offline; nothing is downloaded at run time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .io import UserError

INSTALL_HINT = "pip install 'dlib-bin>=20.0.1,<21' 'face-recognition-models==0.3.0'"

LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"

# dlib's HOG window is 80 px: in images smaller than this where no face is found at native scale, the
# search is repeated at double size, for faces down to ~40 px. Native first: most faces in small photos
# fill them, and the doubled search costs about four times as much.
UPSAMPLE_BELOW = 400
# Larger photos are shrunk first: HOG time grows with pixels, and a face under 1/16 of the side is no portrait.
MAX_SIDE = 1280
# Tight chips (UTKFace) leave the detector no margin: a miss is retried on the image padded by this much.
RETRY_PAD = 0.25

# The canonical crop, in eye distances (centre of one eye to the other), measured on 200 UTKFace chips,
# whose framing is the tightest of the three corpora: side 2.6, eye line 0.30 from the top. A little
# looser keeps the hairline, a gender cue, at the cost of a few edge-replicated pixels on those chips.
CROP_SIDE = 2.8  # crop side / eye distance
EYE_LINE = 0.35  # eye centre's height from the crop's top, as a fraction of the side
# Without landmarks, the eyes are estimated from the box (medians over UTKFace, CelebA and SCUT):
BOX_PER_EYE = 2.3  # box width / eye distance
EYES_ABOVE_CENTRE = 0.2  # eye centre above the box centre, as a fraction of the box width


@dataclass(frozen=True)
class Face:
    """One detected face, in source-image pixels.

    ``left_eye`` is the eye nearer the image's left edge (the person's right eye); eyes are None where
    the detector gives no landmarks.
    """

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    left_eye: tuple[float, float] | None = None
    right_eye: tuple[float, float] | None = None
    points: tuple[tuple[float, float], ...] | None = None  # dlib's 5 landmarks, in its order: they place the descriptor chip


def packaged_model(name: str) -> Path:
    """A model file shipped by the face-recognition-models package."""
    # Located without importing the package: its __init__ needs pkg_resources, gone from new setuptools.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{name} comes with the face-recognition-models package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall it with {INSTALL_HINT}")
    return path


class FaceDetector:
    """dlib HOG detector + 5-point landmarks. Cheap to construct: the models load on first use.

    One instance may be shared by the threads of a process. dlib's detector objects are not safe to share
    (each keeps scratch state), so a thread borrows a set of its own for each image and gives it back:
    at most one set per thread that detects at once is ever loaded, and later threads (a new pool, a new
    request) reuse them. dlib releases the GIL while it searches, so threads run in parallel.
    """

    def __init__(self, min_score: float = 0.0, always_upsample: bool = False):
        self.min_score = min_score  # dlib's own threshold is 0; raise it to trade recall for precision
        # True: search small images at double size even where native scale found a face, which also finds
        # faces of 40-80 px beside bigger ones in them, at about five times the cost
        self.always_upsample = always_upsample
        self._idle: list = []  # loaded (detector, landmarks, dlib) sets that no thread is using now
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[tuple]:
        with self._lock:
            models = self._idle.pop() if self._idle else None
        if models is None:
            try:
                import dlib
            except ImportError:
                raise UserError(f"face detection needs dlib: {INSTALL_HINT}") from None
            models = pickle.loads(_hog_detector()), dlib.shape_predictor(str(packaged_model(LANDMARK_MODEL))), dlib
        try:
            yield models
        finally:
            with self._lock:
                self._idle.append(models)

    def detect(self, image: Image.Image) -> list[Face]:
        """Every face in ``image``, largest first."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        scale = min(1.0, MAX_SIDE / max(rgb.size))
        if scale < 1.0:
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BILINEAR)
        a = np.asarray(rgb)
        with self._borrowed() as models:
            faces = self._detect(models, a, 0, 0)
            if not faces:
                dy, dx = round(a.shape[0] * RETRY_PAD), round(a.shape[1] * RETRY_PAD)
                faces = self._detect(models, np.pad(a, ((dy, dy), (dx, dx), (0, 0)), mode="edge"), dx, dy)
        faces = [_scaled(f, 1.0 / scale) for f in faces] if scale < 1.0 else faces
        return sorted(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), reverse=True)

    def _detect(self, models: tuple, a: np.ndarray, dx: int, dy: int) -> list[Face]:
        """Faces in ``a``, shifted by (-dx, -dy) into the coordinates of the image it was padded from."""
        hog, landmarks, dlib = models
        a = np.ascontiguousarray(a)
        small = max(a.shape[:2]) < UPSAMPLE_BELOW
        rects, scores, _ = hog.run(a, int(small and self.always_upsample), self.min_score)
        if not rects and small and not self.always_upsample:
            rects, scores, _ = hog.run(a, 1, self.min_score)
        faces = []
        for rect, score in zip(rects, scores):
            shape = landmarks(a, rect)
            pts = [(float(shape.part(i).x - dx), float(shape.part(i).y - dy)) for i in range(5)]
            # The 5-point model's parts 0-1 are the corners of the eye on the image's right, 2-3 the left's.
            right = ((pts[0][0] + pts[1][0]) / 2, (pts[0][1] + pts[1][1]) / 2)
            left = ((pts[2][0] + pts[3][0]) / 2, (pts[2][1] + pts[3][1]) / 2)
            box = (rect.left() - dx, rect.top() - dy, rect.right() + 1 - dx, rect.bottom() + 1 - dy)
            faces.append(Face(tuple(float(v) for v in box), float(score), left, right, tuple(pts)))
        return faces


_HOG_LOCK = threading.Lock()
_HOG: list[bytes] = []


def _hog_detector() -> bytes:
    """dlib's HOG face detector, pickled. Building it takes dlib about half a second (it decodes the model
    from text); a copy unpickles in milliseconds, so every thread's own copy is made from this one."""
    with _HOG_LOCK:
        if not _HOG:
            import dlib

            _HOG.append(pickle.dumps(dlib.get_frontal_face_detector()))
        return _HOG[0]


def _scaled(face: Face, k: float) -> Face:
    eye = lambda p: None if p is None else (p[0] * k, p[1] * k)  # noqa: E731
    points = None if face.points is None else tuple(eye(p) for p in face.points)
    return Face(tuple(v * k for v in face.box), face.score, eye(face.left_eye), eye(face.right_eye), points)


def canonical_box(face: Face, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The one face crop: a square placed by the eyes (or, without landmarks, by the box).

    Side CROP_SIDE eye distances, eyes centred horizontally and EYE_LINE of the side from the top; grown
    where needed so it holds the whole detected box. It may extend beyond the image (``image_size``
    bounds only how far): images.face_array fills the outside by edge replication.
    """
    x0, y0, x1, y1 = face.box
    if face.left_eye is not None and face.right_eye is not None:
        (lx, ly), (rx, ry) = face.left_eye, face.right_eye
        eye_distance = max(float(np.hypot(rx - lx, ry - ly)), (x1 - x0) / (2 * BOX_PER_EYE))
        ex, ey = (lx + rx) / 2, (ly + ry) / 2
    else:
        eye_distance = (x1 - x0) / BOX_PER_EYE
        ex, ey = (x0 + x1) / 2, (y0 + y1) / 2 - EYES_ABOVE_CENTRE * (x1 - x0)
    side = CROP_SIDE * eye_distance
    left, top = ex - side / 2, ey - EYE_LINE * side
    # Grow to hold the detected box, keeping the square: shift, then widen if shifting cannot do it.
    side = max(side, x1 - x0, y1 - y0)
    left = min(max(left, x1 - side), x0)
    top = min(max(top, y1 - side), y0)
    # A face at an image's edge may not drag the crop more than one side away from the image.
    width, height = image_size
    left = min(max(left, -side), width)
    top = min(max(top, -side), height)
    bx, by = int(np.floor(left)), int(np.floor(top))
    s = max(1, int(np.ceil(left + side)) - bx, int(np.ceil(top + side)) - by)  # whole pixels, still covering
    return bx, by, bx + s, by + s


def detect_faces(image: Image.Image, detector: FaceDetector) -> list[tuple[Face, tuple[int, int, int, int]]]:
    """Every face in ``image`` with its canonical crop box, largest first."""
    return [(face, canonical_box(face, image.size)) for face in detector.detect(image)]
