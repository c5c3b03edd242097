"""Load on `facegender serve`: N concurrent clients for T seconds, micro-batching off and on, onnxruntime
and torch, in one run.

Starts the server itself (the bundled model, a free loopback port), once per mode and backend, and sends
single-face photos as multipart uploads: SCUT-FBP5500 portraits from ../shared/data when present (350x350
JPEGs, one face each), else scikit-image's astronaut cut to her head and shoulders. Prints requests/s,
p50/p99 latency, errors (a non-200 answer, a failed request, or an answer without exactly one labelled
face), the server's and the clients' CPU time per request, and the server's resident memory after warm-up
and at the end. Usage:
    python benchmarks/serve_load.py --clients 8 --seconds 30 [--backend onnxruntime,torch] [--model CHECKPOINT] [--cold]
``--cold`` times a server's first seconds instead of a warmed-up one: no warm-up, and a cache folder of its
own (FACEGENDER_CACHE), so what a first start does (MNN's conversion and load, where it runs) falls in the
timed window, and the max latency shows it.
The last line reads: serve: R req/s, p50 A ms, p99 B ms, E errors (clients N, micro-batching on), for
the first backend named (onnxruntime by default: what serve picks for the default model).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from common import SHARED


def photos(n: int) -> list[tuple[str, bytes]]:
    folder = SHARED / "scut_fbp5500" / "img"
    if folder.is_dir():
        return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())[::max(1, 5500 // n)][:n]]
    import skimage.data
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).crop((110, 10, 340, 260)).save(out, format="JPEG", quality=90)
    return [("astronaut-head.jpg", out.getvalue())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_pids(pid: int) -> list[int]:
    return [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rss_mib(pid: int) -> float:
    """Resident memory of the server and its worker processes, from /proc."""
    total = 0
    for p in server_pids(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the server and its workers have used: unlike wall time, barely moved by
    other programs sharing the machine."""
    ticks = 0
    for p in server_pids(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def start_server(port: int, micro_batching: bool, workers: int, backend: str, model: str | None,
                 threads: int | None, cache: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "facegender.cli", "serve", *([model] if model else []), "--port", str(port),
           "--workers", str(workers), "--backend", backend, *(["--model-threads", str(threads)] if threads else [])]
    if not micro_batching:
        cmd.append("--no-micro-batching")
    log = tempfile.TemporaryFile()  # a file, not a pipe: the access log of thousands of requests would fill a pipe
    env = os.environ | ({"FACEGENDER_CACHE": cache} if cache else {})
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 900  # a loaded machine takes minutes to import torch and load the model
    while True:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"serve_load: the server exited: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            sys.exit("serve_load: the server did not start within 15 minutes")
        time.sleep(0.2)


async def load(url: str, images: list[tuple[str, bytes]], clients: int, seconds: float,
               timeout: float = 60) -> tuple[list[float], int]:
    """``clients`` clients upload ``images`` in turn to ``url`` for ``seconds``: (latencies in seconds, errors:
    anything but a 200 with the image's own name and one face)."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            name, data = images[i % len(images)]
            i += clients
            start = time.perf_counter()
            try:
                r = await http.post(url, files={"file": (name, data, "image/jpeg")})
                ok = r.status_code == 200 and r.json()["source"] == name and r.json()["faces"] == 1
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    return latencies, errors


def run(micro_batching: bool, images, clients: int, seconds: float, workers: int, backend: str,
        model: str | None, threads: int | None, cold: bool = False) -> dict:
    port = free_port()
    cache = tempfile.TemporaryDirectory(prefix="serve-load-cache-") if cold else None
    proc = start_server(port, micro_batching, workers, backend, model, threads, cache and cache.name)
    url = f"http://127.0.0.1:{port}/v1/predict"
    try:
        if not cold:
            asyncio.run(load(url, images, clients, min(5.0, seconds)))  # warm-up: threads, allocator, caches
        memory_start, cpu_start = rss_mib(proc.pid), cpu_seconds(proc.pid)
        start, client_start = time.perf_counter(), time.process_time()
        latencies, errors = asyncio.run(load(url, images, clients, seconds))
        elapsed, client_cpu = time.perf_counter() - start, time.process_time() - client_start
        cpu = cpu_seconds(proc.pid) - cpu_start
        memory_end = rss_mib(proc.pid)
        health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if cache:
            cache.cleanup()
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()),
            "errors": errors, "requests": len(latencies), "mem_start": memory_start, "mem_end": memory_end,
            "mean_batch": health["faces"] / max(1, health["batches"]), "cpu_ms": 1000 * cpu / max(1, len(latencies)),
            "client_ms": 1000 * client_cpu / max(1, len(latencies))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30, help="timed seconds per mode (after 5 s of warm-up)")
    parser.add_argument("--photos", type=int, default=64, help="distinct photos the clients cycle through")
    parser.add_argument("--workers", type=int, default=1, help="server processes (facegender serve --workers)")
    parser.add_argument("--backend", default="onnxruntime,torch",
                        help="facegender serve --backend: onnxruntime (what serve picks for the default model), "
                             "torch, or both comma-separated (the default; run in turn, the last line for the first)")
    parser.add_argument("--model", help="a checkpoint or bundled model's name (default: the bundled default)")
    parser.add_argument("--micro-batching", choices=["both", "on", "off"], default="both")
    parser.add_argument("--model-threads", type=int, help="facegender serve --model-threads")
    parser.add_argument("--cold", action="store_true",
                        help="time the server's first seconds: no warm-up, and an empty cache folder of its own")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends or set(backends) - {"torch", "onnxruntime"}:
        parser.error(f"--backend {args.backend}: torch, onnxruntime or torch,onnxruntime")
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.micro_batching]
    images = photos(args.photos)
    print(f"{len(images)} single-face photos ({images[0][0]}, ...), {args.clients} clients, {args.seconds:g} s per "
          f"mode{' from a cold start' if args.cold else ''}, {args.workers} server process(es), {os.cpu_count()} CPUs; "
          "modes run one after the other", flush=True)
    results = {}
    for backend in backends:
        for on in modes:
            r = results[backend, on] = run(on, images, args.clients, args.seconds, args.workers, backend, args.model,
                                           args.model_threads, args.cold)
            print(f"{backend}, micro-batching {'on ' if on else 'off'}: {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, "
                  f"p99 {r['p99']:.0f} ms, max {r['max']:.0f} ms, {r['errors']} errors of {r['requests']}, mean batch "
                  f"{r['mean_batch']:.2f} faces, server CPU {r['cpu_ms']:.1f} ms/request (clients {r['client_ms']:.1f}), server memory "
                  f"{r['mem_start']:.0f} -> {r['mem_end']:.0f} MiB ({100 * (r['mem_end'] / r['mem_start'] - 1):+.1f}%)",
                  flush=True)
        if len(modes) == 2:
            on, off = results[backend, True], results[backend, False]
            print(f"{backend}: micro-batching on/off: {on['rps'] / off['rps']:.2f}x requests/s, "
                  f"p99 {on['p99'] / off['p99']:.2f}x, server CPU per request {on['cpu_ms'] / off['cpu_ms']:.2f}x")
    if len(backends) == 2:
        for on in modes:
            o, t = results["onnxruntime", on], results["torch", on]
            print(f"onnxruntime/torch, micro-batching {'on' if on else 'off'}: {o['rps'] / t['rps']:.2f}x requests/s, "
                  f"p99 {o['p99'] / t['p99']:.2f}x, server CPU per request {o['cpu_ms'] / t['cpu_ms']:.2f}x")
    on = modes[-1]
    for backend in backends[1:] + backends[:1]:  # the last line is the first backend's, as the issue reads it
        r = results[backend, on]
        print(f"serve: {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, {r['errors']} errors "
              f"(clients {args.clients}, micro-batching {'on' if on else 'off'}{', cold' if args.cold else ''})"
              + ("" if backend == backends[0] else f" [{backend}]"))


if __name__ == "__main__":
    main()
