"""torchrun with 2 CPU processes (gloo) against one process: same run, resume, and every way a rank can end.

Run as a script (``python tests/test_distributed.py train ...``), this file is one rank of such a job that
pauses where FACEGENDER_TEST_PAUSE says (``_pause_at``): the tests then kill or signal it at a chosen point
of training (a step's forward or backward pass, validation, the checkpoint write, the wait for the image
cache) instead of at a point a clock happens to hit. The training itself is the real code, unchanged.

Every wait here is long enough for a busy 2-core machine (each launch imports torch in two processes and
trains for a few seconds); none of them is a speed target.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
LAUNCH_S = 600  # a whole job, start to end, on a busy 2-core machine
WAIT_S = 300  # one rank reaching a given point of its job


def _env(**extra) -> dict:
    # one thread per rank: two ranks share the two cores of a small machine instead of fighting over them
    return os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | extra


def _torchrun(*args, timeout=LAUNCH_S, **kw):
    return subprocess.run([*TORCHRUN, "-m", "facegender.cli", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=_env(), check=False, **kw)


def _history(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _small(tmp_path: Path) -> Path:
    """A config that keeps the dead-rank jobs short: 64-pixel images (the synthetic faces' own size)."""
    path = tmp_path / "small.yaml"
    path.write_text("image_size: 64\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(args: list, folder: Path, pause: str) -> list[subprocess.Popen]:
    """Two ranks of a job started the way torchrun starts them, without torchrun: nothing stops the survivor
    when a rank dies, so it meets the broken collective itself. Output goes to files (no pipe to fill)."""
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               FACEGENDER_TEST_PAUSE=pause, FACEGENDER_TEST_MARKS=str(folder))
    procs = []
    for rank in (0, 1):
        with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "train", *map(str, args)], stdout=out,
                                          stderr=err, env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}))
    return procs


