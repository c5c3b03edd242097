"""Evaluation: run a model over a split and turn its outputs into metrics, group tables and reports."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import checkpoint
from .data import Sample, load_samples_many
from .inference import Classifier
from .loaders import cached_images, fast_batches
from .metrics import (age_group, apply_temperature, calibration_metrics, classification_metrics, fit_temperature,
                      format_report, group_metrics)
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


def finish_run(run, batches, prepare_seconds: float, log=print) -> dict:
    """After training: reload the best epoch, fit the temperature on validation, report on test."""
    started = time.perf_counter()
    from .train import predict_split, save_best  # training imports this module lazily; no cycle at import

    best_path = run.out / "best.safetensors"
    tensors, best_meta = checkpoint.load(best_path)
    run.model.load_state_dict(checkpoint.model_state(tensors))
    val_logits, val_labels, _ = predict_split(run, batches, "val")
    temperature = fit_temperature(val_logits, val_labels)
    logits, labels, idx = predict_split(run, batches, "test")
    test_samples = [batches.splits["test"][i] for i in idx]
    metrics = assess(logits, labels, test_samples, run.config.threshold, temperature)
    epochs_seconds = sum(row.get("wall_seconds", row["seconds"]) for row in run.history)
    metrics["run"] = {
        "epochs": run.epoch,
        "best_epoch": best_meta["epoch"],
        "train_seconds": round(sum(row["seconds"] for row in run.history), 1),
        "prepare_seconds": round(prepare_seconds, 1),
        "wall_seconds": round(prepare_seconds + epochs_seconds + time.perf_counter() - started, 1),
        "images_per_s": round(float(np.mean([r["images_per_s"] for r in run.history])), 1),
        "precision": run.precision,
        "pipeline": run.config.pipeline,
        "device": str(run.device),
        "skipped_files": len(run.skipped),
        "skipped_examples": dict(list(run.skipped.items())[:20]),
    }
    # the shipped checkpoint carries its calibration and its test figures
    save_best(run, epoch=best_meta["epoch"], val_loss=best_meta["val_loss"], val_acc=best_meta["val_acc"],
              temperature=temperature,
              test_metrics=checkpoint_summary(metrics))
    write_reports(run.out, metrics, run.history)
    log(format_report(metrics))
    if run.skipped:
        log(f"skipped {len(run.skipped)} unreadable file(s); see metrics.json run.skipped_examples")
    log(f"reports written to {run.out}")
    return metrics


def cached_logits(clf: Classifier, cached, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and sample indices of every readable image of a ``loaders.cached_images`` set."""
    logits, labels, indices = [], [], []
    for images, y, idx in fast_batches(cached, batch_size, shuffle=False):
        logits.append(clf.logits(images))
        labels.append(y.numpy())
        indices.append(idx)
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(indices)


def evaluate_checkpoint(path: str | Path, data: list[str], split: str = "test", out: str | Path | None = None,
                        batch_size: int = 256, device: str = "auto", precision: str = "auto", log=print) -> dict:
    """``facegender evaluate``: metrics of a checkpoint on one split of one or more datasets."""
    clf = Classifier.from_checkpoint(path, device, precision, detect=False)  # manifests carry the crops
    samples = load_samples_many(data, split)
    started = time.perf_counter()
    cached = cached_images(samples, clf.size)
    logits, labels, indices = cached_logits(clf, cached, batch_size)
    metrics = assess(logits, labels, [samples[i] for i in indices], clf.threshold, clf.temperature)
    metrics["run"] = {"checkpoint": str(checkpoint.resolve(path)), "split": split, "data": [str(d) for d in data],
                      "seconds": round(time.perf_counter() - started, 1), "skipped_files": len(cached.bad),
                      "skipped_examples": dict(list(cached.bad.items())[:20])}
    out = Path(out) if out else checkpoint.resolve(path).parent / f"eval_{split}"
    write_reports(out, metrics, None)
    log(format_report(metrics))
    if cached.bad:
        log(f"skipped {len(cached.bad)} unreadable file(s); see {out / 'metrics.json'}")
    log(f"reports written to {out}")
    return metrics
