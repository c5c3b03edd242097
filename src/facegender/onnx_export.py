"""Models as ONNX graphs: the training side (PyTorch, onnx, onnxscript) writes what the inference core runs.

Each kind of model is one graph from what its PyTorch model takes to ``logit`` (N x 1) and ``p_male``
(N x 1: the calibrated probability, sigmoid(logit / temperature)); ``p_male >= threshold`` means the
second class. N is free.

- ``resnet18``: ``input``, float32 N x 3 x H x W, RGB, scaled to [0, 1] and normalised with the metadata's
  mean and std (``transforms.eval_batch``).
- ``descriptor``: ``chips``, uint8 N x 150 x 150 x 3 RGB, each cut by dlib's ``get_face_chip`` (size 150,
  padding 0.25) from the face's 5 landmarks (dlib's 5-point shape predictor); dlib's face-recognition
  network and the head in one graph, which also outputs the 128-D ``descriptor``.

The preprocessing contract and the full checkpoint metadata travel in the file's metadata_props, so a
``.onnx`` file is a complete model on its own; ``onnx_model`` runs such graphs with onnxruntime alone.
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

from .chips import CHIP_PADDING, CHIP_SIZE, MODEL_FILE
from .config import MEAN, STD
from .detect import LANDMARK_MODEL
from .dlibnet import DescriptorNet
from .facemodels import DescriptorModel, kind_of
from .io import UserError, atomic_path, cache_dir, used_cache_entry
from .onnx_model import META_KEY
from .torchmodels import TorchResNetModel, build_torch_face_model

OPSET = 18  # the torch.export-based exporter's own opset: no version conversion on the way
CONVERTER = 1  # part of the key of cached graphs: bump when what to_onnx builds changes
INSTALL_HINT = "pip install 'facegender[train]' (PyTorch, onnx and onnxscript)"


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


def to_onnx(model, meta: dict, optimize: bool = True) -> bytes:
    """The serialised float32 ONNX graph, with a dynamic batch dimension, of a ``facemodels`` ResNet18 or
    descriptor model (for the latter, dlib's network from the packaged model file and the model's head).

    ``optimize=False`` keeps the graph as traced: batch norms stay apart from their convolutions (onnxruntime
    fuses them when it loads the graph), so weights that were float16 stay exactly representable in float16
    (``half_stored``)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise UserError(f"ONNX export needs onnx and onnxscript: {INSTALL_HINT}") from None
    temperature = float(meta.get("temperature", 1.0))
    if isinstance(model, TorchResNetModel) and isinstance(model.network, ResNet):
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
    cached = cache_dir() / "onnx" / f"{kind}-{_graph_key(wrapped, example, temperature, optimize)}.onnx"
    if cached.is_file():  # the same weights exported before: the export is the slow part of starting up
        try:
            return with_meta(used_cache_entry(cached, "*.onnx").read_bytes(), meta, kind)
        except UserError:
            pass  # a damaged cache entry is rebuilt below
    proto = _export(wrapped, example, inputs, outputs, optimize)
    proto.producer_name, proto.doc_string = "facegender", __doc__.split("\n\n")[1].replace("\n", " ")
    _set_meta(proto, meta, kind)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    with atomic_path(cached) as tmp:
        tmp.write_bytes(data)
    used_cache_entry(cached, "*.onnx")  # those of models unused for a month go
    return data


def _export(module: nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str], optimize: bool = True):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's business
        program = torch.onnx.export(module, (example,), input_names=inputs, output_names=outputs,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                                    dynamo=True, optimize=optimize, verbose=False, report=False)
    return program.model_proto


def _graph_key(module: nn.Module, example: torch.Tensor, temperature: float, optimize: bool) -> str:
    """What an exported graph depends on: the weights, the input's form, the temperature inside it, the
    exporter's versions and ``CONVERTER``."""
    import onnxscript

    h = hashlib.sha256(f"{CONVERTER}|{OPSET}|{torch.__version__}|{onnxscript.__version__}|{example.dtype}|"
                       f"{tuple(example.shape[1:])}|{temperature!r}|{optimize}".encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def quantize_int8(model_bytes: bytes, calibration: np.ndarray, meta: dict | None, reduce_range: bool = True,
                  method: str = "MinMax", exclude: tuple[str, ...] = ()) -> bytes:
    """A descriptor graph with its convolutions in int8: onnxruntime's static quantisation (QDQ, per-channel
    weights in 7 bits unless ``reduce_range`` is off: CPUs without VNNI can overflow their 16-bit sums of
    u8 x s8 products otherwise), calibrated on ``calibration``, uint8 chips of validation faces, with
    activation ranges set by ``method`` (onnxruntime's CalibrationMethod: MinMax, Percentile, Entropy); the
    convolutions named in ``exclude`` and the head stay float32. ``meta`` None: the graph without metadata."""
    import tempfile

    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
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
                            reduce_range=reduce_range, nodes_to_exclude=list(exclude),
                            calibrate_method=getattr(CalibrationMethod, method),
                            extra_options={} if method == "MinMax" else {"CalibMaxIntermediateOutputs": 4})
        finally:
            logging.disable(logging.NOTSET)
        return out.read_bytes() if meta is None else with_meta(out.read_bytes(), meta, "descriptor")


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


def resnet_graph(tensors: dict, meta: dict) -> bytes:
    """The float32 graph of a ResNet18 (or an ensemble's) checkpoint's network, for onnxruntime; cached."""
    resnet_meta = meta | {"kind": "resnet18"}
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith("model.")}
    return to_onnx(build_torch_face_model(state, resnet_meta, "cpu", "fp32"), resnet_meta)


