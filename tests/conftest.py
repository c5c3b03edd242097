"""Shared fixtures: a synthetic dataset that needs nothing, and small real subsets of ../shared/data."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Decoded-image caches of the tests stay out of the user's ~/.cache."""
    os.environ["FACEGENDER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def shared(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder} is absent (the corpora live in ../shared/data)")
    return folder


def faces_cut_by_the_edge(share: float, size: tuple[int, int] = (640, 480), smallest: int = 140, step: int = 16,
                          along: tuple[int, int, int, int] = (100, 7, 40, 3)):
    """16 photos of ``size``, each with a UTKFace chip (of ``smallest`` px, ``step`` px more in each photo) ``share``
    of whose side lies beyond one of the photo's edges (four of each edge; along that edge at x = a + b i or
    y = c + d i, ``along`` = (a, b, c, d)), on a grey-green ground: (photo, the chip's part inside it, the whole
    chip's box), boxes x0, y0, x1, y1."""
    chips = sorted(shared("utkface").glob("*.jpg"))[::1300][:16]
    (width, height), (a, b, c, d), photos = size, along, []
    for i, path in enumerate(chips):
        side = smallest + step * i
        out = round(share * side)
        x, y = a + b * i, c + d * i
        x, y = ((-out, y), (width - side + out, y), (x, -out), (x, height - side + out))[i % 4]
        canvas = Image.new("RGB", size, (110, 120, 100))
        canvas.paste(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC), (x, y))
        photos.append((canvas, (max(0, x), max(0, y), min(width, x + side), min(height, y + side)),
                       (x, y, x + side, y + side)))
    return photos


def synthetic_face(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A learnable stand-in: a bright disc on the left for one class, on the right for the other, plus noise."""
    image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cx = size * (0.3 if label == 0 else 0.7)
    disc = (xx - cx) ** 2 + (yy - size / 2) ** 2 < (size / 5) ** 2
    image[disc] = rng.integers(180, 255, 3, dtype=np.uint8)
    return Image.fromarray(image)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Split folders (train/val/test x female/male) of generated images."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("validation", 16), ("test", 16)):
        for label, name in enumerate(("female", "male")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                synthetic_face(label, rng).save(folder / f"{i}.png")
    return root


def scut_subset(folder: Path, step: int) -> Path:
    """Every ``step``-th SCUT-FBP5500 portrait linked (never copied) into ``folder``; its labels.csv."""
    src = shared("scut_fbp5500")
    (folder / "img").mkdir(parents=True)
    lines = (src / "labels.csv").read_text().splitlines()
    picked = [lines[0]] + lines[1::step]
    for line in picked[1:]:
        name = line.split(",")[0]
        (folder / "img" / name).symlink_to(src / "img" / name)
    (folder / "labels.csv").write_text("\n".join(picked) + "\n")
    return folder / "labels.csv"


@pytest.fixture(scope="session")
def real_subsets(tmp_path_factory) -> dict[str, Path]:
    """Small prepared subsets of the three real corpora (links to the images, never copies)."""
    from facegender.data import prepare_celeba, prepare_csv, prepare_utkface

    utk_src, celeba_src = shared("utkface"), shared("celeba")
    root = tmp_path_factory.mktemp("real")
    out = {}

    utk = root / "utkface_src"
    utk.mkdir()
    for f in sorted(utk_src.iterdir())[::20]:  # every 20th file: all ages and races, ~1,200 images
        (utk / f.name).symlink_to(f)
    prepare_utkface(utk, root / "utkface")
    out["utkface"] = root / "utkface"

    celeba = root / "celeba_src"
    (celeba / "img").mkdir(parents=True)
    names = sorted(p.name for p in (celeba_src / "img").iterdir())[::25]
    for name in names:
        (celeba / "img" / name).symlink_to(celeba_src / "img" / name)
    keep = set(names)
    attr = (celeba_src / "list_attr_celeba.txt").read_text().splitlines()
    rows = [line for line in attr[2:] if line.split()[0] in keep]
    (celeba / "list_attr_celeba.txt").write_text("\n".join([str(len(rows)), attr[1], *rows]) + "\n")
    ids = [line for line in (celeba_src / "identity_CelebA.txt").read_text().splitlines() if line.split()[0] in keep]
    (celeba / "identity_CelebA.txt").write_text("\n".join(ids) + "\n")
    prepare_celeba(celeba, root / "celeba")
    out["celeba"] = root / "celeba"

    prepare_csv(scut_subset(root / "scut_fbp5500", 12), root / "scut")
    out["scut"] = root / "scut"
    return out


@pytest.fixture()
def choose_runtime(monkeypatch):
    """``choose(name)``: FACEGENDER_DESCRIPTOR_RUNTIME set to ``name``, with the process's shared descriptor
    network made afresh under it (and again after the test, under the environment it restores)."""
    from facegender import descriptor_runtime, onnx_model

    def choose(name: str) -> None:
        monkeypatch.setenv(descriptor_runtime.RUNTIME_ENV, name)
        onnx_model.descriptor_network.cache_clear()

    yield choose
    onnx_model.descriptor_network.cache_clear()


@pytest.fixture(scope="session")
def bundled_classifier():
    from facegender.inference import Classifier

    return Classifier.from_checkpoint()


@contextlib.contextmanager
def serve_process(log: Path, *options: str):
    """A real `facegender serve` process (with ``options``) on a free loopback port, its output in ``log``,
    answering /healthz: yields (base URL, the process); terminated on the way out."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "facegender.cli", "serve", "--port", str(port), *options],
                                  stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                        assert r.status == 200
                    break
                except OSError:
                    assert server.poll() is None and time.time() < deadline, log.read_text()
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}", server
        finally:
            server.terminate()
            server.wait(timeout=30)


@contextlib.contextmanager
def serving(app):
    """``app`` on a real uvicorn on a free loopback port: yields the server, its base URL in ``server.url``."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the test server did not start"
        time.sleep(0.02)
    server.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.app = app
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server(bundled_classifier):
    """The real API around the bundled model, on a real uvicorn on a free loopback port: its base URL."""
    from facegender.serve import create_app

    with serving(create_app(bundled_classifier)) as server:
        yield server.url
