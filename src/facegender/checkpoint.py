"""Checkpoints: weights in safetensors, metadata in JSON, every file written atomically.

``best.safetensors`` is what users load; ``last.safetensors`` adds what ``--resume`` needs (optimizer
moments, RNG states). The metadata travels inside each safetensors header, so weights and metadata can
never come from two different epochs, and is also written beside it as ``.json`` for people to read.
Loading never unpickles anything, and needs no PyTorch: tensors load as numpy arrays (``load``) for the
inference core, or as torch tensors (``load_torch``) for training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .io import UserError, atomic_path, write_text

META_KEY = "facegender"


def save(path: Path, tensors: dict, meta: dict) -> None:
    """Write torch ``tensors`` and ``meta`` (the training side: it needs PyTorch)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(meta, indent=2, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: text})
    write_text(path.with_suffix(".json"), text + "\n")


def read_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable facegender checkpoint ({e}); point at a run directory or .safetensors file") from None
    if META_KEY not in header:
        raise UserError(f"{path}: a safetensors file without facegender metadata; was it written by facegender?")
    return json.loads(header[META_KEY])


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors as numpy arrays (float16 stays float16), and the metadata."""
    from safetensors.numpy import load_file

    meta = read_meta(path)
    return load_file(str(path)), meta


def load_torch(path: Path) -> tuple[dict, dict]:
    """The tensors as torch tensors, and the metadata (the training side: it needs PyTorch)."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    return load_file(str(path)), meta


def resolve(path: str | Path, name: str = "best") -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / f"{name}.safetensors"
        if not candidate.is_file():
            raise UserError(f"{path}: no {candidate.name} in this directory; is it a finished training run?")
        return candidate
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    return path


def model_state(tensors: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """Split a torch optimizer's state dict into tensors (for safetensors) and plain values (for JSON)."""
    import torch

    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def restore_optimizer(optimizer, tensors: dict, saved: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in saved["plain"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
