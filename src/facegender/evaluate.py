"""Evaluation: run a model over a split and turn its outputs into metrics, group tables and reports."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .data import Sample, load_samples_many
from .inference import BUNDLED_MODELS, Classifier, model_path
from .facemodels import apply_temperature
from .metrics import age_group, calibration_metrics, classification_metrics, format_report, group_metrics
from .reports import write_reports


def sample_groups(samples: list[Sample]) -> dict[str, list[str]]:
    """The groupings the data carry (source always; age group and race where any sample has them)."""
    groups = {
        "source": [s.source for s in samples],
        "age_group": [age_group(s.age) for s in samples],
        "race": [s.race for s in samples],
    }
    return {name: values for name, values in groups.items() if any(values)}


def assess(logits: np.ndarray, labels: np.ndarray, samples: list[Sample], threshold: float,
           temperature: float = 1.0) -> dict:
    """Metrics of calibrated predictions, overall, per source and per group, with calibration before/after."""
    p = apply_temperature(logits, temperature)
    metrics = classification_metrics(labels, p, threshold)
    metrics["calibration"] = calibration_metrics(logits, labels, temperature)
    groups = sample_groups(samples)
    metrics["groups"] = group_metrics(labels, p, groups, threshold)
    sources = np.array(groups["source"])
    if len(set(sources)) > 1:
        metrics["by_source"] = {
            src: classification_metrics(labels[sources == src], p[sources == src], threshold)
            | {"calibration": calibration_metrics(logits[sources == src], labels[sources == src], temperature)}
            for src in sorted(set(sources))
        }
    return metrics


def checkpoint_summary(metrics: dict) -> dict:
    """The test figures a shipped checkpoint carries: overall, per source, and its calibration."""
    def brief(m: dict) -> dict:
        out = {k: m[k] for k in ("count", "accuracy", "roc_auc", "per_class") if k in m}
        if "calibration" in m:
            out["calibration"] = {k: m["calibration"][k] for k in ("temperature", "ece_before", "ece_after")}
        return out

    return brief(metrics) | {"by_source": {src: brief(m) for src, m in metrics.get("by_source", {}).items()}}


def assess_model(model, samples: list[Sample], threshold: float, temperature: float,
                 batch_size: int = 256) -> tuple[dict, dict[str, str]]:
    """A model's metrics on prepared samples, and the samples it could not read (path -> the cache's reason)."""
    reasons: dict[str, str] = {}
    logits, labels, indices = model.dataset_logits(samples, batch_size, reasons)
    metrics = assess(logits, labels, [samples[i] for i in indices], threshold, temperature)
    missing = set(range(len(samples))) - set(indices.tolist())
    return metrics, {samples[i].path: reasons.get(samples[i].path, "unreadable") for i in sorted(missing)}


def skipped_summary(skipped: dict[str, str]) -> dict:
    """The ``run`` entries of metrics.json for the files a run skipped: how many, and the first 20 with why."""
    return {"skipped_files": len(skipped), "skipped_examples": dict(list(skipped.items())[:20])}


def evaluate_checkpoint(path: str | Path, data: list[str], split: str = "test", out: str | Path | None = None,
                        batch_size: int = 256, device: str = "auto", precision: str = "auto", log=print) -> dict:
    """``facegender evaluate``: metrics of a checkpoint on one split of one or more datasets."""
    # auto: onnxruntime for an .onnx file, a bundled model or a descriptor head (evaluation then needs no
    # PyTorch), PyTorch for a ResNet18 checkpoint where it is installed
    clf = Classifier.from_checkpoint(path, device, precision, "auto", detect=False)  # manifests carry the crops
    samples = load_samples_many(data, split)
    started = time.perf_counter()
    metrics, bad = assess_model(clf.model, samples, clf.threshold, clf.temperature, batch_size)
    file = Path(path) if Path(path).suffix == ".onnx" else model_path(path)  # a bundled model's name too
    metrics["run"] = {"checkpoint": str(file), "kind": clf.kind, "split": split,
                      "data": [str(d) for d in data], "seconds": round(time.perf_counter() - started, 1),
                      **skipped_summary(bad)}
    # beside the checkpoint; for a bundled model (inside the installed package), under ./runs instead
    default = (Path("runs") / f"eval-{file.stem}-{split}" if file in BUNDLED_MODELS.values()
               else file.parent / f"eval_{split}")
    out = Path(out) if out else default
    write_reports(out, metrics, None)
    log(format_report(metrics))
    if bad:
        log(f"skipped {len(bad)} unreadable file(s); see {out / 'metrics.json'}")
    log(f"reports written to {out}")
    return metrics
