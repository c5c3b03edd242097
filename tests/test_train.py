import csv
import json
import shutil

import pytest

from facegender.config import load_config
from facegender.io import UserError
from facegender.train import EarlyStopping, train


def _config(**kw):
    return load_config(**({"weights": "none", "epochs": 2, "batch_size": 16, "workers": 2} | kw))


def _history(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_early_stopping_counts_epochs_without_improvement():
    s = EarlyStopping(patience=2)
    assert s.step(1.0, 1) and not s.step(1.0, 2) and not s.should_stop
    assert not s.step(1.1, 3) and s.should_stop and s.best_epoch == 1
    assert s.step(0.5, 4) and not s.should_stop


def test_training_writes_every_artifact(synthetic_dataset, tmp_path):
    out = tmp_path / "run"
    metrics = train(_config(), [str(synthetic_dataset)], out, log=lambda *_: None)
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "config.yaml", "metrics.csv",
                 "metrics.json", "training_metrics.png", "confusion_matrix.png", "roc_curve.png", "calibration.png"):
        assert (out / name).is_file(), name
    assert len(_history(out)) == 2
    best = json.loads((out / "best.json").read_text())
    assert best["classes"] == ["female", "male"] and best["threshold"] == 0.5
    assert best["preprocessing"]["image_size"] == 128 and best["temperature"] > 0
    assert metrics["count"] == 32 and 0 <= metrics["accuracy"] <= 1
    assert json.loads((out / "metrics.json").read_text())["run"]["epochs"] == 2
    assert not list(out.glob("*.tmp"))


TIMING = ("images_per_s", "seconds", "wall_seconds")


def test_same_seed_same_run(synthetic_dataset, tmp_path):
    """Seeded runs repeat exactly; --deterministic makes that hold on a GPU too (CPU kernels are already)."""
    runs = []
    for name in ("a", "b"):
        train(_config(epochs=2, deterministic=True), [str(synthetic_dataset)], tmp_path / name, log=lambda *_: None)
        runs.append([{k: v for k, v in row.items() if k not in TIMING} for row in _history(tmp_path / name)])
    assert runs[0] == runs[1] and len(runs[0]) == 2
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b"))
    assert a["accuracy"] == b["accuracy"] and a["roc_auc"] == b["roc_auc"]
    assert json.loads((tmp_path / "a" / "best.json").read_text())["config"]["deterministic"] is True


def test_resume_continues_exactly_where_it_stopped(synthetic_dataset, tmp_path):
    train(_config(epochs=3, deterministic=True), [str(synthetic_dataset)], tmp_path / "straight", log=lambda *_: None)
    train(_config(epochs=1, deterministic=True), [str(synthetic_dataset)], tmp_path / "resumed", log=lambda *_: None)
    train(load_config(epochs=3), [], tmp_path / "resumed", resume=True, log=lambda *_: None)
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    for a, b in zip(straight, resumed):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), key


def test_a_finished_run_is_not_overwritten(synthetic_dataset, tmp_path):
    train(_config(epochs=1), [str(synthetic_dataset)], tmp_path / "run", log=lambda *_: None)
    with pytest.raises(UserError, match="--resume"):
        train(_config(epochs=1), [str(synthetic_dataset)], tmp_path / "run", log=lambda *_: None)


@pytest.mark.parametrize("pipeline", ["fast", "reference"])
def test_bad_files_are_skipped_and_counted(synthetic_dataset, tmp_path, pipeline):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    (data / "train" / "male" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "train" / "female" / "empty.jpg").write_bytes(b"")
    metrics = train(_config(epochs=1, pipeline=pipeline), [str(data)], tmp_path / "run", log=lambda *_: None)
    assert metrics["run"]["skipped_files"] == 2
    assert any("broken.png" in p for p in metrics["run"]["skipped_examples"])
    assert metrics["count"] == 32


def test_freeze_backbone_changes_only_the_head(synthetic_dataset, tmp_path):
    from safetensors.torch import load_file

    train(_config(epochs=1, freeze_backbone=True), [str(synthetic_dataset)], tmp_path / "a", log=lambda *_: None)
    train(_config(epochs=1, freeze_backbone=True, lr=0.05), [str(synthetic_dataset)], tmp_path / "b",
          log=lambda *_: None)
    a, b = load_file(str(tmp_path / "a" / "best.safetensors")), load_file(str(tmp_path / "b" / "best.safetensors"))
    assert (a["model.conv1.weight"] == b["model.conv1.weight"]).all()  # same seed, same init, never trained
    assert not (a["model.fc.1.weight"] == b["model.fc.1.weight"]).all()
