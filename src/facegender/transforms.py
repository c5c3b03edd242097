"""Preprocessing and augmentation: the one definition that training, evaluation and prediction share.

Every image reaches the model as ``images.load_face`` made it (decoded, cropped, resized to 128x128 uint8)
and then goes through ``normalize``. Training adds the specification's augmentations, either per image
with torchvision (the reference pipeline) or per image inside whole batches of tensors (the fast one).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from .config import MEAN, STD, TrainConfig

_MEAN = torch.tensor(MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(STD).view(1, 3, 1, 1)


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float in [0, 1], stored channels-last (no copy of the layout)."""
    return batch_uint8.permute(0, 3, 1, 2).float().div_(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


def eval_batch(batch_uint8: torch.Tensor) -> torch.Tensor:
    """What evaluation and prediction feed the model: normalised, channels-last."""
    return normalize(to_float(batch_uint8)).contiguous(memory_format=torch.channels_last)


def augment_batch(x: torch.Tensor, config: TrainConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The spec's training augmentations on a float batch in [0, 1], drawn independently for each image.

    Matches torchvision's RandomHorizontalFlip, RandomRotation(degrees, fill 0) and ColorJitter(brightness,
    contrast): same distributions, applied with one batched kernel each instead of one call per image.
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n, device="cpu").uniform_(low, high, generator=generator).to(x.device)

    if config.hflip > 0:
        flip = (uniform(0, 1) < config.hflip).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if config.rotation > 0:
        angle = uniform(-config.rotation, config.rotation) * (math.pi / 180)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    b = uniform(max(0.0, 1 - config.brightness), 1 + config.brightness).view(n, 1, 1, 1)
    c = uniform(max(0.0, 1 - config.contrast), 1 + config.contrast).view(n, 1, 1, 1)

    def brightness(t: torch.Tensor) -> torch.Tensor:
        return (t * b).clamp(0, 1)

    def contrast(t: torch.Tensor) -> torch.Tensor:
        gray = (0.2989 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).mean(dim=(1, 2)).view(n, 1, 1, 1)
        return (c * t + (1 - c) * gray).clamp(0, 1)

    # ColorJitter applies its adjustments in a random order, drawn per image
    brightness_first = (uniform(0, 1) < 0.5).view(n, 1, 1, 1)
    return torch.where(brightness_first, contrast(brightness(x)), brightness(contrast(x)))


def train_batch(batch_uint8: torch.Tensor, config: TrainConfig, generator: torch.Generator | None = None):
    x = augment_batch(to_float(batch_uint8), config, generator)
    return normalize(x).contiguous(memory_format=torch.channels_last)


def reference_train_transform(config: TrainConfig) -> T.Compose:
    """The reference design's per-image torchvision pipeline (PIL in, normalised tensor out)."""
    return T.Compose([
        T.Resize((config.image_size, config.image_size)),
        T.RandomHorizontalFlip(config.hflip),
        T.RandomRotation(config.rotation),
        T.ColorJitter(brightness=config.brightness, contrast=config.contrast),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def reference_eval_transform(config: TrainConfig) -> T.Compose:
    return T.Compose([T.Resize((config.image_size, config.image_size)), T.ToTensor(), T.Normalize(MEAN, STD)])
