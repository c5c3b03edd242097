"""The network of the specification: torchvision ResNet18 with a Dropout(0.3) + Linear(512, 1) head."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from .io import UserError


def build_model(weights: str = "none", dropout: float = 0.3, freeze_backbone: bool = False) -> nn.Module:
    """ResNet18 with one logit. ``weights`` is ``imagenet``, ``none`` or a path to a state-dict file."""
    model = resnet18(weights=None)
    head = {}
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict())
    elif weights != "none":
        head = _load_backbone(model, Path(weights))
    model.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(model.fc.in_features, 1))
    if head:  # a facegender checkpoint brings its one-logit head: a warm start, not only a backbone
        model.fc.load_state_dict(head)
    if freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("fc.")
    return model


def _imagenet_state_dict() -> dict:
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as e:  # offline, proxy, or a corrupt download: all end the same way for the user
        raise UserError(
            f"cannot get the ImageNet weights for ResNet18 ({e.__class__.__name__}: {e}); "
            "without internet, train with --weights none or give a local file: --weights PATH"
        ) from None


def _load_backbone(model: nn.Module, path: Path) -> dict:
    """Load a ResNet18 state dict (.safetensors, or .pth/.pt read without unpickling code) into ``model``.

    A 1000-class head is ignored; the one-logit head of a facegender checkpoint is returned (else {}).
    """
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file; use imagenet, none, or a state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--weights {path}: cannot read a state dict ({e.__class__.__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if any(k.startswith("model.") for k in state):  # a facegender checkpoint: its ResNet18 is under model.
        state = {k[len("model."):]: v.float() for k, v in state.items() if k.startswith("model.")}
    # the 1000-class ImageNet head has no place in a one-logit model
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    head = {k[len("fc."):]: v for k, v in state.items() if k.startswith("fc.1.")}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as e:
        raise UserError(f"--weights {path}: not ResNet18 weights ({str(e).splitlines()[0]})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"--weights {path}: not ResNet18 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return head


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
