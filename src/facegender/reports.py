"""Report files of a run: metrics.json and its plots.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so they render with Agg without
touching the global backend or pyplot's figure registry (safe in notebooks, servers and threads).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .config import CLASSES
from .io import atomic_path, write_text

DPI = 120
TRAIN_COLOR, VAL_COLOR, BEST_COLOR = "tab:blue", "tab:orange", "tab:green"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)  # the temporary name ends in .tmp, so name the format
    fig.clear()  # a Figure without pyplot is freed by garbage collection; clearing drops the artists now
    return Path(path)


def plot_training_metrics(history: list[dict], path: str | os.PathLike) -> Path:
    """Loss and accuracy (fractions in [0, 1]) per epoch, train and validation; the best epoch (lowest
    validation loss) and learning-rate reductions (when rows carry ``lr``) are marked."""
    if not history:
        raise ValueError("training history is empty; nothing to plot")
    epochs = [row["epoch"] for row in history]
    val_loss = np.array([row["val_loss"] for row in history], dtype=float)
    best = int(np.nanargmin(val_loss))
    lr_drops = [
        history[i]["epoch"]
        for i in range(1, len(history))
        if "lr" in history[i] and history[i]["lr"] < history[i - 1].get("lr", history[i]["lr"])
    ]

    fig = Figure(figsize=(11, 4.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    panels = ((loss_ax, "loss", "Loss (BCE)", "loss"), (acc_ax, "acc", "Accuracy", "accuracy"))
    for ax, key, title, ylabel in panels:
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", ms=3, color=TRAIN_COLOR, label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", ms=3, color=VAL_COLOR, label="validation")
        ax.axvline(epochs[best], color=BEST_COLOR, ls="--", lw=1, label=f"best epoch {epochs[best]}")
        for i, epoch in enumerate(lr_drops):
            ax.axvline(epoch, color="grey", ls=":", lw=1, label="learning rate reduced" if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    loss_ax.plot(epochs[best], val_loss[best], "*", ms=12, color=BEST_COLOR)
    acc_ax.plot(epochs[best], history[best]["val_acc"], "*", ms=12, color=BEST_COLOR)
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if len(epochs) <= 25:
        for ax in (loss_ax, acc_ax):
            ax.set_xticks(epochs)
    return _save(fig, path)


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]],
    path: str | os.PathLike,
    classes: Sequence[str] = CLASSES,
    title: str = "Confusion matrix",
) -> Path:
    """Counts and row percentages (recall of each true class) per cell; colour follows the row share."""
    cm = np.asarray(cm, dtype=int)
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)

    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{cm[i, j]:,}\n{share[i, j]:.1%}", ha="center", va="center", color=color, fontsize=12)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes)
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (n = {cm.sum():,})")
    fig.colorbar(image, ax=ax, label="share of true class", format=lambda v, _: f"{v:.0%}")
    return _save(fig, path)


def plot_roc_curve(fpr: Sequence[float], tpr: Sequence[float], auc: float, path: str | os.PathLike) -> Path:
    """ROC curve with male as the positive class, AUC in the legend and the chance diagonal."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot(fpr, tpr, color=TRAIN_COLOR, lw=2, label=f"ROC (AUC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance (AUC = 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(f"false positive rate ({CLASSES[0]} predicted {CLASSES[1]})")
    ax.set_ylabel(f"true positive rate ({CLASSES[1]} predicted {CLASSES[1]})")
    ax.set_title(f"ROC curve ({CLASSES[1]} = positive)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_calibration(
    bins_before: list[dict],
    bins_after: list[dict] | None,
    ece_before: float,
    ece_after: float | None,
    path: str | os.PathLike,
    temperature: float | None = None,
) -> Path:
    """Reliability diagram (accuracy against confidence of the predicted class) over a histogram of
    images per bin, before and, when given, after temperature scaling. Bins are
    ``metrics.reliability_bins`` rows."""
    fig = Figure(figsize=(6, 6.5))
    ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    series = [("before scaling", bins_before, ece_before, "tab:red", -1)]
    if bins_after is not None:
        after_label = "after temperature scaling" + (f" (T = {temperature:.2f})" if temperature else "")
        series.append((after_label, bins_after, ece_after, TRAIN_COLOR, 1))
    rows_all = [r for _, rows, _, _, _ in series for r in rows]
    left = min(0.5, *(r["lower"] for r in rows_all))  # the bin holding 0.5 starts a little below it
    bottom = max(0.0, min(left, *(r["accuracy"] for r in rows_all)) - 0.03)
    ax.plot([left, 1], [left, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    for label, rows, ece, color, side in series:
        confidence, accuracy = [r["confidence"] for r in rows], [r["accuracy"] for r in rows]
        ax.plot(confidence, accuracy, "-", color=color, lw=1.5, label=f"{label}: ECE = {ece:.4f}")
        # Marker area follows the bin's share of images, so sparse, noisy bins do not look as weighty.
        share = np.array([r["count"] for r in rows]) / sum(r["count"] for r in rows)
        ax.scatter(confidence, accuracy, s=10 + 150 * np.sqrt(share), color=color, zorder=3)
        width = min(r["upper"] - r["lower"] for r in rows) * 0.4
        hist_ax.bar(
            [(r["lower"] + r["upper"]) / 2 + side * width / 2 for r in rows],
            [r["count"] for r in rows],
            width=width,
            color=color,
            alpha=0.7,
        )
    ax.set_xlim(left, 1.0)
    ax.set_ylim(bottom, 1.01)
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small", title="marker area ~ images in bin", title_fontsize="small")
    hist_ax.set_yscale("log")
    hist_ax.set_xlabel("confidence of the predicted class")
    hist_ax.set_ylabel("images")
    hist_ax.grid(alpha=0.3)
    return _save(fig, path)


def write_reports(
    out_dir: str | os.PathLike, metrics: dict, history: list[dict] | None = None
) -> dict[str, Path]:
    """Write metrics.json and the plots the data allow; return {file name: path} of what was written.

    ``metrics`` is ``metrics.classification_metrics`` output (confusion_matrix, roc_auc, roc {fpr, tpr}),
    optionally with ``groups`` (``metrics.group_metrics``) and ``calibration``
    (``metrics.calibration_metrics``: ece_before, bins_before, ece_after, bins_after, temperature).
    Files: metrics.json always; training_metrics.png with a non-empty history; confusion_matrix.png;
    roc_curve.png when roc_auc is not None; calibration.png when ``calibration`` is present.
    """
    out = Path(out_dir)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    written = {"metrics.json": out / "metrics.json"}
    if history:
        written["training_metrics.png"] = plot_training_metrics(history, out / "training_metrics.png")
    written["confusion_matrix.png"] = plot_confusion_matrix(metrics["confusion_matrix"], out / "confusion_matrix.png")
    if metrics.get("roc_auc") is not None:
        roc = metrics["roc"]
        written["roc_curve.png"] = plot_roc_curve(roc["fpr"], roc["tpr"], metrics["roc_auc"], out / "roc_curve.png")
    calibration = metrics.get("calibration")
    if calibration:
        written["calibration.png"] = plot_calibration(
            calibration["bins_before"],
            calibration.get("bins_after"),
            calibration["ece_before"],
            calibration.get("ece_after"),
            out / "calibration.png",
            temperature=calibration.get("temperature"),
        )
    return written
