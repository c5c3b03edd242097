"""Honest clients against `facegender serve` while attackers try to hurt it, beside the same clients alone.

Starts the server itself (the bundled model, a free loopback port, its default limits) and runs two
phases of --seconds each: honest clients alone (idle), then the same clients while attackers send
  - pixel bombs: the issue's 16-bit 9000 x 9000 PNG (81 M pixels), 8-bit 7000 x 7000 PNGs (49 M, under the
    pixel budget: each costs ~230 MB to decode) and batches of twelve 16-bit 6000 x 6000 PNGs,
  - stalled uploads: --stalled connections that send 9 MiB of a 10 MB body and stop,
  - --idle connections opened at once that send half a request head and wait,
each attacker reconnecting when the server drops it. Everything stays on loopback, and every attacker
stops with the phase: the counts and the time are bounded. Honest clients send single-face photos
(SCUT-FBP5500 portraits from ../shared/data when present, else the astronaut's head) as multipart
uploads; an honest error is a non-200 answer, a failed request, or an answer without exactly one face.
The server's resident memory is sampled every 50 ms from /proc, and its peak (VmHWM) read at the end.

Usage: python benchmarks/serve_hostile.py [--clients 4] [--seconds 20] [--stalled 20] [--idle 200]
The last line reads:
hostile: honest p99 A ms (idle B ms), peak RSS C MB, E errors for honest clients, attackers refused D
"""
from __future__ import annotations

import argparse
import asyncio
import os
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

