"""The HTTP API and web page: ``create_app(Classifier.from_checkpoint())``, served by ``facegender serve``.

Thin by design: requests are parsed and errors mapped here, everything else is ``inference.Classifier``.
Decoding and face detection run in a thread pool off the event loop; the faces of requests that arrive
together share one forward pass (``MicroBatcher``). Uploads are read into memory, never written to disk.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from .images import BadImage, decode_rgb
from . import checkpoint as checkpoint_files
from .facemodels import kind_of
from .inference import Classifier, Prediction, model_path, resolve_backend
from .io import UserError

MAX_BATCH_IMAGES = 32  # images in one /v1/predict/batch request
WEB = files("facegender") / "web"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
DOCS_STATIC = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}
# corpora whose licences allow non-commercial research only (README "Data licences", MODEL_CARD.md)
RESEARCH_ONLY = {"utkface": "UTKFace", "celeba": "CelebA", "scut_fbp5500": "SCUT-FBP5500"}


class ErrorBody(BaseModel):
    error: str  # one line: what is wrong and, where it helps, what to do


ERRORS = {status: {"model": ErrorBody, "description": why} for status, why in (
    (400, "a damaged image: truncated, empty, or a decompression bomb"), (413, "over the upload limit"),
    (415, "not an image, or a body that is neither multipart/form-data nor JSON"),
    (422, "a malformed request: no image, bad base64 or JSON, an option out of range"))}


class ApiError(Exception):
    """A request the API refuses: its HTTP status and a one-line reason for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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
               max_batch: int = 32, max_wait_ms: float = 5.0, threads: int | None = None) -> FastAPI:
    """The API and page around ``classifier`` (which must have a detector unless every request says detect=false).

    ``threads`` decode and detect in parallel (default: the CPU count, at most 8); ``max_upload_mb`` bounds a
    request's body (a batch's images together; base64 JSON may be a third larger, its encoding's overhead).
    """
    max_bytes = int(max_upload_mb * 1024 * 1024)
    batcher = MicroBatcher(classifier, max_batch, max_wait_ms, micro_batching)
    decoders = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1), thread_name_prefix="facegender-decode")

    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=True)

    app = FastAPI(title="facegender", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Perceived binary gender of every face in a photo (ResNet18, one sigmoid logit). "
                              "Upload one image as multipart (field `file`) or JSON (`image`: base64 or a data URL).")
    app.state.batcher = batcher

    async def predict_one(name: str, data: bytes, detect: bool, min_confidence: float) -> dict:
        """One image's answer; BadImage when it does not decode."""
        loop = asyncio.get_running_loop()
        image, stubs = await loop.run_in_executor(decoders, _decode_and_detect, classifier, name, data, detect)
        done = iter(await batcher.classify([(stub, x) for stub, x in stubs if x is not None]))
        preds = [stub if x is None else next(done) for stub, x in stubs]  # faces keep their order
        return {"source": name, "width": image.width, "height": image.height,
                "faces": preds[0].faces,
                "predictions": [_with_min_confidence(p, min_confidence).to_dict() for p in preds]}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

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
        (name, data), = await _images(request, max_bytes, batch=False)
        try:
            return await predict_one(name, data, detect, min_confidence)
        except BadImage as e:
            raise ApiError(415 if e.reason == "not an image" else 400, str(e)) from None

    @app.post("/v1/predict/batch", summary="Label every face of several images (a bad one is that image's error)",
              responses=ERRORS, openapi_extra=_upload_doc(batch=True))
    async def predict_batch(request: Request, detect: bool = detect_query, min_confidence: float = min_conf_query):
        images = await _images(request, max_bytes, batch=True)

        async def one(name: str, data: bytes) -> dict:
            try:
                return await predict_one(name, data, detect, min_confidence)
            except BadImage as e:  # one bad file is that file's answer, as in `facegender predict`
                return {"source": name, "error": str(e), "predictions": [Prediction(name, error=str(e)).to_dict()]}

        return {"results": list(await asyncio.gather(*(one(name, data) for name, data in images)))}

    @app.get("/v1/model", summary="The loaded model's metadata")
    async def model():
        return _model_info(classifier)

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok", "batches": batcher.batches, "faces": batcher.faces}

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
            raise ApiError(404, f"/static/docs/{name}: no such file")
        return Response((swagger_ui_path / name).read_bytes(), media_type=DOCS_STATIC[name])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise ApiError(404, f"/static/{name}: no such file")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name])

    return app


def _decode_and_detect(classifier: Classifier, name: str, data: bytes, detect: bool):
    image = decode_rgb(data, name)
    return image, classifier.faces(name, image, detect=detect)


