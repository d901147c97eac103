"""``POST /v1/classify/binary``: raw image bytes in the body (several framed by ``X-Image-Lengths``),
labels, templates, patches and top_k in the query. Its answers equal the JSON and multipart routes'
for the same images; every limit those routes enforce applies to it, each bad input is one JSON
error and never a 5xx; it is in the OpenAPI schema and the schema fuzz covers it."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from serve_helpers import ADMIN_TOKEN, b64, digit_names, digits, png

from runtime.serve import ServeConfig, create_app
from runtime.serve.config import Limits

BINARY = "/v1/classify/binary"
OCTETS = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def client(export_dir, seven, tmp_path_factory):
    from fastapi.testclient import TestClient

    config = ServeConfig(source=str(export_dir), patches_dir=str(tmp_path_factory.mktemp("binary-registry")),
                         admin_token=ADMIN_TOKEN, threads=1)
    app = create_app(config)
    app.state.service.registry.add_file(seven, "seven")
    with TestClient(app) as c:
        yield c


def small_client(export_dir, **limits):
    from fastapi.testclient import TestClient

    return TestClient(create_app(ServeConfig(source=str(export_dir), threads=1, limits=Limits(**limits))))


def framed(*blobs: bytes) -> dict:
    return {**OCTETS, "x-image-lengths": ",".join(str(len(b)) for b in blobs)}


def ranked(answer: dict) -> list[list[str]]:
    return [[t["label"] for t in r["top"]] for r in answer["results"]]


def probabilities(answer: dict) -> list[float]:
    return [t["prob"] for r in answer["results"] for t in r["top"]]


def error(response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == status, body
    assert text in body["error"]["message"], body["error"]["message"]


# ---------------------------------------------------------------------------- good answers


def test_binary_answers_equal_the_json_and_multipart_routes(client):
    images = [png(digits("seven", 1)[0]), png(digits("three", 1)[0])]
    labels = digit_names()
    for patches in (["seven"], []):
        json_answer = client.post("/v1/classify", json={"images": [b64(Image.open(io.BytesIO(b))) for b in images],
                                                        "labels": labels, "patches": patches, "top_k": 10})
        form_answer = client.post("/v1/classify", files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)],
                                  data={"labels": labels, "patches": patches or [""], "top_k": "10"})
        query = {"labels": labels, "top_k": "10", "patches": patches or [""]}
        binary_answer = client.post(BINARY, params=query, content=b"".join(images), headers=framed(*images))
        for answer in (json_answer, form_answer, binary_answer):
            assert answer.status_code == 200, answer.text
        expected = json_answer.json()
        for answer in (form_answer.json(), binary_answer.json()):
            assert answer["patch_state"] == expected["patch_state"] and answer["labels"] == expected["labels"]
            assert [r["label"] for r in answer["results"]] == [r["label"] for r in expected["results"]]
            assert ranked(answer) == ranked(expected)
            assert probabilities(answer) == pytest.approx(probabilities(expected), abs=1e-6)
        assert len(expected["patch_state"]["patches"]) == len(patches)
    assert binary_answer.json()["results"][0]["label"] == "seven"  # the base, patches=: no patches


def test_one_image_needs_no_framing_and_defaults_apply(client):
    image = png(digits("one", 1)[0])
    plain = client.post(BINARY, params={"labels": ["one", "seven"]}, content=image, headers={"content-type": "image/png"})
    assert plain.status_code == 200, plain.text
    answer = plain.json()
    assert answer["templates"] == ["a photo of a {}."] and len(answer["results"]) == 1
    assert answer["results"][0]["label"] == "one" and len(answer["results"][0]["top"]) == 2
    assert answer["patch_state"]["patches"] == []  # no patches parameter: the default set (empty here)
    templated = client.post(BINARY, params={"labels": ["one", "seven"], "templates": ["a digit: {}"], "top_k": "1"},
                            content=image, headers=framed(image))  # framing one image is fine too
    assert templated.status_code == 200 and templated.json()["templates"] == ["a digit: {}"]
    assert len(templated.json()["results"][0]["top"]) == 1
    assert 'route="/v1/classify/binary",status="200"' in client.get("/metrics").text


def test_the_route_is_in_the_openapi_schema(client):
    operation = client.get("/openapi.json").json()["paths"][BINARY]["post"]
    assert {"application/octet-stream", "image/*"} <= set(operation["requestBody"]["content"])
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["labels"]["required"] and parameters["labels"]["in"] == "query"
    assert {"templates", "patches", "top_k", "X-Image-Lengths"} <= set(parameters)
    assert {"400", "413", "415", "422", "503"} <= set(operation["responses"])


# ---------------------------------------------------------------------------- bad input: one JSON error each


def test_bodies_over_the_limit_are_refused_while_read(export_dir):
    image = png(digits("one", 1)[0])
    with small_client(export_dir, max_body_bytes=4096) as c:
        error(c.post(BINARY, params={"labels": ["a"]}, content=image + b"\0" * 5000, headers=OCTETS), 413, "body over 4096")

        def chunked():  # no Content-Length: counted while read
            yield image
            for _ in range(10):
                yield b"\0" * 1000

        response = c.post(BINARY, params={"labels": ["a"]}, content=chunked(), headers=OCTETS)
        assert "content-length" not in {k.lower() for k in response.request.headers}
        error(response, 413, "body over 4096")


def test_wrong_framing(client):
    a, b = png(digits("one", 1)[0]), png(digits("two", 1)[0])
    query = {"labels": ["one", "two"]}
    for lengths, text in ((f"{len(a)},{len(b) - 1}", "the body has"), (f"{len(a)},{len(b)},1", "the body has"),
                          (f"{len(a) + len(b)},0", "none empty"), ("12,abc", "byte counts"), ("-3", "byte counts"),
                          ("", "byte counts"), ("1;2", "byte counts")):
        error(client.post(BINARY, params=query, content=a + b, headers={**OCTETS, "x-image-lengths": lengths}), 400, text)
    two_headers = [("content-type", "application/octet-stream"), ("x-image-lengths", str(len(a))), ("x-image-lengths", str(len(b)))]
    error(client.post(BINARY, params=query, content=a + b, headers=two_headers), 400, "one header")
    # framing that splits the images in the wrong places reaches the image check, image by image
    error(client.post(BINARY, params=query, content=a + b, headers={**OCTETS, "x-image-lengths": f"{len(a) - 8},{len(b) + 8}"}),
          415, "image 1")


def test_empty_body_unknown_formats_and_broken_images(client):
    query = {"labels": ["one", "two"]}
    error(client.post(BINARY, params=query, content=b"", headers=OCTETS), 422, "body is empty")
    error(client.post(BINARY, params=query, content=b"not an image at all", headers=OCTETS), 415, "PNG, JPEG")
    tiff = io.BytesIO()
    digits("one", 1)[0].save(tiff, "TIFF")  # a real image, in a format the service never decodes
    error(client.post(BINARY, params=query, content=tiff.getvalue(), headers=OCTETS), 415, "PNG, JPEG")
    good = png(digits("one", 1)[0])
    error(client.post(BINARY, params=query, content=good + b"junk", headers=framed(good, b"junk")), 415, "image 1")
    error(client.post(BINARY, params=query, content=good[:60], headers=OCTETS), 422, "cannot decode image")
    error(client.post(BINARY, params=query, content=good, headers={"content-type": "text/plain"}), 415, "application/octet-stream")
    error(client.post(BINARY, params=query, content=good, headers={"content-type": "application/json"}), 415, "/v1/classify")


def test_pixel_and_count_limits_are_checked_before_decoding(export_dir):
    image = png(digits("one", 1)[0])  # 28 x 28
    with small_client(export_dir, max_pixels=40 * 40, max_request_pixels=3 * 28 * 28, max_images=4, max_labels=3) as c:
        query = {"labels": ["one", "two"]}
        error(c.post(BINARY, params=query, content=png(Image.new("L", (41, 41))), headers=OCTETS), 413, "41x41 pixels")
        blank = png(Image.new("L", (5000, 5000)))  # 25 megapixels in a few kilobytes: refused from its header
        error(c.post(BINARY, params=query, content=image + blank, headers=framed(image, blank)), 413, "image 1: 5000x5000")
        four = [image] * 4
        error(c.post(BINARY, params=query, content=b"".join(four), headers=framed(*four)), 413, "pixels in the images of one request")
        five = [image] * 5
        error(c.post(BINARY, params=query, content=b"".join(five), headers=framed(*five)), 413, "5 images")
        error(c.post(BINARY, params={"labels": ["a", "b", "c", "d"]}, content=image, headers=OCTETS), 413, "4 labels")
        assert c.post(BINARY, params=query, content=b"".join(four[:3]), headers=framed(*four[:3])).status_code == 200


def test_bad_labels_templates_top_k_and_query(client):
    image = png(digits("one", 1)[0])

    def post(query):
        return client.post(BINARY, params=query, content=image, headers=OCTETS)

    error(post({}), 422, "labels")
    error(post({"labels": ["one", "one"]}), 422, "duplicate label")
    error(post({"labels": ["one", " "]}), 422, "empty label")
    error(post({"labels": ["one"], "templates": ["no slot"]}), 422, "{}")
    error(post({"labels": ["one"], "templates": ["{:>99999999}{}"]}), 422, "{}")
    for top_k in ("0", "1001", "²", "-1", "2.5"):
        error(post({"labels": ["one"], "top_k": top_k}), 422, "top_k")
    error(post({"labels": ["one"], "top_k": ["1", "2"]}), 422, "top_k")
    error(post({"labels": ["one"], "image": "x"}), 422, "unknown query parameter 'image'")


def test_unknown_patches_and_a_full_queue(client):
    image = png(digits("one", 1)[0])
    error(client.post(BINARY, params={"labels": ["one"], "patches": ["nope"]}, content=image, headers=OCTETS), 422, "no patch")
    error(client.post(BINARY, params={"labels": ["one"], "patches": ["seven", "seven"]}, content=image, headers=OCTETS),
          422, "named twice")
    error(client.post(BINARY, params={"labels": ["one"], "patches": ["sha256:" + "0" * 64]}, content=image, headers=OCTETS),
          422, "no such patch")
    batcher = client.app.state.service.batcher
    batcher.queued = batcher.max_queue  # full: the next request is refused at once with Retry-After
    try:
        response = client.post(BINARY, params={"labels": ["one"]}, content=image, headers=OCTETS)
    finally:
        batcher.queued = 0
    error(response, 503, "busy")
    assert response.headers["retry-after"] == "1"


# ---------------------------------------------------------------------------- schema fuzz


def test_schema_fuzz_of_the_binary_route_finds_no_server_error(client):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operation = schema["/v1/classify/binary"]["POST"]
    seen = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case):
        response = case.call()
        assert response.status_code < 500, f"{case.query} {case.headers}: {response.status_code} {response.text[:300]}"
        kind = response.headers.get("content-type") or [""]
        assert (kind[0] if isinstance(kind, list) else kind).startswith("application/json"), response.text[:300]
        seen.append(response.status_code)

    fuzz()
    assert len(seen) >= 20


def test_the_service_keeps_freed_buffers_for_its_batches(monkeypatch):
    """glibc (CI's Debian) accepts the thresholds, and the service asks for them when it starts:
    without them ViT-B-32's server paid 20% more CPU than the same inference in-process
    (runtime/serve/memory.py, tools/load_test.py)."""
    import platform

    from forgetpack.format.errors import ForgetpackError
    from runtime.serve import memory, service

    if platform.libc_ver()[0] == "glibc":
        assert memory.keep_freed_buffers() is True
    calls = []
    monkeypatch.setattr(service, "keep_freed_buffers", lambda: calls.append(1) or True)
    with pytest.raises(ForgetpackError, match="not an export directory"):  # the call comes first
        service.Service(ServeConfig(source="/nonexistent-export"))
    assert calls == [1]
