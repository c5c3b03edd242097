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


def augment_params(n: int, config: TrainConfig, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The random draws of ``augment_batch`` for ``n`` images, made on the CPU in a fixed order.

    Drawing them apart from the pixels lets a run's generator advance the same way on every device and in
    every rank of a distributed run, whichever images that rank then applies them to.
    """
    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n, device="cpu").uniform_(low, high, generator=generator)

    params = {}
    if config.hflip > 0:
        params["flip"] = uniform(0, 1) < config.hflip
    if config.rotation > 0:
        params["angle"] = uniform(-config.rotation, config.rotation) * (math.pi / 180)
    params["brightness"] = uniform(max(0.0, 1 - config.brightness), 1 + config.brightness)
    params["contrast"] = uniform(max(0.0, 1 - config.contrast), 1 + config.contrast)
    # ColorJitter applies its adjustments in a random order, drawn per image
    params["brightness_first"] = uniform(0, 1) < 0.5
    return params


def augment_batch(x: torch.Tensor, config: TrainConfig, generator: torch.Generator | None = None,
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The spec's training augmentations on a float batch in [0, 1], drawn independently for each image.

    Matches torchvision's RandomHorizontalFlip, RandomRotation(degrees, fill 0) and ColorJitter(brightness,
    contrast): same distributions, applied with one batched kernel each instead of one call per image, on
    whichever device ``x`` is on. ``params`` (from ``augment_params``) replaces drawing from ``generator``.
    """
    n = x.shape[0]
    if params is None:
        params = augment_params(n, config, generator)
    p = {k: v.to(x.device, non_blocking=True).view(n, 1, 1, 1) for k, v in params.items()}
    if "flip" in p:
        x = torch.where(p["flip"], x.flip(-1), x)
    if "angle" in p:
        angle = p["angle"].view(n)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    b, c = p["brightness"], p["contrast"]

    def brightness(t: torch.Tensor) -> torch.Tensor:
        return (t * b).clamp(0, 1)

    def contrast(t: torch.Tensor) -> torch.Tensor:
        gray = (0.2989 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).mean(dim=(1, 2)).view(n, 1, 1, 1)
        return (c * t + (1 - c) * gray).clamp(0, 1)

    return torch.where(p["brightness_first"], contrast(brightness(x)), brightness(contrast(x)))


def train_batch(batch_uint8: torch.Tensor, config: TrainConfig, generator: torch.Generator | None = None,
                keep: slice = slice(None)):
    """Augmented, normalised, channels-last: the images ``keep`` of a batch whose draws are made for all of it."""
    params = {k: v[keep] for k, v in augment_params(len(batch_uint8), config, generator).items()}
    x = augment_batch(to_float(batch_uint8[keep]), config, params=params)
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
