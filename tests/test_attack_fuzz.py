"""Issue 24's fuzzing: the service's schema fuzz also sends every JSON body chunked (no
Content-Length), multipart forms with edge values, and well-formed patches with crafted metadata;
the CLI gets the same patches and templates. No answer is a 5xx and no command raises (a raised
exception is what prints a traceback). Seeded and bounded: a few dozen cases per kind."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from serve_helpers import ADMIN, ADMIN_TOKEN, digits, png

from forgetpack.cli import main
from forgetpack.format.fileio import RawTensor, serialize
from forgetpack.format.metadata import UNSIGNED_KEYS
from forgetpack.format.metadata import digest as content_digest
from forgetpack.format.patch import read_patch
from runtime.serve import ServeConfig, create_app
from runtime.serve.config import Limits

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@pytest.fixture
def app(export_dir, seven, tmp_path):
    config = ServeConfig(source=str(export_dir), patches_dir=str(tmp_path / "reg"), admin_token=ADMIN_TOKEN, threads=1,
                         limits=Limits(max_pixels=256 * 256, max_body_bytes=64 * 1024))
    app = create_app(config)
    app.state.service.registry.add_file(seven, "seven")
    return app


def chunks(data: bytes):
    """A generator body: the client sends it chunked, with no Content-Length."""
    return (data[i : i + 512] for i in range(0, max(len(data), 1), 512))


def no_server_error(response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    assert response.headers.get("content-type", "").startswith(("application/json", "text/html", "text/plain; version")), what


def test_every_json_body_of_the_schema_sent_chunked_finds_no_server_error(app) -> None:
    import schemathesis
    from fastapi.testclient import TestClient

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen = 0
    with TestClient(app) as client:
        for operation in schema.get_all_operations():
            op = operation.ok()

            @FUZZ
            @given(case=op.as_strategy())
            def fuzz(case):
                nonlocal seen
                if case.media_type != "application/json" or not isinstance(case.body, (dict, list)):
                    return
                body = json.dumps(case.body, default=str).encode()
                for headers in ({}, ADMIN):
                    response = client.request(case.method, case.formatted_path, params=case.query or None,
                                              content=chunks(body), headers={**headers, "content-type": "application/json"})
                    no_server_error(response, f"{case.method} {case.formatted_path} chunked")
                seen += 1

            fuzz()
    assert seen >= 25  # classify, embed/text, embed/image, default-patches at least


EDGE_TEXT = st.one_of(st.sampled_from(["", " ", "²", "٣", "-1", "0", "1e3", "99999999999999999999", "{}", "{:>999999999}{}", "{:>99999999999999}{}",
                                       "{0}", "{!r}", "{{}}", "a\x00b", "\u202e", "seven", "a photo of a {}."]),
                      st.text(max_size=40))


def test_multipart_forms_with_edge_values_find_no_server_error(app) -> None:
    from fastapi.testclient import TestClient

    seven = png(digits("seven", 1)[0])
    with TestClient(app) as client:

        @FUZZ
        @given(top_k=EDGE_TEXT, labels=st.lists(EDGE_TEXT, max_size=4), template=EDGE_TEXT,
               patches=st.lists(EDGE_TEXT, max_size=2), image=st.one_of(st.just(None), st.binary(max_size=300)), name=EDGE_TEXT)
        def fuzz(top_k, labels, template, patches, image, name):
            files = [("images", (name or "x.png", image if image is not None else seven, "image/png"))]
            data = {"labels": labels, "top_k": top_k, "templates": [template], "patches": patches}
            no_server_error(client.post("/v1/classify", files=files, data=data), f"multipart {data!r}")

        fuzz()


# ---------------------------------------------------------------------------- crafted patch metadata


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=12)
RECIPES = st.one_of(JSON_VALUE, st.fixed_dictionaries({"forget": JSON_VALUE}, optional={"preserve": JSON_VALUE,
                                                                                          "templates": JSON_VALUE}))


def crafted(path, patch, recipe, effect):
    """``patch`` with its recipe and effect replaced and a valid digest over them."""
    tensors = {k: RawTensor.from_array(v) for k, v in patch.tensors().items()}
    meta = {k: v for k, v in patch.metadata().items() if k not in UNSIGNED_KEYS}
    meta["recipe"] = json.dumps(recipe, allow_nan=True)
    meta["effect"] = json.dumps(effect, allow_nan=True)
    meta["digest"] = content_digest(patch.tensors(), meta)
    path.write_bytes(serialize(tensors, meta))
    return path


def test_crafted_patch_metadata_finds_no_server_error_and_no_cli_traceback(app, seven, tmp_path, capsys) -> None:
    from fastapi.testclient import TestClient

    patch = read_patch(seven)
    path = tmp_path / "crafted.fpatch.safetensors"
    outcomes = {"refused": 0, "accepted": 0}
    with TestClient(app) as client:

        @FUZZ
        @given(recipe=RECIPES, effect=JSON_VALUE)
        def fuzz(recipe, effect):
            crafted(path, patch, recipe, effect)
            upload = client.post("/v1/patches", files={"file": path.read_bytes()}, data={"name": "crafted"}, headers=ADMIN)
            no_server_error(upload, f"upload {recipe!r}")
            outcomes["accepted" if upload.status_code == 201 else "refused"] += 1
            no_server_error(client.get("/v1/patches"), "list after upload")
            for command in (["inspect", path], ["inspect", path, "--json"], ["verify", path]):
                code = main([str(a) for a in command])  # an unexpected exception fails the test here
                out, err = capsys.readouterr()
                assert code in (0, 1) and "Traceback" not in out + err
                if code == 1:
                    assert err.count("\n") == 1, err
            if upload.status_code == 201:
                client.delete(f"/v1/patches/{patch.digest.split(':', 1)[1]}", headers=ADMIN)

        fuzz()
    assert outcomes["refused"] > 0  # the strategies do reach the rule


def test_the_cli_takes_the_same_templates_without_a_traceback(export_dir, tmp_path, capsys) -> None:
    image = tmp_path / "seven.png"
    image.write_bytes(png(digits("seven", 1)[0]))

    @settings(FUZZ, max_examples=12)
    @given(template=EDGE_TEXT)
    def fuzz(template):
        code = main(["classify", str(export_dir), str(image), "--labels", "seven,one", "--template", template])
        out, err = capsys.readouterr()
        assert code in (0, 1) and "Traceback" not in out + err
        if code == 1:
            assert err.count("\n") == 1, err
        else:
            assert template.count("{}") == 1, f"template {template!r} was accepted"

    fuzz()
