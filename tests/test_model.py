import pytest
import torch
from torchvision.models import resnet18

from facegender.io import UserError
from facegender.model import build_model, count_parameters


def test_architecture_matches_the_specification():
    model = build_model("none")
    assert 11.1e6 < count_parameters(model) < 11.25e6  # 11.7M minus the 1000-class head
    head = model.fc
    assert isinstance(head[0], torch.nn.Dropout) and head[0].p == 0.3
    assert (head[1].in_features, head[1].out_features) == (512, 1)
    assert model.eval()(torch.randn(2, 3, 128, 128)).shape == (2, 1)


def test_freeze_backbone_trains_only_the_head():
    model = build_model("none", freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.1.weight", "fc.1.bias"}


def test_weights_from_a_local_file_load_the_backbone(tmp_path):
    source = resnet18(weights=None)  # a 1000-class state dict, as torchvision ships it
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc[1].out_features == 1


def test_weights_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file(source.state_dict(), str(path))
    assert torch.equal(build_model(str(path)).conv1.weight, source.conv1.weight)


def test_bad_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_model(str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="cannot read a state dict"):
        build_model(str(junk))
    other = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(3)}, other)
    with pytest.raises(UserError, match="not ResNet18 weights"):
        build_model(str(other))


def test_imagenet_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached: the weights must come from the internet
    try:
        model = build_model("imagenet")
    except UserError as e:
        assert "--weights none" in str(e)
    else:  # a machine with internet gets the real weights
        assert model.fc[1].out_features == 1
