"""The HTTP API and web page: ``create_app(Classifier.from_checkpoint())``, served by ``facegender serve``.

Thin by design: requests are parsed and errors mapped here, everything else is ``inference.Classifier``.
Decoding and face detection run in a thread pool off the event loop; the faces of requests that arrive
together share one forward pass (``MicroBatcher``). Uploads are read into memory, never written to disk.

Hostile input is bounded at the edge: a request body must arrive within ``--body-timeout`` seconds and a
request head within ``HEAD_TIMEOUT`` (else 408); uploads and decoded images together stay within a memory
budget (``MemoryBudget``: beyond it 503 with Retry-After, never a swollen process); images decode only in
the formats of ``images.FORMATS`` and up to ``--max-pixels``; an image whose decoding is heavy takes a lane
of its own, so that it delays nobody else's; every error, the HTTP layer's too (``Protocol``), is the
API's JSON.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http import HTTPStatus
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
import h11
from pydantic import BaseModel
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from swagger_ui_bundle import swagger_ui_path
from uvicorn.protocols.http.h11_impl import H11Protocol

from .detect import DEFAULT_DETECTOR, FaceDetector
from .images import DEFAULT_MAX_PIXELS, BadImage, Opened, decode, limit_png_text, map_large_buffers
from . import checkpoint as checkpoint_files
from .facemodels import kind_of
from .inference import Classifier, Prediction, model_path, resolve_backend
from .io import UserError

MAX_BATCH_IMAGES = 32  # images in one /v1/predict/batch request
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a request's whole body to arrive (--body-timeout)
DEFAULT_MAX_MEMORY_MB = 512  # uploads and decoded images in flight, in MiB (--max-memory-mb)
HEAD_TIMEOUT = 10.0  # seconds for a request's head (request line and headers) to arrive
KEEP_ALIVE = 5  # seconds an idle kept-alive connection stays open
MAX_HEAD_BYTES = 16 * 1024  # a longer request head is refused with 431
MAX_CONNECTIONS = 1000  # connections beyond this are answered 503 and closed (under the usual 1024 descriptors)
HEAVY_BYTES = 32 * 1024 * 1024  # an image whose decoding holds more than this decodes in the heavy lane
MAX_JSON_VALUES = 4096  # objects, arrays and commas in a JSON body: a real request has a few dozen
MAX_NAME = 200  # characters of a file name kept
RETRY_AFTER = 1  # seconds, in a 503's Retry-After
log = logging.getLogger("uvicorn.error")  # the server's log, as uvicorn configures it
WEB = files("facegender") / "web"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
DOCS_STATIC = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}
# corpora whose licences allow non-commercial research only (README "Data licences", MODEL_CARD.md)
RESEARCH_ONLY = {"utkface": "UTKFace", "celeba": "CelebA", "scut_fbp5500": "SCUT-FBP5500"}


class ErrorBody(BaseModel):
    error: str  # one line: what is wrong and, where it helps, what to do


ERRORS = {status: {"model": ErrorBody, "description": why} for status, why in (
    (400, "a damaged image: truncated, empty, or a decompression bomb (over --max-pixels)"),
    (408, "the request body did not arrive within --body-timeout seconds"),
    (413, "over the upload limit, or an image too large to decode within the memory budget"),
    (415, "not an image, an image format not accepted (JPEG, PNG, WebP, GIF, BMP and TIFF are), or a body that "
          "is neither multipart/form-data nor JSON"),
    (422, "a malformed request: no image, bad base64 or JSON, an option out of range"),
    (503, "the server's memory budget is in use: retry after the Retry-After header's seconds"))}


class ApiError(Exception):
    """A request the API refuses: its HTTP status, a one-line reason for the JSON body, and headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class MemoryBudget:
    """Bytes of uploads and decoded images in flight, bounded: what does not fit is refused with 503 and
    Retry-After at once, not queued, so that the process never swells. Heavy images (``HEAVY_BYTES``) get
    three quarters of it at most: the rest stays for ordinary photos. Thread-safe: decoders take from it."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak, self.refused = limit, 0, 0, 0
        self._lock = threading.Lock()

    def take(self, n: int, what: str) -> None:
        ceiling = self.limit if n <= HEAVY_BYTES else self.limit * 3 // 4
        with self._lock:
            if n > ceiling:  # never fits, however long the client waits: the image's own error
                raise BadImage(what, "too large to decode here",
                               f"needs {n / 2**20:.0f} MB, more than the {ceiling / 2**20:g} MB the server's memory "
                               "budget gives one image: facegender serve --max-memory-mb")
            if self.used + n > ceiling:
                self.refused += 1
                raise ApiError(503, f"server busy: its memory budget of {self.limit / 2**20:g} MB is in use; "
                                    f"retry in {RETRY_AFTER} s", {"Retry-After": str(RETRY_AFTER)})
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Held:
    """What one request, or one image of it, has taken from the budget; given back all at once."""

    def __init__(self, budget: MemoryBudget, what: str):
        self.budget, self.what, self.bytes = budget, what, 0

    def take(self, n: int) -> None:
        self.budget.take(n, self.what)
        self.bytes += n

    def give_back(self) -> None:
        self.budget.give(self.bytes)
        self.bytes = 0


class MicroBatcher:
    """Faces from requests that arrive together go through the model in one forward pass.

    One task collects up to ``max_batch`` faces, waiting at most ``max_wait_ms`` after the first, and runs
    ``classifier.classify`` on them in the model's own thread. Disabled, each request's faces are one pass.
    """

    def __init__(self, classifier: Classifier, max_batch: int = 32, max_wait_ms: float = 5.0,
                 enabled: bool = True):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch {max_batch} must be >= 1 and max_wait_ms {max_wait_ms} >= 0")
        self.classifier, self.max_batch, self.max_wait = classifier, max_batch, max_wait_ms / 1000
        self.enabled = enabled
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="facegender-model")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = self.faces = 0  # forward passes and faces through them: the mean batch is their ratio

    async def start(self) -> None:
        if self.enabled:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.model_thread.shutdown(wait=True)

    async def classify(self, items: list[tuple[Prediction, Any]]) -> list[Prediction]:
        if not items:
            return []
        if not self.enabled:
            return await self._forward(items)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self.queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _forward(self, items: list[tuple[Prediction, Any]]) -> list[Prediction]:
        self.batches += 1
        self.faces += len(items)
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, self.classifier.classify, items)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(item, future) for item, future in batch if not future.cancelled()]  # clients gone
            if not batch:
                continue
            try:
                results = await self._forward([item for item, _ in batch])
            except Exception as e:  # a model failure fails this batch's requests, never the batcher
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def create_app(classifier: Classifier, max_upload_mb: float = 10, micro_batching: bool = True,
               max_batch: int = 32, max_wait_ms: float = 5.0, threads: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
               body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The API and page around ``classifier`` (which must have a detector unless every request says detect=false).

    ``threads`` decode and detect in parallel (default: the CPU count, at most 8), and one more thread
    decodes heavy images (``HEAVY_BYTES``) one at a time. ``max_upload_mb`` bounds a request's body (a
    batch's images together; base64 JSON included, so its images may total three quarters of it);
    ``max_pixels`` an image; ``max_memory_mb`` the bytes of bodies and decoded images of all requests in
    flight; ``body_timeout`` the seconds a body may take to arrive.
    """
    check_limits(max_upload_mb, max_pixels, max_memory_mb, body_timeout)
    map_large_buffers()  # so that a large upload's or image's memory leaves the process with it
    limit_png_text()  # read with the header, before the budget knows what the image costs
    max_bytes = int(max_upload_mb * 1024 * 1024)
    budget = MemoryBudget(int(max_memory_mb * 1024 * 1024))
    batcher = MicroBatcher(classifier, max_batch, max_wait_ms, micro_batching)
    threads = threads or min(8, os.cpu_count() or 1)
    decoders = ThreadPoolExecutor(threads, thread_name_prefix="facegender-decode")
    heavy = ThreadPoolExecutor(1, thread_name_prefix="facegender-decode-heavy")

    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=True)
        heavy.shutdown(wait=True)

    app = FastAPI(title="facegender", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Perceived binary gender of every face in a photo (ResNet18, one sigmoid logit). "
                              "Upload one image as multipart (field `file`) or JSON (`image`: base64 or a data URL).")
    app.state.batcher, app.state.budget = batcher, budget

    async def predict_one(name: str, data: bytes, detect: bool, min_confidence: float) -> dict:
        """One image's answer; BadImage when it does not decode, ApiError 503 when the budget is full."""
        loop = asyncio.get_running_loop()
        held = Held(budget, name)  # the image's decoding, given back once its faces are cut out
        try:
            # the header on the shared threads (cheap), then the decoding on the lane its size calls for
            opened = await loop.run_in_executor(decoders, functools.partial(classifier.open, data, name, detect,
                                                                            pixels=max_pixels, afford=held.take))
            lane = heavy if opened.cost > HEAVY_BYTES else decoders
            (width, height), stubs = await loop.run_in_executor(lane, _decode_and_detect, classifier, opened, detect)
        finally:
            held.give_back()
        done = iter(await batcher.classify([(stub, x) for stub, x in stubs if x is not None]))
        preds = [stub if x is None else next(done) for stub, x in stubs]  # faces keep their order
        return {"source": name, "width": width, "height": height, "faces": preds[0].faces,
                "predictions": [_with_min_confidence(p, min_confidence).to_dict() for p in preds]}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect):  # nobody to answer: one line in the log
        client = request.client
        log.info("%s - %s %s: the client disconnected before its request body was complete",
                 f"{client.host}:{client.port}" if client else "?", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):  # a bug answers 500 and the server keeps serving
        return JSONResponse({"error": f"internal error: {e.__class__.__name__}"}, status_code=500)

    detect_query = Query(True, description="find faces; false classifies the whole image (a face crop already)")
    min_conf_query = Query(0.0, ge=0, le=1, description="below this confidence the label is 'uncertain'")

    @app.post("/v1/predict", summary="Label every face of one image", responses=ERRORS,
              openapi_extra=_upload_doc(batch=False))
    async def predict(request: Request, detect: bool = detect_query, min_confidence: float = min_conf_query):
        held = Held(budget, "request body")
        try:
            (name, data), = await _images(request, max_bytes, body_timeout, held, batch=False)
            if isinstance(data, ApiError):
                raise data
            try:
                return await predict_one(name, data, detect, min_confidence)
            except BadImage as e:
                raise ApiError(_status(e), str(e)) from None
        finally:
            held.give_back()

    @app.post("/v1/predict/batch", summary="Label every face of several images (a bad one is that image's error)",
              responses=ERRORS, openapi_extra=_upload_doc(batch=True))
    async def predict_batch(request: Request, detect: bool = detect_query, min_confidence: float = min_conf_query):
        held = Held(budget, "request body")
        try:
            images = await _images(request, max_bytes, body_timeout, held, batch=True)
            turns = asyncio.Semaphore(threads)  # this request's images in flight: others' requests go between them

            async def one(name: str, data: bytes | ApiError) -> dict:
                try:
                    if isinstance(data, ApiError):
                        raise BadImage(name, data.message)
                    async with turns:
                        return await predict_one(name, data, detect, min_confidence)
                except BadImage as e:  # one bad file is that file's answer, as in `facegender predict`
                    error = e.reason if isinstance(data, ApiError) else str(e)
                    return {"source": name, "error": error, "predictions": [Prediction(name, error=error).to_dict()]}

            results = await asyncio.gather(*(one(name, data) for name, data in images), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:  # the budget's 503, or a bug: the whole request's answer
                raise failed[0]
            return {"results": results}
        finally:
            held.give_back()

    @app.get("/v1/model", summary="The loaded model's metadata")
    async def model():
        return _model_info(classifier)

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok", "batches": batcher.batches, "faces": batcher.faces,
                "memory_in_flight_mb": round(budget.used / 2**20, 1), "memory_peak_mb": round(budget.peak / 2**20, 1),
                "refused_busy": budget.refused}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((WEB / "index.html").read_text(encoding="utf-8"))

    @app.get("/docs", include_in_schema=False)
    async def docs():  # Swagger UI from the swagger-ui-bundle package, not a CDN: it works offline
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="facegender API",
                                   swagger_js_url="/static/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/docs/swagger-ui.css",
                                   swagger_favicon_url="/static/docs/favicon-32x32.png")

    @app.get("/static/docs/{name}", include_in_schema=False)
    async def docs_static(name: str):
        if name not in DOCS_STATIC:
            raise ApiError(404, f"/static/docs/{_printable(name)}: no such file")
        return Response((swagger_ui_path / name).read_bytes(), media_type=DOCS_STATIC[name])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise ApiError(404, f"/static/{_printable(name)}: no such file")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name])

    return app


