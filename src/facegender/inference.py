"""Using a trained model: ``Classifier.from_checkpoint(path).predict(images)``."""
from __future__ import annotations

import collections
import functools
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import checkpoint, onnx_model
from .detect import DEFAULT_DETECTOR, MAX_SIDE, FaceDetector, detect_faces_many
from .facemodels import apply_temperature, build_face_model, graph_model, kind_of
from .images import BadImage, Opened, decode, open_image, open_rgb
from .io import UserError

# the models trained on all three corpora that ship with the package, by name (see MODEL_CARD.md)
BUNDLED_MODELS = {name: Path(__file__).parent / "weights" / f"facegender-{name}.safetensors"
                  for name in ("descriptor", "resnet18")}
DEFAULT_MODEL = "descriptor"  # the best on faces from corpora it never saw (MODEL_CARD.md, leave-one-corpus-out)
BUNDLED_MODEL = BUNDLED_MODELS[DEFAULT_MODEL]
# their ResNet18 networks as ONNX graphs (float16 storage of the float16 weights, run in float32), so the
# core runs every bundled model without converting anything
BUNDLED_GRAPHS = {BUNDLED_MODELS["resnet18"]: BUNDLED_MODELS["resnet18"].with_suffix(".onnx")}
TRAIN_HINT = "pip install 'facegender[train]'"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
BACKENDS = ("auto", "torch", "onnxruntime")  # what runs the model's forward pass (``resolve_backend``)
# On one core, predict decodes this many photos, then detects their faces together (``faces_many``: the
# landmarks of all their faces are placed one after another, with the landmark model still in the cache),
# or fewer where their decoded pixels reach DETECTED_TOGETHER_PIXELS (what a group holds at once).
DETECTED_TOGETHER = 8
DETECTED_TOGETHER_PIXELS = 8 * 640 * 480


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
        # every field is a number, a string, None or a tuple of floats: nothing for asdict's deep copy to do
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Classifier:
    """A trained model with its threshold and temperature, and optionally a face detector.

    The model is any kind of ``facemodels`` (ResNet18, a descriptor head, an ensemble): the checkpoint's
    metadata says which, and nothing here depends on it.
    """

    def __init__(self, model, meta: dict, detect: bool = True, min_confidence: float = 0.0,
                 detector: str = DEFAULT_DETECTOR, min_face: float | None = None):
        self.model = model
        self.meta = meta
        self.kind = kind_of(meta)
        self.classes = tuple(meta["classes"])
        self.threshold = float(meta["threshold"])
        self.temperature = float(meta.get("temperature", 1.0))
        # detector: one of detect.DETECTORS; min_face: BlazeFace's smallest face sought, px of the photo
        # (None: FaceDetector.smallest's default)
        self.detector = FaceDetector(detector, min_face=min_face) if detect else None
        if not 0 <= min_confidence <= 1:
            raise UserError(f"--min-confidence {min_confidence}: must be between 0 and 1")
        self.min_confidence = min_confidence

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "auto", precision: str = "auto",
                        backend: str = "auto", threads: int | None = None, **options) -> "Classifier":
        """A run directory, a .safetensors or .onnx file, or the name of a bundled model; None means the
        default one. ``backend`` (``resolve_backend``): ``onnxruntime`` runs every network as an ONNX graph
        with no PyTorch (``device`` and ``precision`` are then onnxruntime's: float32, CUDA where it has it),
        ``torch`` in PyTorch. ``threads``: onnxruntime's threads per network (default: this process's cores)."""
        backend = resolve_backend(backend, path)
        if path is not None and Path(path).suffix == ".onnx":
            if backend != "onnxruntime":
                raise UserError(f"{path}: an ONNX file runs with the onnxruntime backend (--backend onnxruntime)")
            graph, meta = onnx_model.load(path, threads)
            return cls(graph_model(graph, meta), meta, **options)
        file = model_path(path)
        if backend == "torch":
            return cls(*_torch_model(file, device, precision), **options)
        tensors, meta = checkpoint.load(file)
        kind = kind_of(meta)
        network = _resnet_network(file, tensors, meta, threads) if kind != "descriptor" else None
        extractor = onnx_model.descriptor_network(threads) if kind != "resnet18" else None
        return cls(build_face_model(tensors, meta, network, extractor), meta, **options)

    @classmethod
    def from_state(cls, state: dict, meta: dict, device: str = "auto", precision: str = "auto",
                   **options) -> "Classifier":
        """ResNet18 weights in PyTorch (any float dtype; computed in float32 or the chosen precision) and their
        metadata: the training side."""
        from .torchmodels import build_torch_face_model

        tensors = {f"model.{k}": v for k, v in state.items()}
        return cls(build_torch_face_model(tensors, meta, device, precision), meta, **options)

    def logits(self, inputs) -> np.ndarray:
        """Raw logits (before the temperature) for a batch of model inputs made by ``faces``."""
        return self.model.logits(inputs)

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
        """Like ``predict``, streaming: what is held is a batch of faces, and the faces of at most about as
        many images ahead (their model inputs, not the decoded images).

        ``workers`` threads decode and detect (``faces``) ahead while this one runs the model (``classify``);
        default: one per CPU this process may use, at most 4, and none on one CPU; 0 does everything in the
        calling thread.
        """
        def faces(jobs: list[tuple[int, object]]):
            return self.faces_many([(str(item) if isinstance(item, (str, Path)) else f"<image {i}>", item, 1.0)
                                    for i, item in jobs])

        # the cores this process may use: on one core (taskset -c 0) a worker thread only takes turns with this
        # one, and the hand-over costs: three-face 640x480 photos went 26.4-27.2 -> 27.9-28.1 photos/s without it
        cores = onnx_model.default_threads()
        workers = (min(4, cores) if cores > 1 else 0) if workers is None else workers
        # photos detected together: in this thread only (with workers, a group per worker would leave the others
        # idle on a short list, and that has not been measured)
        together = DETECTED_TOGETHER if workers == 0 else 1
        batch: list[tuple[Prediction, np.ndarray]] = []
        # While this thread runs a batch, the workers go on detecting for the next one: a look-ahead shorter
        # than a batch would leave them idle for most of the model's turn.
        groups = _groups(enumerate(images), together)
        found_faces = (found for group in _ordered_map(faces, groups, workers, ahead=max(4 * workers, batch_size))
                       for found in group)
        for found in found_faces:
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

    def faces(self, name: str, item, detect: bool = True,
              scale: float = 1.0) -> list[tuple[Prediction, np.ndarray | None]]:
        """Decode and detect: each face's Prediction stub with the model's input for it.

        The input is None where there is nothing to classify (no face, or an unreadable image: the stub's
        ``error`` says why). Safe to call from several threads; ``classify`` does the batched model work.
        ``detect=False`` classifies the whole image even where the classifier has a detector. ``scale``: for
        an image already decoded, the file's pixels per pixel of it, where decoding reduced it. Either way
        boxes are in the file's pixels, and so is the detector's ``min_face``.
        """
        return self.faces_many([(name, item, scale)], detect)[0]

    def faces_many(self, jobs: list[tuple[str, object, float]],
                   detect: bool = True) -> list[list[tuple[Prediction, np.ndarray | None]]]:
        """``faces`` of several images, each (name, item, scale): decoded, then detected together (up to
        DETECTED_TOGETHER_PIXELS of decoded pixels at a time: ``FaceDetector.detect_many``)."""
        out: list[list[tuple[Prediction, np.ndarray | None]]] = [[] for _ in jobs]
        pending: list[tuple[int, str, Image.Image, float, Callable[[], np.ndarray]]] = []

        def detected() -> None:
            found = detect_faces_many([(image, pixels, scale) for _, _, image, scale, pixels in pending], self.detector)
            for (i, name, image, scale, pixels), faces in zip(pending, found):
                out[i] = [(Prediction(name, faces=len(faces), face=k, box=tuple(round(v * scale, 1) for v in face.box)),
                           self.model.inputs(image, face, box, pixels))
                          for k, (face, box) in enumerate(faces, start=1)] or [(Prediction(name, faces=0), None)]
            pending.clear()

        held = 0  # decoded pixels waiting for the detector
        for i, (name, item, scale) in enumerate(jobs):
            try:
                image, scale = (decode(self.open(item, item, detect)) if isinstance(item, (str, Path))
                                else (self.load_image(item, name), scale))
            except BadImage as e:
                out[i] = [(Prediction(name, error=str(e)), None)]
                continue
            if self.detector is None or not detect:
                out[i] = [(Prediction(name), self.model.inputs(image, None, None))]
                continue
            image = image if image.mode == "RGB" else image.convert("RGB")
            # one copy of the photo for the landmarks and every face's chip (each conversion copies it), made where needed
            pending.append((i, name, image, scale, functools.cache(lambda image=image: np.asarray(image))))
            held += image.width * image.height
            if held >= DETECTED_TOGETHER_PIXELS:
                detected()
                held = 0
        if pending:
            detected()
        return out

    def open(self, source, name, detect: bool = True, **limits) -> Opened:
        """``images.open_image`` of a file (a path, or its bytes) as this classifier decodes one: a big JPEG
        reduced while it decodes, to no less than MAX_SIDE (what the detector looks at anyway) and, where it
        detects, by no more than its ``min_face`` allows. ``limits``: open_image's ``pixels`` and ``afford``."""
        most = self.detector.largest_reduction() if self.detector is not None and detect else None
        return open_image(source, name, MAX_SIDE, most_reduced=most, **limits)

    def classify(self, batch: list[tuple[Prediction, np.ndarray]]) -> list[Prediction]:
        """Complete the stubs made by ``faces`` with one batched forward pass over their inputs."""
        if not batch:
            return []
        p_male = self.probabilities(self.logits([a for _, a in batch]))
        return [self._decide(stub, float(p)) for (stub, _), p in zip(batch, p_male)]

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


