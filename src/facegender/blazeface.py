"""BlazeFace, MediaPipe's face detector, on onnxruntime: numpy and Pillow only.

Two networks ship in ``weights/`` (converted from MediaPipe's .tflite files by tools/blazeface_to_onnx.py;
Apache-2.0, see weights/BLAZEFACE-NOTICE.md):

- ``short``: trained at 128 px on faces that fill much of the frame (selfies, portraits);
- ``full``: trained at 192 px on faces up to a few metres away, down to about a tenth of the frame.

Both are fully convolutional, so the converted graphs take any input whose sides are multiples of 32: one
pass at a larger size finds smaller faces. Each returns, for every anchor, a box and six keypoints as
offsets in input pixels, and a score logit; ``decode`` turns them into ``Detection`` records in the
image's pixels after MediaPipe's weighted non-maximum suppression.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from .io import UserError

WEIGHTS = Path(__file__).parent / "weights"
INSTALL_HINT = "pip install onnxruntime"


@dataclass(frozen=True)
class Network:
    file: str
    side: int  # the input side it was trained at
    strides: tuple[tuple[int, int], ...]  # (stride, anchors per cell), in the order of the outputs
    min_score: float  # the default threshold


# MediaPipe's threshold is 0.5 for both. The short-range network's few false boxes (on 640x480 backgrounds
# with no face) score up to about 0.7 and its true ones rarely below 0.65: at 0.65 it kept 98% of the faces
# it found at 0.5 and 5 of 22 false boxes, and the full-range network finds most of the rest (benchmarks/
# detectors.py). The full-range network's false boxes are rare at 0.5.
NETWORKS = {
    "short": Network("blazeface-short.onnx", 128, ((8, 2), (16, 6)), 0.65),
    "full": Network("blazeface-full.onnx", 192, ((4, 1),), 0.5),
}
MIN_SCORE = 0.5  # MediaPipe's
MULTIPLE = 32  # input sides are rounded up to this (the deepest stride: padding stays as at training size)
NMS_IOU = 0.3  # MediaPipe's suppression overlap
RAW_SCORE_LIMIT = 80.0  # MediaPipe clips logits to this before the sigmoid

# The six keypoints, in the networks' order; "left"/"right" are the person's, so on an upright face
# RIGHT_EYE is nearer the image's left edge.
RIGHT_EYE, LEFT_EYE, NOSE_TIP, MOUTH, RIGHT_EAR, LEFT_EAR = range(6)


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    score: float
    keypoints: np.ndarray  # 6 x 2, (x, y) in the image's pixels, in the order above


@cache
def anchors(network: str, height: int, width: int) -> np.ndarray:
    """Anchor centres (N x 2, input pixels) for an input of ``height`` x ``width``, in the output's order."""
    rows = []
    for stride, per_cell in NETWORKS[network].strides:
        ys, xs = np.mgrid[0:height // stride, 0:width // stride].astype(np.float32)
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1) * stride + stride / 2
        rows.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(rows)


class BlazeFace:
    """One BlazeFace network. Cheap to construct; the graph loads on first use and one session serves
    every thread (onnxruntime's ``run`` may be called concurrently), each run on one core, whatever the
    input's size. (A session made for one size, by onnxruntime's free-dimension overrides, ran a 384 x 288
    pass 1.16x faster, and a 640x480 photo 1.03x, but each keeps 2-3 MB and its own buffers, and a server
    sees every size: ``benchmarks/blazeface_shapes.py``.)"""

    def __init__(self, network: str = "short", min_score: float | None = None):
        if network not in NETWORKS:
            raise UserError(f"BlazeFace network {network!r}: use one of {', '.join(NETWORKS)}")
        self.network = network
        self.spec = NETWORKS[network]
        self.min_score = self.spec.min_score if min_score is None else min_score
        self._session = None
        self._lock = threading.Lock()

    def session(self):
        with self._lock:
            if self._session is None:
                try:
                    import onnxruntime as ort
                except ImportError:
                    raise UserError(f"the BlazeFace detector runs on onnxruntime: {INSTALL_HINT}") from None
                path = WEIGHTS / self.spec.file
                if not path.is_file():
                    raise UserError(f"{path} is missing from this install: reinstall facegender")
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1  # parallelism comes from detecting several photos at once
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return self._session

    def detect(self, image: Image.Image, side: int | None = None, min_score: float | None = None) -> list[Detection]:
        """Faces in ``image`` (RGB) scoring above ``min_score`` (default: this detector's), best first, with
        the image resized so that its longer side is ``side`` (default: the network's own) and letterboxed
        to multiples of 32."""
        tensor, k = letterbox(image, side or self.spec.side)
        raw_boxes, raw_scores = self.session().run(None, {"input": tensor})
        return decode(raw_boxes[0], raw_scores[0, :, 0], anchors(self.network, *tensor.shape[2:]), k,
                      self.min_score if min_score is None else min_score)


