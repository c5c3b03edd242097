"""Decoded face crops of a prepared dataset, cached: every image is decoded and resized once into a uint8
array (about 48 KiB an image at 128 px), kept on disk under a key made from the images' content, so a second
run, a later epoch or an evaluation never decodes again. numpy only: training batches them with torch
(``loaders``), evaluation and the torch-free core read them as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .data import Sample
from .images import load_faces
from .io import atomic_open, cache_dir, used_cache_entry

CACHE_VERSION = 1


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
    # the crops of datasets no run has read for a month (2.3 GB for the three corpora at 128 px) go
    used_cache_entry(array_path, "*.npy")
    used_cache_entry(bad_path, "*.bad.json")
    for path, reason in bad.items():
        warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
    good = np.array([i for i, s in enumerate(samples) if s.path not in bad], dtype=np.int64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return CachedImages(images, labels, good, bad)


def crop_batches(data: CachedImages, batch_size: int):
    """Yield (uint8 N x H x W x 3 crops, int64 labels, indices into the samples), in order, good images only."""
    for start in range(0, len(data.good), batch_size):
        idx = data.good[start:start + batch_size]
        yield data.images[idx], data.labels[idx], idx
