"""Using a trained model: ``Classifier.from_checkpoint(path).predict(images)``."""
from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import checkpoint
from .detect import MAX_SIDE, FaceDetector, detect_faces
from .images import BadImage, face_array, open_rgb, open_rgb_reduced
from .io import UserError
from .metrics import apply_temperature
from .model import build_model
from .onnx_model import OnnxModule, to_onnx
from .runtime import autocast, resolve_device, resolve_precision
from .transforms import eval_batch

# the model trained on all three corpora that ships with the package (see MODEL_CARD.md)
BUNDLED_MODEL = Path(__file__).parent / "weights" / "facegender-resnet18.safetensors"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
BACKENDS = ("torch", "onnxruntime")  # what runs the model's forward pass; an .onnx file implies onnxruntime


@dataclass
class Prediction:
    """One face of one image (or one whole image with detection off, or one image without a face)."""

    source: str
    faces: int | None = None  # faces found in the image; None when detection is off
    face: int | None = None  # 1-based index of this face, largest first
    box: tuple[float, float, float, float] | None = None  # the detector's box in the image's pixels
    label: str | None = None  # female, male, uncertain (below --min-confidence), or None: no face or an error
    confidence: float | None = None  # the calibrated probability of the predicted class
    p_male: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier:
    """A trained model with its preprocessing, threshold and temperature, and optionally a face detector."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: str = "auto", precision: str = "auto",
                 detect: bool = True, min_confidence: float = 0.0):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.meta = meta
        self.classes = tuple(meta["classes"])
        self.size = int(meta["preprocessing"]["image_size"])
        self.threshold = float(meta["threshold"])
        self.temperature = float(meta.get("temperature", 1.0))
        self.detector = FaceDetector() if detect else None
        if not 0 <= min_confidence <= 1:
            raise UserError(f"--min-confidence {min_confidence}: must be between 0 and 1")
        self.min_confidence = min_confidence

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "auto", precision: str = "auto",
                        backend: str = "torch", **options) -> "Classifier":
        """A run directory, .safetensors or .onnx file; None means the bundled model."""
        if path is not None and Path(path).suffix == ".onnx":
            if backend != "onnxruntime":
                raise UserError(f"{path}: an ONNX file runs with the onnxruntime backend (--backend onnxruntime)")
            model, meta = OnnxModule.load(path)
            return cls(model, meta, device, "fp32", **options)
        tensors, meta = checkpoint.load(bundled_model() if path is None else checkpoint.resolve(path))
        return cls.from_state(checkpoint.model_state(tensors), meta, device, precision, backend=backend, **options)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], meta: dict, device: str = "auto", precision: str = "auto",
                   backend: str = "torch", **options) -> "Classifier":
        """Model weights (any float dtype; computed in float32 or the chosen precision) and their metadata.

        ``backend="onnxruntime"`` converts the model to ONNX in memory (float32; some seconds) and runs that.
        """
        if backend not in BACKENDS:
            raise UserError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
        model = build_model("none", meta["config"]["dropout"])
        model.load_state_dict({k: v.float() for k, v in state.items()})
        if backend == "onnxruntime":
            model, precision = OnnxModule(to_onnx(model, meta)), "fp32"
        return cls(model, meta, device, precision, **options)

    @torch.no_grad()
    def logits(self, batch_uint8: torch.Tensor) -> np.ndarray:
        """Raw logits for an N x H x W x 3 uint8 batch made by ``images.face_array``."""
        with autocast(self.device, self.precision):
            out = self.model(eval_batch(batch_uint8.to(self.device))).squeeze(1)
        return out.float().cpu().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated P(male)."""
        return apply_temperature(logits, self.temperature)

    def _decide(self, stub: Prediction, p_male: float) -> Prediction:
        male = p_male >= self.threshold
        confidence = p_male if male else 1 - p_male
        label = self.classes[int(male)] if confidence >= self.min_confidence else "uncertain"
        return replace(stub, label=label, confidence=confidence, p_male=p_male)

    def predict(self, images: Iterable, batch_size: int = 64) -> list[Prediction]:
        """Paths, PIL images or H x W x 3 uint8 arrays in; one Prediction per face (in order) out."""
        return list(self.iter_predict(images, batch_size))

    def iter_predict(self, images: Iterable, batch_size: int = 64, workers: int | None = None) -> Iterator[Prediction]:
        """Like ``predict``, streaming: at most ``batch_size`` faces (plus a few images being decoded) are held.

        ``workers`` threads decode and detect (``faces``) ahead while this one runs the model (``classify``);
        default: one per CPU, at most 4; 0 does everything in the calling thread.
        """
        def faces(job: tuple[int, object]):
            i, item = job
            return self.faces(str(item) if isinstance(item, (str, Path)) else f"<image {i}>", item)

        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        batch: list[tuple[Prediction, np.ndarray]] = []
        for found in _ordered_map(faces, enumerate(images), workers):
            for stub, face in found:
                if face is None:  # nothing to classify: keep the output in input order
                    yield from self.classify(batch)
                    batch = []
                    yield stub
                    continue
                batch.append((stub, face))
                if len(batch) == batch_size:
                    yield from self.classify(batch)
                    batch = []
        yield from self.classify(batch)

    def faces(self, name: str, item) -> list[tuple[Prediction, np.ndarray | None]]:
        """Decode and detect: each face's Prediction stub with the model's input for it.

        The input is None where there is nothing to classify (no face, or an unreadable image: the stub's
        ``error`` says why). Safe to call from several threads; ``classify`` does the batched model work.
        """
        try:
            # a big JPEG is decoded at a reduced scale no smaller than what the detector looks at anyway
            image, scale = (open_rgb_reduced(item, MAX_SIDE) if isinstance(item, (str, Path))
                            else (self.load_image(item, name), 1.0))
        except BadImage as e:
            return [(Prediction(name, error=str(e)), None)]
        if self.detector is None:
            return [(Prediction(name), face_array(image, None, self.size))]
        found = detect_faces(image, self.detector)
        if not found:
            return [(Prediction(name, faces=0), None)]
        return [(Prediction(name, faces=len(found), face=k, box=tuple(round(v * scale, 1) for v in face.box)),
                 face_array(image, box, self.size))
                for k, (face, box) in enumerate(found, start=1)]

    def classify(self, batch: list[tuple[Prediction, np.ndarray]]) -> list[Prediction]:
        """Complete the stubs made by ``faces`` with one batched forward pass over their inputs."""
        if not batch:
            return []
        arrays = torch.from_numpy(np.stack([a for _, a in batch]))
        return [self._decide(stub, float(p)) for (stub, _), p in zip(batch, self.probabilities(self.logits(arrays)))]

    @staticmethod
    def load_image(item, name: str = "<image>") -> Image.Image:
        """A path, PIL image or H x W x 3 uint8 array as an RGB PIL image; BadImage for what cannot be one."""
        if isinstance(item, (str, Path)):
            return open_rgb(item)
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        array = np.asarray(item)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise TypeError(f"expected a path, a PIL image or an H x W x 3 uint8 array, got {array.dtype} {array.shape}")
        return Image.fromarray(array)


