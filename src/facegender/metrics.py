"""Evaluation metrics for the one-logit classifier: accuracy, per-class scores, ROC, calibration, groups.

Every function takes true labels (0 = female, 1 = male, the order of ``config.CLASSES``) and P(male), and
returns plain Python numbers and lists so the result can be written to JSON as it is.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from .config import CLASSES
from .facemodels import apply_temperature

ROC_MAX_POINTS = 200
MIN_GROUP_SIZE = 20  # below this a group's accuracy is too noisy to call it the worst
UNKNOWN_GROUP_VALUES = {"", "unknown", "none", "nan"}
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def _as_arrays(labels, p_male) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    p = np.asarray(p_male, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    if y.size == 0:
        raise ValueError("no predictions to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 ({CLASSES[0]}) or 1 ({CLASSES[1]}), got {sorted(set(y.tolist()))}")
    y = y.astype(int)
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must be finite and in [0, 1]; pass sigmoid(logits), not logits")
    return y, p


def predict(p_male, threshold: float = 0.5) -> np.ndarray:
    """Class indices from P(male); a probability equal to the threshold counts as male."""
    return (np.asarray(p_male, dtype=float) >= threshold).astype(int)


def _thin(fpr: np.ndarray, tpr: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    # Evenly spaced indices keep both ends; sklearn has already dropped collinear points.
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr.tolist(), tpr.tolist()


def classification_metrics(labels, p_male, threshold: float = 0.5) -> dict:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix and ROC.

    Keys: count, threshold, accuracy, per_class {female, male: {precision, recall, f1, support}},
    confusion_matrix (rows true, columns predicted, order female, male), roc_auc (None with one class),
    roc {fpr, tpr} (None with one class).
    """
    y, p = _as_arrays(labels, p_male)
    pred = predict(p, threshold)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=[0, 1], zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(CLASSES)
    }
    auc, roc = None, None
    if len(np.unique(y)) == 2:
        auc = float(roc_auc_score(y, p))
        fpr, tpr, _ = roc_curve(y, p)
        fpr_list, tpr_list = _thin(fpr, tpr, ROC_MAX_POINTS)
        roc = {"fpr": fpr_list, "tpr": tpr_list}
    return {
        "count": int(y.size),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "roc_auc": auc,
        "roc": roc,
    }


def reliability_bins(labels, p_male, bins: int = 15) -> list[dict]:
    """Non-empty equal-width confidence bins over [0, 1]: {lower, upper, confidence, accuracy, count}.

    Confidence is that of the predicted class, max(p, 1 - p), so only bins above 0.5 are ever filled.
    Bins are closed on the right, as in Guo et al. (2017).
    """
    y, p = _as_arrays(labels, p_male)
    confidence = np.maximum(p, 1 - p)
    correct = predict(p) == y
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in np.unique(index):
        in_bin = index == b
        rows.append({
            "lower": b / bins,
            "upper": (b + 1) / bins,
            "confidence": float(confidence[in_bin].mean()),
            "accuracy": float(correct[in_bin].mean()),
            "count": int(in_bin.sum()),
        })
    return rows


def _ece_from_bins(rows: list[dict]) -> float:
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows))


