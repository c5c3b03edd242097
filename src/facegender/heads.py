"""Fitting the models that need no training loop: a head on face descriptors, and an ensemble's weights.

Both are fitted on the training split (the ensemble: on validation, since its members were trained on the
training split), calibrated on validation, and reported on the test split like a ResNet18 run, into a
run directory holding ``best.safetensors`` that ``predict``, ``evaluate``, ``export`` and ``Classifier``
load like any other checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from . import checkpoint
from .config import CLASSES, TrainConfig
from .data import Sample
from .chips import CHIP_PADDING, CHIP_SIZE
from .chips import MODEL_FILE as DESCRIPTOR_MODEL
from .descriptors import cached_descriptors
from .evaluate import assess_model, checkpoint_summary, skipped_summary
from .facemodels import DescriptorModel, EnsembleModel, kind_of
from .torchmodels import DescriptorHead, build_torch_face_model
from .io import UserError
from .metrics import fit_temperature, format_report
from .reports import write_reports
from .train import bce, load_splits

# Inverse L2 strengths tried for the logistic regression; the one with the lowest validation loss is kept.
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
MLP_HIDDEN = 256
# The MLP replaces the logistic regression only if it is this much more accurate on validation:
# smaller gains are within the noise of one split and buy a less transparent model.
MLP_MARGIN = 0.003
DESCRIPTOR_META = {"network": DESCRIPTOR_MODEL, "chip_size": CHIP_SIZE, "chip_padding": CHIP_PADDING,
                   "landmarks": "dlib 5-point"}


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(((logits > 0).astype(int) == labels).mean())


def fit_logistic(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, log=print) -> DescriptorHead:
    """Logistic regression on standardised descriptors, L2 strength chosen on validation loss."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    best = None
    for c in C_GRID:
        lr = LogisticRegression(C=c, max_iter=2000).fit((x - mean) / scale, y)
        z = lr.decision_function((x_val - mean) / scale)
        loss = bce(z.astype(np.float32), y_val)
        log(f"  logistic C={c:<6g} val loss {loss:.4f} acc {_accuracy(z, y_val):.4f}")
        if best is None or loss < best[0]:
            best = (loss, c, lr)
    head = DescriptorHead(0)
    head.mean.copy_(torch.from_numpy(mean))
    head.scale.copy_(torch.from_numpy(scale))
    linear = head.layers[0]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(best[2].coef_.astype(np.float32)))
        linear.bias.copy_(torch.from_numpy(best[2].intercept_.astype(np.float32)))
    head.fit_info = {"model": "logistic regression", "C": best[1], "val_loss": round(best[0], 6)}
    return head


