"""The kinds of model behind a Classifier, chosen by a checkpoint's metadata ``kind``:

- ``resnet18``: the specification's network on the 128x128 canonical crop;
- ``descriptor``: a small head on dlib's 128-D face descriptor of the aligned 150x150 chip;
- ``ensemble``: both, their logits combined with weights fitted on validation.

Each has one small interface from faces to logits, so evaluation, prediction, export and serving never
branch on the kind: ``inputs`` (one face of an image -> what the model needs of it), ``logits`` (a batch
of those -> raw logits, before the temperature) and ``dataset_logits`` (prepared samples -> logits, through
the on-disk caches).

This is the inference core's side: numpy for the preprocessing and the descriptor heads, onnxruntime for the
networks (``onnx_model``). The training side puts PyTorch networks behind the same classes (``torchmodels``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .chips import DESCRIPTOR_SIZE, chip
from .config import MEAN, STD
from .crops import cached_images, crop_batches
from .data import Sample
from .descriptors import _chips_of_shard, cached_descriptors
from .images import face_array
from .io import UserError

KINDS = ("resnet18", "descriptor", "ensemble")

Logits = tuple[np.ndarray, np.ndarray, np.ndarray]  # logits, labels, indices of the samples that decoded


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """P(male) after temperature scaling: sigmoid(logit / T), stable for large |logit|."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=float) / temperature))


def kind_of(meta: dict) -> str:
    kind = meta.get("kind", "resnet18")
    if kind not in KINDS:
        raise UserError(f"checkpoint of kind {kind!r}: this facegender knows {', '.join(KINDS)}; upgrade it")
    return kind


def face_points(face) -> tuple[float, ...] | None:
    """A detected face's 5 landmarks, flat, as the manifest stores them."""
    return None if face is None or face.points is None else tuple(v for p in face.points for v in p)


def normalised(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32: pixel / 255, then (x - mean) / std per channel, in the
    order of operations that training's ``transforms.eval_batch`` uses."""
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)


class ResNetModel:
    """ResNet18 on the canonical crop (``box``), normalised as in training.

    ``network`` maps the normalised N x 3 x H x W float32 batch to N logits (``onnx_model.ResNetGraph``)."""

    kind = "resnet18"

    def __init__(self, network: Callable, meta: dict):
        pre = meta["preprocessing"]
        self.network, self.size = network, int(pre["image_size"])
        self.mean, self.std = tuple(pre.get("mean", MEAN)), tuple(pre.get("std", STD))
        self.flip = meta.get("tta") == "flip"  # test-time augmentation: the mean logit of the crop and its mirror

    def inputs(self, image: Image.Image, face, box, pixels: Callable[[], np.ndarray] | None = None) -> np.ndarray:
        return face_array(image, box, self.size)

    def logits(self, inputs) -> np.ndarray:
        batch = inputs if isinstance(inputs, np.ndarray) else np.stack(list(inputs))
        x = normalised(batch, self.mean, self.std)
        out = np.asarray(self.network(x), np.float32)
        if self.flip:
            out = (out + np.asarray(self.network(np.ascontiguousarray(x[..., ::-1])), np.float32)) / 2
        return out

    def dataset_logits(self, samples: list[Sample], batch_size: int = 256, skipped: dict | None = None) -> Logits:
        """Logits of the samples that decode; ``skipped``, if given, gets each other sample's path -> reason."""
        cached = cached_images(samples, self.size)
        if skipped is not None:
            skipped.update(cached.bad)
        logits, labels, indices = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for images, y, idx in crop_batches(cached, batch_size):
            logits.append(self.logits(images))
            labels.append(y)
            indices.append(idx)
        return np.concatenate(logits), np.concatenate(labels), np.concatenate(indices)


class Head:
    """A descriptor head in numpy: standardise, then a linear layer (logistic regression) or a
    one-hidden-layer MLP with ReLU; the weights of ``torchmodels.DescriptorHead``, as a checkpoint stores them."""

    def __init__(self, tensors: dict, hidden: int):
        get = lambda k: np.asarray(tensors[f"head.{k}"], np.float32)  # noqa: E731
        self.mean, self.scale = get("mean"), get("scale")
        self.layers = [(get("layers.0.weight"), get("layers.0.bias"))]
        if hidden:
            self.layers.append((get("layers.2.weight"), get("layers.2.bias")))
        if self.layers[0][0].shape[1] != DESCRIPTOR_SIZE:
            raise UserError(f"a descriptor head takes {DESCRIPTOR_SIZE} numbers, this one "
                            f"{self.layers[0][0].shape[1]}: not a facegender descriptor checkpoint")

    def logits(self, descriptors: np.ndarray) -> np.ndarray:
        x = (np.asarray(descriptors, np.float32) - self.mean) / self.scale
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x[:, 0]