def _ordered_map(fn: Callable, items: Iterable, workers: int, ahead_per_worker: int = 4) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most a few items in flight per thread."""
    if workers <= 0:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="facegender-faces") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= workers * ahead_per_worker:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (an error, or the consumer let go): do not decode what nobody will read
            for future in pending:
                future.cancel()


def bundled_model() -> Path:
    if not BUNDLED_MODEL.is_file():
        raise UserError(f"the bundled model {BUNDLED_MODEL} is missing from this install; "
                        "reinstall facegender, or pass a checkpoint (a run directory or .safetensors file)")
    return BUNDLED_MODEL


LABEL_COLOURS = {"female": (230, 60, 140), "male": (40, 120, 230), "uncertain": (240, 180, 0)}


def annotate(image: Image.Image, predictions: list[Prediction]) -> Image.Image:
    """A copy of ``image`` with each face's box and "label confidence" drawn on it."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    line = max(2, round(max(out.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(out.size) / 40)))
    for p in predictions:
        if p.box is None or p.label is None:
            continue
        colour = LABEL_COLOURS.get(p.label, (255, 255, 255))
        draw.rectangle(p.box, outline=colour, width=line)
        text = f"{p.label} {p.confidence:.2f}"
        x0, y0, x1, y1 = draw.textbbox((p.box[0], p.box[1]), text, font=font)
        height = (y1 - y0) + 2 * line
        top = p.box[1] - height if p.box[1] >= height else p.box[3]  # above the box, or below at the top edge
        draw.rectangle((x0, top, x1 + 2 * line, top + height), fill=colour)
        draw.text((x0 + line, top + line - (y0 - p.box[1])), text, fill=(255, 255, 255), font=font)
    return out


def expand_inputs(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders expanded to the images inside them, recursively, in sorted order."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            yield p