def fit_mlp(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int = 0, epochs: int = 60,
            weights: np.ndarray | None = None, log=print) -> DescriptorHead:
    """One hidden layer, Adam with weight decay; the epoch with the lowest validation loss is kept.

    ``weights`` (one per training sample, mean 1) scale each sample's share of the loss.
    """
    torch.manual_seed(seed)
    head = DescriptorHead(MLP_HIDDEN)
    head.mean.copy_(torch.from_numpy(x.mean(0)))
    head.scale.copy_(torch.from_numpy(x.std(0) + 1e-6))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).float()
    wt = torch.ones(len(y)) if weights is None else torch.from_numpy(np.asarray(weights, np.float32))
    optimizer = torch.optim.AdamW(head.layers.parameters(), lr=1e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    best = (np.inf, None, 0)
    for epoch in range(1, epochs + 1):
        head.train()
        for idx in torch.randperm(len(xt), generator=generator).split(256):
            loss = nn.functional.binary_cross_entropy_with_logits(head(xt[idx]), yt[idx], weight=wt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_loss = bce(head.logits(x_val), y_val)
        if val_loss < best[0]:
            best = (val_loss, {k: v.clone() for k, v in head.state_dict().items()}, epoch)
    head.load_state_dict(best[1])
    log(f"  MLP {MLP_HIDDEN} hidden: best epoch {best[2]}, val loss {best[0]:.4f} "
        f"acc {_accuracy(head.logits(x_val), y_val):.4f}")
    head.fit_info = {"model": f"MLP, {MLP_HIDDEN} hidden units", "epoch": best[2], "val_loss": round(best[0], 6)}
    return head


def kept_head(logistic: DescriptorHead, mlp: DescriptorHead, x_val: np.ndarray, y_val: np.ndarray
              ) -> tuple[DescriptorHead, float]:
    """``train --kind descriptor``'s choice: the MLP where it is MLP_MARGIN more accurate on validation and
    its validation loss is lower, else the logistic regression; and the MLP's validation accuracy gain."""
    gain = _accuracy(mlp.logits(x_val), y_val) - _accuracy(logistic.logits(x_val), y_val)
    better = gain >= MLP_MARGIN and mlp.fit_info["val_loss"] < logistic.fit_info["val_loss"]
    return (mlp if better else logistic), gain


def labelled_descriptors(samples: list[Sample], workers: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, int]:
    """The descriptors and labels of the samples that decode, their indices, the others (path -> reason),
    and how many samples have no landmarks (their chip is the whole image)."""
    d = cached_descriptors(samples, workers=workers)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return d.vectors[d.good], labels[d.good], d.good, d.bad, d.without_face


def _meta(config: TrainConfig, data: list[str], kind: str, **extra) -> dict:
    return {"format": 1, "kind": kind, "classes": list(CLASSES), "positive_class": CLASSES[1],
            "threshold": config.threshold, "temperature": 1.0, "config": config.to_dict(), "data": data, **extra}


def _finish(out: Path, model, tensors: dict, meta: dict, splits: dict, started: float, log, **run) -> dict:
    """Calibrate on validation, report on test, and write best.safetensors and the reports."""
    val_logits, val_labels, _ = model.dataset_logits(splits["val"])
    temperature = fit_temperature(val_logits, val_labels)
    metrics, bad = assess_model(model, splits["test"], meta["threshold"], temperature)
    metrics["run"] = {"kind": meta["kind"], "wall_seconds": round(time.perf_counter() - started, 1),
                      **skipped_summary(bad), **run}
    meta = meta | {"temperature": temperature, "test_metrics": checkpoint_summary(metrics)}
    checkpoint.save(out / "best.safetensors", tensors, meta)
    write_reports(out, metrics, None)
    log(format_report(metrics))
    log(f"reports written to {out}")
    return metrics


def train_descriptor_head(config: TrainConfig, data: list[str], out: str | Path, log=print) -> dict:
    """``facegender train --kind descriptor``: a logistic regression (or an MLP, if clearly better on
    validation) on dlib face descriptors; seconds once the descriptors are cached."""
    out = Path(out)
    if (out / "best.safetensors").exists():
        raise UserError(f"{out}: already holds a model; choose another --out")
    started = time.perf_counter()
    data = [str(Path(d).resolve()) for d in data]
    splits = load_splits(data, config)
    log("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " | kind descriptor")
    workers = min(config.workers, 2)
    x, y, _, bad, without_face = labelled_descriptors(splits["train"], workers)
    x_val, y_val, _, _, _ = labelled_descriptors(splits["val"], workers)
    labelled_descriptors(splits["test"], workers)  # computed now, in parallel, rather than one by one at the end
    described = time.perf_counter() - started
    fit_start = time.perf_counter()
    head, gain = kept_head(fit_logistic(x, y, x_val, y_val, log), fit_mlp(x, y, x_val, y_val, config.seed, log=log),
                           x_val, y_val)
    log(f"kept: {head.fit_info['model']} (MLP validation accuracy {gain * 100:+.2f} points; "
        f"needs {MLP_MARGIN * 100:+.1f} and a lower loss)")
    fit_seconds = time.perf_counter() - fit_start
    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    meta = _meta(config, data, "descriptor", descriptor=DESCRIPTOR_META,
                 head={"hidden": head.hidden, **head.fit_info})
    out.mkdir(parents=True, exist_ok=True)
    return _finish(out, DescriptorModel(head), tensors, meta, splits, started, log,
                   train_images=int(len(y)), train_without_face=without_face, descriptor_seconds=round(described, 1),
                   fit_seconds=round(fit_seconds, 2), skipped_train=len(bad))


def train_ensemble(config: TrainConfig, data: list[str], out: str | Path, members: list[str], log=print) -> dict:
    """``facegender train --kind ensemble --members RESNET DESCRIPTOR``: the two members' logits combined by
    a logistic regression fitted on the validation split (stacking), then calibrated on it."""
    out = Path(out)
    if (out / "best.safetensors").exists():
        raise UserError(f"{out}: already holds a model; choose another --out")
    if len(members) != 2:
        raise UserError("--kind ensemble needs --members RESNET_RUN DESCRIPTOR_RUN (two checkpoints)")
    loaded = [checkpoint.load_torch(checkpoint.resolve(m)) for m in members]
    kinds = sorted(kind_of(meta) for _, meta in loaded)
    if kinds != ["descriptor", "resnet18"]:
        raise UserError(f"--members must be one resnet18 and one descriptor checkpoint, got {' and '.join(kinds)}")
    (r_tensors, r_meta), (d_tensors, d_meta) = sorted(loaded, key=lambda t: kind_of(t[1]) != "resnet18")
    started = time.perf_counter()
    data = [str(Path(d).resolve()) for d in data]
    splits = load_splits(data, config)
    resnet = build_torch_face_model(r_tensors, r_meta, config.device, config.precision)
    descriptor = build_torch_face_model(d_tensors, d_meta)
    model = EnsembleModel(resnet, descriptor, (1.0, 1.0), 0.0)
    zr, y, ir = resnet.dataset_logits(splits["val"])
    zd, _, id_ = descriptor.dataset_logits(splits["val"])
    both, in_r, in_d = np.intersect1d(ir, id_, return_indices=True)
    stack = LogisticRegression(C=1.0).fit(np.stack([zr[in_r], zd[in_d]], 1), y[in_r])
    model.weights, model.bias = tuple(float(w) for w in stack.coef_[0]), float(stack.intercept_[0])
    log(f"ensemble on {len(both)} validation faces: logit = {model.weights[0]:.3f} x resnet18 "
        f"+ {model.weights[1]:.3f} x descriptor {model.bias:+.3f}")
    tensors = {**{k: v for k, v in r_tensors.items() if k.startswith("model.")},
               **{k: v for k, v in d_tensors.items() if k.startswith("head.")}}
    meta = _meta(config, data, "ensemble", preprocessing=r_meta["preprocessing"], descriptor=d_meta["descriptor"],
                 head=d_meta["head"], ensemble={"weights": list(model.weights), "bias": model.bias,
                                               "members": [Path(m).name for m in members]})
    meta["config"] = r_meta["config"] | {"threshold": config.threshold}
    out.mkdir(parents=True, exist_ok=True)
    return _finish(out, model, tensors, meta, splits, started, log, members=[str(m) for m in members])
