"""The training loop of the reference recipe: Adam, reduce-on-plateau, early stopping, full-state checkpoints."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint
from .config import CLASSES, MEAN, STD, TrainConfig, load_config, save_config
from .data import Sample, load_samples_many
from .distributed import uninterrupted
from .evaluate import assess, checkpoint_summary, skipped_summary
from .torchmodels import build_torch_face_model
from .io import UserError, write_text
from .crops import cached_images
from .loaders import fast_batches, on_device, reference_loader
from .metrics import fit_temperature, format_report
from .model import build_model
from .reports import write_reports
from .runtime import autocast, grad_scaler, resolve_device, resolve_precision, set_deterministic
from .transforms import eval_batch, reference_eval_transform, reference_train_transform, train_batch


@dataclass
class EarlyStopping:
    patience: int
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def step(self, loss: float, epoch: int) -> bool:
        """Record an epoch's validation loss; True when it is the best so far."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class Run:
    """Everything that changes while training, and all of it is in the ``last`` checkpoint."""
    config: TrainConfig
    data: list[str]
    out: Path
    device: torch.device
    precision: str
    model: nn.Module = None
    forward: nn.Module = None  # the model, or its torch.compile'd wrapper sharing the same parameters
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau = None
    stopper: EarlyStopping = None
    generator: torch.Generator = None
    teacher_logits: torch.Tensor | None = None  # per training sample, NaN where the teacher has none
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    comm: object = None  # a distributed.Comm under torchrun (it shards, reduces and gathers); None in one process
    world_size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes files and reports: the only one, or rank 0."""
        return self.comm is None or self.comm.rank == 0


def preprocessing_meta(config: TrainConfig) -> dict:
    return {"image_size": config.image_size, "mean": list(MEAN), "std": list(STD), "resize": "bilinear"}


def checkpoint_meta(run: Run, **extra) -> dict:
    return {
        "format": 1,
        "classes": list(CLASSES),
        "positive_class": CLASSES[1],
        "threshold": run.config.threshold,
        "temperature": 1.0,
        "preprocessing": preprocessing_meta(run.config),
        "config": run.config.to_dict(),
        "data": run.data,
        "epoch": run.epoch,
        "world_size": run.world_size,
        **extra,
    }


def save_last(run: Run) -> None:
    model_t = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    optim_t, optim_plain = checkpoint.optimizer_tensors(run.optimizer)
    rng_t = {"rng.torch": torch.get_rng_state(), "rng.data": run.generator.get_state()}
    meta = checkpoint_meta(
        run,
        optimizer=optim_plain,
        scheduler=run.scheduler.state_dict(),
        early_stopping=vars(run.stopper),
        history=run.history,
        skipped=run.skipped,
        numpy_rng=_numpy_state(),
    )
    checkpoint.save(run.out / "last.safetensors", model_t | optim_t | rng_t, meta)


def save_best(run: Run, **extra) -> None:
    model_t = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    checkpoint.save(run.out / "best.safetensors", model_t, checkpoint_meta(run, **extra))


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, cached]


def new_run(config: TrainConfig, data: list[str], out: Path) -> Run:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    run = Run(config, data, out, device, resolve_precision(config.precision, device))
    run.model = build_model(config.weights, config.dropout, config.freeze_backbone)
    set_deterministic(config.deterministic, run.model)
    run.model.to(device)
    if config.pipeline == "fast":  # the fast pipeline feeds channels-last batches; the reference one plain NCHW
        run.model.to(memory_format=torch.channels_last)
    run.forward = torch.compile(run.model) if config.compile else run.model
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.Adam(params, lr=config.lr)
    run.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        run.optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience)
    run.stopper = EarlyStopping(config.early_stopping_patience)
    run.generator = torch.Generator().manual_seed(config.seed)
    return run


def resume_run(out: Path, epochs: int | None = None) -> Run:
    path = checkpoint.resolve(out, "last")
    for stale in out.glob(".*.tmp"):  # a write cut short by SIGKILL leaves its temporary file; never the checkpoint
        stale.unlink(missing_ok=True)
    tensors, meta = checkpoint.load_torch(path)
    config = load_config(**(meta["config"] | {"weights": "none"} | ({"epochs": epochs} if epochs else {})))
    run = new_run(config, meta["data"], out)
    run.config.weights = meta["config"]["weights"]
    run.model.load_state_dict(checkpoint.model_state(tensors))
    checkpoint.restore_optimizer(run.optimizer, tensors, meta["optimizer"])
    run.scheduler.load_state_dict(meta["scheduler"])
    run.stopper = EarlyStopping(**meta["early_stopping"])
    run.epoch, run.history, run.skipped = meta["epoch"], meta["history"], meta["skipped"]
    torch.set_rng_state(tensors["rng.torch"])
    run.generator.set_state(tensors["rng.data"])
    kind, keys, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return run


class Batches:
    """The training, validation and test splits, served by the configured pipeline."""

    def __init__(self, run: Run, splits: dict[str, list[Sample]]):
        self.run, self.splits = run, splits
        cfg = run.config
        if cfg.pipeline == "fast":
            # under torchrun one process per node decodes, the others then read its cache file
            with run.comm.node_first() if run.comm else contextlib.nullcontext():
                self.cached = {name: on_device(cached_images(s, cfg.image_size, min(cfg.workers, os.cpu_count() or 1)),
                                               run.device)
                               for name, s in splits.items()}
            for c in self.cached.values():
                run.skipped.update(c.bad)
        else:
            self.loaders = {
                "train": reference_loader(splits["train"], reference_train_transform(cfg), cfg.image_size, cfg.batch_size,
                                          True, cfg.workers, run.generator),
                **{name: reference_loader(splits[name], reference_eval_transform(cfg), cfg.image_size, cfg.batch_size,
                                          False, cfg.workers) for name in ("val", "test")},
            }

    def __call__(self, split: str, train: bool = False):
        cfg = self.run.config
        if cfg.pipeline == "reference":
            for x, y, idx, bad in self.loaders[split]:
                for path, reason in bad.items():
                    if path not in self.run.skipped:
                        warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
                        self.run.skipped[path] = reason
                if len(y):
                    yield x, y, idx
            return
        size = cfg.batch_size if train else 256
        comm = self.run.comm
        for k, (images, labels, idx) in enumerate(fast_batches(self.cached[split], size, train, self.run.generator)):
            keep = comm.keep(len(idx), k, train) if comm else slice(None)
            if keep is None:
                continue
            x = train_batch(images, cfg, self.run.generator, keep) if train else eval_batch(images[keep])
            yield x, labels[keep], idx[keep]

    def count(self, split: str) -> int:
        if self.run.config.pipeline == "fast":
            return len(self.cached[split])
        return len(self.splits[split])


def teacher_logits(config: TrainConfig, samples: list[Sample], log=print) -> torch.Tensor:
    """The distillation teacher's logits (after its temperature) for each training sample; NaN where it
    could not read one. Computed once: a descriptor head reads its cached descriptors."""
    tensors, meta = checkpoint.load_torch(checkpoint.resolve(config.distill))
    model = build_torch_face_model(tensors, meta, config.device, config.precision)
    started = time.perf_counter()
    z, _, idx = model.dataset_logits(samples)
    out = torch.full((len(samples),), float("nan"))
    out[torch.from_numpy(idx)] = torch.from_numpy(z / float(meta.get("temperature", 1.0))).float()
    log(f"distilling from {config.distill} ({meta.get('kind', 'resnet18')}): teacher logits for {len(idx)} "
        f"training images in {time.perf_counter() - started:.0f} s")
    return out


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross entropy against the teacher's softened probabilities, times T^2 so its gradients keep their scale
    as T changes (Hinton et al. 2015). Samples without a teacher logit (NaN) contribute nothing."""
    known = ~torch.isnan(teacher)
    if not known.any():
        return logits.sum() * 0
    soft = torch.sigmoid(teacher[known] / temperature)
    loss = nn.functional.binary_cross_entropy_with_logits(logits[known] / temperature, soft, reduction="sum")
    return loss / len(logits) * temperature**2


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, scaler,
               idx: np.ndarray | None = None) -> tuple[float, int]:
    """One optimiser step; returns the batch's mean loss and its number of correct predictions."""
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    target = y.float()
    if run.config.label_smoothing:
        target = target * (1 - run.config.label_smoothing) + 0.5 * run.config.label_smoothing
    with autocast(run.device, run.precision):
        logits = run.forward(x).squeeze(1)
    loss = loss_fn(logits.float(), target)
    if run.teacher_logits is not None and idx is not None:
        alpha, temperature = run.config.distill_weight, run.config.distill_temperature
        teacher = run.teacher_logits[torch.as_tensor(idx)].to(run.device)
        loss = (1 - alpha) * loss + alpha * distillation_loss(logits.float(), teacher, temperature)
    run.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(run.optimizer)
    scaler.update()
    return loss.item(), ((logits.detach() > 0).long() == y).sum().item()


