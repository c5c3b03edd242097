"""Hostile input: files and requests crafted to hurt, through `facegender predict`, `evaluate`, `Classifier`
and every endpoint of a real `facegender serve` process; each gets its documented code and message, and the
process's peak memory stays under the bound `images.decoding_cost` states (the server's under its budget)."""
from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import skimage.data
from PIL import EpsImagePlugin, Image

from facegender.detect import MAX_SIDE
from facegender.images import open_image

ASTRONAUT = pathlib.Path(skimage.data.__file__).parent / "astronaut.png"
SLACK_MB = 64  # the allocator's and the interpreter's own growth beside the stated bound
BUDGET_MB = 400  # the test server's --max-memory-mb
BODY_TIMEOUT = 3  # the test server's --body-timeout, in seconds


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int = 8, colour: int = 0, rows: int | None = None) -> bytes:
    """A PNG of black rows, compressed as it is made (no full-size array): ``rows`` fewer than ``height``
    makes a header that lies about the data behind it."""
    channels = {0: 1, 2: 3, 6: 4}[colour]
    row = bytes(1 + width * channels * depth // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows))
    data += z.flush() if rows is None else z.flush(zlib.Z_SYNC_FLUSH)  # a lying header: the stream just stops
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def png_with_text(chunks: int) -> bytes:
    """A 16 x 16 PNG carrying ``chunks`` compressed text chunks of 1 MB each: a 200 KB file."""
    text = b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"a" * 1_000_000)) for i in range(chunks))
    image = png(16, 16)
    return image[:33] + text + image[33:]  # after the signature and IHDR


