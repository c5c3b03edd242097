"""Using a trained model: ``Classifier.from_checkpoint(path).predict(images)``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from . import checkpoint
from .images import BadImage, face_array, load_face
from .metrics import apply_temperature
from .model import build_model
from .runtime import autocast, resolve_device, resolve_precision
from .transforms import eval_batch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class Prediction:
    source: str
    label: str | None
    confidence: float | None  # the (calibrated) probability of the predicted class
    p_male: float | None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier:
    def __init__(self, model: torch.nn.Module, meta: dict, device: str = "auto", precision: str = "auto"):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.meta = meta
        self.classes = tuple(meta["classes"])
        self.size = int(meta["preprocessing"]["image_size"])
        self.threshold = float(meta["threshold"])
        self.temperature = float(meta.get("temperature", 1.0))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "auto") -> "Classifier":
        tensors, meta = checkpoint.load(checkpoint.resolve(path))
        model = build_model("none", meta["config"]["dropout"])
        model.load_state_dict({k: v.float() for k, v in checkpoint.model_state(tensors).items()})
        return cls(model, meta, device, precision)

    @torch.no_grad()
    def logits(self, batch_uint8: torch.Tensor) -> np.ndarray:
        """Raw logits for an N x H x W x 3 uint8 batch made by ``images.load_face``."""
        with autocast(self.device, self.precision):
            out = self.model(eval_batch(batch_uint8.to(self.device))).squeeze(1)
        return out.float().cpu().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated P(male)."""
        return apply_temperature(logits, self.temperature)

    def _decide(self, source: str, p_male: float) -> Prediction:
        male = p_male >= self.threshold
        return Prediction(source, self.classes[int(male)], p_male if male else 1 - p_male, p_male)

    def predict(self, images: Iterable, batch_size: int = 64) -> list[Prediction]:
        """Paths, PIL images or H x W x 3 uint8 arrays in, one Prediction each out (in order)."""
        return list(self.iter_predict(images, batch_size))

    def iter_predict(self, images: Iterable, batch_size: int = 64) -> Iterator[Prediction]:
        batch: list[tuple[str, np.ndarray]] = []
        for i, item in enumerate(images):
            name = str(item) if isinstance(item, (str, Path)) else f"<image {i}>"
            try:
                batch.append((name, self._face_array(item)))
            except BadImage as e:
                yield from self._flush(batch)
                batch = []
                yield Prediction(name, None, None, None, error=str(e))
                continue
            if len(batch) == batch_size:
                yield from self._flush(batch)
                batch = []
        yield from self._flush(batch)

    def _flush(self, batch: list[tuple[str, np.ndarray]]) -> Iterator[Prediction]:
        if not batch:
            return
        arrays = torch.from_numpy(np.stack([a for _, a in batch]))
        for (name, _), p in zip(batch, self.probabilities(self.logits(arrays))):
            yield self._decide(name, float(p))

    def _face_array(self, item) -> np.ndarray:
        if isinstance(item, (str, Path)):
            return load_face(item, size=self.size)
        if not isinstance(item, Image.Image):
            array = np.asarray(item)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise TypeError(f"expected a path, a PIL image or an H x W x 3 uint8 array, got {array.dtype} {array.shape}")
            item = Image.fromarray(array)
        return face_array(item.convert("RGB"), size=self.size)


def expand_inputs(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders expanded to the images inside them, recursively, in sorted order."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            yield p
