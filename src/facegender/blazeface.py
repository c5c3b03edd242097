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

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from .cpu import x86_without_avx512
from .io import UserError

WEIGHTS = Path(__file__).parent / "weights"
INSTALL_HINT = "pip install onnxruntime"


@dataclass(frozen=True)
class Network:
    file: str
    side: int  # the input side it was trained at
    strides: tuple[tuple[int, int], ...]  # (stride, anchors per cell), in the order of the outputs
    min_score: float  # the default threshold
    narrow_file: str | None = None  # the same network for 8-float vectors (NARROW_WHERE), where one ships


# MediaPipe's threshold is 0.5 for both. The short-range network's few false boxes (on 640x480 backgrounds
# with no face) score up to about 0.7 and its true ones rarely below 0.65: at 0.65 it kept 98% of the faces
# it found at 0.5 and 5 of 22 false boxes, and the full-range network finds most of the rest (benchmarks/
# detectors.py). The full-range network's false boxes are rare at 0.5.
NETWORKS = {
    "short": Network("blazeface-short.onnx", 128, ((8, 2), (16, 6)), 0.65, "blazeface-short-8.onnx"),
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


# onnxruntime plans a run at a size it knows in advance better than one at any size: only then may a residual
# block's convolution write its output over its shortcut's buffer instead of copying that first, which costs
# most on the large maps of a large input (a sized session ran a 384 x 288 pass 0.85 ms faster, 1.16x, and a
# 128 x 96 one 0.05 ms: benchmarks/blazeface_shapes.py). So an input of at least this many pixels seen this many
# times gets a session of its own, up to this many sizes: the first to earn one keep it (a server sees every
# size, and replacing sessions would cost more than it saves).
SIZED_MIN_PIXELS = 256 * 256
SIZED_AFTER = 2
SIZED_SESSIONS = 2
# the sizes counted towards SIZED_AFTER: forgotten when they are this many
SIZES_COUNTED = 256
# The shipped graphs carry multiples of 16 channels, onnxruntime's block with AVX-512, and where that widened a
# residual block's shortcut (an identity convolution appending zero channels), the block is split instead
# (graph_edit.split_shortcuts: two convolutions and a concatenation, the identity's multiply-adds gone; one core of
# an AMD EPYC with AVX-512: a 384 x 288 pass 6.2 -> 5.5 ms, 128 x 96 0.74 -> 0.68, the full-range network's
# 192 x 192 3.5 -> 2.9): tools/blazeface_to_onnx.py. Where a vector holds 8 floats (AVX2), the short-range graph's
# widening of its first layers, 24 channels to 32 at half the input's size, costs more than it saves: every session
# there runs ``narrow_file``, the graph narrowed back (graph_edit.narrowed; a 384 x 288 pass 8.5 -> 8.0 ms on one
# core of an AVX2-only AMD EPYC), the shortcut that narrowing widens split too (with the others split: 384 x 288
# 8.2 -> 7.2 ms, 128 x 96 0.94 -> 0.83, the same CPU). The same outputs within 5e-5. It ships made
# (tools/blazeface_to_onnx.py): made at run time, the edits and protobuf's import took 37 ms.
NARROW_WHERE = x86_without_avx512
# The input tensor of a pass is written into memory its thread keeps, up to this many bytes (a 384 x 288 pass
# takes 1.3 MB): freshly allocated each time, it came from the system page by page, and filling it took twice
# as long (a fifth of a 640x480 photo's page faults).
SCRATCH_BYTES = 2 * 1024 * 1024
# A second look runs its windows this many at a time: 16 windows of 96 px hold about as much as one 384 x 288
# pass, so a photo full of doubtful faces needs no more memory than the passes that found them.
SECOND_LOOK_BATCH = 16


class BlazeFace:
    """One BlazeFace network. Cheap to construct; the graphs load on first use and one session serves every
    thread (onnxruntime's ``run`` may be called concurrently), each run on one core: a session for any input
    size, and one for each of the first SIZED_SESSIONS large sizes seen SIZED_AFTER times. Every session
    draws its working memory from one arena shared by the process (``shared_arena``): a sized session costs
    a few MB (its graph and packed weights), not the buffers of an arena of its own."""

    def __init__(self, network: str = "short", min_score: float | None = None):
        if network not in NETWORKS:
            raise UserError(f"BlazeFace network {network!r}: use one of {', '.join(NETWORKS)}")
        self.network = network
        self.spec = NETWORKS[network]
        self.min_score = self.spec.min_score if min_score is None else min_score
        self._session = None
        self._sized: dict[tuple[int, int], object] = {}  # (height, width) -> its own session
        self._seen: Counter[tuple[int, int]] = Counter()
        self._lock = threading.Lock()

    def session(self, size: tuple[int, int] | None = None):
        """The session for inputs of ``size`` (height, width): its own where it has one (or has now earned
        one), otherwise the one for every size."""
        with self._lock:
            if self._session is None:
                self._session = self.new_session()
            if size is None or size[0] * size[1] < SIZED_MIN_PIXELS:
                return self._session
            if size in self._sized:
                return self._sized[size]
            if len(self._sized) >= SIZED_SESSIONS:
                return self._session
            if len(self._seen) >= SIZES_COUNTED:
                self._seen.clear()
            self._seen[size] += 1
            if self._seen[size] < SIZED_AFTER:
                return self._session
            self._sized[size] = self.new_session(size)
            return self._sized[size]

    def new_session(self, size: tuple[int, int] | None = None):
        """A new onnxruntime session of the network: for inputs of ``size`` (height, width) only, where given."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"the BlazeFace detector runs on onnxruntime: {INSTALL_HINT}") from None
        path = WEIGHTS / (self.spec.narrow_file if self.spec.narrow_file and NARROW_WHERE() else self.spec.file)
        if not path.is_file():
            raise UserError(f"{path} is missing from this install: reinstall facegender")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallelism comes from detecting several photos at once
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        shared_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")
        if size is not None:
            # the speed is in the plan, not in the memory pattern (which would hold a block of its own)
            options.enable_mem_pattern = False
            for name, n in (("batch", 1), ("height", size[0]), ("width", size[1])):
                options.add_free_dimension_override_by_name(name, n)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def detect(self, image: Image.Image, side: int | None = None, min_score: float | None = None) -> list[Detection]:
        """Faces in ``image`` (RGB) scoring above ``min_score`` (default: this detector's), best first, with
        the image resized so that its longer side is ``side`` (default: the network's own) and letterboxed
        to multiples of 32."""
        return decode(*self._outputs(image, side or self.spec.side), self.min_score if min_score is None else min_score)

    def _outputs(self, image: Image.Image, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """One run on ``image`` letterboxed at ``side``: its regressions, score logits and anchor centres, and
        the input's pixels per image pixel (``decode``'s first four arguments)."""
        return self._run(*letterbox(image, side, reuse=True))

    def _run(self, tensor: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        raw_boxes, raw_scores = self.session(tensor.shape[2:]).run(None, {"input": tensor})
        return raw_boxes[0], raw_scores[0, :, 0], anchors(self.network, *tensor.shape[2:]), k

    def detect_input(self, tensor: np.ndarray, k: float, min_score: float | None = None) -> list[Detection]:
        """``detect`` of an input made already (``letterbox``'s, or one made from it): the 1 x 3 x H x W tensor
        and its input pixels per image pixel. Detections in the pixels of the image it shows."""
        return decode(*self._run(tensor, k), self.min_score if min_score is None else min_score)

    def detect_doubting(self, image: Image.Image, doubtful: float, side: int | None = None,
                        min_score: float | None = None, at_edge: bool = False) -> tuple[list[Detection], list[Detection]]:
        """``detect(image, side, min_score)``'s faces, and apart from them what scores from ``doubtful`` up to
        ``min_score`` (suppressed among themselves) and overlaps none of them by more than NMS_IOU: candidates
        for a second look; with ``at_edge``, only boxes that reach the image's edge (within one px of the
        input), picked before they are suppressed, which is most of the cost. One run; the first list is
        exactly ``detect``'s."""
        min_score = self.min_score if min_score is None else min_score
        raw_boxes, logits, centres, k = self._outputs(image, side or self.spec.side)
        sure = decode(raw_boxes, logits, centres, k, min_score)
        if doubtful >= min_score:
            return sure, []
        # the anchors under the threshold, less those on a face already found (most of them, in a portrait),
        # suppressed among themselves
        band = (logits > logit(doubtful)) & (logits <= logit(min_score))
        if not band.any():
            return sure, []
        boxes, points, scores = candidates(raw_boxes[band], logits[band], centres[band], k, doubtful)
        if at_edge:
            (w, h), px = image.size, 1 / k
            reach = (boxes[:, 0] <= px) | (boxes[:, 1] <= px) | (boxes[:, 2] >= w - px) | (boxes[:, 3] >= h - px)
            boxes, points, scores = boxes[reach], points[reach], scores[reach]
        apart = np.ones(len(scores), bool)
        for d in sure:
            apart &= iou(np.array(d.box), boxes) <= NMS_IOU
        return sure, weighted_nms(boxes[apart], points[apart], scores[apart]) if apart.any() else []

    def second_look(self, image: Image.Image, detections: list[Detection], window: float, side: int,
                    repeat_edges: bool = False) -> list[float]:
        """Each detection's score when the network sees it larger: a square ``window`` times the detection's
        longer side, centred on it and cut from ``image`` (black beyond its edges, or with ``repeat_edges`` its
        edge pixels repeated there: a face the photo's edge cuts then shows as much of itself as the network
        needs), resized to ``side`` px (a multiple of 32); the best score of a box that holds the window's
        centre. One run for every SECOND_LOOK_BATCH of them (a photo crafted to be full of doubtful faces costs
        time, not memory)."""
        scores: list[float] = []
        for start in range(0, len(detections), SECOND_LOOK_BATCH):
            scores += self._looked(image, detections[start:start + SECOND_LOOK_BATCH], window, side, repeat_edges)
        return scores

    def _looked(self, image: Image.Image, detections: list[Detection], window: float, side: int,
                repeat_edges: bool) -> list[float]:
        """``second_look`` of a few detections, in one run."""
        batch = np.empty((len(detections), 3, side, side), np.float32)
        for i, d in enumerate(detections):
            x0, y0, x1, y1 = d.box
            half = max(x1 - x0, y1 - y0) * window / 2
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
            batch[i] = letterbox(_window(image, box, side, repeat_edges), side, reuse=True)[0][0]
        raw_boxes, raw_scores = self.session().run(None, {"input": batch})
        centres = anchors(self.network, side, side)
        # a box holds the centre where its own centre is within half its width and height of it
        dx = np.abs(centres[None, :, 0] + raw_boxes[:, :, 0] - side / 2)
        dy = np.abs(centres[None, :, 1] + raw_boxes[:, :, 1] - side / 2)
        holds = (dx < raw_boxes[:, :, 2] / 2) & (dy < raw_boxes[:, :, 3] / 2)
        best = np.where(holds, np.clip(raw_scores[:, :, 0], -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT), -RAW_SCORE_LIMIT).max(axis=1)
        return [float(v) for v in 1 / (1 + np.exp(-best))]


def _window(image: Image.Image, box: tuple[int, int, int, int], side: int, repeat_edges: bool) -> Image.Image:
    """The square ``box`` of ``image`` resized to ``side`` px, black where it reaches beyond the image or, with
    ``repeat_edges``, the edge pixels repeated there: the part inside is then resized to its share of ``side``
    first, so a window much larger than the image costs no more than ``side`` squared."""
    x0, y0, x1, y1 = box
    w, h = image.size
    if not repeat_edges or (x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h):
        return image.crop(box).resize((side, side), Image.BILINEAR)
    kx, ky = side / max(1, x1 - x0), side / max(1, y1 - y0)  # window px per image px
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    left, top = round((ix0 - x0) * kx), round((iy0 - y0) * ky)
    right, bottom = side - round((ix1 - x0) * kx), side - round((iy1 - y0) * ky)
    if ix0 >= ix1 or iy0 >= iy1 or left + right >= side or top + bottom >= side:  # (almost) nothing inside
        return image.crop(box).resize((side, side), Image.BILINEAR)
    inside = image.crop((ix0, iy0, ix1, iy1)).resize((side - left - right, side - top - bottom), Image.BILINEAR,
                                                      reducing_gap=3.0)
    a = np.asarray(inside if inside.mode == "RGB" else inside.convert("RGB"))
    return Image.fromarray(np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge"))


_ARENA_LOCK = threading.Lock()
_ARENA: list[bool] = []


def shared_arena(ort) -> None:
    """Register, once per process, a CPU arena in onnxruntime's environment, which the sessions that ask
    for it (``session.use_env_allocators``) share. Where one is registered already, they share that one;
    where none can be, each session keeps an arena of its own, as without the option."""
    with _ARENA_LOCK:
        if not _ARENA:
            _ARENA.append(True)
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            with contextlib.suppress(Exception):  # onnxruntime's own Fail: "already registered"
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


_SCRATCH = threading.local()


def letterbox(image: Image.Image, side: int, reuse: bool = False) -> tuple[np.ndarray, float]:
    """(1 x 3 x H x W float32 in [-1, 1], scale from image to input pixels). The image, resized so that its
    longer side is ``side``, sits at the top left of a black canvas whose sides are ``side`` rounded up to a
    multiple of 32 along the longer side and the shorter side's own multiple of 32 (no square padding).
    ``reuse``: the tensor lives in memory this thread keeps (up to SCRATCH_BYTES) and is overwritten by its
    next call: for a caller done with it before then."""
    w, h = image.size
    k = side / max(w, h)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    small = image if size == image.size else shrunk(image, size)
    height, width = (-(-n // MULTIPLE) * MULTIPLE for n in (size[1], size[0]))
    tensor = _scratch((1, 3, height, width)) if reuse else np.empty((1, 3, height, width), np.float32)
    if (height, width) != (size[1], size[0]):
        tensor.fill(-1.0)  # the padding: black
    inside = tensor[0, :, :size[1], :size[0]]
    # band by band (Pillow splits them in one pass): a strided transpose of the pixels took twice as long
    for channel, band in zip(inside, (small if small.mode == "RGB" else small.convert("RGB")).split()):
        np.multiply(np.asarray(band), np.float32(1 / 127.5), out=channel, dtype=np.float32)
    inside -= 1.0
    return tensor, k


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` in this thread's scratch memory, or a new one where it would not fit."""
    n = int(np.prod(shape))
    if n * 4 > SCRATCH_BYTES:
        return np.empty(shape, np.float32)
    memory = getattr(_SCRATCH, "memory", None)
    if memory is None:
        memory = _SCRATCH.memory = np.empty(SCRATCH_BYTES // 4, np.float32)
    return memory[:n].reshape(shape)


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
    return weighted_nms(*candidates(raw_boxes, raw_scores, centres, k, min_score))


def candidates(raw_boxes: np.ndarray, raw_scores: np.ndarray, centres: np.ndarray, k: float,
               min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``decode``'s boxes (M x 4), keypoints (M x 6 x 2) and scores (M) of the anchors scoring over
    ``min_score``, before suppression."""
    keep = raw_scores > logit(min_score)
    raw, centres = raw_boxes[keep], centres[keep]
    scores = 1 / (1 + np.exp(-np.clip(raw_scores[keep], -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
    cx, cy = centres[:, 0] + raw[:, 0], centres[:, 1] + raw[:, 1]
    half_w, half_h = raw[:, 2] / 2, raw[:, 3] / 2
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    points = raw[:, 4:].reshape(-1, 6, 2) + centres[:, None, :]
    valid = (half_w > 0) & (half_h > 0)
    return boxes[valid] / k, points[valid] / k, scores[valid]


def logit(p: float) -> float:
    """The score logit at which the sigmoid gives ``p``: thresholds are compared before the sigmoid."""
    return float(np.log(p / (1 - p)))


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