def expected_calibration_error(labels, p_male, bins: int = 15) -> float:
    """Count-weighted mean gap between accuracy and confidence of the predicted class."""
    return _ece_from_bins(reliability_bins(labels, p_male, bins))


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimising the NLL of sigmoid(logit / T); fit it on validation data, not test data.

    T is searched in [0.05, 20]; separable or one-class data drive it to the lower bound.
    """
    z = np.asarray(logits, dtype=float).ravel()
    y, _ = _as_arrays(labels, np.full(z.shape, 0.5))

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))  # BCE with logits, stable for large |s|

    result = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def calibration_metrics(logits, labels, temperature: float | None = None, bins: int = 15) -> dict:
    """The ``calibration`` section of a metrics dict, as ``reports.write_reports`` expects it.

    Keys: bins (count), temperature, ece_before, bins_before, ece_after, bins_after; the ``*_after``
    values are None when no temperature is given. ``temperature`` should come from validation data.
    """
    before = reliability_bins(labels, apply_temperature(logits, 1.0), bins)
    after = None if temperature is None else reliability_bins(labels, apply_temperature(logits, temperature), bins)
    return {
        "bins": bins,
        "temperature": temperature,
        "ece_before": _ece_from_bins(before),
        "bins_before": before,
        "ece_after": None if after is None else _ece_from_bins(after),
        "bins_after": after,
    }


def age_group(age: int | None) -> str:
    """The age band used for group metrics; "" when the age is unknown."""
    if age is None or age < 0:
        return ""
    for upper, name in ((10, "0-9"), (20, "10-19"), (40, "20-39"), (60, "40-59")):
        if age < upper:
            return name
    return "60+"


def _recall(cm: np.ndarray, i: int) -> float | None:
    return float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None


def group_metrics(
    labels,
    p_male,
    groups: dict[str, Sequence[str]],
    threshold: float = 0.5,
    min_count: int = MIN_GROUP_SIZE,
) -> dict:
    """Accuracy and per-class recall for each value of each grouping (e.g. source, age_group, race).

    Returns {grouping: {"groups": {value: {count, accuracy, recall: {female, male}}}, "worst": value or
    None, "min_count": min_count}}. Unknown values ("", None, "unknown") are left out; recall is None for
    a class the group lacks; "worst" is the lowest-accuracy group with at least ``min_count`` images.
    """
    y, p = _as_arrays(labels, p_male)
    pred = predict(p, threshold)
    result = {}
    for grouping, values in groups.items():
        values = np.array(["" if v is None else str(v) for v in values], dtype=object)
        if values.size != y.size:
            raise ValueError(f"group {grouping!r} has {values.size} values for {y.size} predictions")
        table = {}
        for value in sorted(set(values)):
            if value.strip().lower() in UNKNOWN_GROUP_VALUES:
                continue
            mask = values == value
            cm = confusion_matrix(y[mask], pred[mask], labels=[0, 1])
            table[value] = {
                "count": int(mask.sum()),
                "accuracy": float(accuracy_score(y[mask], pred[mask])),
                "recall": {name: _recall(cm, i) for i, name in enumerate(CLASSES)},
            }
        eligible = {v: g["accuracy"] for v, g in table.items() if g["count"] >= min_count}
        result[grouping] = {
            "groups": table,
            "worst": min(eligible, key=eligible.get) if eligible else None,
            "min_count": min_count,
        }
    return result


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(metrics: dict) -> str:
    """A plain-text report of ``classification_metrics`` output, plus its optional ``calibration``
    (``calibration_metrics``) and ``groups`` (``group_metrics``) sections."""
    width = max(len(c) for c in CLASSES) + 2
    lines = [
        f"images     {metrics['count']}",
        f"threshold  {metrics['threshold']:g}",
        f"accuracy   {metrics['accuracy'] * 100:.2f}%",
        f"ROC AUC    {_fmt(metrics.get('roc_auc'))}",
        "",
        f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name in CLASSES:
        c = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>10d}"
        )
    cm = metrics["confusion_matrix"]
    cell = max(width, *(len(str(n)) + 2 for row in cm for n in row))
    lines += ["", "confusion matrix (rows true, columns predicted)"]
    lines.append(" " * width + "".join(f"{c:>{cell}}" for c in CLASSES))
    for name, row in zip(CLASSES, cm):
        lines.append(f"{name:<{width}}" + "".join(f"{n:>{cell}d}" for n in row))

    calibration = metrics.get("calibration")
    if calibration:
        bins = f" ({calibration['bins']} bins)" if calibration.get("bins") else ""
        lines += ["", f"calibration ECE{bins}  before {_fmt(calibration['ece_before'])}"]
        if calibration.get("ece_after") is not None:
            lines[-1] += f"  after T={calibration['temperature']:.3f}: {_fmt(calibration['ece_after'])}"

    by_source = metrics.get("by_source") or {}
    if by_source:
        w = max(len(v) for v in by_source) + 2
        lines += ["", f"{'source':<{w}}{'images':>8}{'accuracy':>10}{'AUC':>8}"
                  + "".join(f"{f'{m}({c[0]})':>8}" for c in CLASSES for m in ("P", "R", "F1")) + f"{'ECE':>8}{'ECE(T)':>8}"]
        for source, m in by_source.items():
            row = f"{source:<{w}}{m['count']:>8d}{m['accuracy'] * 100:>9.2f}%{_fmt(m.get('roc_auc')):>8}"
            row += "".join(f"{m['per_class'][c][k]:>8.3f}" for c in CLASSES for k in ("precision", "recall", "f1"))
            cal = m.get("calibration") or {}
            row += f"{_fmt(cal.get('ece_before')):>8}{_fmt(cal.get('ece_after')):>8}"
            lines.append(row)
        lines.append("(P, R, F1: precision, recall and F1 of (f)emale and (m)ale; ECE before and after the temperature)")

    for grouping, section in (metrics.get("groups") or {}).items():
        table = section["groups"]
        if not table:
            continue
        w = max(len(grouping), *(len(v) for v in table)) + 2
        header = f"{grouping:<{w}}{'count':>8}{'accuracy':>10}" + "".join(f"{'recall ' + c:>14}" for c in CLASSES)
        lines += ["", header]
        for value, g in table.items():
            row = f"{value:<{w}}{g['count']:>8d}{_fmt(g['accuracy']):>10}"
            row += "".join(f"{_fmt(g['recall'][c]):>14}" for c in CLASSES)
            lines.append(row + ("  <- worst" if value == section["worst"] else ""))
        lines.append(f"(worst: lowest accuracy among groups with at least {section['min_count']} images)")
    return "\n".join(lines) + "\n"
