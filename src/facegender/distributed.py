"""Training on several processes: ``torchrun --nproc-per-node N -m facegender.cli train ...``.

This wraps the single-process loop of ``facegender.train`` rather than forking it. Every rank builds the
same run (same seed, same weights) and draws the same shuffle and augmentation numbers from the run's
generator, so the generators stay in step without messages. Each global batch of ``batch_size`` images
(the recipe's batch, whatever the number of processes) is then dealt out: rank r takes images r, r+N,
r+2N, ... with their own augmentation draws, DDP averages the gradients, and one optimiser step on every
rank follows, as one process would take it on the whole batch. Validation is split by batches and
gathered, training loss and accuracy are summed, and rank 0 alone writes checkpoints, metrics and reports
and evaluates the test split. gloo on CPUs, nccl on GPUs (one GPU per process, ``LOCAL_RANK``).

Batch norm is synchronised: in training, every batch-norm layer normalises with the mean and variance of
the whole global batch, gathered from all ranks, and its backward pass sums its gradient terms over all
ranks too (``SyncBatchNorm2d``). So N processes of B/N images compute what one process computes on B, and
the running statistics are the same on every rank. What still differs from one process: dropout draws its
masks from a stream per rank (the same distribution, other numbers), the last batch of an epoch is cut to a
multiple of N images, and sums are added in another order (float rounding).

When anything fails (a rank dies, a collective breaks, torchrun or the user sends SIGTERM or SIGINT), each
rank ends with one line on stderr that says what happened, where the last checkpoint is and the command
that continues the run, and a non-zero status. A signal that arrives while rank 0 writes its checkpoint
waits until the file is complete (``uninterrupted``); the file is written beside its final name and renamed,
so a checkpoint on disk is always whole.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import re
import shlex
import shutil
import signal
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from .io import UserError

# a rank waits this long on the others (one of them building the image cache, say) before giving up
TIMEOUT = timedelta(minutes=int(os.environ.get("FACEGENDER_DIST_TIMEOUT_MIN", "30")))


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class Stopped(Exception):
    """A signal ended this rank: SIGTERM (torchrun stops every rank when one fails) or SIGINT (the user)."""


class _Signals:
    """SIGTERM and SIGINT raise ``Stopped``, except inside ``uninterrupted`` blocks, which finish first."""

    def __init__(self):
        self.held, self.pending, self.ended = 0, None, False

    def __call__(self, signum, frame):
        if self.ended:  # the rank is already saying why it ends; let it finish the line
            return
        name = signal.Signals(signum).name
        if self.held:
            self.pending = self.pending or name
            return
        self.ended = True
        raise Stopped(name)


_signals = _Signals()


@contextlib.contextmanager
def uninterrupted():
    """A block (writing a checkpoint) that SIGTERM and SIGINT do not cut short: they end the rank after it.

    Outside a torchrun job no handler is installed and this does nothing.
    """
    _signals.held += 1
    try:
        yield
    finally:
        _signals.held -= 1
    if not _signals.held and _signals.pending and not _signals.ended:
        _signals.ended = True
        raise Stopped(_signals.pending)


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm over the global batch: statistics gathered from every rank, gradient terms summed over them.

    Weight and bias get this rank's share of their gradient; DDP averages those as it does every gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=dims, correction=0)
        count = x32.numel() // x32.shape[1]
        # each rank's count, mean and sum of squared deviations, combined in float64 (Chan et al.), the same
        # way and in the same order on every rank, so all ranks hold the same statistics
        local = torch.cat([torch.tensor([count], dtype=torch.float64, device=x.device), mean.double(),
                           var.double() * count])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        stacked = torch.stack(parts)
        counts, means, m2 = stacked[:, :1], stacked[:, 1:1 + len(mean)], stacked[:, 1 + len(mean):]
        n = counts.sum()
        g_mean = (counts * means).sum(0) / n
        g_m2 = (m2 + counts * (means - g_mean) ** 2).sum(0)
        running_mean.mul_(1 - momentum).add_(momentum * g_mean.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * (g_m2 / (n - 1).clamp(min=1)).to(running_var.dtype))
        mean, invstd = g_mean.float(), torch.rsqrt(g_m2.float() / n.float() + eps)
        ctx.save_for_backward(x, weight, mean, invstd, n.float())  # tensors all: no wait on a GPU here
        scale = invstd * weight.float()
        shift = bias.float() - mean * scale
        return (x32 * scale.view(shape) + shift.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        dy32 = dy.float()
        sum_dy, sum_dy_xhat = dy32.sum(dims), (dy32 * xhat).sum(dims)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both)
        mean_dy, mean_dy_xhat = (both / n).view(2, -1)
        dx = (dy32 - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * (invstd * weight.float()).view(shape)
        return dx.to(x.dtype), sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype), None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any device.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one uses plain tensor operations and the process
    group's collectives, so gloo on CPUs works too. Its state dict is BatchNorm2d's: checkpoints stay plain.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                      momentum)


def sync_batch_norm(model: nn.Module) -> None:
    """Make the model's batch-norm layers ``SyncBatchNorm2d`` in place: same parameters, buffers, optimiser."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d and module.affine and module.track_running_stats:
            module.__class__ = SyncBatchNorm2d


