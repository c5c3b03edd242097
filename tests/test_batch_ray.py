"""predict --ray on a local Ray instance with 2 actors, against the single-process predict."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import shared

pytest.importorskip("ray", reason="Ray is not installed: pip install 'facegender[ray]' (make test installs it)")
pq = pytest.importorskip("pyarrow.parquet",
                         reason="pyarrow is not installed (Ray Data needs it): pip install 'facegender[ray]'")

NUMBERS = ("confidence", "p_male")


def _cli(*args, timeout=900):
    env = os.environ | {"PYTHONUNBUFFERED": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    return subprocess.run([sys.executable, "-m", "facegender.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _normal(row: dict) -> dict:
    """A row of either output as strings ("" for none), its probabilities as floats."""
    out = {k: ("" if v is None else str(v)) for k, v in row.items() if k not in NUMBERS}
    out.update({k: (None if row[k] in (None, "") else float(row[k])) for k in NUMBERS})
    return out


def _shards(folder):
    return sorted(folder.glob("part-*.parquet"))


def _ray_rows(folder) -> list[dict]:
    rows = [r for shard in _shards(folder) for r in pq.read_table(shard).to_pylist()]
    return sorted(map(_normal, rows), key=lambda r: (r["source"], r["face"]))


def test_ray_labels_like_predict_and_skips_what_is_done(tmp_path):
    import skimage.data

    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(shared("celeba") / "img"))[:5]:
        (images / name).symlink_to(shared("celeba") / "img" / name)
    for name in ("AF1.jpg", "AM1.jpg"):
        (images / f"scut_{name}").symlink_to(shared("scut_fbp5500") / "img" / name)
    # a big JPEG, which predict decodes at half its size: Ray's actors must decode it the same way
    Image.open(shared("scut_fbp5500") / "img" / "AF2.jpg").resize((2800, 2800)).save(images / "big.jpg", quality=90)
    Image.fromarray(skimage.data.astronaut()).save(images / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(images / "coffee.png")  # no face: one row, faces 0
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    missing = tmp_path / "gone.jpg"

    single = _cli("predict", images, missing, "--format", "csv", "--output", tmp_path / "single.csv")
    assert single.returncode == 1, single.stderr  # the three bad files are reported, the rest labelled
    with open(tmp_path / "single.csv", newline="") as f:
        reader = csv.DictReader(f)
        expected = sorted(map(_normal, reader), key=lambda r: (r["source"], r["face"]))
        columns = reader.fieldnames

    out = tmp_path / "shards"
    first = _cli("predict", "--ray", "local", "--ray-workers", "2", images, missing, "--output", out)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "2 labelling actor(s)" in first.stdout
    assert first.stderr.count("facegender: warning:") == 3 and "gone.jpg" in first.stderr
    got = _ray_rows(out)
    assert pq.read_table(_shards(out)[0]).column_names == columns
    assert len(got) == len(expected) == 13  # 8 one-face photos, the astronaut, coffee, 3 errors
    for a, b in zip(got, expected):
        assert {k: v for k, v in a.items() if k not in NUMBERS} == {k: v for k, v in b.items() if k not in NUMBERS}
        for k in NUMBERS:
            assert (a[k] is None) == (b[k] is None) and (a[k] is None or abs(a[k] - b[k]) < 1e-3), (a, b)
    assert any(r["label"] in ("female", "male") for r in got) and any(r["faces"] == "0" for r in got)

    # a re-run labels only what is new
    Image.fromarray(np.asarray(Image.open(images / "astronaut.png"))[:, ::-1]).save(images / "mirrored.png")
    second = _cli("predict", "--ray", "local", "--ray-workers", "2", images, "--output", out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 to do" in second.stdout and len(_shards(out)) == 2
    assert [r["source"] for r in _ray_rows(out)].count(str(images / "mirrored.png")) == 1
    third = _cli("predict", "--ray", "local", images, "--output", out)
    assert third.returncode == 0 and "0 to do" in third.stdout and len(_shards(out)) == 2


@pytest.mark.parametrize("args, message", [
    (["predict", "--ray", "local", "{tmp}"], "--output"),
    (["predict", "--ray", "local", "{tmp}", "--output", "{tmp}/o", "--annotate", "{tmp}/a"], "--annotate"),
    (["predict", "--ray", "local", "{tmp}", "--output", "{tmp}/file.txt"], "file.txt"),
])
def test_ray_mistakes_get_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "file.txt").write_text("")
    result = _cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("facegender: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
