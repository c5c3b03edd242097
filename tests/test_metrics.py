import json

import numpy as np
import pytest

from facegender.metrics import (
    age_group,
    calibration_metrics,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    format_report,
    group_metrics,
    reliability_bins,
)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_perfect_predictions():
    labels = [0, 0, 1, 1, 1]
    m = classification_metrics(labels, [0.1, 0.2, 0.7, 0.9, 0.6])
    assert m["accuracy"] == 1.0
    assert m["confusion_matrix"] == [[2, 0], [0, 3]]
    assert m["roc_auc"] == 1.0
    assert m["per_class"]["female"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert m["per_class"]["male"]["support"] == 3
    assert m["count"] == 5


def test_inverted_predictions():
    m = classification_metrics([0, 0, 1, 1], [0.9, 0.8, 0.1, 0.2])
    assert m["accuracy"] == 0.0
    assert m["confusion_matrix"] == [[0, 2], [2, 0]]
    assert m["roc_auc"] == 0.0
    assert m["per_class"]["male"]["precision"] == 0.0


def test_known_mixed_case():
    # predictions at 0.5: female, male, female, male, female
    m = classification_metrics([0, 0, 0, 1, 1], [0.1, 0.6, 0.2, 0.8, 0.4])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    female, male = m["per_class"]["female"], m["per_class"]["male"]
    assert female["precision"] == pytest.approx(2 / 3) and female["recall"] == pytest.approx(2 / 3)
    assert male["precision"] == pytest.approx(1 / 2) and male["recall"] == pytest.approx(1 / 2)
    assert male["f1"] == pytest.approx(1 / 2)
    assert m["roc_auc"] == pytest.approx(5 / 6)  # 5 of the 6 (female, male) pairs are ranked correctly
    assert m["roc"]["fpr"][0] == 0.0 and m["roc"]["tpr"][-1] == 1.0


def test_threshold_moves_decisions():
    m = classification_metrics([0, 1], [0.3, 0.6], threshold=0.7)
    assert m["confusion_matrix"] == [[1, 0], [1, 0]]
    assert m["threshold"] == 0.7


def test_one_class_has_no_auc_and_is_json_serialisable():
    m = classification_metrics([1, 1, 1], [0.9, 0.4, 0.8])
    assert m["roc_auc"] is None and m["roc"] is None
    assert m["per_class"]["female"]["support"] == 0
    json.dumps(m, allow_nan=False)


def test_roc_is_thinned_and_plain_floats():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20_000)
    p = _sigmoid(rng.normal(size=labels.size) + 0.5 * (2 * labels - 1))
    m = classification_metrics(labels, p)
    assert 100 < len(m["roc"]["fpr"]) == len(m["roc"]["tpr"]) <= 200
    assert m["roc"]["fpr"][0] == 0.0 and m["roc"]["fpr"][-1] == 1.0
    assert all(type(x) is float for x in m["roc"]["tpr"])
    json.dumps(m, allow_nan=False)


def test_invalid_inputs_name_the_problem():
    with pytest.raises(ValueError, match="differ in length"):
        classification_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="pass sigmoid"):
        classification_metrics([0, 1], [-2.0, 3.0])
    with pytest.raises(ValueError, match="labels must be"):
        classification_metrics([0, 2], [0.1, 0.9])


def test_ece_hand_computed():
    # ten predictions of P(male)=0.9, eight of them right: confidence 0.9, accuracy 0.8
    labels = [1] * 8 + [0] * 2
    assert expected_calibration_error(labels, [0.9] * 10) == pytest.approx(0.1)
    (row,) = reliability_bins(labels, [0.9] * 10)
    assert row["count"] == 10 and row["confidence"] == pytest.approx(0.9) and row["accuracy"] == 0.8


def test_ece_uses_confidence_of_predicted_class():
    # P(male)=0.1 is a confident female prediction; all right -> confidence 0.9, accuracy 1.0
    assert expected_calibration_error([0] * 4, [0.1] * 4) == pytest.approx(0.1)