from serve_load import free_port, load, photos, start_server


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A black PNG, compressed as it is made (no full-size array here): a few hundred KB on the wire."""
    row = bytes(1 + width * {0: 1, 2: 3}[colour] * depth // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Tally:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors = 0
        self.refused: dict[str, int] = {}  # attacks answered with an error or a closed connection, by kind
        self.answered: dict[str, int] = {}  # attacks the server answered 200 (a bomb under the pixel budget)


async def honest(url: str, images, clients: int, stop: float, tally: Tally) -> None:
    latencies, errors = await load(f"{url}/v1/predict", images, clients, stop - time.perf_counter(), timeout=120)
    tally.latencies += latencies
    tally.errors += errors


async def bombs(url: str, stop: float, tally: Tally) -> None:
    """One attacker each for the 16-bit bomb, the 49 M pixel PNG and the batch of twelve 36 M pixel PNGs."""
    bomb16, big, grey16 = png(9000, 9000, depth=16), png(7000, 7000, colour=2), png(6000, 6000, depth=16)
    attacks = {"pixel bomb (81 M, 16-bit)": {"files": {"file": ("bomb16.png", bomb16)}},
               "large image (49 M)": {"files": {"file": ("big.png", big)}},
               "batch of 12 x 36 M 16-bit": {"files": [("files", (f"{i}.png", grey16)) for i in range(12)]}}

    async def attack(kind: str, request: dict, http: httpx.AsyncClient) -> None:
        path = "/v1/predict/batch" if kind.startswith("batch") else "/v1/predict"
        while time.perf_counter() < stop:
            try:
                r = await http.post(f"{url}{path}", **request)
                good = r.status_code == 200 and not any(x.get("error") for x in r.json().get("results", []))
            except httpx.HTTPError:
                good = False
            book = tally.answered if good else tally.refused
            book[kind] = book.get(kind, 0) + 1
            if not good:
                await asyncio.sleep(0.2)  # as Retry-After asks, roughly: an attacker that hammers is refused faster

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(attack(kind, request, http) for kind, request in attacks.items()))


async def raw_attacker(host: str, port: int, opening: bytes, kind: str, stop: float, tally: Tally) -> None:
    """Send ``opening`` and wait for the server to answer or drop the connection; then again, until ``stop``."""
    while time.perf_counter() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(opening)
            await writer.drain()
            await asyncio.wait_for(reader.read(65536), max(0.1, stop - time.perf_counter()))
            tally.refused[kind] = tally.refused.get(kind, 0) + 1  # answered with an error, or dropped
        except (asyncio.TimeoutError, OSError):
            pass  # the phase ended first, or the server reset it
        finally:
            writer.close()


async def attack_phase(url: str, images, args, tally: Tally, honest_tally: Tally) -> None:
    stop = time.perf_counter() + args.seconds
    host, port = url.removeprefix("http://").split(":")
    stalled = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
               b"Content-Length: 10000000\r\n\r\n" + b"a" * (9 * 2**20))
    half_head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    await asyncio.gather(
        honest(url, images, args.clients, stop, honest_tally), bombs(url, stop, tally),
        *(raw_attacker(host, int(port), stalled, "stalled upload", stop, tally) for _ in range(args.stalled)),
        *(raw_attacker(host, int(port), half_head, "idle connection", stop, tally) for _ in range(args.idle)))


async def sample_rss(pid: int, until: asyncio.Event, peaks: list[float]) -> None:
    while not until.is_set():
        peaks.append(status_mb(pid, "VmRSS"))
        await asyncio.sleep(0.05)


async def with_rss(pid: int, work) -> float:
    done, peaks = asyncio.Event(), []
    sampler = asyncio.create_task(sample_rss(pid, done, peaks))
    try:
        await work
    finally:
        done.set()
        await sampler
    return max(peaks)


def p99(latencies: list[float]) -> float:
    return float(np.percentile(np.array(latencies) * 1000, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="honest clients, each one request at a time")
    parser.add_argument("--seconds", type=float, default=20, help="timed seconds per phase (after 5 s of warm-up)")
    parser.add_argument("--stalled", type=int, default=20, help="stalled 9 MiB uploads held open at once")
    parser.add_argument("--idle", type=int, default=200, help="connections sending half a head, held at once")
    parser.add_argument("--photos", type=int, default=64)
    args = parser.parse_args()
    images = photos(args.photos)
    print(f"{len(images)} single-face photos ({images[0][0]}, ...), {args.clients} honest clients, {args.seconds:g} s "
          f"per phase, attackers: 3 bomb senders, {args.stalled} stalled uploads, {args.idle} idle connections; "
          f"{os.cpu_count()} CPUs", flush=True)
    port = free_port()
    proc = start_server(port, True, 1, "auto", None, None)
    url = f"http://127.0.0.1:{port}"
    try:
        warm = Tally()
        asyncio.run(honest(url, images, args.clients, time.perf_counter() + 5, warm))
        idle = Tally()
        idle_rss = asyncio.run(with_rss(proc.pid, honest(url, images, args.clients,
                                                         time.perf_counter() + args.seconds, idle)))
        print(f"idle: {len(idle.latencies)} honest requests, p50 {np.percentile(idle.latencies, 50) * 1000:.0f} ms, "
              f"p99 {p99(idle.latencies):.0f} ms, {idle.errors} errors, server RSS up to {idle_rss:.0f} MB", flush=True)
        attacked, attacks = Tally(), Tally()
        attack_rss = asyncio.run(with_rss(proc.pid, attack_phase(url, images, args, attacks, attacked)))
        peak = status_mb(proc.pid, "VmHWM")
        health = httpx.get(f"{url}/healthz", timeout=60).json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    refused = sum(attacks.refused.values())
    print(f"under attack: {len(attacked.latencies)} honest requests, p50 "
          f"{np.percentile(attacked.latencies, 50) * 1000:.0f} ms, p99 {p99(attacked.latencies):.0f} ms "
          f"({p99(attacked.latencies) / p99(idle.latencies):.2f}x idle), {attacked.errors} errors, server RSS up to "
          f"{attack_rss:.0f} MB (sampled), peak {peak:.0f} MB (VmHWM)")
    print("attacks refused (error answer or dropped connection): " +
          ", ".join(f"{kind} {n}" for kind, n in sorted(attacks.refused.items())) +
          "; answered 200: " + (", ".join(f"{kind} {n}" for kind, n in sorted(attacks.answered.items())) or "none"))
    print(f"server budget: peak {health['memory_peak_mb']} MB in flight, {health['refused_busy']} refused busy (503)")
    print(f"hostile: honest p99 {p99(attacked.latencies):.0f} ms (idle {p99(idle.latencies):.0f} ms), peak RSS "
          f"{peak:.0f} MB, {attacked.errors} errors for honest clients, attackers refused {refused}")


if __name__ == "__main__":
    main()
