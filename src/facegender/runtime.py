"""Where and in what precision the model runs: chosen from the hardware unless the user says otherwise."""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .io import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def cpu_has_bf16() -> bool:
    """bf16 pays on CPUs with native bf16 arithmetic (AVX-512 BF16 or AMX); elsewhere it is emulated and slow."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


class GlobalMean(nn.Module):
    """AdaptiveAvgPool2d(1) as a plain mean, whose CUDA backward is deterministic (the pooling's is flagged not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def set_deterministic(on: bool, model: nn.Module | None = None) -> None:
    """Make a seeded run repeat bit for bit on a GPU too (``--deterministic``), or lift that requirement.

    On the CPU the training kernels are deterministic already. On CUDA, cuDNN may pick different
    convolution algorithms from run to run and some of them, and cuBLAS with its default workspace, add in
    an unspecified order; torch then raises on any kernel it knows to be non-deterministic.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
        if model is not None:
            for name, module in list(model.named_modules()):
                if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
                    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                    setattr(parent, name.rpartition(".")[2], GlobalMean())
    torch.use_deterministic_algorithms(on)
    # that mode also fills every new tensor with NaN, a cost that correct code does not need to repeat itself
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False