def check_limits(max_upload_mb: float, max_pixels: int, max_memory_mb: float, body_timeout: float) -> None:
    """UserError unless the limits make a server that can answer: positive, and a budget that holds an upload."""
    if min(max_upload_mb, max_pixels, max_memory_mb, body_timeout) <= 0:
        raise UserError(f"--max-upload-mb {max_upload_mb}, --max-pixels {max_pixels}, --max-memory-mb "
                        f"{max_memory_mb} and --body-timeout {body_timeout} must be above 0")
    if max_memory_mb < 3 * max_upload_mb:
        raise UserError(f"--max-memory-mb {max_memory_mb}: must hold at least one upload as it is read and "
                        f"parsed, three times --max-upload-mb {max_upload_mb}")


def _status(e: BadImage) -> int:
    if e.reason == "too large to decode here":
        return 413
    return 415 if e.reason in ("not an image", "not a supported image") else 400


def _decode_and_detect(classifier: Classifier, opened: Opened, detect: bool):
    """The upright image's size in the file's pixels, and ``classifier.faces`` of it, boxes in those pixels.

    Opened by ``Classifier.open``, as ``facegender predict`` opens a file: the answer is the same as the command
    line's for the same file.
    """
    image, scale = decode(opened)
    stubs = classifier.faces(opened.name, image, detect=detect, scale=scale)
    w, h = opened.size
    turned = (image.width >= image.height) != (w >= h)  # EXIF orientation: a quarter turn swaps the sides
    return ((h, w) if turned else (w, h)), stubs