def _wait_for_pause(folder: Path, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not (folder / "paused").is_file():
        for rank, proc in enumerate(procs):
            if proc.poll() is not None:
                pytest.fail(f"rank {rank} ended (status {proc.returncode}) before the pause: "
                            f"{(folder / f'rank{rank}.err').read_text()[-3000:]}")
        assert time.monotonic() < deadline, "no rank reached the pause"
        time.sleep(0.1)


def _end(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _ending(stderr: str, rank: int) -> str:
    """The one line a rank ends with; it says what happened, where the checkpoint is, what to run."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"facegender: rank {rank} of 2: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _checkpoint_epoch(run: Path) -> int:
    from facegender.checkpoint import load_torch

    tensors, meta = load_torch(run / "last.safetensors")  # whole: it loads, weights and all
    assert any(k.startswith("model.") for k in tensors)
    return meta["epoch"]


def test_two_processes_train_like_one(synthetic_dataset, tmp_path):
    """An epoch of 2 processes x 32 images is an epoch of 1 process x 64, within float tolerance.

    Same seed, same data, same order and augmentation (both draw them from the run's generator), the same
    global batch of 64 (torchrun's --batch-size is the global batch): 64 training images, so the epoch is one
    optimiser step, then validation. Batch norm is synchronised (``SyncBatchNorm2d``: the statistics of the
    whole global batch, on every rank). Dropout is 0 here: its masks are random draws per rank, the same
    distribution as one process but not the same numbers. precision fp32.

    Why one step: float32 sums added in another order differ in the last bits, and this fresh ResNet18's
    gradient is ill-conditioned (it is a small difference of large sums): on this CPU one process with 1
    thread and with 2 threads gives gradients 2.7% apart (relative L2), and Adam's first steps, sign-like,
    turn that into different weights after a few steps. So the test compares what rounding leaves exact and
    bounds the rest by what rounding does, with margins over the figures measured on a Xeon (AVX-512, 2
    cores), beside per-rank batch norm, which fails every bound:

    - the step's loss: relative 1e-5 (measured 0; per-rank statistics 1.7e-3)
    - batch-norm running statistics: 1e-3 of each tensor's largest value (measured 2.5e-5; per-rank 2.8e-2)
    - the gradient (Adam's first moment, 0.1 x gradient): 10% relative L2 (measured 1.9%; per-rank 66%)
    - the step taken by the weights: 25% relative L2 (measured 8.8%: Adam's first step is about
      lr x sign(gradient), so a gradient entry within rounding of 0 may turn its weight's step around)
    - validation loss after the step: 5% relative (measured 0.7%; per-rank 240%)
    """
    import torch

    from facegender.checkpoint import load_torch
    from facegender.config import load_config
    from facegender.model import build_model
    from facegender.train import train

    exact = tmp_path / "exact.yaml"
    exact.write_text("dropout: 0.0\nprecision: fp32\n")
    options = {"weights": "none", "epochs": 1, "seed": 0, "max_train_images": 64}
    train(load_config(exact, batch_size=64, **options), [str(synthetic_dataset)], tmp_path / "one",
          log=lambda *_: None)
    result = _torchrun("--config", exact, "--data", synthetic_dataset, "--out", tmp_path / "two", "--batch-size", 64,
                       *[x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", v)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout
    assert result.stdout.count("epoch  1") == 1  # rank 0 alone reports
    assert json.loads((tmp_path / "two" / "last.json").read_text())["world_size"] == 2

    (a,), (b,) = _history(tmp_path / "one"), _history(tmp_path / "two")
    one, _ = load_torch(tmp_path / "one" / "last.safetensors")
    two, _ = load_torch(tmp_path / "two" / "last.safetensors")
    assert sorted(one) == sorted(two)
    torch.manual_seed(0)  # where both runs started: new_run seeds, then builds the model
    start = {f"model.{k}": v for k, v in build_model("none", 0.0).state_dict().items()}

    def rel(keys, x, y, base=None):
        base = base or {k: 0 for k in keys}
        dx = torch.cat([(x[k] - base[k]).double().flatten() for k in keys])
        dy = torch.cat([(y[k] - base[k]).double().flatten() for k in keys])
        return ((dx - dy).norm() / dx.norm()).item()

    stats = [k for k in one if "running_" in k]
    weights = [k for k in one if k.startswith("model.") and "running_" not in k and one[k].is_floating_point()]
    moments = [k for k in one if k.endswith(".exp_avg")]
    figures = {
        "loss": abs(float(b["train_loss"]) / float(a["train_loss"]) - 1),
        "stats": max(((two[k] - one[k]).abs().max() / one[k].abs().max()).item() for k in stats),
        "gradient": rel(moments, one, two),
        "step": rel(weights, one, two, start),
        "val_loss": abs(float(b["val_loss"]) / float(a["val_loss"]) - 1),
    }
    print("2 x 32 against 1 x 64, relative differences:", {k: f"{v:.2g}" for k, v in figures.items()})
    bounds = {"loss": 1e-5, "stats": 1e-3, "gradient": 0.1, "step": 0.25, "val_loss": 0.05}
    assert all(figures[k] <= bounds[k] for k in bounds), (figures, bounds)
    assert a["train_acc"] == b["train_acc"]
    assert abs(float(a["val_acc"]) - float(b["val_acc"])) <= 2 / 32 + 1e-9  # two images near the threshold at most
    # the step was taken (equal weights are not merely the untouched initial ones), and is one Adam step
    lr = load_config().lr
    for k in weights:
        assert (two[k] - one[k]).abs().max() <= 2 * lr + 1e-6, k
    assert rel(weights, one, start) > 0.001


def _batch_norm_rank(rank: int, port: int, results: Path) -> None:
    """One of two gloo ranks: a small conv net with SyncBatchNorm2d, under DDP, on its half of a batch."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from facegender.distributed import leave, sync_batch_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 2
    sync_batch_norm(model)
    share = x[rank::2].clone().requires_grad_()
    ddp = DistributedDataParallel(model)  # kept: its hooks average the gradients in backward
    out = ddp(share)
    (out ** 2).mean().backward()
    torch.save({"out": out.detach(), "dx": share.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
                "buffers": dict(model.named_buffers())}, results / f"rank{rank}.pt")
    dist.barrier()  # as distributed.train does: no rank tears the group down while its peer still uses it
    dist.destroy_process_group()
    leave(0)  # as a torchrun rank ends: not in the interpreter's teardown, where gloo's threads can abort it


def test_synchronised_batch_norm_is_batch_norm_of_the_whole_batch(tmp_path):
    """2 ranks x 4 images through SyncBatchNorm2d = BatchNorm2d on all 8: outputs, every gradient, running
    statistics, to float precision (a well-conditioned net, unlike a fresh ResNet18)."""
    import torch
    import torch.multiprocessing as mp
    from torch import nn

    mp.start_processes(_batch_norm_rank, args=(_free_port(), tmp_path), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    x = (torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 2).requires_grad_()
    out = model(x)
    (out ** 2).mean().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["out"], out.detach()[r::2], rtol=1e-5, atol=1e-6)
        # each rank's loss is the mean over its half: its input gradient is twice the whole batch's
        torch.testing.assert_close(got["dx"] / 2, x.grad[r::2], rtol=1e-5, atol=1e-7)
        for name, param in model.named_parameters():  # DDP averaged the ranks' gradients
            torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
        for name, buffer in model.named_buffers():  # the same running statistics on every rank
            torch.testing.assert_close(got["buffers"][name], buffer, rtol=1e-5, atol=1e-7, msg=name)


LEAVING = """
import atexit, pathlib, sys
from facegender import distributed
atexit.register(lambda: pathlib.Path(sys.argv[1]).write_text("exit handlers ran"))
print("a row still in stdout's buffer")
print("a line still in stderr's", file=sys.stderr)
distributed.leave(3)
print("after leave")
"""


def test_a_rank_leaves_with_its_status_its_output_and_its_exit_handlers(tmp_path):
    """``distributed.leave`` skips the interpreter's teardown, not what a normal exit does before it."""
    marker = tmp_path / "marker"
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    done = subprocess.run([sys.executable, "-c", LEAVING, str(marker)], capture_output=True, text=True,
                          timeout=LAUNCH_S, env=env, check=False)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "a row still in stdout's buffer\n" and "a line still in stderr's" in done.stderr
    assert marker.read_text() == "exit handlers ran"


def test_resume_under_torchrun_continues_exactly(synthetic_dataset, tmp_path):
    common = ["--weights", "none", "--batch-size", 16, "--seed", 3, "--config", _small(tmp_path)]
    straight = _torchrun("--data", synthetic_dataset, "--out", tmp_path / "straight", "--epochs", 2, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _torchrun("--data", synthetic_dataset, "--out", tmp_path / "resumed", "--epochs", 1, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _torchrun("--out", tmp_path / "resumed", "--resume", "--epochs", 2)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [r["epoch"] for r in b] == ["1", "2"]
    for x, y in zip(a, b):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(x[key]) == pytest.approx(float(y[key]), abs=1e-4), key


# moment (where the victim pauses, always after the first epoch's checkpoint unless it is the cache),
# the rank that pauses and is killed, and what the survivor was doing when it lost it
LOST_RANK = [
    ("forward", 1, "a training step"),  # the survivor waits in a batch-norm all-gather of the forward pass
    ("backward", 1, "the gradient all-reduce of a training step"),
    ("validation", 1, "validation"),  # the survivor waits to gather the validation logits
    ("write", 0, "a training step"),  # rank 0 dies between writing its checkpoint and renaming it
    ("cache", 0, "the wait for the image cache"),  # rank 0 dies while rank 1 waits for it at the barrier
]


@pytest.mark.parametrize("moment, victim, doing", LOST_RANK, ids=[m[0] for m in LOST_RANK])
def test_a_lost_rank_ends_the_other_with_what_to_do(synthetic_dataset, tmp_path, moment, victim, doing):
    run = tmp_path / "run"
    procs = _ranks(["--data", synthetic_dataset, "--out", run, "--weights", "none", "--epochs", 50,
                    "--batch-size", 16, "--config", _small(tmp_path)], tmp_path, f"{moment}:{victim}")
    try:
        _wait_for_pause(tmp_path, procs)
        procs[victim].kill()
    finally:
        _end(procs)
    survivor = 1 - victim
    assert procs[survivor].returncode == 1
    line = _ending((tmp_path / f"rank{survivor}.err").read_text(), survivor)
    assert f"lost contact with another rank during {doing} (" in line, line
    command = ("torchrun --standalone --nproc-per-node 2 -m facegender.cli train --out "
               f"{shlex.quote(str(run))} --resume")
    if moment == "cache":
        assert "no epoch had finished, so there is no checkpoint yet: start again with torchrun" in line, line
        assert not (run / "last.safetensors").exists()
        return
    assert _checkpoint_epoch(run) == 1  # the victim paused in epoch 2 (its checkpoint unrenamed, for "write")
    assert line.endswith(f"; the last checkpoint is {run / 'last.safetensors'} (epoch 1): continue with "
                         f"{command}"), line


def test_a_signal_during_the_checkpoint_write_waits_for_it(synthetic_dataset, tmp_path):
    """SIGTERM while rank 0 writes its checkpoint: the write finishes, then the rank ends with its line."""
    run = tmp_path / "run"
    procs = _ranks(["--data", synthetic_dataset, "--out", run, "--weights", "none", "--epochs", 50,
                    "--batch-size", 16, "--config", _small(tmp_path)], tmp_path, "write-until-signal:0")
    try:
        _wait_for_pause(tmp_path, procs)
        procs[0].send_signal(signal.SIGTERM)
    finally:
        _end(procs)
    assert procs[0].returncode == 143
    line = _ending((tmp_path / "rank0.err").read_text(), 0)
    assert line.startswith("facegender: rank 0 of 2: stopped by SIGTERM"), line
    assert _checkpoint_epoch(run) == 2  # the write that the signal met, finished
    assert f"{run / 'last.safetensors'} (epoch 2): continue with torchrun" in line, line
    assert not list(run.glob(".*.tmp"))
    assert procs[1].returncode != 0
    assert "(epoch 2)" in _ending((tmp_path / "rank1.err").read_text(), 1)


def _rank_logs(logs: Path) -> dict[int, str]:
    """Each rank's stderr, as torchrun's --redirects 3 --log-dir kept it."""
    return {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}


def _torchrun_ranks(parent: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun started."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
        except (OSError, ValueError):
            continue
        if ppid == parent and "RANK" in env:
            ranks[int(env["RANK"])] = int(proc.name)
    return ranks


def test_a_dead_rank_ends_every_rank_with_a_message(synthetic_dataset, tmp_path):
    """Under torchrun: rank 1 dies in a training step; rank 0 ends with one line (whichever comes first: the
    broken collective or torchrun's SIGTERM), and the command in it continues the run to its end."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    launcher = [*TORCHRUN, "--log-dir", str(logs), "--redirects", "3", str(SCRIPT)]
    proc = subprocess.Popen([*launcher, "train", "--data", str(synthetic_dataset), "--out", str(run), "--weights",
                             "none", "--epochs", "3", "--batch-size", "16", "--config", str(_small(tmp_path))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(FACEGENDER_TEST_PAUSE="forward:1", FACEGENDER_TEST_MARKS=str(tmp_path)))
    try:
        deadline = time.monotonic() + WAIT_S
        while not (tmp_path / "paused").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "rank 1 did not reach its pause"
            time.sleep(0.1)
        os.kill(_torchrun_ranks(proc.pid)[1], signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    line = _ending(_rank_logs(logs)[0], 0)
    assert "stopped by SIGTERM" in line or "lost contact with another rank during a training step" in line, line
    assert not list(run.glob(".*.tmp"))
    assert _checkpoint_epoch(run) == 1
    continue_with = line.split(": continue with ", 1)[1]
    assert shlex.split(continue_with) == [*launcher, "train", "--out", str(run), "--resume"]
    result = subprocess.run(shlex.split(continue_with), capture_output=True, text=True, timeout=LAUNCH_S, env=_env(),
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in _history(run)] == ["1", "2", "3"]


@pytest.mark.parametrize("sig, words", [(signal.SIGTERM, "stopped by SIGTERM"), (signal.SIGINT, "interrupted by SIGINT")],
                         ids=["SIGTERM", "SIGINT"])
def test_stopping_torchrun_ends_every_rank_with_a_message(synthetic_dataset, tmp_path, sig, words):
    """The user (or a scheduler) stops torchrun; it passes the signal on, and each rank says what to run next."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = subprocess.Popen([*TORCHRUN, "--log-dir", str(logs), "--redirects", "3", "-m", "facegender.cli", "train",
                             "--data", str(synthetic_dataset), "--out", str(run), "--weights", "none", "--epochs",
                             "50", "--batch-size", "16", "--config", str(_small(tmp_path))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.monotonic() + WAIT_S
        while not (run / "last.json").is_file():  # last.json follows last.safetensors: epoch 1 is on disk
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not finish an epoch"
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    epoch = _checkpoint_epoch(run)
    for rank, stderr in sorted(_rank_logs(logs).items()):
        line = _ending(stderr, rank)
        assert words in line, line
        # rank 1 may read the checkpoint while rank 0 finishes writing the next one (the signal waits for it)
        assert f"(epoch {epoch}): continue with " in line or f"(epoch {epoch - 1}): continue with " in line, line
    assert sorted(_rank_logs(logs)) == [0, 1]
    assert not list(run.glob(".*.tmp"))


# ---- run as a script: one rank that pauses where FACEGENDER_TEST_PAUSE ("moment:rank") says ----

def _pause_at(moment: str, victim: int, marks: Path) -> None:
    import facegender.train as training
    from facegender import distributed

    replace = os.replace

    def pause(until_signal: bool = False) -> None:
        (marks / "paused.tmp").write_text(moment)
        replace(marks / "paused.tmp", marks / "paused")  # appears complete: the test reads it at once
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline and not (until_signal and distributed._signals.pending):
            time.sleep(0.05)

    if int(os.environ["RANK"]) != victim:
        return
    step, predict, cached = training.train_step, training.predict_split, training.cached_images
    if moment == "forward":
        training.train_step = lambda run, *a, **k: (run.epoch >= 1 and pause(), step(run, *a, **k))[1]
    elif moment == "backward":  # between the forward pass and the backward pass: zero_grad
        def arm(run, *a, **k):
            if run.epoch >= 1 and not hasattr(run.optimizer, "_paused"):
                run.optimizer._paused, clear = True, run.optimizer.zero_grad
                run.optimizer.zero_grad = lambda *za, **zk: (pause(), clear(*za, **zk))[1]
            return step(run, *a, **k)
        training.train_step = arm
    elif moment == "validation":
        training.predict_split = lambda run, b, split: (run.epoch >= 1 and pause(), predict(run, b, split))[1]
    elif moment.startswith("write"):  # the second checkpoint is written in full, but not yet renamed
        seen = []

        def slow_replace(src, dst, *a, **k):
            if Path(dst).name == "last.safetensors":
                seen.append(dst)
                if len(seen) == 2:
                    pause(until_signal=moment == "write-until-signal")
            return replace(src, dst, *a, **k)
        os.replace = slow_replace
    elif moment == "cache":
        training.cached_images = lambda *a, **k: (pause(), cached(*a, **k))[1]
    else:
        raise ValueError(f"FACEGENDER_TEST_PAUSE: unknown moment {moment!r}")


if __name__ == "__main__":
    if os.environ.get("FACEGENDER_TEST_PAUSE"):
        where, rank = os.environ["FACEGENDER_TEST_PAUSE"].rsplit(":", 1)
        _pause_at(where, int(rank), Path(os.environ["FACEGENDER_TEST_MARKS"]))
    from facegender.cli import main

    sys.exit(main())
