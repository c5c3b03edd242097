"""Checkpoints: weights in safetensors, metadata in JSON, every file written atomically.

``best.safetensors`` is what users load; ``last.safetensors`` adds what ``--resume`` needs (optimizer
moments, RNG states). The metadata travels inside each safetensors header, so weights and metadata can
never come from two different epochs, and is also written beside it as ``.json`` for people to read.
Loading never unpickles anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .io import UserError, atomic_path, write_text

META_KEY = "facegender"


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(meta, indent=2, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: text})
    write_text(path.with_suffix(".json"), text + "\n")


def read_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable facegender checkpoint ({e}); point at a run directory or .safetensors file") from None
    if META_KEY not in header:
        raise UserError(f"{path}: a safetensors file without facegender metadata; was it written by facegender?")
    return json.loads(header[META_KEY])


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
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


def model_state(tensors: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain values (for JSON)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in saved["plain"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