def _with_min_confidence(p: Prediction, min_confidence: float) -> Prediction:
    """A request's own --min-confidence: weaker predictions are labelled 'uncertain', as in predict."""
    if p.confidence is None or p.confidence >= min_confidence:
        return p
    return replace(p, label="uncertain")


CLOSE = {"Connection": "close"}  # on answers given before the body was read: the rest of it is not wanted


async def _read_body(request: Request, limit: int, timeout: float, held: Held) -> bytearray:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (announced or streamed), with
    408 when it has not all arrived within ``timeout`` seconds (a stalled upload, a lying Content-Length),
    and with 503 when the memory budget cannot hold it. A client that hangs up raises ClientDisconnect."""
    too_big = ApiError(413, f"request body over the upload limit of {limit / 1024 / 1024:g} MB "
                            "(facegender serve --max-upload-mb raises it)", CLOSE)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise too_big
            held.take(len(chunk))
            body.extend(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not complete within {timeout:g} s, {len(body)} bytes arrived "
                            "(facegender serve --body-timeout)", CLOSE) from None
    except ApiError as e:
        e.headers = {**CLOSE, **(e.headers or {})}
        raise
    return body


async def _images(request: Request, max_bytes: int, timeout: float, held: Held,
                  batch: bool) -> list[tuple[str, bytes | ApiError]]:
    """(name, bytes) of each uploaded image: multipart field ``file`` (batch: ``files``) or JSON base64. An
    entry of a JSON batch that is not an image (not an object, bad base64) is (name, its ApiError)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    ctype = ctype.decode("latin-1").lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise ApiError(415, f"Content-Type {_printable(ctype) or '(none)'}: send multipart/form-data or "
                            "application/json", CLOSE)
    body = await _read_body(request, max_bytes, timeout, held)
    if ctype == "multipart/form-data":
        held.take(len(body))  # the parts' copies
        field = "files" if batch else "file"
        parts = _multipart(body, params.get(b"boundary", b""))
        images = [(_clean_name(name, f"<upload {i}>"), data) for i, (part, name, data) in enumerate(parts)
                  if part == field]
    else:
        held.take(2 * len(body))  # the text, then the images' bytes
        images = _json_images(body, batch)
    del body
    if not images:
        what = "'files' fields" if batch else "a 'file' field"
        raise ApiError(422, f"no image in the request: send {what} (multipart) or " +
                       ("{\"images\": [{\"image\": BASE64}, ...]}" if batch else "{\"image\": BASE64}") + " (JSON)")
    if not batch and len(images) > 1:
        raise ApiError(422, f"{len(images)} images in one /v1/predict request: use /v1/predict/batch")
    if len(images) > MAX_BATCH_IMAGES:
        raise ApiError(422, f"{len(images)} images in one request: at most {MAX_BATCH_IMAGES}")
    return images