class Comm:
    """This rank's place in the job and the few collective steps that training needs."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    def keep(self, n: int, k: int, train: bool) -> slice | None:
        """Which part of the k-th batch (of n images) is this rank's; None: none of it.

        Training: every rank gets an equal share of every batch, so all take the same number of steps.
        Evaluation: whole batches, dealt round-robin, put back in order by ``gather``.
        """
        if train:
            usable = n - n % self.world_size
            return slice(self.rank, usable, self.world_size) if usable else None
        return slice(None) if k % self.world_size == self.rank else None

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, *lists: list) -> tuple[list, ...]:
        """Each rank's per-batch results (dealt by ``keep``) -> every rank holds all of them, in batch order."""
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, lists)
        merged = []
        for position in range(len(lists)):
            per_rank = [ranks[position] for ranks in everyone]
            total = sum(len(p) for p in per_rank)
            merged.append([per_rank[k % self.world_size][k // self.world_size] for k in range(total)])
        return tuple(merged)

    def seed_dropout(self, seed: int, epoch: int) -> None:
        """This rank's own dropout masks for the epoch. The ranks share one seed, and with one stream they
        would drop the same units for the k-th image of every rank's share; seeded from (seed, epoch, rank),
        a resumed run draws what an uninterrupted one does."""
        torch.manual_seed(hash((seed, epoch, self.rank)))

    @contextlib.contextmanager
    def node_first(self):
        """The block runs on each node's local rank 0 first (it builds the caches), then on the others."""
        if self.local_rank != 0:
            dist.barrier()
        yield
        if self.local_rank == 0:
            dist.barrier()

    def wrap(self, run) -> None:
        """Make a single-process ``train.Run`` this rank's: synchronised batch norm, DDP around its model."""
        from torch.nn.parallel import DistributedDataParallel

        if run.config.pipeline != "fast":
            raise UserError("torchrun: --pipeline reference is the one-process baseline and does not shard its data; "
                            "use the default pipeline (fast) with torchrun")
        run.comm, run.world_size = self, self.world_size
        sync_batch_norm(run.model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # synchronised batch norm keeps the buffers equal on every rank: nothing to copy at each forward pass
        # (newer torch renamed the switch)
        switch = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        ddp = DistributedDataParallel(run.model, device_ids=ids, **{switch: False})
        run.forward = torch.compile(ddp) if run.config.compile else ddp


def start() -> Comm:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this "
                            f"node; use --nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if backend == "nccl" else None)
    return Comm(rank, world_size, local_rank, device)


def train(work: Callable[[Comm, Callable[..., None]], None], out: str) -> int:
    """One rank of ``facegender train`` under torchrun: ``work(comm, log)`` runs the single-process loop
    (``facegender.train.train``, which imports this module: the caller hands it in) as this rank, into run
    directory ``out``; returns the exit status."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    main = rank == 0
    previous = {s: signal.signal(s, _signals) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        comm = start()
        if not main:  # one voice: rank 0 prints the progress, the warnings and the report
            warnings.simplefilter("ignore")
        log = print if main else (lambda *_, **__: None)
        log(f"torchrun: world size {comm.world_size}, backend {dist.get_backend()}, "
            f"{comm.device.type}; rank 0 writes {out}", flush=True)
        work(comm, log)
        # every rank done with the group before any tears it down: a rank whose peer had already closed its
        # connections could die in gloo's teardown (SIGABRT, "terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
        return 0
    except UserError as e:
        _signals.ended = True
        if main:  # every rank meets the same mistake; one of them says so
            print(f"facegender: error: {e}", file=sys.stderr, flush=True)
        return 2
    except BaseException as e:  # noqa: BLE001 - whatever ends a rank, it ends with the line that says what to do
        _signals.ended = True
        what, status = ending(e)
        if status == 1 and not _collective_error(e) and not isinstance(e, MemoryError):
            traceback.print_exc()  # not a lost rank: a defect, whose traceback is what its fix needs
        print(f"facegender: rank {rank} of {world_size}: {what}; {how_to_continue(out)}", file=sys.stderr, flush=True)
        return status
    finally:
        if not _signals.ended:  # after a failure, a late SIGTERM from torchrun must not cut the exit short
            for s, handler in previous.items():
                signal.signal(s, handler)


def leave(status: int) -> NoReturn:
    """End this rank's process with ``status``, skipping the interpreter's own teardown.

    When the last collective (the barrier before ``destroy_process_group``) returns, one of gloo's worker
    threads may not yet have dropped its record of it, and dropping it takes the GIL. If the main thread is
    already finalising the interpreter by then, that thread cannot have the GIL and the process aborts
    (SIGABRT, "terminate called without an active exception") after a run that finished: 1 exit in 25-60
    here, and torchrun reports the whole job as failed. So the exit handlers run while the interpreter is
    whole, and the process ends without finalising it. Nothing is lost: checkpoints and reports are renamed
    into place as they are written, and stdout and stderr are flushed."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def ending(e: BaseException) -> tuple[str, int]:
    """What ended the rank, in words, and its exit status."""
    if isinstance(e, Stopped):
        if str(e) == "SIGINT":
            return "interrupted by SIGINT", 130
        return f"stopped by {e} (torchrun stops every rank when one of them fails, or the job was stopped)", 143
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    detail = _first_line(e)
    if _collective_error(e):
        return f"lost contact with another rank during {_phase(e)} ({detail})", 1
    return f"failed during {_phase(e)} ({type(e).__name__}: {detail})", 1


_GLOO_OR_NCCL = re.compile(r"gloo|nccl|pair\.cc|connection (reset|closed|refused)|broken pipe|timed out|"
                           r"process ?group|c10d|socket", re.IGNORECASE)

# the innermost frame named here says what the rank was doing
_PHASES = {"backward": "the gradient all-reduce of a training step", "train_step": "a training step",
           "train_one_epoch": "the end of a training epoch", "predict_split": "validation",
           "node_first": "the wait for the image cache", "start": "the start of the job"}


def _collective_error(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and bool(_GLOO_OR_NCCL.search(str(e))))


def _phase(e: BaseException) -> str:
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if frame.name in _PHASES:
            return _PHASES[frame.name]
    return "training"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = re.sub(r"^\[[^\]]*:\d+\]\s*", "", lines[0]) if lines else type(e).__name__  # gloo's source position
    line = line.split(". ", 1)[0]  # gloo goes on with advice that fits the C++ developer, not this user
    return line if len(line) <= 200 else line[:197] + "..."


def how_to_continue(out: str | Path) -> str:
    """Where the last checkpoint is, and the command that continues the run from it (or starts it again)."""
    last = Path(out) / "last.safetensors"
    launcher = _launcher()
    epoch = _epoch_of(last)
    if epoch is None:
        return (f"no epoch had finished, so there is no checkpoint yet: start again with "
                f"{shlex.join([*launcher, *sys.argv[1:]])}")
    return (f"the last checkpoint is {last} (epoch {epoch}): continue with "
            f"{shlex.join([*launcher, 'train', '--out', str(out), '--resume'])}")


def _epoch_of(path: Path) -> int | None:
    from .checkpoint import read_meta

    if not path.is_file():
        return None
    try:
        return int(read_meta(path)["epoch"])
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return None


def _launcher() -> list[str]:
    """The torchrun command line that started this rank, up to the training command (``train ...``).

    torchrun is this process's parent and ends its command line with this rank's arguments; where its command
    line cannot be read (not Linux, another launcher), the equivalent is built from torchrun's environment.
    """
    mine = sys.argv[1:]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
        head = argv[:len(argv) - len(mine)]
        if mine and argv[len(head):] == mine and any(
                a == "torch.distributed.run" or os.path.basename(a) == "torchrun" for a in head):
            if len(head) > 1 and os.path.basename(head[1]) == "torchrun":  # the console script, as the OS runs it
                head = ["torchrun" if shutil.which("torchrun") == head[1] else head[1], *head[2:]]
            return head
    nodes, per_node = os.environ.get("GROUP_WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    where = ["--standalone"] if nodes == "1" else ["--nnodes", nodes]
    return ["torchrun", *where, "--nproc-per-node", per_node, "-m", "facegender.cli"]