def test_ece_calibrated_small_overconfident_large():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=50_000)
    labels = (rng.uniform(size=p.size) < p).astype(int)
    assert expected_calibration_error(labels, p) < 0.01
    overconfident = _sigmoid(4 * np.log(p / (1 - p)))
    assert expected_calibration_error(labels, overconfident) > 0.1
    bins = reliability_bins(labels, p)
    assert sum(b["count"] for b in bins) == p.size
    assert all(b["lower"] >= 7 / 15 - 1e-9 for b in bins)  # confidence is never below 0.5


@pytest.mark.parametrize("true_t", [0.5, 2.0, 3.0])
def test_fit_temperature_recovers_known_temperature(true_t):
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 4, 20_000)
    labels = (rng.uniform(size=logits.size) < _sigmoid(logits / true_t)).astype(int)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)


def test_calibration_metrics_improves_ece():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, 20_000)
    labels = (rng.uniform(size=logits.size) < _sigmoid(logits / 2.5)).astype(int)
    t = fit_temperature(logits, labels)
    c = calibration_metrics(logits, labels, t)
    assert c["ece_after"] < 0.02 < c["ece_before"]
    assert c["temperature"] == t and c["bins"] == 15
    none = calibration_metrics(logits, labels)
    assert none["ece_after"] is None and none["bins_after"] is None
    json.dumps(c, allow_nan=False)


def test_age_group():
    assert [age_group(a) for a in (0, 9, 10, 19, 20, 39, 40, 59, 60, 116)] == [
        "0-9", "0-9", "10-19", "10-19", "20-39", "20-39", "40-59", "40-59", "60+", "60+"
    ]
    assert age_group(None) == "" and age_group(-1) == ""


def test_group_metrics_worst_group_and_unknowns():
    # "a": 30 images all right; "b": 30 images, 10 males wrong; "c": 5 images all wrong (too few to count)
    labels = [0] * 15 + [1] * 15 + [0] * 15 + [1] * 15 + [1] * 5 + [0, 1]
    p = [0.1] * 15 + [0.9] * 15 + [0.1] * 15 + [0.9] * 5 + [0.2] * 10 + [0.1] * 5 + [0.9, 0.9]
    source = ["a"] * 30 + ["b"] * 30 + ["c"] * 5 + ["", "unknown"]
    g = group_metrics(labels, p, {"source": source}, threshold=0.5)["source"]
    assert set(g["groups"]) == {"a", "b", "c"}
    assert g["groups"]["b"] == {"count": 30, "accuracy": pytest.approx(20 / 30),
                                "recall": {"female": 1.0, "male": pytest.approx(5 / 15)}}
    assert g["groups"]["c"]["recall"] == {"female": None, "male": 0.0}
    assert g["worst"] == "b"
    assert group_metrics(labels, p, {"source": source}, min_count=1)["source"]["worst"] == "c"


def test_group_metrics_rejects_misaligned_groups():
    with pytest.raises(ValueError, match="'race' has 1 values for 2"):
        group_metrics([0, 1], [0.1, 0.9], {"race": ["x"]})


def test_format_report_contains_tables():
    labels, p = [0, 0, 1, 1] * 10, [0.1, 0.6, 0.8, 0.9] * 10
    m = classification_metrics(labels, p)
    m["groups"] = group_metrics(labels, p, {"source": ["x", "y"] * 20})
    m["calibration"] = calibration_metrics(np.log(np.array(p) / (1 - np.array(p))), labels, 1.5)
    text = format_report(m)
    for needle in ("accuracy   75.00%", "female", "male", "ROC AUC", "confusion matrix", "source", "<- worst",
                   "after T=1.500"):
        assert needle in text
    assert "<- worst" not in format_report(classification_metrics(labels, p))
    del m["calibration"]["bins"]  # a hand-built calibration section need not carry it
    assert "after T=1.500" in format_report(m)
