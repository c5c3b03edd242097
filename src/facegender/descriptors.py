"""Face descriptors: dlib's face-recognition ResNet maps an aligned 150x150 chip of a face to 128 numbers.

That network has seen millions of faces; a small head on its descriptors generalises to photos from
collections we never train on better than a ResNet18 trained on our 46k faces alone. The chip is placed by
the same 5 landmarks that place the canonical crop (found at prepare time, stored in the manifest), so no
face is detected twice.

Descriptors of a prepared dataset are computed once, in parallel, and cached on disk per image, keyed by
content (the file's hash and its landmarks): a killed run keeps every shard it wrote and continues where
it stopped; a second run, or another dataset holding the same images, computes nothing.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Sample
from .chips import DESCRIPTOR_SIZE, chip
from .images import BadImage, open_rgb
from .io import atomic_open, cache_dir, remove_stale_temporaries

SHARD_SIZE = 256  # images per cache shard: what a killed run can lose
# a shard's temporary file lives for the moment it is written: one this old is what a killed run left
STALE_SHARD = 3600.0  # s


class NetDescriptors:
    """dlib's face-recognition network in PyTorch (``dlibnet``): batched, many times faster than dlib's own.

    float32 by default: its descriptors match dlib's (cosine >= 0.999, tests/test_dlibnet.py), so heads fitted
    on either kind see the same inputs. Loads on first use.
    """

    def __init__(self, device: str = "auto", precision: str = "fp32"):
        self.device, self.precision = device, precision
        self.name = f"dlibnet-{precision}"
        self._net = None

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        if self._net is None:
            from .dlibnet import DescriptorNet  # PyTorch: the training side

            self._net = DescriptorNet.from_dat(device=self.device, precision=self.precision)
        return self._net.descriptors(chips)


def default_extractor(device: str = "auto", precision: str = "fp32"):
    """The descriptor implementation to use: the PyTorch port (fast, batched) of dlib's network."""
    return NetDescriptors(device, precision)


# ---------------------------------------------------------------- cached descriptors of a prepared dataset


def cache_root() -> Path:
    return cache_dir() / "descriptors"


def sample_key(s: Sample) -> str:
    """The content a descriptor depends on: the image's bytes and the landmarks placing its chip."""
    if s.sha1:
        content = s.sha1
    else:  # layouts without a manifest carry no hash: the file's path, size and time stand in
        st = os.stat(s.path)
        content = f"{s.path}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha1(f"{content}|{s.landmarks}".encode()).hexdigest()


@dataclass
class Descriptors:
    vectors: np.ndarray  # N x 128 float32, one row per sample (zeros where the image was unreadable)
    good: np.ndarray  # indices of the samples that decoded
    bad: dict[str, str]  # path -> reason
    without_face: int  # samples described from the whole image, no landmarks being known


def _read_shards(folder: Path) -> dict[str, np.ndarray | str]:
    known: dict[str, np.ndarray | str] = {}
    for shard in sorted(folder.glob("shard-*.npz")):
        with np.load(shard) as z:
            for key, vector in zip(z["keys"], z["vectors"]):
                known[str(key)] = vector
            for key, reason in zip(z["bad_keys"], z["bad_reasons"]):
                known[str(key)] = str(reason)
    return known


def _chip_of(job: tuple[str, tuple | None]) -> tuple[np.ndarray | None, str]:
    path, landmarks = job
    try:
        return chip(open_rgb(path), landmarks), ""
    except BadImage as e:
        return None, e.why


def _chips_of_shard(jobs: list[tuple[str, tuple | None]]) -> tuple[list[np.ndarray | None], list[str]]:
    chips = [_chip_of(job) for job in jobs]
    return [c for c, _ in chips], [why for _, why in chips]


def _write_shard(folder: Path, keys: list[str], vectors: list, reasons: list[str]) -> None:
    good = [(k, v) for k, v in zip(keys, vectors) if v is not None]
    bad = [(k, r) for k, v, r in zip(keys, vectors, reasons) if v is None]
    with atomic_open(folder / f"shard-{uuid.uuid4().hex}.npz", "wb") as f:
        np.savez(f, keys=np.array([k for k, _ in good], dtype="U40"),
                 vectors=np.array([v for _, v in good], np.float32).reshape(-1, DESCRIPTOR_SIZE),
                 bad_keys=np.array([k for k, _ in bad], dtype="U40"), bad_reasons=np.array([r for _, r in bad]))


def cached_descriptors(samples: list[Sample], workers: int = 2, extractor=None, progress: bool = True) -> Descriptors:
    """The descriptor of every sample's face, computing only those not in the cache.

    ``workers`` processes decode the images and cut the chips; this process runs the network on them in
    batches.
    """
    extractor = extractor or default_extractor()
    folder = cache_root() / extractor.name
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder, "shard-*.npz", STALE_SHARD)
    keys = [sample_key(s) for s in samples]
    known = _read_shards(folder)
    todo = sorted({k: s for k, s in zip(keys, samples) if k not in known}.items())
    if todo:
        if hasattr(extractor, "load"):  # one runtime for all of them: a few chips would otherwise run on onnxruntime
            extractor.load()
        shards = [todo[i:i + SHARD_SIZE] for i in range(0, len(todo), SHARD_SIZE)]
        jobs = [[(s.path, s.landmarks) for _, s in shard] for shard in shards]
        from tqdm import tqdm  # here: labelling a photo (which imports this module) shows no bar

        bar = tqdm(total=len(todo), desc=f"descriptors ({extractor.name})", unit="face", disable=not progress or None,
                   dynamic_ncols=True)
        with _pool(workers) as pool:
            for shard, (chips, reasons) in zip(shards, _bounded_map(pool, _chips_of_shard, jobs, 2 * workers)):
                good = [c for c in chips if c is not None]
                vectors = iter(extractor(np.stack(good)) if good else [])
                outputs = [next(vectors) if c is not None else None for c in chips]
                shard_keys = [k for k, _ in shard]
                # the extractor's name as it is now: one whose fast runtime failed (onnx_model.DescriptorGraph)
                # computed these on onnxruntime, in float32, whatever name it started with
                written = cache_root() / extractor.name
                written.mkdir(parents=True, exist_ok=True)
                _write_shard(written, shard_keys, outputs, reasons)
                for k, v, r in zip(shard_keys, outputs, reasons):
                    known[k] = v if v is not None else r
                bar.update(len(shard))
        bar.close()
    vectors = np.zeros((len(samples), DESCRIPTOR_SIZE), np.float32)
    bad = {}
    for i, (k, s) in enumerate(zip(keys, samples)):
        entry = known[k]
        if isinstance(entry, str):
            bad[s.path] = entry
        else:
            vectors[i] = entry
    good = np.array([i for i, s in enumerate(samples) if s.path not in bad], dtype=np.int64)
    return Descriptors(vectors, good, bad, sum(s.landmarks is None for s in samples))


def _bounded_map(pool, fn, jobs: list, window: int):
    """``map(fn, jobs)`` in order, at most ``window`` jobs ahead: chips waiting for the network stay few."""
    if pool is None:
        yield from map(fn, jobs)
        return
    pending = [pool.submit(fn, job) for job in jobs[:window]]
    for i in range(len(jobs)):
        result = pending.pop(0).result()
        if i + window < len(jobs):
            pending.append(pool.submit(fn, jobs[i + window]))
        yield result


class _pool:
    """A spawned process pool (the caller may hold torch threads), or None to work in this process."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = None

    def __enter__(self):
        if self.workers > 1:
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self.executor

    def __exit__(self, *exc):
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