def train_one_epoch(run: Run, batches: Batches, loss_fn: nn.Module) -> dict:
    run.model.train()
    if run.comm:
        run.comm.seed_dropout(run.config.seed, run.epoch)
    scaler = grad_scaler(run.device, run.precision)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    # a with block: whatever ends the epoch early, the bar is cleared and the next line starts clean
    with tqdm(total=batches.count("train"), desc=f"epoch {run.epoch + 1}/{run.config.epochs}", unit="img",
              leave=False, dynamic_ncols=True, mininterval=1.0, disable=not run.main) as bar:
        for x, y, idx in batches("train", train=True):
            loss, right = train_step(run, x, y, loss_fn, scaler, idx)
            n = len(y)
            total_loss += loss * n
            correct += right
            seen += n
            bar.update(n * run.world_size)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
    if run.comm:
        total_loss, correct, seen = run.comm.sum(total_loss, correct, seen)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": seen / seconds, "train_seconds": seconds}


@torch.no_grad()
def predict_split(run: Run, batches: Batches, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and sample indices for every readable image of a split."""
    run.model.eval()
    net = run.model if run.comm else run.forward  # each rank evaluates its share without the DDP wrapper
    logits, labels, indices = [], [], []
    for x, y, idx in batches(split):
        with autocast(run.device, run.precision):
            out = net(x.to(run.device)).squeeze(1)
        logits.append(out.float().cpu())
        labels.append(y.cpu())
        indices.append(np.asarray(idx))
    if run.comm:
        logits, labels, indices = run.comm.gather(logits, labels, indices)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), np.concatenate(indices)


def bce(logits: np.ndarray, labels: np.ndarray) -> float:
    return nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(labels).float()).item()


def load_splits(data: list[str], config: TrainConfig) -> dict[str, list[Sample]]:
    splits = {name: load_samples_many(data, name) for name in ("train", "val", "test")}
    if config.max_train_images and len(splits["train"]) > config.max_train_images:
        keep = np.random.default_rng(config.seed).permutation(len(splits["train"]))[:config.max_train_images]
        splits["train"] = [splits["train"][i] for i in sorted(keep)]
    return splits


def write_history(run: Run) -> None:
    buf = io.StringIO()
    # the newest row has the columns in training order; rows restored by --resume come back key-sorted
    writer = csv.DictWriter(buf, fieldnames=list(run.history[-1]))
    writer.writeheader()
    writer.writerows(run.history)
    write_text(run.out / "metrics.csv", buf.getvalue())


def train(config: TrainConfig | None, data: list[str], out: str | Path, resume: bool = False,
          log=print, comm=None) -> dict:
    """Train, keep the best epoch, evaluate it on the test split and write the reports. Returns metrics.

    ``comm`` (a ``distributed.Comm``) makes this one rank of a torchrun job; see facegender.distributed.
    """
    out = Path(out)
    if resume:
        run = resume_run(out, config.epochs if config else None)
        log(f"resuming {out} after epoch {run.epoch}")
    else:
        if (out / "last.safetensors").exists():
            raise UserError(f"{out}: already holds a training run; pass --resume to continue it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        run = new_run(config, [str(Path(d).resolve()) for d in data], out)
    if comm:
        comm.wrap(run)
    if run.main:
        save_config(run.config, out / "config.yaml")
    splits = load_splits(run.data, run.config)
    log(f"data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        + f" | device {run.device}, precision {run.precision}, pipeline {run.config.pipeline}")
    started = time.perf_counter()
    batches = Batches(run, splits)
    if run.config.distill:
        run.teacher_logits = teacher_logits(run.config, splits["train"], log)
    prepare_seconds = time.perf_counter() - started
    loss_fn = nn.BCEWithLogitsLoss()
    while run.epoch < run.config.epochs and not run.stopper.should_stop:
        epoch_start = time.perf_counter()
        stats = train_one_epoch(run, batches, loss_fn)
        logits, labels, _ = predict_split(run, batches, "val")
        val_loss = bce(logits, labels)
        val_acc = float(((logits > 0).astype(int) == labels).mean())
        run.epoch += 1
        improved = run.stopper.step(val_loss, run.epoch)
        run.scheduler.step(val_loss)
        row = {"epoch": run.epoch, "train_loss": round(stats["train_loss"], 6), "train_acc": round(stats["train_acc"], 6),
               "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
               "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": round(stats["images_per_s"], 1),
               "seconds": round(stats["train_seconds"], 1),
               "wall_seconds": round(time.perf_counter() - epoch_start, 1)}
        run.history.append(row)
        if run.main:
            with uninterrupted():  # under torchrun a SIGTERM waits for the checkpoint to be whole
                if improved:
                    save_best(run, val_loss=val_loss, val_acc=val_acc)
                save_last(run)
                write_history(run)
        log(f"epoch {run.epoch:2d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  {row['images_per_s']:.0f} img/s"
            + ("  *best" if improved else ""))
    if run.stopper.should_stop:
        log(f"early stopping: no better validation loss for {run.stopper.patience} epochs")
    if run.comm:
        if not run.main:
            return {}
        run.comm, run.forward = None, run.model  # the test report is rank 0's alone
    return finish_run(run, batches, prepare_seconds=prepare_seconds, log=log)


def finish_run(run, batches, prepare_seconds: float, log=print) -> dict:
    """After training: reload the best epoch, fit the temperature on validation, report on test."""
    started = time.perf_counter()
    best_path = run.out / "best.safetensors"
    tensors, best_meta = checkpoint.load_torch(best_path)
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
        **skipped_summary(run.skipped),
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
