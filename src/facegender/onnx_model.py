"""The model as an ONNX graph, for running it without PyTorch or elsewhere.

The graph takes what the PyTorch model takes: a float32 batch N x 3 x H x W, RGB, scaled to [0, 1] and
normalised with the metadata's mean and std (``transforms.eval_batch``), N free. It returns ``logit``
(N x 1) and ``p_male`` (N x 1: the calibrated probability, sigmoid(logit / temperature)); ``p_male >=
threshold`` means the second class. The preprocessing contract and the full checkpoint metadata travel
in the file's metadata_props, so a ``.onnx`` file is a complete model on its own.

``OnnxModule`` runs such a graph with onnxruntime behind the interface of the PyTorch module, so the
``Classifier`` uses either without a second code path.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import ResNet

from .checkpoint import META_KEY
from .config import MEAN, STD
from .io import UserError

OPSET = 18  # the torch.export-based exporter's own opset: no version conversion on the way
INSTALL_HINT = "pip install 'facegender[onnx]' (onnxruntime, onnx and onnxscript)"


class _Calibrated(nn.Module):
    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.model(x)
        return logit, torch.sigmoid(logit / self.temperature)


def contract(meta: dict) -> dict[str, str]:
    """The metadata_props of an exported graph: the preprocessing contract, readable without facegender."""
    pre = meta["preprocessing"]
    return {
        "image_size": str(int(pre["image_size"])),
        "input": "float32 N x 3 x H x W, RGB, pixel / 255, then (x - mean) / std per channel",
        "mean": json.dumps(list(pre.get("mean", MEAN))),
        "std": json.dumps(list(pre.get("std", STD))),
        "classes": json.dumps(list(meta["classes"])),
        "threshold": str(float(meta["threshold"])),
        "temperature": str(float(meta.get("temperature", 1.0))),
        "output": "logit (N x 1); p_male (N x 1) = sigmoid(logit / temperature); p_male >= threshold: classes[1]",
        META_KEY: json.dumps(meta, sort_keys=True),
    }


def to_onnx(model: nn.Module, meta: dict) -> bytes:
    """The serialised ONNX graph of a ResNet18 classifier, in float32, with a dynamic batch dimension."""
    if not isinstance(model, ResNet):
        raise UserError(f"ONNX export covers the ResNet18 model only, not a {type(model).__name__}; "
                        "use this checkpoint with the torch backend")
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise UserError(f"ONNX export needs onnx and onnxscript: {INSTALL_HINT}") from None
    size = int(meta["preprocessing"]["image_size"])
    wrapped = _Calibrated(model.float().eval(), float(meta.get("temperature", 1.0)))
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's business
        program = torch.onnx.export(wrapped, (example,), input_names=["input"], output_names=["logit", "p_male"],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
                                    dynamo=True, verbose=False, report=False)
    proto = program.model_proto
    proto.producer_name, proto.doc_string = "facegender", __doc__.split("\n\n")[1].replace("\n", " ")
    _set_meta(proto, meta)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def with_meta(model_bytes: bytes, meta: dict) -> bytes:
    """The same graph with ``meta`` (and the contract derived from it) as its metadata."""
    import onnx

    proto = onnx.load_model_from_string(model_bytes)
    _set_meta(proto, meta)
    return proto.SerializeToString()


def _set_meta(proto, meta: dict) -> None:
    del proto.metadata_props[:]
    for key, value in contract(meta).items():
        proto.metadata_props.add(key=key, value=value)


def read_meta(model_bytes: bytes, name: str) -> dict:
    try:
        import onnx
    except ImportError:
        raise UserError(f"{name}: reading ONNX files needs onnx: {INSTALL_HINT}") from None
    try:
        proto = onnx.load_model_from_string(model_bytes)
    except Exception as e:  # protobuf's decode errors have no common base worth naming
        raise UserError(f"{name}: not a readable ONNX file ({e.__class__.__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise UserError(f"{name}: an ONNX file without facegender metadata; export it with `facegender export`")
    return json.loads(props[META_KEY])


class OnnxModule(nn.Module):
    """An ONNX graph made by ``to_onnx``, run by onnxruntime, called like the PyTorch model it came from."""

    def __init__(self, model_bytes: bytes, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"the onnxruntime backend needs onnxruntime: {INSTALL_HINT}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(model_bytes, options, providers=providers)

    @classmethod
    def load(cls, path: str | Path) -> tuple["OnnxModule", dict]:
        """An exported ``.onnx`` file: the module and the checkpoint metadata it carries."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such ONNX file")
        data = path.read_bytes()
        meta = read_meta(data, str(path))
        return cls(data), meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())  # ONNX wants plain NCHW, not channels-last
        (logit,) = self.session.run(["logit"], {"input": batch})
        return torch.from_numpy(logit).to(x.device)
