"""Where a `facegender serve` request's CPU time goes, stage by stage, for each backend, in one run.

On single-face photos as `serve_load.py` sends them (SCUT-FBP5500 portraits, else the astronaut's head),
times each step that serve runs for a request, in this process with one thread: decoding the upload,
face detection with landmarks, cutting the model's input (the descriptor model's 150x150 chip), and the
model at batch 1 and at the micro-batch ``--batch`` for torch fp32 and onnxruntime fp32. Figures are CPU
milliseconds of this thread (``time.thread_time``), which other programs on a shared machine barely
move; medians of ``--rounds`` rounds taken in turn. What `serve_load.py` reports as the server's CPU per
request, minus these stages, is the HTTP side (uvicorn, FastAPI, multipart parsing, JSON).

In the server the model runs in its own thread beside the event loop's pure-Python work. Each time a
thread gives up the GIL (PyTorch does, around every operator; onnxruntime once per run) it may wait up to
Python's switch interval (5 ms) to take it back from a thread running Python code. So the model is also
timed, in wall-clock ms per batch, while another thread runs Python code without pause, against the same
batch alone, in turns. Usage:
    python benchmarks/serve_stages.py [--photos 32] [--rounds 3] [--batch 4] [--model descriptor]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import torch

from facegender.images import decode_rgb
from facegender.inference import Classifier
from serve_load import photos


def cpu_ms(fn, items) -> float:
    """CPU milliseconds of this thread per item."""
    start = time.thread_time()
    for item in items:
        fn(item)
    return (time.thread_time() - start) * 1000 / len(items)


def wall_ms(fn, batch, seconds: float = 2.0, busy: bool = False) -> float:
    """Wall-clock ms per call of ``fn(batch)``, alone or beside a thread that runs Python code throughout."""
    stop = threading.Event()

    def python_work():
        while not stop.is_set():
            sum(i * i for i in range(1000))

    worker = threading.Thread(target=python_work, daemon=True)
    if busy:
        worker.start()
    try:
        fn(batch)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(batch)
            calls += 1
        return (time.perf_counter() - start) * 1000 / calls
    finally:
        stop.set()
        if busy:
            worker.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="faces per forward pass, as micro-batching makes them")
    parser.add_argument("--model", default="descriptor", help="a bundled model's name or a checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what serve gives the model on a 2-core machine: cpu_count // 2
    images = photos(args.photos)
    clfs = {backend: Classifier.from_checkpoint(args.model, precision="fp32", backend=backend)
            for backend in ("torch", "onnxruntime")}
    clf = clfs["torch"]
    decoded = [decode_rgb(data, name) for name, data in images]
    faces = [clf.detector.detect(image)[:1] for image in decoded]
    found = [(image, face) for image, face in zip(decoded, faces) if face]
    inputs = [clf.model.inputs(image, face[0], face[0].box) for image, face in found]
    batches = [inputs[i:i + args.batch] for i in range(0, len(inputs) - args.batch + 1, args.batch)]
    print(f"{len(images)} photos ({images[0][0]}, ...), faces found in {len(found)}; model {args.model}; "
          f"torch {torch.__version__}, 1 thread; CPU ms per photo or face, medians of {args.rounds} rounds", flush=True)
    stages = {
        "decode": (lambda item: decode_rgb(item[1], item[0]), images, 1),
        "detect + landmarks": (clf.detector.detect, decoded, 1),
        "model input (chip/crop)": (lambda f: clf.model.inputs(f[0], f[1][0], f[1][0].box), found, 1),
    }
    for backend, c in clfs.items():
        stages[f"model, {backend}, batch 1"] = (lambda x, c=c: c.logits([x]), inputs, 1)
        stages[f"model, {backend}, batch {args.batch}"] = (c.logits, batches, args.batch)
    times = {name: [] for name in stages}
    for _ in range(args.rounds):
        for name, (fn, items, per) in stages.items():
            times[name].append(cpu_ms(fn, items) / per)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in median.items():
        print(f"  {name:32s} {ms:7.2f} ms")
    front = median["decode"] + median["detect + landmarks"] + median["model input (chip/crop)"]
    contention = {(backend, busy): [] for backend in clfs for busy in (False, True)}
    for _ in range(args.rounds):
        for backend, busy in contention:
            contention[backend, busy].append(wall_ms(clfs[backend].logits, batches[0], busy=busy))
    print(f"model wall ms per batch of {args.batch}, alone / beside a thread running Python code:")
    for backend in clfs:
        alone, busy = (statistics.median(contention[backend, b]) for b in (False, True))
        print(f"  {backend:12s} {alone:7.1f} / {busy:7.1f} ms ({busy / alone:.2f}x)")
    for backend in clfs:
        model = median[f"model, {backend}, batch {args.batch}"]
        print(f"per request, {backend}: {front + model:.1f} ms CPU without the HTTP side (model "
              f"{100 * model / (front + model):.0f}%); on 2 cores at most {2000 / (front + model):.0f} requests/s")


if __name__ == "__main__":
    main()
