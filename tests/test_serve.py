"""The HTTP API: the real app around the bundled model, on a real uvicorn on loopback, with real photos."""
import asyncio
import base64
import io
import json
import pathlib

import httpx
import pytest
import skimage.data
from PIL import Image

from facegender.serve import MicroBatcher

ASTRONAUT = pathlib.Path(skimage.data.__file__).parent / "astronaut.png"  # public domain, NASA
CAT = pathlib.Path(skimage.data.__file__).parent / "chelsea.png"  # a cat: no human face


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _bomb() -> bytes:
    """A small PNG that would decode to 144 million pixels, above Pillow's decompression-bomb limit."""
    return _png(Image.new("1", (12000, 12000)))


def _variants() -> dict[str, bytes]:
    """The astronaut at several scales, crops and mirrored: every one has its own box and P(male)."""
    astronaut = Image.open(ASTRONAUT).convert("RGB")
    out = {}
    for scale in (1.0, 0.8, 0.65):
        size = round(512 * scale)
        resized = astronaut.resize((size, size), Image.BILINEAR)
        out[f"s{scale}.png"] = _png(resized)
        out[f"m{scale}.png"] = _png(resized.transpose(Image.FLIP_LEFT_RIGHT))
        out[f"c{scale}.png"] = _png(resized.crop((size // 5, 0, size, size * 4 // 5)))
    return out


@pytest.fixture(scope="module")
def client(live_server):
    with httpx.Client(base_url=live_server, timeout=60) as c:
        yield c


def _expected(classifier, name: str, data: bytes) -> list[dict]:
    return [p.to_dict() for p in classifier.predict([Image.open(io.BytesIO(data)).convert("RGB")])]


def _same(got: list[dict], want: list[dict]) -> None:
    """The server's rows are predict's rows (P(male) to batched-versus-single rounding)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["faces"], g["face"], g["label"]) == (w["faces"], w["face"], w["label"])
        assert g["box"] == (list(w["box"]) if w["box"] else None)
        assert g["p_male"] == pytest.approx(w["p_male"], abs=2e-3)
        assert g["confidence"] == pytest.approx(w["confidence"], abs=2e-3)


def test_the_astronaut_uploaded_as_a_file_is_one_female_face_where_her_face_is(client, bundled_classifier):
    data = ASTRONAUT.read_bytes()
    r = client.post("/v1/predict", files={"file": ("astronaut.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["source"], body["width"], body["height"], body["faces"]) == ("astronaut.png", 512, 512, 1)
    (face,) = body["predictions"]
    assert face["label"] == "female" and face["confidence"] > 0.8 and face["p_male"] < 0.2
    x0, y0, x1, y1 = face["box"]
    assert 150 < x0 < x1 < 300 and 50 < y0 < y1 < 200  # her face, not the helmet or the badges
    assert set(face) == {"source", "faces", "face", "box", "label", "confidence", "p_male", "error"}
    _same(body["predictions"], _expected(bundled_classifier, "astronaut.png", data))


@pytest.mark.parametrize("encode", [
    lambda d: base64.b64encode(d).decode(),
    lambda d: "data:image/png;base64," + base64.b64encode(d).decode(),
], ids=["base64", "data-url"])
def test_json_base64_and_data_urls_give_the_same_answer_as_a_file(client, encode):
    data = ASTRONAUT.read_bytes()
    by_file = client.post("/v1/predict", files={"file": ("a.png", data)}).json()["predictions"]
    r = client.post("/v1/predict", json={"image": encode(data), "name": "a.png"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == by_file


def test_options_match_the_command_line(client, bundled_classifier):
    data = ASTRONAUT.read_bytes()
    whole = client.post("/v1/predict?detect=false", files={"file": ("a.png", data)}).json()
    (row,) = whole["predictions"]
    assert whole["faces"] is None and row["box"] is None and row["label"] in ("female", "male")
    want = bundled_classifier.predict([Image.open(ASTRONAUT).convert("RGB")], batch_size=1)
    assert bundled_classifier.faces("x", Image.open(ASTRONAUT).convert("RGB"), detect=False)[0][0].box is None
    assert row["p_male"] != pytest.approx(want[0].p_male, abs=1e-3)  # the whole photo is not the face crop
    strict = client.post("/v1/predict?min_confidence=0.999", files={"file": ("a.png", data)}).json()
    assert strict["predictions"][0]["label"] == "uncertain"
    assert strict["predictions"][0]["p_male"] == pytest.approx(want[0].p_male, abs=2e-3)


def test_a_photo_without_a_face_is_an_answer_not_an_error(client):
    r = client.post("/v1/predict", files={"file": ("cat.png", CAT.read_bytes())})
    assert r.status_code == 200
    assert r.json()["faces"] == 0
    (row,) = r.json()["predictions"]
    assert row["faces"] == 0 and row["label"] is None and row["error"] is None


def test_batch_answers_each_image_in_order_and_a_bad_one_alone(client, bundled_classifier):
    head = Image.open(ASTRONAUT).convert("RGB").crop((120, 20, 330, 240))  # her head and shoulders
    two = Image.new("RGB", (700, 400), (128, 128, 128))
    two.paste(head, (20, 40))
    two.paste(head.resize((150, 157)), (450, 120))
    files = [("files", ("two.png", _png(two))), ("files", ("cat.png", CAT.read_bytes())),
             ("files", ("notes.png", b"not an image")), ("files", ("astronaut.png", ASTRONAUT.read_bytes()))]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["source"] for x in results] == ["two.png", "cat.png", "notes.png", "astronaut.png"]
    assert [p["face"] for p in results[0]["predictions"]] == [1, 2]  # largest first
    _same(results[0]["predictions"], _expected(bundled_classifier, "two.png", _png(two)))
    assert results[1]["faces"] == 0
    assert "not an image" in results[2]["error"] and results[2]["predictions"][0]["label"] is None
    assert results[3]["predictions"][0]["label"] == "female"
    by_json = client.post("/v1/predict/batch", json={"images": [
        {"image": base64.b64encode(ASTRONAUT.read_bytes()).decode(), "name": "a"},
        {"image": base64.b64encode(CAT.read_bytes()).decode()}]}).json()["results"]
    assert [x["source"] for x in by_json] == ["a", "<image 1>"]
    assert [(p["box"], p["label"]) for p in by_json[0]["predictions"]] == \
        [(p["box"], p["label"]) for p in results[3]["predictions"]]
    assert by_json[1]["faces"] == 0


BAD = {
    "over the upload limit": (413, dict(files={"file": ("big.png", b"\0" * (11 * 1024 * 1024))}), "upload limit"),
    "streamed over the limit": (413, dict(content=(b"\0" * 1024 * 1024 for _ in range(12)),
                                          headers={"content-type": "multipart/form-data; boundary=x"}), "upload limit"),
    "a text file": (415, dict(files={"file": ("notes.jpg", b"just some text")}), "notes.jpg: not an image"),
    "a text body": (415, dict(content=b"hello", headers={"content-type": "text/plain"}), "Content-Type text/plain"),
    "no file field": (422, dict(files={"photo": ("a.png", b"x")}), "'file' field"),
    "two files": (422, dict(files=[("file", ("a.png", b"x")), ("file", ("b.png", b"y"))]), "/v1/predict/batch"),
    "bad base64": (422, dict(json={"image": "@@@"}), "base64"),
    "bad JSON": (422, dict(content=b"{image:", headers={"content-type": "application/json"}), "malformed JSON"),
    "JSON without an image": (422, dict(json={"picture": "x"}), "expected an object"),
    "a decompression bomb": (400, dict(files={"file": ("bomb.png", _bomb())}), "bomb.png: decompression bomb"),
    "a truncated file": (400, dict(files={"file": ("cut.png", ASTRONAUT.read_bytes()[:30000])}), "cut.png: truncated"),
    "an empty file": (400, dict(files={"file": ("empty.png", b"")}), "empty.png: empty file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_status_and_a_one_line_reason_and_the_server_lives_on(client, case):
    status, request, reason = BAD[case]
    r = client.post("/v1/predict", **request)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert "\n" not in error and error and (reason is None or reason in error), error
    assert client.get("/healthz").json()["status"] == "ok"


def test_bad_query_values_and_unknown_paths_are_json_errors(client):
    r = client.post("/v1/predict?min_confidence=1.5", files={"file": ("a.png", ASTRONAUT.read_bytes())})
    assert r.status_code == 422 and "min_confidence" in r.json()["error"]
    r = client.post("/v1/predict?detect=maybe", files={"file": ("a.png", ASTRONAUT.read_bytes())})
    assert r.status_code == 422 and "detect" in r.json()["error"]
    assert client.get("/v1/nothing").json() == {"error": "Not Found"}
    assert client.get("/v1/predict").status_code == 405


def test_a_body_announced_over_the_limit_is_refused_before_it_is_read(live_server):
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(live_server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 52428800\r\n\r\n{")
        answer = b""
        while b"}" not in answer and (chunk := s.recv(65536)):  # the whole JSON body, or the server closed
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"upload limit" in body


def test_model_metadata_health_docs_and_page(client):
    model = client.get("/v1/model").json()
    assert model["classes"] == ["female", "male"] and model["threshold"] == 0.5
    assert 0.5 < model["temperature"] < 2 and model["test_metrics"]["accuracy"] > 0.9
    assert "non-commercial" in model["licence"]
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    docs = client.get("/docs").text
    assert "/static/docs/swagger-ui-bundle.js" in docs
    assert client.get("/static/docs/swagger-ui-bundle.js").status_code == 200
    page = client.get("/").text
    assert 'type="file"' in page
    for asset in ("/", "/static/app.js", "/static/style.css", "/docs"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text.replace("https://swagger.io", ""), asset


def test_simultaneous_requests_each_get_their_own_correct_answer(live_server, bundled_classifier):
    variants = _variants()
    expected = {name: _expected(bundled_classifier, name, data) for name, data in variants.items()}
    assert len({json.dumps(e[0]["box"]) for e in expected.values()}) == len(variants)  # each answer is its own
    jobs = [name for name in variants for _ in range(3)]

    async def run():
        async with httpx.AsyncClient(base_url=live_server, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/predict", files={"file": (name, variants[name])})
                                          for name in jobs))

    before = httpx.get(f"{live_server}/healthz").json()
    answers = asyncio.run(run())
    after = httpx.get(f"{live_server}/healthz").json()
    for name, r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        assert r.json()["source"] == name
        _same(r.json()["predictions"], expected[name])
    assert after["faces"] - before["faces"] == sum(len(expected[name]) for name in jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # some requests shared a forward pass


def test_the_micro_batcher_runs_faces_that_arrive_together_in_one_forward_pass(bundled_classifier):
    image = Image.open(ASTRONAUT).convert("RGB")
    stubs = [item for scale in (1.0, 0.9, 0.8, 0.7)
             for item in bundled_classifier.faces(f"s{scale}", image.resize((round(512 * scale),) * 2))]
    alone = [bundled_classifier.classify([item])[0] for item in stubs]

    async def run(enabled):
        batcher = MicroBatcher(bundled_classifier, max_batch=3, max_wait_ms=50, enabled=enabled)
        await batcher.start()
        try:
            got = await asyncio.gather(*(batcher.classify([item]) for item in stubs))
        finally:
            await batcher.stop()
        return [g[0] for g in got], batcher.batches

    for enabled, passes in ((True, -(-len(stubs) // 3)), (False, len(stubs))):  # batches of at most 3, or one each
        got, batches = asyncio.run(run(enabled))
        assert batches == passes
        assert [g.source for g in got] == [a.source for a in alone]
        assert [g.p_male for g in got] == pytest.approx([a.p_male for a in alone], abs=2e-3)
