"""Training on several processes: ``torchrun --nproc-per-node N -m facegender.cli train ...``.

This wraps the single-process loop of ``facegender.train`` rather than forking it. Every rank builds the
same run (same seed, same weights) and draws the same shuffle and augmentation numbers from the run's
generator, so the generators stay in step without messages. Each global batch of ``batch_size`` images
(the recipe's batch, whatever the number of processes) is then dealt out: rank r takes images r, r+N,
r+2N, ... with their own augmentation draws, DDP averages the gradients, and one optimiser step on every
rank follows, as one process would take it on the whole batch. Validation is split by batches and
gathered, training loss and accuracy are summed, and rank 0 alone writes checkpoints, metrics and reports
and evaluates the test split. gloo on CPUs, nccl on GPUs (one GPU per process, ``LOCAL_RANK``).

What differs from one process: batch-norm statistics come from each rank's share of the batch (rank 0's
running averages are kept), dropout draws its masks per share, and the last batch of an epoch is cut to
a multiple of N images.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import signal
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from .io import UserError

# a rank waits this long on the others (one of them building the image cache, say) before giving up
TIMEOUT = timedelta(minutes=int(os.environ.get("FACEGENDER_DIST_TIMEOUT_MIN", "30")))


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class Stopped(Exception):
    """torchrun (or the user) ended this rank: another rank failed, or the job was interrupted."""


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

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's batch-norm statistics everywhere, so every rank evaluates the same model."""
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)

    @contextlib.contextmanager
    def node_first(self):
        """The block runs on each node's local rank 0 first (it builds the caches), then on the others."""
        if self.local_rank != 0:
            dist.barrier()
        yield
        if self.local_rank == 0:
            dist.barrier()

    def wrap(self, run) -> None:
        """Make a single-process ``train.Run`` this rank's: DDP around its model."""
        from torch.nn.parallel import DistributedDataParallel

        if run.config.pipeline != "fast":
            raise UserError("torchrun: --pipeline reference is the one-process baseline and does not shard its data; "
                            "use the default pipeline (fast) with torchrun")
        run.comm, run.world_size = self, self.world_size
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers are synchronised before each evaluation instead of at every forward pass (newer torch
        # renamed the switch; both keep the copy of rank 0's buffers made at the start)
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


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def train(config, data: list[str], out: str, resume: bool = False) -> int:
    """One rank of ``facegender train`` under torchrun; returns the exit status."""
    from . import train as single

    comm = start()
    main = comm.rank == 0
    where = f"rank {comm.rank} of {comm.world_size}"
    if config is not None and comm.device.type == "cuda":
        config.device = str(comm.device)
    if not main:  # one voice: rank 0 prints the progress, the warnings and the report
        warnings.simplefilter("ignore")
    log = print if main else (lambda *_, **__: None)
    log(f"torchrun: world size {comm.world_size}, backend {dist.get_backend()}, "
        f"{comm.device.type}; rank 0 writes {out}", flush=True)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        single.train(config, data, out, resume=resume, log=log, comm=comm)
        return 0
    except UserError as e:
        if main:
            print(f"facegender: error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by {e} from torchrun"
        print(f"facegender: {where}: {why} (another rank failed, or the job was interrupted); {out} keeps its "
              f"last finished epoch: continue with the same command and --resume", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except dist.DistError as e:
        print(f"facegender: {where}: lost another rank ({type(e).__name__}: {str(e).splitlines()[0]}); {out} keeps "
              f"its last finished epoch: continue with the same command and --resume", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
