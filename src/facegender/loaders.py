"""Batches for training and evaluation: the fast cached path and the reference DataLoader path.

The fast path batches the uint8 crops of ``crops.cached_images`` (decoded once, kept on disk). The reference
path is the published design: PIL decode and torchvision transforms per image, per epoch, in a DataLoader
with worker processes.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import Sample
from .crops import CachedImages
from .images import BadImage, face_array, open_rgb


def on_device(data: CachedImages, device: torch.device) -> CachedImages:
    """The cache moved whole onto a GPU, so batches are gathered and augmented there; unchanged on the CPU.

    At 48 KiB a face, all 46,000 faces of the three corpora take 2.3 GB. A cache larger than half the GPU's
    free memory stays in host memory (batches then travel to the GPU one at a time), with a warning.
    """
    if device.type != "cuda" or torch.is_tensor(data.images):
        return data
    free, _ = torch.cuda.mem_get_info(device)
    if data.images.nbytes > free // 2:
        warnings.warn(f"the image cache ({data.images.nbytes / 2**30:.1f} GiB) is over half of {device}'s free "
                      f"memory; it stays in host memory", stacklevel=2)
        return data
    return replace(data, images=torch.from_numpy(data.images).to(device))


def fast_batches(data: CachedImages, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """Yield (uint8 N x H x W x 3 tensor on the cache's device, int64 labels, indices into the samples)."""
    order = data.good
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator).numpy()]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if torch.is_tensor(data.images):
            images = data.images[torch.from_numpy(idx).to(data.images.device)]
        else:
            images = torch.from_numpy(data.images[idx])
        yield images, torch.from_numpy(data.labels[idx]), idx


class ReferenceDataset(Dataset):
    """PIL decode and a torchvision transform per image; a file that fails to decode yields (path, reason)."""

    def __init__(self, samples: list[Sample], transform, size: int):
        self.samples, self.transform, self.size = samples, transform, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            image = open_rgb(s.path)
        except BadImage as e:
            return s.path, e.why
        if s.box:  # the same crop as everywhere else; the transform's resize then keeps the size
            image = Image.fromarray(face_array(image, s.box, self.size))
        return self.transform(image), s.label, i


def _collate_skipping_bad(items):
    """A batch of the good items, plus {path: reason} of the bad ones (the batch may then be empty)."""
    bad = dict(it for it in items if len(it) == 2)
    items = [it for it in items if len(it) == 3]
    x = torch.stack([it[0] for it in items]) if items else None
    y = torch.tensor([it[1] for it in items], dtype=torch.int64)
    idx = np.array([it[2] for it in items], dtype=np.int64)
    return x, y, idx, bad


def reference_loader(samples: list[Sample], transform, size: int, batch_size: int, shuffle: bool, workers: int,
                     generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(ReferenceDataset(samples, transform, size), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, collate_fn=_collate_skipping_bad, generator=generator,
                      persistent_workers=workers > 0)