def tiff(width: int, height: int, data: bytes) -> bytes:
    """An uncompressed 8-bit greyscale TIFF whose header says ``width`` x ``height``, whatever ``data`` holds."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, width * height)]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = b"".join(struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else
                   struct.pack("<HHII", tag, kind, 1, offset if tag == 273 else value) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + ifd + b"\x00" * 4 + data


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossless WebP whose header claims ``width`` x ``height``: libwebp would take 4 bytes a pixel
    for its canvas as soon as Pillow opened it."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (90, 90, 90)), "WEBP", lossless=True))
    bits = int.from_bytes(data[21:25], "little")
    data[21:25] = ((bits & ~0x0FFFFFFF) | (width - 1) | (height - 1) << 14).to_bytes(4, "little")
    return bytes(data)


def gif_with_frames(side: int, frames: int) -> bytes:
    """A GIF whose first frame is ``side`` pixels square and which has ``frames`` more after it."""
    first = encoded(Image.new("P", (side, side), 0), "GIF")
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"  # 1x1: clear, 0, end
    return first[:-1] + frame * frames + b"\x3b"


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
       b"0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n")
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>\n'

# name -> (the file's bytes, its status from the API, words its error holds; None for an answer)
HOSTILE = {
    "bomb16.png": (lambda: png(9000, 9000, depth=16), 400, "decompression bomb"),  # the 157 KB file
    "bomb.png": (lambda: png(12000, 12000, colour=2), 400, "decompression bomb"),
    "bomb.jpg": (lambda: jpeg_claiming(60000, 60000), 400, "decompression bomb"),
    "bomb.tif": (lambda: tiff(20000, 20000, b"\x00" * 100), 400, "decompression bomb"),
    "bomb.webp": (lambda: webp_claiming(16000, 16000), 400, "decompression bomb"),
    "lying.png": (lambda: png(4000, 4000, colour=2, rows=3), 400, "truncated"),
    "lying.tif": (lambda: tiff(3000, 3000, b"\x00" * 100), 400, "truncated"),
    "cut.png": (lambda: ASTRONAUT.read_bytes()[:30000], 400, "truncated"),
    "text.png": (lambda: png_with_text(200), 400, "corrupt (ValueError: Too much memory used in text chunks"),
    "drawing.eps": (lambda: EPS, 415, "not a supported image (EPS"),
    "drawing.svg": (lambda: SVG, 415, "not a supported image (SVG"),
    "notes.png": (lambda: b"just some text\n" * 100, 415, "not an image"),
    "frames.gif": (lambda: gif_with_frames(2000, 20000), 200, None),
    "grey16.png": (lambda: png(6000, 6000, depth=16), 200, None),  # under the budget: reduced in strips
    "big.png": (lambda: png(7000, 7000, colour=2), 200, None),
    "big-rgba.png": (lambda: png(5000, 5000, colour=6), 200, None),
    "big.tif": (lambda: encoded(Image.new("L", (6000, 6000)), "TIFF", compression="tiff_deflate"), 200, None),
    "big.jpg": (lambda: encoded(Image.new("RGB", (7000, 7000), (40, 40, 40)), "JPEG"), 200, None),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("hostile")
    for name, (make, _, _) in HOSTILE.items():
        (folder / name).write_bytes(make())
    return folder


def cost_mb(data: bytes, name: str, min_side: int | None = MAX_SIDE) -> float:
    """The bound `images` states for decoding this file as predict and serve do (``min_side`` None: whole,
    as evaluate does); 0 for a refused one."""
    try:
        opened = open_image(data, name, min_side)
    except Exception:
        return 0.0
    opened.image.close()
    return opened.cost / 2**20


def status_mb(pid: int, field: str) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_rss_of(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``facegender ARGS`` in a child process: its result and its own peak resident memory, in MiB."""
    code = ("import resource, sys\nfrom facegender.cli import main\ncode = main(sys.argv[1:])\n"
            "print(f'PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}', file=sys.stderr)\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900)
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK ")]
    assert peak, done.stderr[-3000:]
    return done, float(peak[-1].split()[1])


def test_predict_names_each_hostile_file_and_stays_under_the_stated_bound(corpus, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "astronaut.png").write_bytes(ASTRONAUT.read_bytes())
    _, baseline = peak_rss_of(["predict", str(good), "--workers", "1"])
    done, peak = peak_rss_of(["predict", *(str(corpus / name) for name in HOSTILE), "--workers", "1"])
    assert done.returncode == 1, done.stderr[-2000:]  # some files failed, none crashed it
    assert "Traceback" not in done.stderr
    rows = {pathlib.Path(row["source"]).name: row for row in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == set(HOSTILE)
    for name, (_, status, words) in HOSTILE.items():
        if words is None:
            assert rows[name]["error"] is None, rows[name]
        else:
            assert f"{name}: {words}" in rows[name]["error"], rows[name]
    bound = max(cost_mb((corpus / name).read_bytes(), name) for name in HOSTILE)
    assert peak - baseline <= bound + SLACK_MB, (peak, baseline, bound)


def test_predict_refuses_above_its_own_max_pixels(corpus):
    done = subprocess.run([sys.executable, "-m", "facegender.cli", "predict", str(corpus / "big.jpg"),
                           "--max-pixels", "1000000"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    row = json.loads(done.stdout)
    assert "decompression bomb" in row["error"] and "more than the 1 M allowed (--max-pixels)" in row["error"]


def test_the_classifier_answers_each_hostile_file_and_never_runs_ghostscript(corpus, bundled_classifier,
                                                                            monkeypatch):
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)  # as where it is installed
    for name, (_, status, words) in HOSTILE.items():
        (pred, *_) = bundled_classifier.predict([corpus / name])
        assert (pred.error is None) if words is None else (f"{name}: {words}" in pred.error), (name, pred)
    assert ran == []


@pytest.mark.needs_eval
def test_evaluate_skips_hostile_files_and_names_why(corpus, tmp_path):
    data = tmp_path / "data"
    for label in ("female", "male"):
        (data / "test" / label).mkdir(parents=True)
        (data / "test" / label / "astronaut.png").write_bytes(ASTRONAUT.read_bytes())
    _, baseline = peak_rss_of(["evaluate", "descriptor", str(data), "--out", str(tmp_path / "plain")])
    hostile = {"bomb16.png": "bomb16.png", "drawing.eps": "drawing.png", "lying.png": "lying.png",
               "frames.gif": "frames.gif", "grey16.png": "grey16.png"}  # split folders hold image suffixes only
    for name, saved in hostile.items():
        (data / "test" / "female" / saved).write_bytes((corpus / name).read_bytes())
    out = tmp_path / "eval"
    done, peak = peak_rss_of(["evaluate", "descriptor", str(data), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    skipped = json.loads((out / "metrics.json").read_text())
    report = json.dumps(skipped)
    for words in ("bomb16.png\": \"decompression bomb", "drawing.png\": \"not a supported image (EPS",
                  "lying.png\": \"truncated"):
        assert words in report, (words, report[-1500:])
    bound = max(cost_mb((corpus / name).read_bytes(), name, None) for name in hostile)
    assert peak - baseline <= bound + SLACK_MB, (peak, baseline, bound)


# ---- the server: a real `facegender serve` process on loopback ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`facegender serve` with a small budget and a short body timeout; yields (url, pid, log path)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "facegender.cli", "serve", "--port", str(port),
                                 "--max-memory-mb", str(BUDGET_MB), "--body-timeout", str(BODY_TIMEOUT)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    try:
        yield url, proc.pid, log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=120) as c:
        c.post("/v1/predict", files={"file": ("a.png", ASTRONAUT.read_bytes())})  # warm: model, threads, arenas
        yield c


def _check(r: httpx.Response, name: str, status: int, words: str | None) -> None:
    assert r.status_code == status, (name, r.status_code, r.text[:500])
    if words is not None:
        error = r.json()["error"]
        assert f"{name}: {words}" in error and "\n" not in error, error


def test_every_endpoint_answers_each_hostile_file_within_the_stated_bound(server, client, corpus):
    _, pid, log = server
    baseline = status_mb(pid, "VmHWM")
    for name, (_, status, words) in HOSTILE.items():
        data = (corpus / name).read_bytes()
        _check(client.post("/v1/predict", files={"file": (name, data)}), name, status, words)
        _check(client.post("/v1/predict", json={"image": base64.b64encode(data).decode(), "name": name}),
               name, status, words)
        for r in (client.post("/v1/predict/batch", files=[("files", (name, data)), ("files", ("a.png", ASTRONAUT.read_bytes()))]),
                  client.post("/v1/predict/batch", json={"images": [
                      {"image": base64.b64encode(data).decode(), "name": name},
                      {"image": base64.b64encode(ASTRONAUT.read_bytes()).decode(), "name": "a.png"}]})):
            assert r.status_code == 200, r.text[:500]
            mine, astronaut = r.json()["results"]
            assert astronaut["predictions"][0]["label"] == "female"  # the bad file is its own answer only
            assert (mine.get("error") is None) if words is None else (f"{name}: {words}" in mine["error"])
    bound = max(cost_mb((corpus / name).read_bytes(), name) for name in HOSTILE)
    peak = status_mb(pid, "VmHWM")
    assert peak - baseline <= bound + SLACK_MB, (peak, baseline, bound)
    assert "Traceback" not in log.read_text()


def test_the_16_bit_bomb_is_refused_before_it_costs_memory(server, client, corpus):
    _, pid, _ = server
    before = status_mb(pid, "VmHWM")
    r = client.post("/v1/predict", files={"file": ("bomb16.png", (corpus / "bomb16.png").read_bytes())})
    assert r.status_code == 400 and "9000 x 9000 = 81.0 M pixels" in r.json()["error"]
    assert status_mb(pid, "VmHWM") - before < SLACK_MB


def raw(url: str, request: bytes, wait: float = 60) -> bytes:
    """Send ``request`` as is and read until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def json_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_a_stalled_body_and_a_lying_content_length_end_in_408_and_a_closed_connection(server):
    url = server[0]
    for sent in (b"", b"--x\r\n"):  # nothing of the body, or some of it
        status, error = json_error(raw(url, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                                            b"form-data; boundary=x\r\nContent-Length: 1000\r\n\r\n" + sent))
        assert status == 408 and f"not complete within {BODY_TIMEOUT} s" in error, error


def test_a_request_head_that_never_ends_is_408_and_an_oversized_one_431(server):
    url = server[0]
    status, error = json_error(raw(url, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n"))
    assert status == 408 and "request head" in error
    status, error = json_error(raw(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"))
    assert status == 431 and "KiB" in error
    status, error = json_error(raw(url, b"NOT HTTP AT ALL\r\n\r\n"))
    assert status == 400 and "malformed HTTP request" in error


def test_a_client_hanging_up_mid_upload_is_one_info_line(server):
    url, _, log = server
    before = log.read_text().count("disconnected before its request body was complete")
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"a" * 5000)
        time.sleep(0.5)
    deadline = time.time() + 30
    while log.read_text().count("disconnected before its request body was complete") == before:
        assert time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    text = log.read_text()
    assert text.count("disconnected before its request body was complete") == before + 1
    assert "Traceback" not in text and "ClientDisconnect" not in text


def test_requests_beyond_the_memory_budget_get_503_with_retry_after_and_it_recovers(server, client, corpus):
    """Stalled uploads hold what they sent, counted against the budget; an image that needs more than is
    left is refused at once, and answered once the stalled uploads have timed out."""
    url, pid, _ = server
    big = (corpus / "big.png").read_bytes()
    held = int(BUDGET_MB * 2**20 - cost_mb(big, "big.png") * 2**20 / 2)  # what is left is half the image's need
    part = 8 * 2**20
    host, port = url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(held // part + 1):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 10000000\r\n\r\n" + b"a" * part)
        stalled.append(s)
    try:
        deadline = time.time() + 30
        while client.get("/healthz").json()["memory_in_flight_mb"] < held / 2**20 - 1:
            assert time.time() < deadline, client.get("/healthz").json()
            time.sleep(0.05)
        r = client.post("/v1/predict", files={"file": ("big.png", big)})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "memory budget" in r.json()["error"]
        for s in stalled:  # they are dropped at the body timeout, with a 408 each
            s.settimeout(60)
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for s in stalled:
            s.close()
    assert client.post("/v1/predict", files={"file": ("big.png", big)}).status_code == 200
    health = client.get("/healthz").json()
    assert health["memory_peak_mb"] <= BUDGET_MB and health["memory_in_flight_mb"] == 0


def test_concurrent_heavy_images_are_answered_or_refused_never_swell_the_process(server, client, corpus):
    _, pid, _ = server
    big = (corpus / "big.png").read_bytes()
    baseline = status_mb(pid, "VmHWM")

    def send(i):
        return client.post("/v1/predict", files={"file": (f"{i}.png", big)})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(6)))
    assert {r.status_code for r in answers} <= {200, 503} and 200 in {r.status_code for r in answers}
    assert all(r.headers.get("retry-after") == "1" for r in answers if r.status_code == 503)
    assert status_mb(pid, "VmHWM") <= max(baseline, status_mb(pid, "VmRSS")) + BUDGET_MB + SLACK_MB


def test_json_edges_nested_huge_wrapped_base64_and_a_bad_entry_of_a_batch(client):
    data = ASTRONAUT.read_bytes()
    nested = b'{"image": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    r = client.post("/v1/predict", content=nested, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON body" in r.json()["error"]
    r = client.post("/v1/predict", content=b'{"image": "' + b"A" * (11 * 2**20) + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "upload limit of 10 MB" in r.json()["error"]
    plain = client.post("/v1/predict", json={"image": base64.b64encode(data).decode()}).json()["predictions"]
    wrapped = base64.encodebytes(data).decode()  # 76 columns, as the base64 tool prints
    assert "\n" in wrapped
    for text in (wrapped, "data:image/png;BASE64," + wrapped):
        r = client.post("/v1/predict", json={"image": text})
        assert r.status_code == 200 and r.json()["predictions"] == plain, r.text
    r = client.post("/v1/predict/batch", json={"images": [
        {"image": "@@@", "name": "bad"}, "not an object", {"image": base64.b64encode(data).decode(), "name": "a"}]})
    assert r.status_code == 200, r.text
    bad, odd, good = r.json()["results"]
    assert "not valid base64" in bad["error"] and "expected an object" in odd["error"]
    assert good["predictions"][0]["label"] == "female"


def test_file_names_come_back_sanitised(client):
    data = ASTRONAUT.read_bytes()
    r = client.post("/v1/predict", files={"file": ("../../a\r\nb.png", data)})  # sent as a%0D%0Ab.png
    assert r.status_code == 200 and r.json()["source"] == "ab.png", r.text
    r = client.post("/v1/predict", json={"image": base64.b64encode(b"text").decode(), "name": 'C:\\x\\"bad\r\nname"'})
    assert r.status_code == 415 and r.json()["error"].startswith("badname: not an image"), r.text
