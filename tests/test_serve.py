"""``forgetpack serve`` end to end through an ASGI test client: per-request patches equal the runtime's,
the registry and its admin routes, limits and JSON errors, micro-batching, and a schema fuzz (no 500s).

Image embeddings may go through a micro-batch of another size than the runtime's own call, so
probabilities are compared to 1e-5 (absolute); text embeddings take the same path and are compared exactly.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from serve_helpers import ADMIN, ADMIN_TOKEN, b64, digit_names, digits, png

import runtime
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.patch import read_patch
from forgetpack.format.signing import generate_keypair, load_private_key, sign
from runtime.serve import ServeConfig, create_app
from runtime.serve.batching import Closed, ImageBatcher, Overloaded
from runtime.serve.config import Limits

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def client(export_dir, patch_files, tmp_path_factory):
    """A server with both patches registered by name through the admin route."""
    from fastapi.testclient import TestClient

    config = ServeConfig(source=str(export_dir), patches_dir=str(tmp_path_factory.mktemp("registry")),
                         admin_token=ADMIN_TOKEN, threads=2, max_wait_ms=2)
    with TestClient(create_app(config)) as c:
        for name, path in patch_files.items():
            r = c.post("/v1/patches", files={"file": path.read_bytes()}, data={"name": name}, headers=ADMIN)
            assert r.status_code == 201, r.text
        yield c


@pytest.fixture(scope="module")
def images():
    return digits("seven", 3) + digits("three", 2)


def reference(model: runtime.Model, patches, images, labels):
    model.set_patches(patches)
    try:
        return np.stack([p.probs for p in model.classify(images, labels)])
    finally:
        model.set_patches([])


def probs_of(answer: dict, labels: list[str]) -> np.ndarray:
    return np.array([[{t["label"]: t["prob"] for t in r["top"]}[label] for label in labels] for r in answer["results"]])


# ---------------------------------------------------------------------------- per-request patches


@pytest.mark.parametrize("names", [[], ["seven"], ["three", "seven"], ["seven", "three"]])
def test_per_request_patches_equal_the_runtime(client, onnx_model, patch_files, images, names):
    labels = digit_names()
    patches = [read_patch(patch_files[n]) for n in names]
    expected = reference(onnx_model, patches, images, labels)
    by_name = client.post("/v1/classify", json={"images": [b64(im) for im in images], "labels": labels,
                                                "patches": names, "top_k": 10})
    assert by_name.status_code == 200, by_name.text
    answer = by_name.json()
    assert answer["patch_state"]["patches"] == [p.digest for p in patches]  # the exact state, in order
    assert answer["patch_state"]["digest"] == runtime.state_digest([p.digest for p in patches])
    np.testing.assert_allclose(probs_of(answer, labels), expected, atol=TOLERANCE, rtol=0)
    # the same request as multipart, naming the patches by digest
    form = client.post("/v1/classify", files=[("images", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)],
                       data={"labels": labels, "patches": [p.digest for p in patches], "top_k": "10"})
    assert form.status_code == 200, form.text
    np.testing.assert_allclose(probs_of(form.json(), labels), expected, atol=TOLERANCE, rtol=0)
    # text embeddings: the same arithmetic as the runtime, exactly
    onnx_model.set_patches(patches)
    try:
        want = onnx_model.encode_text(["a photo of a seven.", "three"])
    finally:
        onnx_model.set_patches([])
    text = client.post("/v1/embed/text", json={"texts": ["a photo of a seven.", "three"], "patches": names})
    assert text.status_code == 200
    assert np.array_equal(np.asarray(text.json()["embeddings"], np.float32), want)


def test_forgetting_shows_and_requests_do_not_leak_into_each_other(client, images):
    labels = digit_names()
    sevens = [b64(im) for im in images[:3]]
    plain = client.post("/v1/classify", json={"images": sevens, "labels": labels, "patches": []}).json()
    patched = client.post("/v1/classify", json={"images": sevens, "labels": labels, "patches": ["seven"]}).json()
    again = client.post("/v1/classify", json={"images": sevens, "labels": labels, "patches": []}).json()
    assert [r["label"] for r in plain["results"]] == ["seven"] * 3
    assert all(r["label"] != "seven" for r in patched["results"])
    assert again["results"] == plain["results"]  # the patched request left nothing behind
    image = client.post("/v1/embed/image", json={"images": sevens[:1], "patches": ["seven"]}).json()
    assert len(image["embeddings"]) == 1 and abs(np.linalg.norm(image["embeddings"][0]) - 1) < 1e-5


def test_default_switch_is_atomic_and_reaches_other_replicas(client, export_dir, patch_files):
    from fastapi.testclient import TestClient

    body = {"texts": ["seven"]}
    assert client.post("/v1/embed/text", json=body).json()["patch_state"]["patches"] == []
    seven = read_patch(patch_files["seven"]).digest
    switched = client.put("/v1/default-patches", json={"patches": ["seven"]}, headers=ADMIN)
    assert switched.status_code == 200 and switched.json()["default"]["patches"] == [seven]
    assert client.post("/v1/embed/text", json=body).json()["patch_state"]["patches"] == [seven]
    listing = client.get("/v1/patches").json()
    assert listing["default"] == [seven] and {p["id"]: p["default"] for p in listing["patches"]}[seven]
    # a second server on the same registry folder (another replica) sees the names and the default set
    folder = client.app.state.service.registry.folder
    other_config = ServeConfig(source=str(export_dir), patches_dir=str(folder), threads=1)
    with TestClient(create_app(other_config)) as other:
        assert other.post("/v1/embed/text", json=body).json()["patch_state"]["patches"] == [seven]
        assert client.put("/v1/default-patches", json={"patches": []}, headers=ADMIN).status_code == 200
        assert other.post("/v1/embed/text", json=body).json()["patch_state"]["patches"] == []
    bad = client.put("/v1/default-patches", json={"patches": ["seven", "seven"]}, headers=ADMIN)
    assert bad.status_code == 422 and client.get("/v1/patches").json()["default"] == []  # a bad set changes nothing


def test_delete_refuses_the_default_and_forgets_the_patch(client, patch_files):
    three = read_patch(patch_files["three"]).digest
    assert client.put("/v1/default-patches", json={"patches": ["three"]}, headers=ADMIN).status_code == 200
    assert client.delete(f"/v1/patches/{three}", headers=ADMIN).status_code == 409
    assert client.put("/v1/default-patches", json={"patches": []}, headers=ADMIN).status_code == 200
    assert client.delete("/v1/patches/three", headers=ADMIN).json() == {"deleted": three}
    assert client.delete("/v1/patches/three", headers=ADMIN).status_code == 404
    gone = client.post("/v1/embed/text", json={"texts": ["x"], "patches": ["three"]})
    assert gone.status_code == 422 and "no patch" in gone.json()["error"]["message"]
    again = client.post("/v1/patches", files={"file": patch_files["three"].read_bytes()}, data={"name": "three"}, headers=ADMIN)
    assert again.status_code == 201


# ---------------------------------------------------------------------------- security


@pytest.mark.parametrize("method,path,kwargs", [
    ("post", "/v1/patches", {"files": {"file": b"x"}}),
    ("delete", "/v1/patches/seven", {}),
    ("put", "/v1/default-patches", {"json": {"patches": []}}),
])
def test_admin_routes_refuse_a_missing_or_wrong_token(client, method, path, kwargs):
    call = getattr(client, method)
    assert call(path, **kwargs).status_code == 401
    assert call(path, headers={"Authorization": "Bearer wrong-token-wrong-token"}, **kwargs).status_code == 403
    assert call(path, headers={"Authorization": f"Basic {ADMIN_TOKEN}"}, **kwargs).status_code == 403
    assert call(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, **kwargs).status_code == 403
    assert "seven" in [n for p in client.get("/v1/patches").json()["patches"] for n in p["names"]]


def test_write_routes_are_off_without_a_token_and_unsigned_uploads_are_refused(export_dir, patch_files, tmp_path):
    from fastapi.testclient import TestClient

    off = ServeConfig(source=str(export_dir), threads=1)
    with TestClient(create_app(off)) as c:
        r = c.put("/v1/default-patches", json={"patches": []}, headers=ADMIN)
        assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]
    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    signed = tmp_path / "signed.fpatch.safetensors"
    sign(read_patch(patch_files["seven"]), load_private_key(tmp_path / "key.pem")).save(signed)
    keyed = ServeConfig(source=str(export_dir), trusted_keys=(str(tmp_path / "key.pub"),), admin_token=ADMIN_TOKEN, threads=1)
    with TestClient(create_app(keyed)) as c:
        r = c.post("/v1/patches", files={"file": patch_files["seven"].read_bytes()}, headers=ADMIN)
        assert r.status_code == 422 and "not signed" in r.json()["error"]["message"]
        assert str(tmp_path) not in r.text and "/tmp" not in r.text  # no server paths in answers
        assert c.get("/v1/patches").json()["patches"] == []
        assert c.post("/v1/patches", files={"file": signed.read_bytes()}, data={"name": "seven"}, headers=ADMIN).status_code == 201
    with pytest.raises(ForgetpackError, match="too short"):
        ServeConfig(source=str(export_dir), admin_token="short")


def test_names_are_never_paths(client, patch_files):
    for name in ("../seven", "/etc/passwd", "a/b", ".hidden", "sha256:" + "0" * 64):
        r = client.post("/v1/patches", files={"file": patch_files["seven"].read_bytes()}, data={"name": name}, headers=ADMIN)
        assert r.status_code == 422, name
    for pid in ("../seven", "%2e%2e%2fseven", "seven.fpatch.safetensors"):
        assert client.post("/v1/embed/text", json={"texts": ["x"], "patches": [pid]}).status_code == 422


# ---------------------------------------------------------------------------- limits and errors


def test_limits_and_json_errors(export_dir, images):
    from fastapi.testclient import TestClient

    limits = Limits(max_body_bytes=200_000, max_images=2, max_labels=3, max_pixels=40 * 40)
    with TestClient(create_app(ServeConfig(source=str(export_dir), threads=1, limits=limits, max_queue=2))) as c:
        def err(response, status, text):
            assert response.status_code == status, response.text
            assert text in response.json()["error"]["message"]

        one = [b64(images[0])]
        err(c.post("/v1/classify", content=b"x" * 200_001, headers={"content-type": "application/json"}), 413, "body over")
        err(c.post("/v1/classify", json={"images": one * 3, "labels": ["a"]}), 413, "3 images")
        err(c.post("/v1/classify", json={"images": one, "labels": ["a", "b", "c", "d"]}), 413, "4 labels")
        big = images[0].resize((41, 41))
        err(c.post("/v1/classify", json={"images": [b64(big)], "labels": ["a"]}), 413, "41x41 pixels")
        err(c.post("/v1/classify", content=b"{}", headers={"content-type": "text/plain"}), 415, "Content-Type")
        err(c.post("/v1/classify", json={"images": ["bm90IGFuIGltYWdl"], "labels": ["a"]}), 415, "not an image")
        err(c.post("/v1/classify", json={"images": ["***"], "labels": ["a"]}), 422, "base64")
        err(c.post("/v1/classify", json={"images": one, "labels": ["a", "a"]}), 422, "duplicate label")
        err(c.post("/v1/classify", json={"images": one, "labels": ["a"], "templates": ["no slot"]}), 422, "{}")
        err(c.post("/v1/classify", json={"images": one, "labels": []}), 422, "labels")
        err(c.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON")
        err(c.post("/v1/classify", content=b"--x\r\n", headers={"content-type": "multipart/form-data; boundary=x"}), 422, "labels")
        err(c.post("/v1/embed/text", json={"texts": ["x"], "patches": ["nope"]}), 422, "no patch")
        # a full queue answers 503 with Retry-After at once (here: 2 images against a queue of 2, one taken)
        c.app.state.service.batcher.queued = 1
        try:
            r = c.post("/v1/classify", json={"images": one * 2, "labels": ["a"]})
        finally:
            c.app.state.service.batcher.queued = 0
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
        assert c.post("/v1/classify", json={"images": one, "labels": ["a"]}).status_code == 200


def test_health_ready_metrics_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    client.post("/v1/classify", json={"images": [b64(digits("one", 1)[0])], "labels": ["one", "two"], "patches": ["seven"]})
    text = client.get("/metrics").text
    for name in ("forgetpack_requests_total", "forgetpack_request_seconds_bucket", "forgetpack_image_batch_size_count",
                 "forgetpack_patch_state_lookups_total", "forgetpack_patch_states ", "forgetpack_images_queued"):
        assert name in text, name
    assert 'route="/v1/classify",status="200"' in text
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "/v1/classify" in page.text
    schema = client.get("/openapi.json").json()
    assert {"application/json", "multipart/form-data"} <= set(schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"])


# ---------------------------------------------------------------------------- pieces


def test_batcher_groups_requests_bounds_its_queue_and_drains_on_close():
    sizes: list[int] = []
    release = threading.Event()

    def encode(images, state):
        release.wait(10)
        sizes.append(len(images))
        return np.arange(len(images), dtype=np.float32)[:, None] + state

    batcher = ImageBatcher(encode, key=lambda state: state % 2, max_batch=4, max_wait_ms=1000, max_queue=8)
    try:
        futures = [batcher.submit([i], 10) for i in range(4)]  # one key: one batch of 4, taken once 4 are ready
        release.set()
        assert [f.result(10)[0, 0] for f in futures] == [10, 11, 12, 13]  # each request gets its own rows back
        assert sizes == [4]
        release.clear()
        blocked = batcher.submit([0], 1)  # the worker takes it (after max_wait) and waits in encode
        for _ in range(1000):
            if batcher.queued == 0:
                break
            threading.Event().wait(0.01)
        queued = [batcher.submit([0, 1, 2, 3], 2), batcher.submit([0, 1, 2, 3], 4)]
        with pytest.raises(Overloaded):
            batcher.submit([0], 2)
        closing = threading.Thread(target=batcher.close)  # shutdown: no new work, the accepted work finishes
        closing.start()
        for _ in range(1000):
            if batcher._closed:
                break
            threading.Event().wait(0.01)
        with pytest.raises(Closed):
            batcher.submit([0], 2)
        release.set()
        closing.join(10)
        assert blocked.result(10).tolist() == [[1.0]]
        assert [f.result(10).ravel().tolist() for f in queued] == [[2, 3, 4, 5], [4, 5, 6, 7]]
    finally:
        release.set()
        batcher.close()


def test_per_request_states_are_refused_where_the_export_cannot_reproject(export_dir, patch_files, monkeypatch):
    model = runtime.load(export_dir, threads=1)
    seven = read_patch(patch_files["seven"])
    before = model.backend.matrices
    monkeypatch.setattr(model.backend, "_reprojects", lambda tower: None)
    assert model.patch_state([]).patches == ()
    with pytest.raises(ForgetpackError, match="reproject: false"):
        model.patch_state([seven])
    assert all(np.array_equal(before[k], v) for k, v in model.backend.matrices.items())


def test_cli_check_and_bad_source(export_dir, patch_files, capsys, tmp_path):
    import json

    from forgetpack.cli import main

    code = main(["serve", str(export_dir), "--patches", str(tmp_path / "reg"), "--default-patch", str(patch_files["seven"]),
                 "--check", "--json", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    info = json.loads(out)
    assert info["model"] == "mini" and len(info["default"]["patches"]) == 1
    assert not (tmp_path / "reg").exists()  # --check writes nothing
    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "not an export directory" in capsys.readouterr().err


def test_the_service_imports_no_torch(export_dir):
    import subprocess
    import sys

    code = ("import sys; from runtime.serve import ServeConfig, create_app; "
            f"create_app(ServeConfig(source={str(export_dir)!r}, threads=1)); "
            "bad = [m for m in ('torch', 'open_clip', 'torchvision', 'ray', 'forgetpack.engine') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------- schema fuzz


def test_openapi_schema_fuzz_finds_no_server_errors(export_dir, patch_files, tmp_path):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error

    config = ServeConfig(source=str(export_dir), patches_dir=str(tmp_path / "reg"), admin_token=ADMIN_TOKEN, threads=1,
                         limits=Limits(max_pixels=256 * 256))
    app = create_app(config)
    app.state.service.registry.add_file(patch_files["seven"], "seven")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=12, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def fuzz(case):
            for headers in (None, ADMIN):
                response = case.call(headers=headers)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path}: {response.status_code} {response.text[:200]}")
                case.validate_response(response, checks=[not_a_server_error])

        fuzz()
    assert not failures, failures


def test_the_service_sleeps_between_onnx_runs_and_answers_as_the_runtime(export_dir, images):
    """The server's event loop, decoding threads and batcher share the cores with onnxruntime, so its
    sessions sleep between runs instead of spin-waiting (``spin=False``); the answers are the same."""
    from runtime.serve.service import Service

    service = Service(ServeConfig(source=str(export_dir), threads=2))
    try:
        spinning = runtime.load(export_dir, threads=2)
        assert service.model.backend.spin is False and spinning.backend.spin is True
        np.testing.assert_allclose(service.model.encode_image(images[:4]), spinning.encode_image(images[:4]), atol=1e-6)
    finally:
        service.close()
    with pytest.raises(ForgetpackError, match="unknown option"):
        runtime.load(export_dir, spinning=False)
