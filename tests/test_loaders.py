import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from facegender.data import Sample
from facegender.images import load_face
from facegender.crops import cached_images
from facegender.io import cache_dir
from facegender.loaders import fast_batches, on_device


def _samples(tmp_path, n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
        out.append(Sample(str(path), i % 2, "train", "test"))
    return out


def test_cache_holds_load_face_pixels_and_is_reused(tmp_path):
    samples = _samples(tmp_path)
    first = cached_images(samples, 32)
    assert np.array_equal(first.images[3], load_face(samples[3].path, size=32))
    files = sorted(cache_dir().glob("*.npy"))
    stamp = {f: f.stat().st_mtime_ns for f in files}
    second = cached_images(samples, 32)
    assert np.array_equal(first.images, second.images)
    assert {f: f.stat().st_mtime_ns for f in sorted(cache_dir().glob("*.npy"))} == stamp  # read, not rebuilt


def test_cache_rebuilds_when_an_image_changes(tmp_path):
    samples = _samples(tmp_path)
    before = cached_images(samples, 32).images[0].copy()
    Image.new("RGB", (40, 30), "red").save(samples[0].path)
    os.utime(samples[0].path, ns=(1, 1))  # a different mtime, as any real edit has
    after = cached_images(samples, 32).images[0]
    assert not np.array_equal(before, after) and tuple(after[5, 5]) == (255, 0, 0)


def test_bad_files_are_left_out_of_the_batches(tmp_path):
    samples = _samples(tmp_path)
    open(samples[2].path, "wb").close()
    data = cached_images(samples, 32)
    assert list(data.bad) == [samples[2].path] and len(data) == 5
    seen = np.concatenate([idx for _, _, idx in fast_batches(data, 4, shuffle=False)])
    assert sorted(seen) == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_a_device_resident_cache_gives_the_same_batches(tmp_path, device):
    data = cached_images(_samples(tmp_path, 10), 32)
    resident = on_device(data, torch.device(device))
    if device == "cpu":  # the CPU keeps its numpy array; the tensor path is the one a GPU takes
        assert resident is data
        resident = replace(data, images=torch.from_numpy(data.images))
    else:
        assert torch.is_tensor(resident.images) and resident.images.device.type == "cuda"
    for (a, ya, ia), (b, yb, ib) in zip(fast_batches(data, 4, True, torch.Generator().manual_seed(0)),
                                        fast_batches(resident, 4, True, torch.Generator().manual_seed(0))):
        assert b.device.type == device and np.array_equal(ia, ib) and torch.equal(ya, yb)
        assert torch.equal(a, b.cpu())
