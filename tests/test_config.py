from pathlib import Path

import pytest

from facegender.config import TrainConfig, load_config, save_config
from facegender.io import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_specification():
    c = TrainConfig()
    assert (c.lr, c.batch_size, c.epochs, c.dropout, c.image_size) == (1e-3, 64, 20, 0.3, 128)
    assert (c.plateau_factor, c.plateau_patience, c.early_stopping_patience) == (0.2, 3, 5)
    assert (c.workers, c.rotation, c.hflip, c.threshold, c.freeze_backbone) == (4, 10.0, 0.5, 0.5, False)


def test_reference_yaml_matches_the_defaults():
    assert load_config(ROOT / "configs" / "reference.yaml") == TrainConfig()


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: 3\nfreeze_backbone: true\n")
    c = load_config(path, epochs=7, batch_size=None)
    assert (c.lr, c.epochs, c.batch_size, c.freeze_backbone) == (0.01, 7, 64, True)


def test_saved_config_reloads_identically(tmp_path):
    c = load_config(epochs=2, weights="none")
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "unknown option"),
    ("epochs: -1\n", "epochs must be positive"),
    ("precision: fp8\n", "precision='fp8'"),
    ("lr: fast\n", "lr='fast' is not a number"),
    ("[unclosed\n", "not valid YAML"),
])
def test_bad_config_names_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