class _Network(nn.Module):
    def __init__(self, net: DescriptorNet):
        super().__init__()
        self.net = net

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        return self.net(chips)


def descriptor_network_graph(blocked: bool = True, size: int = CHIP_SIZE) -> bytes:
    """dlib's face-recognition network alone, chips -> ``descriptor``, float32: the graph that the package
    ships (``onnx_model.DESCRIPTOR_NETWORK``) and that every descriptor head runs on in the core.
    ``blocked=False``: as the exporter writes it, without ``in_channel_blocks`` (to compare); ``size``: the
    chips' side it takes (the network was trained on 150; others are for studies, benchmarks/chip_size.py)."""
    import onnx

    net = DescriptorNet.from_dat(device="cpu", precision="fp32")
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    proto = _export(_Network(net), example, ["chips"], ["descriptor"])
    proto = in_channel_blocks(proto) if blocked else proto
    proto.producer_name = "facegender"
    proto.doc_string = (f"dlib's face-recognition network ({MODEL_FILE}): chips, uint8 N x {size} x {size} x 3 "
                        f"RGB (dlib.get_face_chip, size {size}, padding {CHIP_PADDING}) -> descriptor, N x 128")
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def in_channel_blocks(proto):
    """dlib's network rewritten so that onnxruntime keeps it in its blocked channel layout (NCHWc) from the
    first convolution to the last, the same arithmetic up to float32 rounding (descriptors within 1e-6):

    - the pixels' normalisation, (x - mean) / 256, is folded into the first convolution's weights and bias
      (dlib does not pad it, so the fold is exact);
    - each zero padding of a residual block's shortcut (more channels after a downsampling block, or a row
      and a column where dlib adds a 3x3 to a 4x4 tensor) becomes a 1x1 convolution with identity weights
      and the same zero padding.

    onnxruntime runs a Pad only in the plain layout: around the first one the graph left the blocked layout,
    and since the next blocks' shortcuts then came from outside it, every later residual Add and ReLU ran
    apart from its convolution, each between two layout conversions (about 5% of the network's time)."""
    from onnx import helper, numpy_helper, shape_inference

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    constant = lambda name: numpy_helper.to_array(initializers[name])

    def put(name: str, value: np.ndarray) -> None:
        if name in initializers:
            graph.initializer.remove(initializers[name])
        initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
        graph.initializer.append(initializers[name])

    producer = {out: node for node in graph.node for out in node.output}
    consumers = lambda name: [n for n in graph.node if name in n.input]
    stem = next(n for n in graph.node if n.op_type == "Conv")
    div = producer[stem.input[0]]
    sub = producer[div.input[0]]
    if (div.op_type, sub.op_type) != ("Div", "Sub") or len(consumers(div.output[0])) != 1 \
            or any(a.name == "pads" and any(a.ints) for a in stem.attribute):
        raise ValueError("dlib's network graph does not start as it was written to: (x - mean) / k -> unpadded Conv")
    mean, k = constant(sub.input[1]).reshape(-1), float(constant(div.input[1]))
    weight, bias = constant(stem.input[1]), constant(stem.input[2])
    put(stem.input[1], weight / k)
    put(stem.input[2], bias - (weight * mean[None, :, None, None]).sum(axis=(1, 2, 3)) / k)
    stem.input[0] = sub.input[0]
    graph.node.remove(div)
    graph.node.remove(sub)

    shapes = {v.name: v.type.tensor_type.shape for v in shape_inference.infer_shapes(proto).graph.value_info}
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        widths = [int(v) for v in constant(pad.input[1])]  # begin N C H W, end N C H W
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = float(constant(pad.input[2])) if len(pad.input) > 2 and pad.input[2] else 0.0
        if len(widths) != 8 or widths[0] or widths[1] or widths[4] or min(widths) < 0 or mode != b"constant" or value:
            raise ValueError(f"{pad.name}: {mode!r} pads {widths} of {value}: only zeros, and no new leading channels")
        channels = shapes[pad.input[0]].dim[1].dim_value
        if widths[5]:  # new channels: each output channel copies one input channel or is zero
            identity = np.zeros((channels + widths[5], channels, 1, 1), np.float32)
            identity[np.arange(channels), np.arange(channels)] = 1.0
        else:  # rows and columns only: one weight per channel
            identity = np.ones((channels, 1, 1, 1), np.float32)
        put(f"{pad.name}.identity", identity)
        conv = helper.make_node("Conv", [pad.input[0], f"{pad.name}.identity"], list(pad.output),
                                name=f"{pad.name}_as_conv", kernel_shape=[1, 1], group=1 if widths[5] else channels,
                                pads=[widths[2], widths[3], widths[6], widths[7]])
        graph.node.insert(list(graph.node).index(pad), conv)
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for name in [name for name in initializers if name not in used]:
        graph.initializer.remove(initializers.pop(name))
    return proto


def half_stored(model_bytes: bytes) -> bytes:
    """The same graph with its float32 weights stored as float16 and cast back to float32 where used: half
    the file, and the same answers as the float32 graph wherever the weights were float16 to begin with
    (the bundled ResNet18's are: a float16 -> float32 -> float16 round trip is exact)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = _parse(model_bytes, "an ONNX graph")
    graph = proto.graph
    kept, casts = [], []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype != np.float32 or array.size < 1024 or not np.array_equal(array.astype(np.float16).astype(np.float32), array):
            kept.append(init)
            continue
        stored = numpy_helper.from_array(array.astype(np.float16), f"{init.name}__f16")
        kept.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{init.name}__cast"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
