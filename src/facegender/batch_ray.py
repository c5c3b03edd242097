"""Batch prediction on a Ray cluster: ``facegender predict [CHECKPOINT] --ray ADDRESS SRC... --output DIR``.

Ray Data reads the files (``read_binary_files``, spread over the cluster); a pool of actors, each holding
one ``Classifier`` (and a GPU where the cluster has them), decodes, detects and classifies them in batches
with the same ``faces`` + ``classify`` calls as ``facegender predict``; the driver writes the rows as
Parquet shards (``part-*.parquet``, each written to a temporary file and renamed) with the columns of
``predict --format csv``. An image whose path is in a shard already is not labelled again, so a re-run
after an interruption, or over a folder that has grown, does only what is left.

Install with ``pip install 'facegender[ray]'`` on the driver and on every node; the images must be at the
same path on every node (a shared or replicated file system).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from .detect import DEFAULT_DETECTOR
from .inference import Prediction, expand_inputs
from .io import UserError, atomic_path

COLUMNS = ("source", "faces", "face", "box", "label", "confidence", "p_male", "error")
ROWS_PER_SHARD = 10_000


def _schema():
    import pyarrow as pa

    types = {"faces": pa.int32(), "face": pa.int32(), "confidence": pa.float64(), "p_male": pa.float64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in COLUMNS])


def prediction_row(pred: Prediction) -> dict:
    """A Prediction as a row of ``predict --format csv`` (the box as "x0 y0 x1 y1"; null for none)."""
    row = pred.to_dict()
    row["box"] = None if pred.box is None else " ".join(f"{v:g}" for v in pred.box)
    return row


class Labeler:
    """A Ray Data actor: one model, loaded once, labelling batch after batch of files' bytes."""

    def __init__(self, checkpoint: str | None, device: str, detect: bool, min_confidence: float, threads: int,
                 detector: str = DEFAULT_DETECTOR, min_face: float | None = None):
        from .inference import Classifier, resolve_backend

        threads = max(1, threads)
        if resolve_backend("auto", checkpoint) == "torch":  # PyTorch only where it runs the model
            import torch

            torch.set_num_threads(threads)
        self.clf = Classifier.from_checkpoint(checkpoint, device=device, detect=detect, detector=detector,
                                              min_face=min_face, min_confidence=min_confidence, threads=threads)

    def __call__(self, batch):
        import pyarrow as pa

        from .images import BadImage, decode

        items = []
        for data, path in zip(batch["bytes"], batch["path"]):
            try:
                # decoded as predict decodes a file (a big JPEG reduced while it decodes): the same answers
                image, scale = decode(self.clf.open(data, path))
                items.extend(self.clf.faces(path, image, scale=scale))
            except BadImage as e:
                items.append((Prediction(path, error=str(e)), None))
        done = iter(self.clf.classify([item for item in items if item[1] is not None]))
        preds = [next(done) if model_input is not None else stub for stub, model_input in items]
        return pa.Table.from_pylist([prediction_row(p) for p in preds], schema=_schema())


def labelled_sources(output: Path) -> set[str]:
    """The images that the shards in ``output`` hold rows for."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for shard in sorted(output.glob("part-*.parquet")):
        try:
            done.update(pq.read_table(shard, columns=["source"]).column("source").to_pylist())
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"{shard}: not a readable Parquet shard ({e.__class__.__name__}); "
                            "delete it to label its images again") from None
    return done


def _unreadable(path: str) -> Prediction | None:
    """The error row ``predict`` gives for a path that is not a readable file; None when it is one."""
    from .images import BadImage

    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return Prediction(path, error=str(BadImage(path, "unreadable", e.strerror or type(e).__name__)))
    return None


class ShardWriter:
    def __init__(self, output: Path):
        self.output, self.stamp, self.count, self.rows = output, time.strftime("%Y%m%d-%H%M%S"), 0, 0
        self.errors: list[str] = []

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        if not table.num_rows:
            return
        path = self.output / f"part-{self.stamp}-{os.getpid()}-{self.count:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table.cast(_schema()), tmp)
        self.count += 1
        self.rows += table.num_rows
        self.errors += [m for m in table.column("error").to_pylist() if m]


def _start_ray(address: str):
    try:
        import ray
    except ImportError:
        raise UserError("predict --ray needs Ray: pip install 'facegender[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=True)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(f"--ray {address}: cannot start or join Ray ({str(e).splitlines()[0]}); use local, "
                            "auto (a cluster this machine belongs to) or ray://HEAD:10001") from None
    return ray


def predict_ray(checkpoint: str | None, inputs: list[str], output: str | Path, address: str, *,
                device: str = "auto", detect: bool = True, min_confidence: float = 0.0, batch_size: int = 64,
                workers: int | None = None, rows_per_shard: int = ROWS_PER_SHARD, detector: str = DEFAULT_DETECTOR,
                min_face: float | None = None, log=print) -> dict:
    """Label ``inputs`` (files and folders) on Ray; returns counts: images, skipped (done before), rows, errors."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: with --ray this is a folder of Parquet shards, and a file is there")
    output.mkdir(parents=True, exist_ok=True)
    files = list(dict.fromkeys(os.path.abspath(p) for p in expand_inputs(inputs)))
    done = labelled_sources(output)
    todo = [f for f in files if f not in done]
    log(f"ray: {len(files)} images, {len(files) - len(todo)} already labelled in {output}, {len(todo)} to do")
    stats = {"images": len(files), "skipped": len(files) - len(todo), "rows": 0, "errors": 0}
    if not todo:
        return stats
    writer = ShardWriter(output)
    unreadable = [p for p in map(_unreadable, todo) if p is not None]
    readable = [f for f in todo if f not in {p.source for p in unreadable}]

    ray = _start_ray(address)
    import pyarrow as pa

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plans and timings; errors still show
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    workers = workers or gpus or max(1, cpus // 2)
    # the readers take a quarter CPU each and the actors share three quarters of the CPUs: actors that held
    # every CPU would leave none to read their input
    per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 0.75 * cpus / workers}
    log(f"ray: {workers} labelling actor(s) on {cpus} CPU(s), {gpus} GPU(s)")
    tables = [pa.Table.from_pylist([prediction_row(p) for p in unreadable], schema=_schema())]
    # a path made absolute for actors elsewhere; a bundled model's name stays a name
    model = os.path.abspath(checkpoint) if checkpoint and os.path.exists(checkpoint) else checkpoint
    if readable:
        labelled = ray.data.read_binary_files(readable, include_paths=True, num_cpus=0.25).map_batches(
            Labeler, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"checkpoint": model, "detector": detector, "min_face": min_face, "device": device,
                                   "detect": detect, "min_confidence": min_confidence,
                                   "threads": int(per_actor.get("num_cpus", 1))},
            **per_actor)
        tables = _chain(tables, labelled.iter_batches(batch_size=rows_per_shard, batch_format="pyarrow"))
    pending = []
    for table in tables:
        pending.append(table)
        if sum(t.num_rows for t in pending) >= rows_per_shard:
            writer.write(pa.concat_tables(pending))
            pending = []
    if pending:
        writer.write(pa.concat_tables(pending))
    for message in writer.errors:
        print(f"facegender: warning: {message}", file=sys.stderr)
    stats.update(rows=writer.rows, errors=len(writer.errors))
    log(f"ray: {writer.rows} rows in {writer.count} new shard(s) in {output}")
    return stats


def _chain(first: list, rest):
    yield from first
    yield from rest