def _clean_name(name: str, fallback: str) -> str:
    """A client's file name as it can be shown: no folders, no control characters (a line break would
    split the one-line error), no surrounding blanks or quotes, at most ``MAX_NAME`` characters."""
    for escape, character in (("%0D", "\r"), ("%0A", "\n"), ("%22", '"')):  # how browsers send those (HTML)
        name = name.replace(escape, character)
    name = _printable(name.replace("\\", "/").rsplit("/", 1)[-1]).strip("\"'").strip()
    return name[:MAX_NAME] or fallback


def _printable(text: str) -> str:
    """``text`` without control characters, for a one-line message."""
    return "".join(c for c in text if unicodedata.category(c)[0] != "C").strip()[:MAX_NAME]


def _multipart(body: bytearray, boundary: bytes) -> list[tuple[str, str, bytes]]:
    """(field name, file name, content) of each part, parsed in memory."""
    if not boundary:
        raise ApiError(422, "multipart/form-data without a boundary")
    parts: list[tuple[str, str, bytes]] = []
    state: dict = {"parts": 0}
    most = 2 * MAX_BATCH_IMAGES + 16  # tiny parts by the million would cost far more than their bytes

    def on_part_begin():
        state["parts"] += 1
        if state["parts"] > most:
            raise ApiError(422, f"more than {most} parts in a multipart body")
        state.update(headers={}, data=[], field=b"")

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        key = state["field"].lower()
        state["headers"][key] = state["headers"].get(key, b"") + data[start:end]

    def on_header_end():
        state["field"] = b""

    def on_part_data(data, start, end):
        state["data"].append(data[start:end])

    def on_part_end():
        _, options = parse_options_header(state["headers"].get(b"content-disposition", b""))
        parts.append((options.get(b"name", b"").decode("utf-8", "replace"),
                      options.get(b"filename", b"").decode("utf-8", "replace"), b"".join(state["data"])))
        state["data"] = []

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # python-multipart's errors: a malformed body
        raise ApiError(422, f"malformed multipart body: {_one_line(e)}") from None
    return parts


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _json_images(body: bytearray, batch: bool) -> list[tuple[str, bytes | ApiError]]:
    values = body.count(b"{") + body.count(b"[") + body.count(b",")
    if values > MAX_JSON_VALUES:  # parsed, millions of tiny values would cost many times their bytes
        raise ApiError(422, f"JSON body: more than {MAX_JSON_VALUES} values, objects and arrays; "
                            "expected {\"images\": [{\"image\": BASE64, \"name\": ...}, ...]}")
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ApiError(422, "malformed JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, f"malformed JSON body: {_one_line(e)}") from None
    items = doc.get("images") if batch and isinstance(doc, dict) else [doc]
    if not isinstance(items, list):
        raise ApiError(422, "JSON body: expected {\"images\": [{\"image\": BASE64, \"name\": ...}, ...]}")
    images = []
    for i, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        name = _clean_name(str(name), f"<image {i}>") if name else f"<image {i}>"
        try:
            images.append((name, _json_image(item, i)))
        except ApiError as e:
            images.append((name, e))
    return images


_BLANKS = str.maketrans("", "", " \t\r\n")


def _json_image(item, i: int) -> bytes:
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        raise ApiError(422, f"JSON image {i}: expected an object {{\"image\": BASE64 or data URL, \"name\": optional}}")
    text = item["image"]
    if text[:5].lower() == "data:":
        header, _, text = text.partition(",")
        if not header.lower().endswith(";base64"):
            raise ApiError(422, f"JSON image {i}: a data URL must be base64 (data:image/...;base64,...)")
    try:
        # line breaks too: the base64 tool and MIME wrap at 76 columns
        return base64.b64decode(text.translate(_BLANKS), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, f"JSON image {i}: not valid base64 ({_one_line(e)})") from None


def _model_info(classifier: Classifier) -> dict:
    meta = classifier.meta
    data = meta.get("data") or []
    names = ", ".join(RESEARCH_ONLY.get(d, d) for d in data) or "data not recorded in the checkpoint"
    licence = meta.get("licence") or (
        f"trained on {names}: " + ("for non-commercial research only, as those corpora's licences say (see MODEL_CARD.md)"
                                   if set(data) & set(RESEARCH_ONLY) else "the licences of that data apply"))
    return {"kind": classifier.kind, "classes": list(classifier.classes), "positive_class": meta.get("positive_class"),
            "threshold": classifier.threshold, "temperature": classifier.temperature,
            "image_size": meta.get("preprocessing", {}).get("image_size"), "epoch": meta.get("epoch"),
            "data": data, "test_metrics": meta.get("test_metrics"), "licence": licence,
            "detector": classifier.detector is not None}


def _upload_doc(batch: bool) -> dict:
    """The request body in the OpenAPI docs (parsed by hand, so that uploads stay in memory)."""
    field = "files" if batch else "file"
    file_schema = {"type": "string", "format": "binary"}
    image = {"type": "object", "required": ["image"],
             "properties": {"image": {"type": "string", "description": "base64, or a data URL"},
                            "name": {"type": "string"}}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": [field], "properties": {
            field: {"type": "array", "items": file_schema} if batch else file_schema}}},
        "application/json": {"schema": {"type": "object", "required": ["images"],
                                        "properties": {"images": {"type": "array", "items": image}}}
                             if batch else image}}}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facegender")
    except PackageNotFoundError:
        return "0"


