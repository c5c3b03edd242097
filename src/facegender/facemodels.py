"""The kinds of model behind a Classifier, chosen by a checkpoint's metadata ``kind``:

- ``resnet18``: the specification's network on the 128x128 canonical crop;
- ``descriptor``: a small head on dlib's 128-D face descriptor of the aligned 150x150 chip;
- ``ensemble``: both, their logits combined with weights fitted on validation.

Each has one small interface from faces to logits, so evaluation, prediction, export and serving never
branch on the kind: ``inputs`` (one face of an image -> what the model needs of it), ``logits`` (a batch
of those -> raw logits, before the temperature) and ``dataset_logits`` (prepared samples -> logits, through
the on-disk caches).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data import Sample
from .descriptors import DIMENSIONS, cached_descriptors, chip, default_extractor
from .images import face_array
from .io import UserError
from .loaders import cached_images, fast_batches
from .model import build_model
from .runtime import autocast, resolve_device, resolve_precision
from .transforms import eval_batch

KINDS = ("resnet18", "descriptor", "ensemble")

Logits = tuple[np.ndarray, np.ndarray, np.ndarray]  # logits, labels, indices of the samples that decoded


def face_points(face) -> tuple[float, ...] | None:
    """A detected face's 5 landmarks, flat, as the manifest stores them."""
    return None if face is None or face.points is None else tuple(v for p in face.points for v in p)


class ResNetModel:
    """ResNet18 on the canonical crop (``box``), normalised as in training."""

    kind = "resnet18"

    def __init__(self, network: nn.Module, size: int, device: torch.device, precision: str, flip: bool = False):
        self.network = network.to(device).to(memory_format=torch.channels_last).eval()
        self.size, self.device, self.precision = size, device, precision
        self.flip = flip  # test-time augmentation: the mean logit of the crop and its mirror image

    def inputs(self, image: Image.Image, face, box) -> np.ndarray:
        return face_array(image, box, self.size)

    @torch.no_grad()
    def logits(self, inputs) -> np.ndarray:
        if not torch.is_tensor(inputs):
            inputs = torch.from_numpy(inputs if isinstance(inputs, np.ndarray) else np.stack(list(inputs)))
        batch = inputs
        x = eval_batch(batch.to(self.device))
        with autocast(self.device, self.precision):
            out = self.network(x).squeeze(1)
            if self.flip:
                out = (out + self.network(x.flip(3)).squeeze(1)) / 2
        return out.float().cpu().numpy()

    def dataset_logits(self, samples: list[Sample], batch_size: int = 256, skipped: dict | None = None) -> Logits:
        """Logits of the samples that decode; ``skipped``, if given, gets each other sample's path -> reason."""
        cached = cached_images(samples, self.size)
        if skipped is not None:
            skipped.update(cached.bad)
        logits, labels, indices = [], [], []
        for images, y, idx in fast_batches(cached, batch_size, shuffle=False):
            logits.append(self.logits(images))
            labels.append(y.numpy())
            indices.append(idx)
        return np.concatenate(logits), np.concatenate(labels), np.concatenate(indices)


