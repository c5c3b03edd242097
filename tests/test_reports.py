import json

import numpy as np
import pytest
from PIL import Image

from facegender.metrics import calibration_metrics, classification_metrics, fit_temperature, group_metrics
from facegender.reports import (
    plot_calibration,
    plot_confusion_matrix,
    plot_roc_curve,
    plot_training_metrics,
    write_reports,
)


def _history(epochs=6):
    return [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e + 0.05 * max(0, e - 4) ** 2,
         "train_acc": 1 - 0.3 / e, "val_acc": 1 - 0.35 / e, "lr": 1e-3 if e < 4 else 2e-4}
        for e in range(1, epochs + 1)
    ]


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, 2000)
    labels = (rng.uniform(size=logits.size) < 1 / (1 + np.exp(-logits / 2))).astype(int)
    p = 1 / (1 + np.exp(-logits))
    return logits, labels, p


def _assert_png(path, min_size=(400, 300)):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        image.verify()


def _no_temp_files(directory):
    return not [f for f in directory.iterdir() if f.name.endswith(".tmp")]


def test_each_plot_writes_a_png(tmp_path, synthetic):
    logits, labels, p = synthetic
    m = classification_metrics(labels, p)
    c = calibration_metrics(logits, labels, fit_temperature(logits, labels))
    plot_training_metrics(_history(), tmp_path / "t.png")
    plot_confusion_matrix(m["confusion_matrix"], tmp_path / "cm.png")
    plot_roc_curve(m["roc"]["fpr"], m["roc"]["tpr"], m["roc_auc"], tmp_path / "roc.png")
    plot_calibration(c["bins_before"], c["bins_after"], c["ece_before"], c["ece_after"], tmp_path / "cal.png")
    plot_calibration(c["bins_before"], None, c["ece_before"], None, tmp_path / "cal_before.png")
    for name in ("t", "cm", "roc", "cal", "cal_before"):
        _assert_png(tmp_path / f"{name}.png")
    assert _no_temp_files(tmp_path)


def test_write_reports_everything(tmp_path, synthetic):
    logits, labels, p = synthetic
    m = classification_metrics(labels, p)
    m["groups"] = group_metrics(labels, p, {"source": ["a", "b"] * 1000})
    m["calibration"] = calibration_metrics(logits, labels, 2.0)
    written = write_reports(tmp_path / "run", m, _history())
    assert set(written) == {"metrics.json", "training_metrics.png", "confusion_matrix.png", "roc_curve.png",
                            "calibration.png"}
    assert sorted(f.name for f in (tmp_path / "run").iterdir()) == sorted(written)  # nor any temp file
    for name, path in written.items():
        if name.endswith(".png"):
            _assert_png(path)
    assert json.loads(written["metrics.json"].read_text()) == json.loads(json.dumps(m))


def test_write_reports_skips_what_the_data_do_not_allow(tmp_path):
    m = classification_metrics([1, 1, 1], [0.9, 0.8, 0.3])  # one class: no ROC
    written = write_reports(tmp_path, m, history=None)
    assert set(written) == {"metrics.json", "confusion_matrix.png"}
    assert _no_temp_files(tmp_path)


def test_failed_plot_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_training_metrics([], tmp_path / "t.png")
    with pytest.raises(KeyError):
        plot_training_metrics([{"epoch": 1, "val_loss": 0.5}], tmp_path / "t.png")
    assert list(tmp_path.iterdir()) == []