class _Connection(h11.Connection):
    """h11's connection, keeping the error it raised on a malformed request: its status hint (431) and words."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


HEAD_TOO_LARGE = f"request head over {MAX_HEAD_BYTES // 1024} KiB: send fewer or shorter headers"


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with what a service on an open network needs besides: the errors
    it answers itself (a malformed request, a head over ``MAX_HEAD_BYTES``) in the API's JSON, a request
    head that has not arrived ``HEAD_TIMEOUT`` seconds after the connection opened or the last answer
    ended answered 408 and closed (uvicorn's keep-alive timeout stops at the first byte; this does not),
    and connections beyond ``MAX_CONNECTIONS`` answered 503 and closed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES)
        self.head_timer: asyncio.TimerHandle | None = None
        self.waiting_since = None  # the request cycle before the one whose head is awaited

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            self._refuse(503, f"more than {MAX_CONNECTIONS} connections open: retry in {RETRY_AFTER} s",
                         [("retry-after", str(RETRY_AFTER))])
            return
        self._await_head()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a head arriving: h11 bounds it only while it is incomplete
            head = self.conn.trailing_data[0] + data
            end = head.find(b"\r\n\r\n")
            if (end if end >= 0 else len(head)) > MAX_HEAD_BYTES:
                self._refuse(431, HEAD_TOO_LARGE)
                return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.head_timer is not None and self.cycle is not self.waiting_since:
            self._stop_waiting()  # a new request's head arrived

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and self.cycle is answered:
            self._await_head()

    def send_400_response(self, msg: str) -> None:
        error = self.conn.error
        if getattr(error, "error_status_hint", 400) == 431:
            self._refuse(431, HEAD_TOO_LARGE)
        else:
            self._refuse(400, f"malformed HTTP request: {_one_line(error) if error else msg}")

    def _await_head(self) -> None:
        self._stop_waiting()
        self.waiting_since = self.cycle
        self.head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_late)

    def _stop_waiting(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing() and self.cycle is self.waiting_since:
            self._refuse(408, f"request head not complete within {HEAD_TIMEOUT:g} s")

    def _refuse(self, status: int, message: str, headers: list[tuple[str, str]] = ()) -> None:
        """Answer with the API's JSON error and close, outside h11's state machine: there may be no request
        to answer yet."""
        body = json.dumps({"error": message}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in headers)]
        if status != 408:  # a head that is late is the client's choice; the rest are worth a line
            log.warning("%s - %d %s", "%s:%d" % self.client if self.client else "?", status, message)
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.transport.close()


def uvicorn_options() -> dict:
    """What ``serve`` gives uvicorn besides the app and the address: the protocol and its limits."""
    return {"http": Protocol, "timeout_keep_alive": KEEP_ALIVE, "h11_max_incomplete_event_size": MAX_HEAD_BYTES}


def serve(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          workers: int = 1, micro_batching: bool = True, device: str = "auto", backend: str = "auto",
          model_threads: int | None = None, log_level: str = "info", max_pixels: int = DEFAULT_MAX_PIXELS,
          max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, body_timeout: float = DEFAULT_BODY_TIMEOUT,
          detector: str = DEFAULT_DETECTOR, min_face: float | None = None) -> None:
    """Run the server (blocking). With several workers each process loads the model and batches alone.

    ``backend`` auto (``inference.resolve_backend``) runs a descriptor model on onnxruntime where the `onnx` extra is
    installed: the same answers (P(male) within 1e-4) for less CPU per request (README, "Serving").
    ``model_threads``: the model's threads in each process (default: half of the process's share of the cores).
    ``max_pixels``, ``max_memory_mb`` and ``body_timeout`` bound what hostile requests can take (``create_app``).
    """
    import uvicorn

    if workers < 1 or max_upload_mb <= 0 or (model_threads is not None and model_threads < 1):
        raise UserError(f"--workers {workers} and --model-threads {model_threads} must be at least 1 and "
                        f"--max-upload-mb {max_upload_mb} above 0")
    FaceDetector(detector, min_face=min_face)  # cheap (no model loads): a bad --detector or --min-face is one message here
    backend = resolve_backend(backend, checkpoint)
    os.environ[_ENV] = json.dumps({"checkpoint": checkpoint, "max_upload_mb": max_upload_mb, "workers": workers,
                                   "micro_batching": micro_batching, "device": device, "backend": backend,
                                   "model_threads": model_threads, "max_pixels": max_pixels,
                                   "max_memory_mb": max_memory_mb, "body_timeout": body_timeout,
                                   "detector": detector, "min_face": min_face})
    if workers == 1:
        uvicorn.run(app_from_environment(), host=host, port=port, log_level=log_level, **uvicorn_options())
        return
    # a wrong path is one message here, not one per worker; an ONNX conversion is done (and cached) once
    path = model_path(checkpoint)
    if path.suffix != ".onnx":
        kind_of(checkpoint_files.read_meta(path))  # a kind of model this facegender runs
        if backend == "onnxruntime":
            Classifier.from_checkpoint(path, device=device, backend=backend, detect=False)
    uvicorn.run("facegender.serve:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, **uvicorn_options())


_ENV = "FACEGENDER_SERVE"


def app_from_environment() -> FastAPI:
    """The app ``serve`` configured; uvicorn's worker processes build theirs here."""
    options = json.loads(os.environ[_ENV])
    # Half of a process's share of the cores for the model, the rest for decoding and detection, which run
    # beside it. More model threads than that oversubscribe the cores, and the model's threads, which wait
    # for each other at every layer, then lose many times what they gain (bench: benchmarks/serve_load.py).
    threads = max(1, options.get("model_threads") or (os.cpu_count() or 1) // (2 * options["workers"]))
    backend = options.get("backend", "onnxruntime")
    if backend == "torch":  # PyTorch only where it runs the model
        import torch

        torch.set_num_threads(threads)
    classifier = Classifier.from_checkpoint(options["checkpoint"], device=options["device"], backend=backend,
                                            threads=threads, detector=options.get("detector", DEFAULT_DETECTOR),
                                            min_face=options.get("min_face"))
    return create_app(classifier, max_upload_mb=options["max_upload_mb"], micro_batching=options["micro_batching"],
                      max_pixels=options.get("max_pixels", DEFAULT_MAX_PIXELS),
                      max_memory_mb=options.get("max_memory_mb", DEFAULT_MAX_MEMORY_MB),
                      body_timeout=options.get("body_timeout", DEFAULT_BODY_TIMEOUT))
