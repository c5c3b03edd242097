"""Batches for training and evaluation: the fast cached path and the reference DataLoader path.

The fast path decodes and resizes every image once into a uint8 array (about 48 KiB an image at 128 px),
kept on disk under a key made from the images' content, so a second run, or a later epoch, never decodes
again. The reference path is the published design: PIL decode and torchvision transforms per image, per
epoch, in a DataLoader with worker processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import Sample
from .images import BadImage, face_array, load_faces, open_rgb
from .io import atomic_open

CACHE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("FACEGENDER_CACHE", Path.home() / ".cache" / "facegender"))


def _content_key(samples: list[Sample], size: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}:{size}".encode())
    for s in samples:
        if s.sha1:
            h.update(s.sha1.encode())
        else:  # layouts without a manifest carry no hash: the file's path, size and time stand in
            st = os.stat(s.path)
            h.update(f"{s.path}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(repr(s.box).encode())
    return h.hexdigest()[:20]


@dataclass
class CachedImages:
    images: np.ndarray  # N x size x size x 3 uint8
    labels: np.ndarray  # N int64
    good: np.ndarray  # indices of the images that decoded
    bad: dict[str, str]  # path -> reason

    def __len__(self) -> int:
        return len(self.good)


def cached_images(samples: list[Sample], size: int, workers: int = 2) -> CachedImages:
    """Decode and resize ``samples`` once; later calls with the same content read the cache file."""
    key = _content_key(samples, size)
    folder = cache_dir()
    array_path, bad_path = folder / f"{key}.npy", folder / f"{key}.bad.json"
    if array_path.is_file() and bad_path.is_file():
        images = np.load(array_path)
        bad = json.loads(bad_path.read_text())
    else:
        items = [(s.path, s.box) for s in samples]
        images, bad_list = load_faces(items, size, workers)
        bad = {samples[i].path: reason for i, reason in bad_list}
        with atomic_open(array_path, "wb") as f:
            np.save(f, images)
        with atomic_open(bad_path, "w") as f:
            json.dump(bad, f)
    for path, reason in bad.items():
        warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
    good = np.array([i for i, s in enumerate(samples) if s.path not in bad], dtype=np.int64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return CachedImages(images, labels, good, bad)


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
