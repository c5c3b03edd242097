import os
import subprocess
import sys
import time

import pytest
import torch

from facegender.io import UNUSED_FOR, UserError, atomic_open, remove_stale_temporaries, used_cache_entry
from facegender.runtime import cpu_has_bf16, resolve_device, resolve_precision


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"


def test_bad_devices_are_user_errors():
    with pytest.raises(UserError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_what_a_killed_write_left_is_swept_once_stale(tmp_path):
    path = tmp_path / "out.bin"
    path.write_text("old")
    killed = ("import os, signal, sys\nfrom facegender.io import atomic_open\n"
              "with atomic_open(sys.argv[1], 'wb') as f:\n    f.write(b'half')\n    f.flush()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    for _ in range(2):
        assert subprocess.run([sys.executable, "-c", killed, str(path)]).returncode == -9
    left = sorted(p for p in tmp_path.iterdir() if p != path)
    assert len(left) == 2 and all(p.name.startswith(".out.bin.") and p.suffix == ".tmp" for p in left)
    old = time.time() - 120
    os.utime(left[0], (old, old))
    assert remove_stale_temporaries(tmp_path, "out.bin", 60) == 1
    assert sorted(tmp_path.iterdir()) == sorted([path, left[1]]) and path.read_text() == "old"
    assert remove_stale_temporaries(tmp_path, "out.bin", 600) == 0  # not stale yet: a writer may be at work


def test_a_used_cache_entry_sweeps_its_neighbours_unused_for_a_month(tmp_path):
    month = time.time() - UNUSED_FOR - 60
    entry, stale, used, other_kind = (tmp_path / name for name in ("a.onnx", "b.onnx", "c.onnx", "d.npy"))
    for path in (entry, stale, used, other_kind):
        path.write_bytes(b"x")
    for path in (entry, stale, other_kind):
        os.utime(path, (month, month))
    assert used_cache_entry(entry, "*.onnx") == entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "c.onnx", "d.npy"]
    assert time.time() - entry.stat().st_mtime < 60  # marked as used: the next sweep keeps it


def test_outputs_get_the_usual_permissions(tmp_path):
    import torch

    from facegender import checkpoint

    checkpoint.save(tmp_path / "best.safetensors", {"w": torch.zeros(2)}, {})
    mask = os.umask(0)
    os.umask(mask)
    for name in ("best.safetensors", "best.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_deterministic_mode_keeps_the_model_and_can_be_lifted():
    from facegender.model import build_model
    from facegender.runtime import GlobalMean, set_deterministic

    torch.manual_seed(0)
    model = build_model("none").eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    try:
        set_deterministic(True, model)
        assert isinstance(model.avgpool, GlobalMean) and torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # same function, same weights
        assert set(model.state_dict()) == set(build_model("none").state_dict())
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