def _groups(items: Iterable, n: int) -> Iterator[list]:
    """``items`` in lists of ``n`` (the last may be shorter)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def _ordered_map(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most ``ahead`` items in flight (at least
    one per thread, so that none idles); ``workers`` 0 maps in this thread."""
    if workers <= 0:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="facegender-faces") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= max(ahead, workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (an error, or the consumer let go): do not decode what nobody will read
            for future in pending:
                future.cancel()


def resolve_backend(backend: str, model: str | Path | None) -> str:
    """What runs ``model`` (as ``model_path`` reads it). ``auto``: onnxruntime wherever that needs no
    PyTorch (an .onnx file, a bundled model, a descriptor head: the same answers, P(male) within 1e-4), else
    torch where it is installed (a ResNet18 or ensemble checkpoint of your own), else onnxruntime, which then
    says what to do. ``torch`` and ``onnxruntime`` stay as they are."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if model is not None and Path(model).suffix == ".onnx":
        return "onnxruntime"
    path = model_path(model)
    if path in BUNDLED_GRAPHS or kind_of(checkpoint.read_meta(path)) == "descriptor":
        return "onnxruntime"
    return "torch" if _torch_installed() else "onnxruntime"


def _torch_installed() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "torchvision"))


def _torch_model(file: Path, device: str, precision: str) -> tuple:
    """The checkpoint's model in PyTorch, and its metadata."""
    if not _torch_installed():
        raise UserError(f"--backend torch needs PyTorch: {TRAIN_HINT}, or use --backend onnxruntime")
    from .torchmodels import build_torch_face_model

    tensors, meta = checkpoint.load_torch(file)
    return build_torch_face_model(tensors, meta, device, precision), meta


def _resnet_network(file: Path, tensors: dict, meta: dict, threads: int | None):
    """The checkpoint's ResNet18 as an ONNX graph: the one shipped with a bundled model, or converted once
    (cached) where PyTorch is installed to convert it."""
    if file in BUNDLED_GRAPHS:
        graph, _ = onnx_model.load(BUNDLED_GRAPHS[file], threads)
        return graph
    if not (_torch_installed() and all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))):
        raise UserError(f"{file}: a ResNet18 checkpoint runs in PyTorch: export it once with "
                        f"`facegender export {file} model.onnx` and predict with model.onnx, or {TRAIN_HINT}")
    from .onnx_export import resnet_graph

    return onnx_model.ResNetGraph(onnx_model.session(resnet_graph(tensors, meta), threads, str(file)))