class DescriptorModel:
    """A head on dlib's face descriptor of the chip placed by the face's 5 landmarks.

    ``extractor`` maps chips to descriptors and names them (``onnx_model.DescriptorGraph``); None is
    ``descriptors.default_extractor``, training's PyTorch network, made on first use."""

    kind = "descriptor"

    def __init__(self, head, extractor=None, device: str = "auto"):
        self.head = head  # numpy's Head, or training's DescriptorHead (whose logits run in eval mode)
        self._extractor, self.device = extractor, device

    @property
    def extractor(self):
        if self._extractor is None:  # float32, as the cached descriptors it was fitted on
            from .descriptors import default_extractor

            self._extractor = default_extractor(self.device)
        return self._extractor

    def inputs(self, image: Image.Image, face, box, pixels: Callable[[], np.ndarray] | None = None) -> np.ndarray:
        """``pixels``: as ``detect.FaceDetector.detect``'s, the RGB image as an array made once (each face's
        chip is cut from it rather than from a copy of its own)."""
        return chip(image if pixels is None else pixels(), face_points(face))

    def logits(self, inputs) -> np.ndarray:
        chips = inputs if isinstance(inputs, np.ndarray) else np.stack(list(inputs))
        return self.head.logits(self.extractor(chips))

    def dataset_logits(self, samples: list[Sample], batch_size: int = 256, skipped: dict | None = None) -> Logits:
        d = cached_descriptors(samples, extractor=self._extractor)
        if skipped is not None:
            skipped.update(d.bad)
        labels = np.array([s.label for s in samples], dtype=np.int64)
        return self.head.logits(d.vectors[d.good]), labels[d.good], d.good


class GraphDescriptorModel(DescriptorModel):
    """An exported descriptor model: one graph from chips to the head's logit, whose head cannot be run on
    descriptors alone, so datasets go through the whole graph (no descriptor cache)."""

    def __init__(self, graph):
        super().__init__(head=None, extractor=graph)

    def logits(self, inputs) -> np.ndarray:
        chips = inputs if isinstance(inputs, np.ndarray) else np.stack(list(inputs))
        return self.extractor.logits(chips)

    def dataset_logits(self, samples: list[Sample], batch_size: int = 256, skipped: dict | None = None) -> Logits:
        logits, labels, indices = [np.zeros(0, np.float32)], [], []
        for start in range(0, len(samples), batch_size):
            part = samples[start:start + batch_size]
            chips, reasons = _chips_of_shard([(s.path, s.landmarks) for s in part])
            good = [i for i, c in enumerate(chips) if c is not None]
            if skipped is not None:
                skipped.update({part[i].path: r for i, r in enumerate(reasons) if chips[i] is None})
            if good:
                logits.append(self.logits(np.stack([chips[i] for i in good])))
            labels += [part[i].label for i in good]
            indices += [start + i for i in good]
        return np.concatenate(logits), np.array(labels, np.int64), np.array(indices, np.int64)


class EnsembleModel:
    """Both models on their own view of each face; logit = w_resnet * z_resnet + w_descriptor * z_descriptor + b."""

    kind = "ensemble"

    def __init__(self, resnet: ResNetModel, descriptor: DescriptorModel, weights: Sequence[float], bias: float):
        self.resnet, self.descriptor = resnet, descriptor
        self.weights, self.bias = tuple(float(w) for w in weights), float(bias)

    def combine(self, z_resnet: np.ndarray, z_descriptor: np.ndarray) -> np.ndarray:
        return self.weights[0] * z_resnet + self.weights[1] * z_descriptor + self.bias

    def inputs(self, image: Image.Image, face, box,
               pixels: Callable[[], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.resnet.inputs(image, face, box), self.descriptor.inputs(image, face, box, pixels)

    def logits(self, inputs) -> np.ndarray:
        crops, chips = zip(*inputs)
        return self.combine(self.resnet.logits(crops), self.descriptor.logits(chips))

    def dataset_logits(self, samples: list[Sample], batch_size: int = 256, skipped: dict | None = None) -> Logits:
        zr, labels, ir = self.resnet.dataset_logits(samples, batch_size, skipped)
        zd, _, id_ = self.descriptor.dataset_logits(samples, batch_size, skipped)
        both, in_r, in_d = np.intersect1d(ir, id_, return_indices=True)
        return self.combine(zr[in_r], zd[in_d]), labels[in_r], both


def combined(meta: dict, resnet=None, descriptor=None):
    """The model of ``meta``'s kind from its parts: a ResNet18, a descriptor model, or both as an ensemble."""
    kind = kind_of(meta)
    if kind == "resnet18":
        return resnet
    if kind == "descriptor":
        return descriptor
    ensemble = meta["ensemble"]
    return EnsembleModel(resnet, descriptor, ensemble["weights"], ensemble["bias"])


def graph_model(graph, meta: dict):
    """The model of an exported graph (``onnx_model.load``): a ResNet18, or a descriptor model whose head is in
    the graph."""
    return GraphDescriptorModel(graph) if kind_of(meta) == "descriptor" else ResNetModel(graph, meta)


def build_face_model(tensors: dict, meta: dict, resnet_network: Callable | None = None, extractor=None):
    """The model a checkpoint describes, on the inference core: ``tensors`` (numpy) hold the descriptor
    head's ``head.*``; the ResNet18 runs as ``resnet_network`` (needed for resnet18 and ensemble models),
    dlib's network as ``extractor``."""
    kind = kind_of(meta)
    resnet = descriptor = None
    if kind in ("resnet18", "ensemble"):
        if resnet_network is None:
            raise ValueError("a ResNet18 model needs its network")
        resnet = ResNetModel(resnet_network, meta)
    if kind in ("descriptor", "ensemble"):
        descriptor = DescriptorModel(Head(tensors, int(meta["head"]["hidden"])), extractor)
    return combined(meta, resnet, descriptor)
