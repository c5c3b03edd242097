"""The kinds of model of ``facemodels`` with PyTorch networks: what training fits, distils and exports.

The interface is the core's (``facemodels``), so evaluation inside training and export treat these models
as the core treats its ONNX ones; only where the network runs differs: a PyTorch module on the chosen
device and precision.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .chips import DESCRIPTOR_SIZE
from .facemodels import DescriptorModel, ResNetModel, combined, kind_of
from .model import build_model
from .runtime import autocast, resolve_device, resolve_precision
from .transforms import eval_batch


class TorchResNetModel(ResNetModel):
    """ResNet18 in PyTorch on the canonical crop, channels-last, in the chosen precision."""

    def __init__(self, network: nn.Module, meta: dict, device: torch.device, precision: str):
        super().__init__(None, meta)
        self.network = network.to(device).to(memory_format=torch.channels_last).eval()
        self.device, self.precision = device, precision

    @torch.no_grad()
    def logits(self, inputs) -> np.ndarray:
        if not torch.is_tensor(inputs):
            inputs = torch.from_numpy(inputs if isinstance(inputs, np.ndarray) else np.stack(list(inputs)))
        x = eval_batch(inputs.to(self.device))
        with autocast(self.device, self.precision):
            out = self.network(x).squeeze(1)
            if self.flip:
                out = (out + self.network(x.flip(3)).squeeze(1)) / 2
        return out.float().cpu().numpy()


class DescriptorHead(nn.Module):
    """Standardise the descriptor, then a linear layer (logistic regression) or a one-hidden-layer MLP."""

    def __init__(self, hidden: int = 0):
        super().__init__()
        self.hidden = hidden
        self.register_buffer("mean", torch.zeros(DESCRIPTOR_SIZE))
        self.register_buffer("scale", torch.ones(DESCRIPTOR_SIZE))
        self.layers = (nn.Sequential(nn.Linear(DESCRIPTOR_SIZE, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden
                       else nn.Sequential(nn.Linear(DESCRIPTOR_SIZE, 1)))

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return self.layers((descriptors - self.mean) / self.scale).squeeze(1)

    @torch.no_grad()
    def logits(self, descriptors: np.ndarray) -> np.ndarray:
        self.eval()
        return self(torch.from_numpy(np.asarray(descriptors, np.float32))).numpy()


def _state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}


def resnet_from_state(tensors: dict[str, torch.Tensor], meta: dict, device, precision) -> TorchResNetModel:
    network = build_model("none", meta["config"]["dropout"])
    network.load_state_dict(_state(tensors, "model."))
    return TorchResNetModel(network, meta, device, precision)


def head_from_state(tensors: dict[str, torch.Tensor], meta: dict) -> DescriptorHead:
    head = DescriptorHead(int(meta["head"]["hidden"]))
    head.load_state_dict(_state(tensors, "head."))
    return head


def build_torch_face_model(tensors: dict[str, torch.Tensor], meta: dict, device: str = "auto",
                           precision: str = "auto", extractor=None):
    """The model a checkpoint describes, in PyTorch. ``tensors`` (torch) hold ``model.*`` and/or ``head.*``;
    a descriptor model's extractor defaults to ``descriptors.default_extractor`` (dlib's network in PyTorch)."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    kind = kind_of(meta)
    resnet = resnet_from_state(tensors, meta, device, precision) if kind != "descriptor" else None
    descriptor = (DescriptorModel(head_from_state(tensors, meta), extractor, str(device)) if kind != "resnet18"
                  else None)
    return combined(meta, resnet, descriptor)
