"""Regression tests for the findings of an attack on ``forgetpack serve`` (S2 to S12, shared registry).

Each test names its finding; each failed on the code before the fix. Bodies and images are kept
tiny: limits are set low in the test configs instead of sending megabytes.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib

import pytest
from serve_helpers import ADMIN, ADMIN_TOKEN, b64, digits, png

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.patch import read_patch
from forgetpack.format.signing import generate_keypair, load_private_key, sign
from runtime.serve import ServeConfig, create_app
from runtime.serve.batching import ImageBatcher, Overloaded
from runtime.serve.config import Limits, read_admin_token
from runtime.serve.registry import SUFFIX


def client_for(config):
    from fastapi.testclient import TestClient

    return TestClient(create_app(config))


def hex_of(path) -> str:
    return read_patch(path).digest.split(":", 1)[1]


def message(response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]["message"]


def no_paths(response, *folders) -> None:
    for folder in folders:
        assert str(folder) not in response.text
    assert "/tmp" not in response.text


# ---------------------------------------------------------------------------- S2: bodies


def test_s2_chunked_bodies_are_counted_on_every_route_and_the_token_comes_first(export_dir, tmp_path):
    limits = Limits(max_body_bytes=4096)
    config = ServeConfig(source=str(export_dir), threads=1, limits=limits, admin_token=ADMIN_TOKEN,
                         patches_dir=str(tmp_path / "reg"))

    def chunked(text: bytes):  # a generator body: sent chunked, with no Content-Length
        def gen():
            for i in range(0, len(text), 1000):
                yield text[i : i + 1000]
        return gen()

    big_texts = json.dumps({"texts": ["x" * 900] * 20}).encode()
    big_default = json.dumps({"patches": ["y" * 900] * 20}).encode()
    with client_for(config) as c:
        r = c.post("/v1/embed/text", content=chunked(big_texts), headers={"content-type": "application/json"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413 and "body over 4096" in message(r)
        r = c.put("/v1/default-patches", content=chunked(big_default), headers={**ADMIN, "content-type": "application/json"})
        assert r.status_code == 413 and "body over 4096" in message(r)
        # no token and a bad body: the token is checked first (401), the body is never parsed
        r = c.put("/v1/default-patches", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401, r.text
        # the routes still work with small bodies
        assert c.post("/v1/embed/text", json={"texts": ["a seven"], "patches": []}).status_code == 200
        assert c.put("/v1/default-patches", json={"patches": []}, headers=ADMIN).status_code == 200


# ---------------------------------------------------------------------------- S3: decoded pixels


def test_s3_decoded_pixels_are_bounded_per_request_and_in_the_queue(export_dir):
    digit = digits("seven", 1)[0]  # 28 x 28 = 784 pixels
    limits = Limits(max_request_pixels=1000)
    config = ServeConfig(source=str(export_dir), threads=1, limits=limits, max_queue_pixels=1000)
    with client_for(config) as c:
        assert c.post("/v1/embed/image", json={"images": [b64(digit)], "patches": []}).status_code == 200
        r = c.post("/v1/embed/image", json={"images": [b64(digit)] * 2, "patches": []})
        assert r.status_code == 413 and "1,568 pixels" in message(r), r.text
        # pixels are reserved before decoding and given back however the request ends
        broken = png(digit)[:60]  # the header reads, the pixels do not
        r = c.post("/v1/embed/image", json={"images": [b64_bytes(broken)], "patches": []})
        assert r.status_code == 422 and "cannot decode" in message(r), r.text
        assert c.app.state.service.batcher.queued_pixels == 0
    with pytest.raises(ForgetpackError, match="max_queue_pixels"):
        ServeConfig(source=str(export_dir), limits=limits, max_queue_pixels=999)

    release = threading.Event()
    batcher = ImageBatcher(lambda images, state: (release.wait(10), [[0.0]] * len(images))[1], key=lambda s: 0,
                           max_batch=8, max_wait_ms=1000, max_queue=8, max_queue_pixels=100, arriving=lambda: 1)
    try:
        first = batcher.submit([0], 0, pixels=60)
        with pytest.raises(Overloaded, match="pixels"):
            batcher.submit([0], 0, pixels=50)
        release.set()
        first.result(10)
        assert batcher.queued_pixels == 0
    finally:
        release.set()
        batcher.close()


# ---------------------------------------------------------------------------- S5: top_k


def test_s5_multipart_top_k_takes_ascii_digits_only(export_dir):
    with client_for(ServeConfig(source=str(export_dir), threads=1)) as c:
        image = png(digits("seven", 1)[0])
        for top_k in ("²", "٣", "1e3", " 5", "-1"):
            r = c.post("/v1/classify", files=[("images", ("a.png", image, "image/png"))],
                       data={"labels": ["seven", "three"], "top_k": top_k, "patches": []})
            assert r.status_code == 422 and "top_k" in message(r), (top_k, r.text)
        r = c.post("/v1/classify", files=[("images", ("a.png", image, "image/png"))],
                   data={"labels": ["seven", "three"], "top_k": "1", "patches": []})
        assert r.status_code == 200 and len(r.json()["results"][0]["top"]) == 1


# ---------------------------------------------------------------------------- S6: signed over unsigned


def test_s6_a_signed_upload_replaces_an_unsigned_copy_and_readiness_reflects_the_default(export_dir, patch_files, tmp_path):
    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    unsigned = patch_files["seven"].read_bytes()
    signed_path = tmp_path / "signed.fpatch.safetensors"
    sign(read_patch(patch_files["seven"]), load_private_key(tmp_path / "key.pem")).save(signed_path)
    signed = signed_path.read_bytes()
    digest = read_patch(signed_path).digest
    assert digest == read_patch(patch_files["seven"]).digest
    folder = tmp_path / "reg"
    folder.mkdir()
    target = folder / f"{digest.split(':', 1)[1]}{SUFFIX}"
    target.write_bytes(unsigned)  # an unsigned file of the same digest is already there
    config = ServeConfig(source=str(export_dir), patches_dir=str(folder), trusted_keys=(str(tmp_path / "key.pub"),),
                         admin_token=ADMIN_TOKEN, threads=1)
    with client_for(config) as c:
        r = c.post("/v1/patches", files={"file": signed}, data={"name": "seven"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        assert c.put("/v1/default-patches", json={"patches": ["seven"]}, headers=ADMIN).status_code == 200
    assert target.read_bytes() == signed  # written, replacing the unsigned copy
    assert not [p for p in folder.iterdir() if p.name.startswith(".upload-")]
    with client_for(config) as c:  # a restart: the signed file loads, the default set serves
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/info").json()["default"]["patches"] == [digest]

    # a default set that cannot load (its file unsigned) is not "ready"
    target.write_bytes(unsigned)
    with client_for(config) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "default patch set" in message(r), r.text
        no_paths(r, folder)
        assert c.post("/v1/embed/text", json={"texts": ["x"], "patches": []}).status_code == 200


# ---------------------------------------------------------------------------- S7, S8: registry trouble


def test_s7_an_unreadable_index_is_named_without_its_path(export_dir, patch_files, tmp_path):
    folder = tmp_path / "reg"
    config = ServeConfig(source=str(export_dir), patches_dir=str(folder), admin_token=ADMIN_TOKEN, threads=1)
    with client_for(config) as c:
        assert c.post("/v1/patches", files={"file": patch_files["seven"].read_bytes()}, data={"name": "seven"},
                      headers=ADMIN).status_code == 201
        (folder / "registry.json").write_text("{broken", encoding="utf-8")
        assert c.post("/v1/embed/text", json={"texts": ["x"], "patches": []}).status_code == 200  # needs no index
        for r in (c.post("/v1/embed/text", json={"texts": ["x"]}), c.post("/v1/embed/text", json={"texts": ["x"], "patches": ["seven"]}),
                  c.get("/v1/info"), c.get("/readyz")):
            assert r.status_code == 503, r.text
            assert "registry.json" in message(r) and "unreadable" in message(r)
            no_paths(r, folder, tmp_path)


def test_s8_an_upload_into_a_missing_folder_is_a_json_error_without_a_path(export_dir, patch_files, tmp_path):
    import shutil

    folder = tmp_path / "reg"
    config = ServeConfig(source=str(export_dir), patches_dir=str(folder), admin_token=ADMIN_TOKEN, threads=1)
    with client_for(config) as c:
        shutil.rmtree(folder)
        r = c.post("/v1/patches", files={"file": patch_files["seven"].read_bytes()}, data={"name": "seven"}, headers=ADMIN)
        assert r.status_code == 503 and "cannot be written" in message(r), r.text
        no_paths(r, folder, tmp_path)
        assert not folder.exists()  # not recreated: an operator removed it, an operator restores it


# ---------------------------------------------------------------------------- S9: digest vs file name


def test_s9_a_file_holding_another_patch_than_its_name_says_is_skipped(export_dir, patch_files, tmp_path, caplog):
    folder = tmp_path / "reg"
    folder.mkdir()
    seven = read_patch(patch_files["seven"]).digest
    (folder / f"{hex_of(patch_files['seven'])}{SUFFIX}").write_bytes(patch_files["three"].read_bytes())
    config = ServeConfig(source=str(export_dir), patches_dir=str(folder), threads=1)
    with caplog.at_level("WARNING", logger="runtime.serve"), client_for(config) as c:
        r = c.post("/v1/embed/text", json={"texts": ["x"], "patches": [seven]})
        assert r.status_code == 422 and "no such patch" in message(r), r.text
        assert c.get("/v1/patches").json()["patches"] == []
    assert "not the one its name says" in caplog.text


# ---------------------------------------------------------------------------- S10: image formats


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def test_s10_only_the_served_formats_are_decoded(export_dir, monkeypatch):
    from PIL import EpsImagePlugin, Image

    from runtime.preprocess import UnsupportedImage, load_image

    reached = []
    original = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: (reached.append(1), original(self))[1])
    with pytest.raises(UnsupportedImage, match="cannot decode image"):
        load_image(EPS)
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    with client_for(ServeConfig(source=str(export_dir), threads=1)) as c:
        for blob in (EPS, tiff.getvalue()):
            r = c.post("/v1/embed/image", files=[("images", ("a", blob, "application/octet-stream"))], data={"patches": []})
            assert r.status_code == 415 and "PNG, JPEG" in message(r), r.text
    assert reached == []  # PIL's EPS plugin never saw the bytes


# ---------------------------------------------------------------------------- S11: FIFO token file


def test_s11_an_admin_token_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    outcome: list[BaseException | str] = []

    def read():
        try:
            outcome.append(read_admin_token(fifo))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # the old code blocks in open(): unblock it, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(5)
        pytest.fail("reading a FIFO admin token file blocked")
    assert isinstance(outcome[0], ForgetpackError) and "not a regular file" in str(outcome[0])


# ---------------------------------------------------------------------------- S12: the small ones


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_s12_small_ones(export_dir, patch_files, tmp_path, capsys):
    from forgetpack.cli import main

    config = ServeConfig(source=str(export_dir), threads=1, admin_token=ADMIN_TOKEN)
    with client_for(config) as c:
        r = c.post("/v1/embed/image", json={"images": [b64_bytes(png_header(100_000, 100_000))], "patches": []})
        assert r.status_code == 413, r.text  # a header far over the budget is "too large", as documented
        r = c.post("/v1/patches", files={"file": patch_files["seven"].read_bytes()}, data={"name": ""}, headers=ADMIN)
        assert r.status_code == 422 and "patch name" in message(r), r.text
        assert c.get("/v1/patches").json()["patches"] == []
    # a queue smaller than one request: refused at start, in one line
    with pytest.raises(ForgetpackError, match="max_queue"):
        ServeConfig(source=str(export_dir), max_queue=10)
    assert main(["serve", str(export_dir), "--max-queue", "10", "--check"]) == 1
    err = capsys.readouterr().err
    assert "max_queue (10)" in err and len(err.strip().splitlines()) == 1
    # --check writes nothing
    assert main(["serve", str(export_dir), "--patches", str(tmp_path / "reg"), "--check", "--threads", "1"]) == 0
    assert not (tmp_path / "reg").exists()
    capsys.readouterr()
    # the export hint is a command that runs
    assert main(["serve", "mini"]) == 1
    assert "forgetpack export mini -o DIR" in capsys.readouterr().err


def b64_bytes(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- shared registry, two processes

WRITER = """
import sys, time
from runtime.serve.registry import PatchRegistry
folder, patch, prefix, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
registry = PatchRegistry(folder, check=lambda p: None)
data = open(patch, "rb").read()
while time.time() < start:
    time.sleep(0.005)
for i in range(8):
    registry.add_bytes(data, f"{prefix}{i}")
"""


def test_two_processes_writing_the_registry_at_once_lose_nothing(patch_files, tmp_path):
    import time

    folder = tmp_path / "reg"
    start = time.time() + 3  # both imported by then, so their writes overlap
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(patch_files[name]), prefix, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, prefix in (("seven", "a"), ("three", "b"))]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    names = json.loads((folder / "registry.json").read_text())["names"]
    assert sorted(names) == sorted([f"a{i}" for i in range(8)] + [f"b{i}" for i in range(8)])
    assert set(names.values()) == {read_patch(patch_files["seven"]).digest, read_patch(patch_files["three"]).digest}
    assert len(list(folder.glob(f"*{SUFFIX}"))) == 2