def bundled_model(name: str = DEFAULT_MODEL) -> Path:
    path = BUNDLED_MODELS[name]
    if not path.is_file():
        raise UserError(f"the bundled model {path} is missing from this install; "
                        "reinstall facegender, or pass a checkpoint (a run directory or .safetensors file)")
    return path


def model_path(model: str | Path | None) -> Path:
    """The checkpoint file meant by ``model``: a run directory or file, a bundled model's name, or None
    for the default bundled model."""
    if model is None:
        return bundled_model()
    if str(model) in BUNDLED_MODELS and not Path(model).exists():
        return bundled_model(str(model))
    return checkpoint.resolve(model)


LABEL_COLOURS = {"female": (230, 60, 140), "male": (40, 120, 230), "uncertain": (240, 180, 0)}


# A smaller image is drawn on enlarged by a whole factor to at least this side: a label's smallest legible type
# (12 px) is wider than a 64 px thumbnail, and wider than the faces in a 240 px group photo.
ANNOTATED_MIN_SIDE = 400


def annotate(image: Image.Image, predictions: list[Prediction]) -> Image.Image:
    """A copy of ``image`` with each face's box and "label confidence" drawn on it; an image whose longer side
    is under ANNOTATED_MIN_SIDE px is enlarged first, by the whole factor that takes it there."""
    out = image.convert("RGB")
    f = -(-ANNOTATED_MIN_SIDE // max(out.size))
    if f > 1:
        out = out.resize((out.width * f, out.height * f), Image.LANCZOS)
        predictions = [p if p.box is None else replace(p, box=tuple(v * f for v in p.box)) for p in predictions]
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
