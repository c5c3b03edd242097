"""Shipping a model: a weights-only checkpoint, in half precision when that leaves predictions unchanged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .data import load_samples_many
from .inference import Classifier

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def probabilities(state: dict[str, torch.Tensor], meta: dict, samples) -> np.ndarray:
    """Calibrated P(male) for every readable sample, computed in fp32 so only the stored weights differ."""
    clf = Classifier.from_state(state, meta, device="cpu", precision="fp32", detect=False)
    return clf.probabilities(clf.model.dataset_logits(samples)[0])


def _corpus_name(data: str) -> str:
    path = Path(data)
    return path.parent.name if path.name == "manifest.csv" else path.name


def export_model(source: str | Path, out: str | Path, dtype: str = "float16", check: list[str] | None = None,
                 tolerance: float = 1e-3, log=print) -> dict:
    """Write the model of ``source`` (a run directory or checkpoint) to ``out`` without the training state.

    With ``check`` (prepared datasets), predictions on their test splits are compared between the fp32
    weights and the ``dtype`` weights; beyond ``tolerance`` in probability the fp32 weights are written.
    """
    path = checkpoint.resolve(source)
    tensors, meta = checkpoint.load(path)
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