def letterbox(image: Image.Image, side: int) -> tuple[np.ndarray, float]:
    """(1 x 3 x H x W float32 in [-1, 1], scale from image to input pixels). The image, resized so that its
    longer side is ``side``, sits at the top left of a black canvas whose sides are ``side`` rounded up to a
    multiple of 32 along the longer side and the shorter side's own multiple of 32 (no square padding)."""
    w, h = image.size
    k = side / max(w, h)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    small = image if size == image.size else shrunk(image, size)
    height, width = (-(-n // MULTIPLE) * MULTIPLE for n in (size[1], size[0]))
    tensor = np.empty((1, 3, height, width), np.float32)
    if (height, width) != (size[1], size[0]):
        tensor.fill(-1.0)  # the padding: black
    inside = tensor[0, :, :size[1], :size[0]]
    # band by band (Pillow splits them in one pass): a strided transpose of the pixels took twice as long
    for channel, band in zip(inside, (small if small.mode == "RGB" else small.convert("RGB")).split()):
        np.multiply(np.asarray(band), np.float32(1 / 127.5), out=channel, dtype=np.float32)
    inside -= 1.0
    return tensor, k


def shrunk(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size``: by a box average of f x f pixels where it is exactly f times as large
    (the 128 px pass over a 640x480 photo reads the 384 px pass's copy: a third of its sides), which costs
    a fifth of the bilinear filter; bilinear otherwise."""
    f = image.width // size[0]
    if f >= 2 and image.size == (f * size[0], f * size[1]):
        return image.reduce(f)
    return image.resize(size, Image.BILINEAR, reducing_gap=3.0)


def decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, centres: np.ndarray, k: float,
           min_score: float) -> list[Detection]:
    """Detections (image pixels: input pixels / ``k``) from one input's outputs: N x 16 regressions (box
    centre offset, width, height, then six keypoint offsets, in input pixels) and N score logits."""
    keep = raw_scores > np.log(min_score / (1 - min_score))  # the sigmoid's threshold, as a logit
    if not keep.any():
        return []
    raw, centres = raw_boxes[keep], centres[keep]
    scores = 1 / (1 + np.exp(-np.clip(raw_scores[keep], -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
    cx, cy = centres[:, 0] + raw[:, 0], centres[:, 1] + raw[:, 1]
    half_w, half_h = raw[:, 2] / 2, raw[:, 3] / 2
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    points = raw[:, 4:].reshape(-1, 6, 2) + centres[:, None, :]
    valid = (half_w > 0) & (half_h > 0)
    return weighted_nms(boxes[valid] / k, points[valid] / k, scores[valid])


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, points: np.ndarray, scores: np.ndarray, threshold: float = NMS_IOU) -> list[Detection]:
    """MediaPipe's suppression: each cluster of overlapping candidates becomes one detection whose box and
    keypoints are their score-weighted mean, with the best candidate's score. Best first."""
    order = np.argsort(-scores)
    boxes, points, scores = boxes[order], points[order], scores[order]
    left = np.ones(len(scores), bool)
    out = []
    for i in range(len(scores)):
        if not left[i]:
            continue
        cluster = left & (iou(boxes[i], boxes) > threshold)
        cluster[i] = True
        left &= ~cluster
        weights = scores[cluster][:, None]
        box = (boxes[cluster] * weights).sum(0) / weights.sum()
        kp = (points[cluster] * weights[:, :, None]).sum(0) / weights.sum()
        out.append(Detection(tuple(float(v) for v in box), float(scores[i]), kp))
    return out


def merge(found: list[list[Detection]], threshold: float = NMS_IOU) -> list[Detection]:
    """Detections of several passes over one image as one list: where passes overlap, the earlier pass's
    detection stays (give the pass that sees a face at the size its network was trained for first)."""
    kept: list[Detection] = []
    for d in (d for ds in found for d in ds):
        if not kept or iou(np.array(d.box), np.array([k.box for k in kept])).max() <= threshold:
            kept.append(d)
    return kept
