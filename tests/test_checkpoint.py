import json

import pytest
import torch

from facegender import checkpoint
from facegender.io import UserError


def test_roundtrip_keeps_tensors_and_metadata(tmp_path):
    path = tmp_path / "best.safetensors"
    tensors = {"model.w": torch.randn(3, 4), "model.b": torch.arange(5)}
    checkpoint.save(path, tensors, {"classes": ["female", "male"], "epoch": 3})
    loaded, meta = checkpoint.load_torch(path)
    assert meta == {"classes": ["female", "male"], "epoch": 3}
    assert json.loads((tmp_path / "best.json").read_text()) == meta
    assert torch.equal(loaded["model.w"], tensors["model.w"])
    assert checkpoint.model_state(loaded).keys() == {"w", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors"]  # no temp files left


def test_resolve_run_directory_and_errors(tmp_path):
    checkpoint.save(tmp_path / "best.safetensors", {"x": torch.zeros(1)}, {})
    assert checkpoint.resolve(tmp_path) == tmp_path / "best.safetensors"
    with pytest.raises(UserError, match="no last.safetensors"):
        checkpoint.resolve(tmp_path, "last")
    with pytest.raises(UserError, match="no such checkpoint"):
        checkpoint.resolve(tmp_path / "missing")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable facegender checkpoint"):
        checkpoint.load_torch(junk)


def test_optimizer_state_roundtrip():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    tensors, plain = checkpoint.optimizer_tensors(opt)
    plain = json.loads(json.dumps(plain))  # it must survive JSON
    other = torch.optim.Adam(torch.nn.Linear(4, 2).parameters(), lr=0.5)
    checkpoint.restore_optimizer(other, tensors, plain)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 0.01
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))
