"""Small regressions: whole key errors, the resume count, draining ``serve --ray`` on SIGTERM (acc5 is in test_evaluate.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from index_fakes import FakeFactory, write_digit
from patch_factory import base_matrices, make_patch
from serve_helpers import free_port, serve_export

from forgetpack.format.errors import SignatureError
from forgetpack.format.signing import generate_keypair, load_private_key, load_public_key, sign

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: object, columns: int = 60, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "forgetpack.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


# ------------------------------------------------------------------ a) a private key given where a public one is wanted


def test_verify_with_a_private_key_says_so_in_full_on_a_narrow_terminal(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "key", tmp_path / "key.pub")
    patch = tmp_path / "p.fpatch.safetensors"
    sign(make_patch(base_matrices(), 1), load_private_key(tmp_path / "key")).save(patch)
    result = _cli("verify", patch, "--key", tmp_path / "key", columns=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == (f"error: {tmp_path / 'key'}: not a PEM public key (it is a private key; "
                        "give the public key, the .pub file written next to it)")
    # and the other way round: signing with the public key
    result = _cli("sign", patch, "--key", tmp_path / "key.pub", "-o", tmp_path / "q.fpatch.safetensors", columns=60)
    assert result.returncode == 1 and result.stderr.strip().endswith(
        "not an unencrypted PEM private key (it is a public key; signing needs the private key it was made from)")


def test_key_errors_quote_the_parser_whole(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    data = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    (tmp_path / "junk").write_bytes(data)
    with pytest.raises(ValueError) as parser:
        serialization.load_pem_public_key(data)
    with pytest.raises(SignatureError) as caught:
        load_public_key(tmp_path / "junk")
    whole = " ".join(str(parser.value).split())
    assert len(whole) > 80 and str(caught.value) == f"{tmp_path / 'junk'}: not a PEM public key ({whole})"  # was cut at 80


# ------------------------------------------------------------------ b) index --resume counts what it skipped


def test_resume_reports_the_skipped_images_as_already_indexed(tmp_path: Path, capsys, monkeypatch) -> None:
    import runtime
    from forgetpack.cli import main

    monkeypatch.setattr(runtime, "load", lambda source, **options: FakeFactory(int(str(source).split(":")[1]))())
    monkeypatch.setenv("COLUMNS", "200")
    images = tmp_path / "images"
    for i in range(200):
        write_digit(images / f"{i:03d}.png", i % 10, i)
    (images / "broken.png").write_bytes(b"not an image")
    index = tmp_path / "idx"
    args = ["index", str(images), "--model", "fake:0", "-o", str(index), "--shard-size", "64"]
    assert main([*args, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["items"], first["added"], first["already_indexed"], first["failed"]) == (201, 200, 0, 1)
    assert main([*args, "--resume", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["added"], again["already_indexed"], again["failed"], again["rows"]) == (0, 200, 0, 200)
    assert again["skipped"] == {"images": 201, "unreadable": 1}
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "201 listed, 0 added, 200 already indexed, 0 unreadable (and 1 an earlier run could not read)" in out


# ------------------------------------------------------------------ c) serve --ray drains on SIGTERM


@pytest.mark.xdist_group("ray")  # its Ray cluster never beside another one (tests/conftest.py)
def test_serve_ray_drains_on_sigterm(tmp_path_factory) -> None:
    pytest.importorskip("ray")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    child = subprocess.Popen([sys.executable, "-m", "forgetpack.cli", "serve", str(serve_export(tmp_path_factory)), "--ray", "1",
                              "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline, ready = time.monotonic() + 120, False
        while not ready and time.monotonic() < deadline and child.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        if not ready:  # say why: a child that exited says so on stderr
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"not ready in 120 s (exit {child.returncode}): {err[-3000:]}")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "SIGTERM: stopped taking requests, finished the accepted ones, shut Ray Serve down"