class DescriptorHead(nn.Module):
    """Standardise the descriptor, then a linear layer (logistic regression) or a one-hidden-layer MLP."""

    def __init__(self, hidden: int = 0):
        super().__init__()
        self.hidden = hidden
        self.register_buffer("mean", torch.zeros(DIMENSIONS))
        self.register_buffer("scale", torch.ones(DIMENSIONS))
        self.layers = (nn.Sequential(nn.Linear(DIMENSIONS, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden
                       else nn.Sequential(nn.Linear(DIMENSIONS, 1)))

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return self.layers((descriptors - self.mean) / self.scale).squeeze(1)

    @torch.no_grad()
    def logits(self, descriptors: np.ndarray) -> np.ndarray:
        self.eval()
        return self(torch.from_numpy(np.asarray(descriptors, np.float32))).numpy()


class DescriptorModel:
    """A head on dlib's face descriptor of the chip placed by the face's 5 landmarks."""

    kind = "descriptor"

    def __init__(self, head: DescriptorHead, extractor=None, device: str = "auto"):
        self.head = head.eval()
        self._extractor, self.device = extractor, device

    @property
    def extractor(self):
        if self._extractor is None:  # float32, as the cached descriptors it was fitted on
            self._extractor = default_extractor(self.device)
        return self._extractor

    def inputs(self, image: Image.Image, face, box) -> np.ndarray:
        return chip(image, face_points(face))

    def logits(self, inputs) -> np.ndarray:
        chips = inputs if isinstance(inputs, np.ndarray) else np.stack(list(inputs))
        return self.head.logits(self.extractor(chips))

    def dataset_logits(self, samples: list[Sample], batch_size: int = 256, skipped: dict | None = None) -> Logits:
        d = cached_descriptors(samples, extractor=self._extractor)
        if skipped is not None:
            skipped.update(d.bad)
        labels = np.array([s.label for s in samples], dtype=np.int64)
        return self.head.logits(d.vectors[d.good]), labels[d.good], d.good


class EnsembleModel:
    """Both models on their own view of each face; logit = w_resnet * z_resnet + w_descriptor * z_descriptor + b."""

    kind = "ensemble"

    def __init__(self, resnet: ResNetModel, descriptor: DescriptorModel, weights: Sequence[float], bias: float):
        self.resnet, self.descriptor = resnet, descriptor
        self.weights, self.bias = tuple(float(w) for w in weights), float(bias)

    def combine(self, z_resnet: np.ndarray, z_descriptor: np.ndarray) -> np.ndarray:
        return self.weights[0] * z_resnet + self.weights[1] * z_descriptor + self.bias

    def inputs(self, image: Image.Image, face, box) -> tuple[np.ndarray, np.ndarray]:
        return self.resnet.inputs(image, face, box), self.descriptor.inputs(image, face, box)

    def logits(self, inputs) -> np.ndarray:
        crops, chips = zip(*inputs)
        return self.combine(self.resnet.logits(crops), self.descriptor.logits(chips))

    def dataset_logits(self, samples: list[Sample], batch_size: int = 256, skipped: dict | None = None) -> Logits:
        zr, labels, ir = self.resnet.dataset_logits(samples, batch_size, skipped)
        zd, _, id_ = self.descriptor.dataset_logits(samples, batch_size, skipped)
        both, in_r, in_d = np.intersect1d(ir, id_, return_indices=True)
        return self.combine(zr[in_r], zd[in_d]), labels[in_r], both


# ---------------------------------------------------------------- building a model from a checkpoint


def kind_of(meta: dict) -> str:
    kind = meta.get("kind", "resnet18")
    if kind not in KINDS:
        raise UserError(f"checkpoint of kind {kind!r}: this facegender knows {', '.join(KINDS)}; upgrade it")
    return kind


def _state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}


def resnet_from_state(tensors: dict[str, torch.Tensor], meta: dict, device, precision) -> ResNetModel:
    network = build_model("none", meta["config"]["dropout"])
    network.load_state_dict(_state(tensors, "model."))
    return ResNetModel(network, int(meta["preprocessing"]["image_size"]), device, precision,
                       flip=meta.get("tta") == "flip")


def head_from_state(tensors: dict[str, torch.Tensor], meta: dict) -> DescriptorHead:
    head = DescriptorHead(int(meta["head"]["hidden"]))
    head.load_state_dict(_state(tensors, "head."))
    return head


def build_face_model(tensors: dict[str, torch.Tensor], meta: dict, device: str = "auto", precision: str = "auto",
                     extractor=None):
    """The model a checkpoint describes, ready to run. ``tensors`` hold ``model.*`` and/or ``head.*``."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    kind = kind_of(meta)
    if kind == "resnet18":
        return resnet_from_state(tensors, meta, device, precision)
    descriptor = DescriptorModel(head_from_state(tensors, meta), extractor, str(device))
    if kind == "descriptor":
        return descriptor
    ensemble = meta["ensemble"]
    return EnsembleModel(resnet_from_state(tensors, meta, device, precision), descriptor, ensemble["weights"],
                         ensemble["bias"])
