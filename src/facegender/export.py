"""Shipping a model: a weights-only checkpoint, in half precision when that leaves predictions unchanged,
or an ONNX graph that gives the same predictions as PyTorch in float32 (or, for a descriptor model, an
int8 one that keeps its test accuracy)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .data import load_samples_many
from .chips import chip
from .facemodels import graph_model, kind_of
from .images import BadImage, open_rgb
from .inference import Classifier, model_path
from .io import UserError, atomic_path
from .onnx_export import OPSET, quantize_int8, to_onnx, with_meta
from .onnx_model import network, session
from .torchmodels import build_torch_face_model

DTYPES = {"float16": torch.float16, "float32": torch.float32}
CALIBRATION_FACES = 256  # validation faces that set the int8 ranges
INT8_MAX_DROP = 0.3  # points of test accuracy an int8 graph may lose (issue 10)
FORMATS = {".safetensors": "safetensors", ".onnx": "onnx"}


def probabilities(state: dict[str, torch.Tensor], meta: dict, samples) -> np.ndarray:
    """Calibrated P(male) for every readable sample, computed in fp32 so only the stored weights differ."""
    clf = Classifier.from_state(state, meta, device="cpu", precision="fp32", detect=False)
    return clf.probabilities(clf.model.dataset_logits(samples)[0])


def _corpus_name(data: str) -> str:
    path = Path(data)
    return path.parent.name if path.name == "manifest.csv" else path.name


def export_model(source: str | Path, out: str | Path, dtype: str | None = None, check: list[str] | None = None,
                 tolerance: float | None = None, log=print, fmt: str | None = None,
                 int8: list[str] | None = None) -> dict:
    """Write the model of ``source`` (a run directory or checkpoint) to ``out`` without the training state.

    The format is ``fmt`` or, without it, the suffix of ``out``. With ``check`` (prepared datasets),
    predictions on their test splits are compared with those of the fp32 PyTorch model: beyond
    ``tolerance`` in probability a safetensors export falls back to fp32 weights, an ONNX export stops.
    """
    fmt = fmt or FORMATS.get(Path(out).suffix)
    if fmt is None:
        raise UserError(f"{out}: say which format to write: name it .safetensors or .onnx, or add --format")
    if int8 and fmt != "onnx":
        raise UserError(f"{out}: --int8 writes an ONNX graph: name it .onnx")
    if fmt == "onnx":
        if dtype not in (None, "float32"):
            raise UserError(f"--dtype {dtype}: ONNX export writes float32 only (or int8, with --int8)")
        return export_onnx(source, out, check, tolerance, log, int8)
    dtype, tolerance = dtype or "float16", 1e-3 if tolerance is None else tolerance
    path = model_path(source)
    tensors, meta = checkpoint.load_torch(path)
    weights = {k: v.float() for k, v in checkpoint.model_state(tensors).items()}
    stored = {k: v.to(DTYPES[dtype]) for k, v in weights.items()}
    report = {"dtype": dtype, "from": path.name}
    if check and dtype != "float32" and weights:  # a descriptor head alone has no ResNet18 to halve
        samples = load_samples_many(check, "test")
        full = probabilities(weights, meta, samples)
        diff = np.abs(probabilities(stored, meta, samples) - full)
        report |= {"checked_images": int(len(diff)), "max_probability_difference": float(diff.max()),
                   "tolerance": tolerance}
        log(f"{dtype} vs float32 on {len(diff)} test images: largest difference in P(male) {diff.max():.2e}")
        if diff.max() > tolerance:
            log(f"above {tolerance:g}: writing float32 weights instead")
            stored, report["dtype"] = weights, "float32"
    # the shipped file names its training data, not the paths of the machine it was trained on
    meta = meta | {"data": [_corpus_name(d) for d in meta.get("data", [])], "export": report}
    # a descriptor head (and an ensemble's) is a few thousand numbers: it stays float32
    heads = {k: v.float() for k, v in tensors.items() if k.startswith("head.")}
    checkpoint.save(Path(out), {f"model.{k}": v for k, v in stored.items()} | heads, meta)
    log(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB, {report['dtype']})")
    return report


def export_onnx(source: str | Path, out: str | Path, check: list[str] | None = None, tolerance: float | None = None,
                log=print, int8: list[str] | None = None) -> dict:
    """Write the model of ``source`` (a ResNet18 or a descriptor model) as an ONNX graph (see ``onnx_model``).

    float32: with ``check``, only if onnxruntime's P(male) on the datasets' test splits stays within
    ``tolerance`` (default 1e-4) of PyTorch's in fp32. ``int8`` (prepared datasets): a descriptor model's
    network quantised, calibrated on chips of their validation splits; with ``check``, only if test accuracy
    drops by at most ``tolerance`` (default 0.3) points against fp32.
    """
    path = model_path(source)
    tensors, meta = checkpoint.load_torch(path)
    if kind_of(meta) == "ensemble":
        raise UserError(f"{path}: an ensemble is two networks: export each member (its --members) to ONNX, "
                        "or run the ensemble with --backend onnxruntime")
    if int8 and kind_of(meta) != "descriptor":
        raise UserError(f"{path}: --int8 covers descriptor models (the only kind whose int8 accuracy was measured); "
                        f"this one is of kind {kind_of(meta)!r}")
    tolerance = (INT8_MAX_DROP if int8 else 1e-4) if tolerance is None else tolerance
    clf = Classifier(build_torch_face_model(tensors, meta, device="cpu", precision="fp32"), meta, detect=False)
    meta = meta | {"data": [_corpus_name(d) for d in meta.get("data", [])]}
    report = {"format": "onnx", "dtype": "int8" if int8 else "float32", "from": path.name}
    data = to_onnx(clf.model, meta | {"export": report})
    if int8:
        chips = calibration_chips(load_samples_many(int8, "val"))
        report["calibration_images"] = len(chips)
        log(f"quantising to int8, calibrated on {len(chips)} validation faces")
        data = quantize_int8(data, chips, meta | {"export": report})
    if check:
        samples = load_samples_many(check, "test")
        full, labels, _ = clf.model.dataset_logits(samples)
        clf.model = graph_model(network(session(data), "export-check", str(out)), meta)
        logits, _, _ = clf.model.dataset_logits(samples)
        full, got = clf.probabilities(full), clf.probabilities(logits)
        diff = np.abs(got - full)
        report |= {"checked_images": int(len(diff)), "max_probability_difference": float(diff.max()),
                   "tolerance": tolerance}
        if int8:
            accuracy = {k: float(100 * ((p >= clf.threshold) == labels).mean()) for k, p in (("fp32", full), ("int8", got))}
            drop = accuracy["fp32"] - accuracy["int8"]
            report |= {"test_accuracy_fp32": accuracy["fp32"], "test_accuracy_int8": accuracy["int8"]}
            log(f"int8 vs PyTorch float32 on {len(diff)} test images: accuracy {accuracy['int8']:.2f}% against "
                f"{accuracy['fp32']:.2f}%, largest difference in P(male) {diff.max():.2e}")
            if drop > tolerance:
                raise UserError(f"{out}: not written: int8 loses {drop:.2f} points of test accuracy, more than "
                                f"--tolerance {tolerance:g}; export float32 instead")
        else:
            log(f"onnxruntime vs PyTorch float32 on {len(diff)} test images: largest difference in P(male) {diff.max():.2e}")
            if diff.max() > tolerance:
                raise UserError(f"{out}: not written: the ONNX graph moves P(male) by {diff.max():.2e}, "
                                f"more than --tolerance {tolerance:g}")
        data = with_meta(data, meta | {"export": report})
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    log(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB, {report['dtype']} ONNX of a {kind_of(meta)} model, "
        f"opset {OPSET})")
    return report


def calibration_chips(samples, count: int = CALIBRATION_FACES) -> np.ndarray:
    """Chips of ``count`` faces drawn (seeded) from ``samples``, for int8 calibration; unreadable ones skipped."""
    if not samples:
        raise UserError("--int8: no validation images in those datasets to calibrate on")
    picked = np.random.default_rng(0).permutation(len(samples))[:count]
    chips = []
    for i in picked:
        try:
            chips.append(chip(open_rgb(samples[i].path), samples[i].landmarks))
        except BadImage:
            continue
    if not chips:
        raise UserError("--int8: none of the validation images could be read")
    return np.stack(chips)
