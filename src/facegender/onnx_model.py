"""The model as an ONNX graph, for running it without PyTorch or elsewhere.

Each kind of model is one graph from what its PyTorch model takes to ``logit`` (N x 1) and ``p_male``
(N x 1: the calibrated probability, sigmoid(logit / temperature)); ``p_male >= threshold`` means the
second class. N is free.

- ``resnet18``: ``input``, float32 N x 3 x H x W, RGB, scaled to [0, 1] and normalised with the metadata's
  mean and std (``transforms.eval_batch``).
- ``descriptor``: ``chips``, uint8 N x 150 x 150 x 3 RGB, each cut by dlib's ``get_face_chip`` (size 150,
  padding 0.25) from the face's 5 landmarks (dlib's 5-point shape predictor); dlib's face-recognition
  network and the head in one graph, which also outputs the 128-D ``descriptor``.

The preprocessing contract and the full checkpoint metadata travel in the file's metadata_props, so a
``.onnx`` file is a complete model on its own. ``onnx_face_model`` and ``run_on_onnxruntime`` run such
graphs with onnxruntime behind the interfaces of ``facemodels``, so the ``Classifier`` uses either backend
without a second code path. This is the one module that imports onnx and onnxruntime.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import ResNet

from .checkpoint import META_KEY
from .config import MEAN, STD
from .detect import LANDMARK_MODEL
from .dlibnet import CHIP_PADDING, CHIP_SIZE, DESCRIPTOR_SIZE, MODEL_FILE, DescriptorNet
from .facemodels import DescriptorModel, ResNetModel, kind_of
from .io import UserError, atomic_path
from .loaders import cache_dir

OPSET = 18  # the torch.export-based exporter's own opset: no version conversion on the way
CONVERTER = 1  # part of the key of cached graphs: bump when what to_onnx builds changes
INSTALL_HINT = "pip install 'facegender[onnx]' (onnxruntime, onnx and onnxscript)"
BATCH = 64  # chips per onnxruntime call: bounds the activations' memory as DescriptorNet.descriptors does


class _Calibrated(nn.Module):
    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.model(x)
        return logit, torch.sigmoid(logit / self.temperature)


class _DescriptorGraph(nn.Module):
    """Chips -> dlib's descriptor -> the head's logit, calibrated; the descriptor is an output too."""

    def __init__(self, net: DescriptorNet, head: nn.Module, temperature: float):
        super().__init__()
        self.net, self.head, self.temperature = net, head, temperature

    def forward(self, chips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        descriptor = self.net(chips)
        logit = self.head(descriptor).unsqueeze(1)
        return logit, torch.sigmoid(logit / self.temperature), descriptor


def contract(meta: dict, kind: str | None = None) -> dict[str, str]:
    """The metadata_props of an exported graph of a ``kind`` of model (default: the metadata's): the
    preprocessing contract, readable without facegender."""
    kind = kind or kind_of(meta)
    props = {"kind": kind}
    if kind == "resnet18":
        pre = meta["preprocessing"]
        props |= {
            "image_size": str(int(pre["image_size"])),
            "input": "input: float32 N x 3 x H x W, RGB, pixel / 255, then (x - mean) / std per channel",
            "mean": json.dumps(list(pre.get("mean", MEAN))),
            "std": json.dumps(list(pre.get("std", STD))),
        }
    else:
        described = meta.get("descriptor", {})
        props |= {
            "chip_size": str(int(described.get("chip_size", CHIP_SIZE))),
            "chip_padding": str(float(described.get("chip_padding", CHIP_PADDING))),
            "landmarks": f"dlib 5-point shape predictor ({LANDMARK_MODEL})",
            "input": f"chips: uint8 N x {CHIP_SIZE} x {CHIP_SIZE} x 3 RGB, each dlib.get_face_chip(image, "
                     f"full_object_detection of the 5 landmarks, size={CHIP_SIZE}, padding={CHIP_PADDING})",
            "descriptor_network": described.get("network", MODEL_FILE),
        }
    return props | {
        "classes": json.dumps(list(meta["classes"])),
        "threshold": str(float(meta["threshold"])),
        "temperature": str(float(meta.get("temperature", 1.0))),
        "output": "logit (N x 1); p_male (N x 1) = sigmoid(logit / temperature); p_male >= threshold: classes[1]"
                  + ("; descriptor (N x 128): dlib's face descriptor" if kind == "descriptor" else ""),
        META_KEY: json.dumps(meta, sort_keys=True),
    }


def to_onnx(model, meta: dict) -> bytes:
    """The serialised float32 ONNX graph, with a dynamic batch dimension, of a ``facemodels`` ResNet18 or
    descriptor model (for the latter, dlib's network from the packaged model file and the model's head)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise UserError(f"ONNX export needs onnx and onnxscript: {INSTALL_HINT}") from None
    temperature = float(meta.get("temperature", 1.0))
    if isinstance(model, ResNetModel) and isinstance(model.network, ResNet):
        size = int(meta["preprocessing"]["image_size"])
        wrapped, example = _Calibrated(model.network.float().eval(), temperature), torch.zeros(2, 3, size, size)
        inputs, outputs, kind = ["input"], ["logit", "p_male"], "resnet18"
    elif isinstance(model, DescriptorModel) and isinstance(model.head, nn.Module):
        net = DescriptorNet.from_dat(device="cpu", precision="fp32")
        wrapped = _DescriptorGraph(net, model.head.float().eval(), temperature)
        example = torch.zeros(2, CHIP_SIZE, CHIP_SIZE, 3, dtype=torch.uint8)
        inputs, outputs, kind = ["chips"], ["logit", "p_male", "descriptor"], "descriptor"
    else:
        raise UserError(f"ONNX export covers ResNet18 and descriptor models, not a {type(model).__name__}; "
                        "export an ensemble's members one by one, or run it with the torch backend")
    cached = cache_dir() / "onnx" / f"{kind}-{_graph_key(wrapped, example, temperature)}.onnx"
    if cached.is_file():  # the same weights exported before: the export is the slow part of starting up
        try:
            return with_meta(cached.read_bytes(), meta, kind)
        except UserError:
            pass  # a damaged cache entry is rebuilt below
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's business
        program = torch.onnx.export(wrapped, (example,), input_names=inputs, output_names=outputs,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                                    dynamo=True, verbose=False, report=False)
    proto = program.model_proto
    proto.producer_name, proto.doc_string = "facegender", __doc__.split("\n\n")[1].replace("\n", " ")
    _set_meta(proto, meta, kind)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    with atomic_path(cached) as tmp:
        tmp.write_bytes(data)
    return data


def _graph_key(module: nn.Module, example: torch.Tensor, temperature: float) -> str:
    """What an exported graph depends on: the weights, the input's form, the temperature inside it, the
    exporter's versions and ``CONVERTER``."""
    import onnxscript

    h = hashlib.sha256(f"{CONVERTER}|{OPSET}|{torch.__version__}|{onnxscript.__version__}|{example.dtype}|"
                       f"{tuple(example.shape[1:])}|{temperature!r}".encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def quantize_int8(model_bytes: bytes, calibration: np.ndarray, meta: dict, reduce_range: bool = True) -> bytes:
    """A descriptor graph with its convolutions in int8: onnxruntime's static quantisation (QDQ, per-channel
    weights in 7 bits unless ``reduce_range`` is off: CPUs without VNNI can overflow their 16-bit sums of
    u8 x s8 products otherwise), calibrated on ``calibration``, uint8 chips of validation faces. The head
    stays float32."""
    import tempfile

    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError:
        raise UserError(f"int8 quantisation needs onnxruntime: {INSTALL_HINT}") from None

    class Chips(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"chips": calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="facegender-int8-") as tmp:
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        logging.disable(logging.WARNING)  # its advice to pre-process the graph: done by the exporter already
        try:
            quantize_static(src, out, Chips(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=reduce_range)
        finally:
            logging.disable(logging.NOTSET)
        return with_meta(out.read_bytes(), meta, "descriptor")


def with_meta(model_bytes: bytes, meta: dict, kind: str | None = None) -> bytes:
    """The same graph with ``meta`` (and the contract derived from it) as its metadata."""
    proto = _parse(model_bytes, "an ONNX graph")
    _set_meta(proto, meta, kind)
    return proto.SerializeToString()


def _set_meta(proto, meta: dict, kind: str | None = None) -> None:
    del proto.metadata_props[:]
    for key, value in contract(meta, kind).items():
        proto.metadata_props.add(key=key, value=value)


def _parse(model_bytes: bytes, name: str):
    try:
        import onnx
    except ImportError:
        raise UserError(f"{name}: reading ONNX files needs onnx: {INSTALL_HINT}") from None
    try:
        return onnx.load_model_from_string(model_bytes)
    except Exception as e:  # protobuf's decode errors have no common base worth naming
        raise UserError(f"{name}: not a readable ONNX file ({e.__class__.__name__})") from None


def read_meta(model_bytes: bytes, name: str) -> dict:
    proto = _parse(model_bytes, name)
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise UserError(f"{name}: an ONNX file without facegender metadata; export it with `facegender export`")
    return json.loads(props[META_KEY])


def _session(model_bytes: bytes, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"the onnxruntime backend needs onnxruntime: {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
    # Between runs its threads would spin, waiting for work, on the cores that the threads detecting faces
    # (predict, serve) need. On the 2-core machine of README "Fast prediction" the difference was within
    # the noise either way.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(model_bytes, options, providers=providers)


class OnnxModule(nn.Module):
    """A ResNet18 graph made by ``to_onnx``, run by onnxruntime, called like the PyTorch network it came from."""

    def __init__(self, model_bytes: bytes, threads: int | None = None):
        super().__init__()
        self.session = _session(model_bytes, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())  # ONNX wants plain NCHW, not channels-last
        (logit,) = self.session.run(["logit"], {"input": batch})
        return torch.from_numpy(logit).to(x.device)


class OnnxDescriptors:
    """A descriptor graph made by ``to_onnx`` on onnxruntime, as ``facemodels.DescriptorModel`` uses its
    parts: called on chips it is the extractor (N x 128 descriptors); ``head`` maps descriptors to logits.

    ``name`` (which keys cached descriptors) comes from the graph: an int8 graph's descriptors are not fp32's."""

    def __init__(self, model_bytes: bytes, threads: int | None = None):
        import onnx.utils

        self.session = _session(model_bytes, threads)
        proto = _parse(model_bytes, "the descriptor graph")
        head = onnx.utils.Extractor(proto).extract_model(["descriptor"], ["logit"])
        del proto.metadata_props[:]  # the same graph under other metadata gives the same descriptors
        self.name = f"onnx-{hashlib.sha256(proto.SerializeToString()).hexdigest()[:16]}"
        self.head = _OnnxHead(_session(head.SerializeToString(), 1))

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        chips = np.ascontiguousarray(chips, dtype=np.uint8)
        out = [self.session.run(["descriptor"], {"chips": chips[i:i + BATCH]})[0] for i in range(0, len(chips), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, DESCRIPTOR_SIZE), np.float32)


class _OnnxHead:
    """The head of a descriptor graph (its part from ``descriptor`` to ``logit``), as DescriptorHead is used."""

    def __init__(self, session):
        self.session = session

    def eval(self) -> "_OnnxHead":  # DescriptorModel treats its head as a module
        return self

    def logits(self, descriptors: np.ndarray) -> np.ndarray:
        return self.session.run(["logit"], {"descriptor": np.asarray(descriptors, np.float32)})[0][:, 0]


def load(path: str | Path) -> tuple[bytes, dict]:
    """An exported ``.onnx`` file's bytes and the checkpoint metadata it carries."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    data = path.read_bytes()
    return data, read_meta(data, str(path))


def onnx_face_model(model_bytes: bytes, meta: dict, threads: int | None = None):
    """The ``facemodels`` model of a graph made by ``to_onnx``, run by onnxruntime."""
    if kind_of(meta) == "resnet18":
        size = int(meta["preprocessing"]["image_size"])
        return ResNetModel(OnnxModule(model_bytes, threads), size, torch.device("cpu"), "fp32")
    graph = OnnxDescriptors(model_bytes, threads)
    return DescriptorModel(graph.head, graph)


def run_on_onnxruntime(model, meta: dict) -> None:
    """Swap the networks of ``model`` (a ResNet18, a descriptor model, or both members of an ensemble) for
    their ONNX graphs on onnxruntime, converted in memory (float32; some seconds)."""
    resnet = model if isinstance(model, ResNetModel) else getattr(model, "resnet", None)
    descriptor = model if isinstance(model, DescriptorModel) else getattr(model, "descriptor", None)
    if resnet is not None:
        resnet.network, resnet.precision = OnnxModule(to_onnx(resnet, meta)), "fp32"
    if descriptor is not None:
        graph = OnnxDescriptors(to_onnx(descriptor, meta))
        descriptor.head, descriptor._extractor = graph.head, graph