def _with_min_confidence(p: Prediction, min_confidence: float) -> Prediction:
    """A request's own --min-confidence: weaker predictions are labelled 'uncertain', as in predict."""
    if p.confidence is None or p.confidence >= min_confidence:
        return p
    return replace(p, label="uncertain")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (announced or streamed)."""
    too_big = ApiError(413, f"request body over the upload limit of {limit / 1024 / 1024:g} MiB "
                            "(facegender serve --max-upload-mb raises it)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _images(request: Request, max_bytes: int, batch: bool) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded image: multipart field ``file`` (batch: ``files``) or JSON base64."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    ctype = ctype.decode("latin-1").lower()
    if ctype == "multipart/form-data":
        field = "files" if batch else "file"
        parts = _multipart(await _read_body(request, max_bytes), params.get(b"boundary", b""))
        images = [(name or f"<upload {i}>", data) for i, (part, name, data) in enumerate(parts) if part == field]
    elif ctype == "application/json":
        images = _json_images(await _read_body(request, max_bytes * 4 // 3 + 65536), batch)
    else:
        raise ApiError(415, f"Content-Type {ctype or '(none)'}: send multipart/form-data or application/json")
    if not images:
        what = "'files' fields" if batch else "a 'file' field"
        raise ApiError(422, f"no image in the request: send {what} (multipart) or " +
                       ("{\"images\": [{\"image\": BASE64}, ...]}" if batch else "{\"image\": BASE64}") + " (JSON)")
    if not batch and len(images) > 1:
        raise ApiError(422, f"{len(images)} images in one /v1/predict request: use /v1/predict/batch")
    if len(images) > MAX_BATCH_IMAGES:
        raise ApiError(422, f"{len(images)} images in one request: at most {MAX_BATCH_IMAGES}")
    return images


def _multipart(body: bytes, boundary: bytes) -> list[tuple[str, str, bytes]]:
    """(field name, file name, content) of each part, parsed in memory."""
    if not boundary:
        raise ApiError(422, "multipart/form-data without a boundary")
    parts: list[tuple[str, str, bytes]] = []
    state: dict = {}

    def on_part_begin():
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
                      os.path.basename(options.get(b"filename", b"").decode("utf-8", "replace")),
                      b"".join(state["data"])))

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart's errors: a malformed body
        raise ApiError(422, f"malformed multipart body: {e}") from None
    return parts


def _json_images(body: bytes, batch: bool) -> list[tuple[str, bytes]]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, f"malformed JSON body: {e}") from None
    items = doc.get("images") if batch and isinstance(doc, dict) else [doc]
    if not isinstance(items, list):
        raise ApiError(422, "JSON body: expected {\"images\": [{\"image\": BASE64, \"name\": ...}, ...]}")
    return [_json_image(item, i) for i, item in enumerate(items)]


def _json_image(item, i: int) -> tuple[str, bytes]:
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        raise ApiError(422, f"JSON image {i}: expected an object {{\"image\": BASE64 or data URL, \"name\": optional}}")
    text = item["image"]
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(422, f"JSON image {i}: a data URL must be base64 (data:image/...;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, f"JSON image {i}: not valid base64 ({e})") from None
    name = item.get("name")
    return (str(name) if name else f"<image {i}>"), data


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


def serve(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          workers: int = 1, micro_batching: bool = True, device: str = "auto", backend: str = "auto",
          model_threads: int | None = None, log_level: str = "info") -> None:
    """Run the server (blocking). With several workers each process loads the model and batches alone.

    ``backend`` auto (``inference.resolve_backend``) runs a descriptor model on onnxruntime where the `onnx` extra is
    installed: the same answers (P(male) within 1e-4) for less CPU per request (README, "Serving").
    ``model_threads``: the model's threads in each process (default: half of the process's share of the cores).
    """
    import uvicorn

    if workers < 1 or max_upload_mb <= 0 or (model_threads is not None and model_threads < 1):
        raise UserError(f"--workers {workers} and --model-threads {model_threads} must be at least 1 and "
                        f"--max-upload-mb {max_upload_mb} above 0")
    backend = resolve_backend(backend, checkpoint)
    os.environ[_ENV] = json.dumps({"checkpoint": checkpoint, "max_upload_mb": max_upload_mb, "workers": workers,
                                   "micro_batching": micro_batching, "device": device, "backend": backend,
                                   "model_threads": model_threads})
    if workers == 1:
        uvicorn.run(app_from_environment(), host=host, port=port, log_level=log_level)
        return
    # a wrong path is one message here, not one per worker; an ONNX conversion is done (and cached) once
    path = model_path(checkpoint)
    if path.suffix != ".onnx":
        kind_of(checkpoint_files.read_meta(path))  # a kind of model this facegender runs
        if backend == "onnxruntime":
            Classifier.from_checkpoint(path, device=device, backend=backend, detect=False)
    uvicorn.run("facegender.serve:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)


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
                                            threads=threads)
    return create_app(classifier, max_upload_mb=options["max_upload_mb"], micro_batching=options["micro_batching"])
