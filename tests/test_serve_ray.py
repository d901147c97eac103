"""``forgetpack serve --ray``: a local Ray (2 CPUs), two replicas of the same app sharing one registry
folder; requests with and without a patch are answered identically by both, through deployment handles
and through Ray's HTTP proxy on 127.0.0.1.
"""

from __future__ import annotations

import pytest
from serve_helpers import digit_names, digits, forget_patches, free_port, png, serve_export

from forgetpack.format.patch import read_patch
from runtime.serve import ServeConfig
from runtime.serve.registry import PatchRegistry

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest-xdist (tests/conftest.py)


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    import ray
    from ray import serve

    from runtime.serve.ray_app import build

    patches = forget_patches(tmp_path_factory)
    folder = tmp_path_factory.mktemp("ray-registry")
    registry = PatchRegistry(folder, check=lambda patch: None)  # the replicas check the fit when they load it
    registry.add_file(patches["seven"], "seven")
    config = ServeConfig(source=str(serve_export(tmp_path_factory)), patches_dir=str(folder), threads=1, max_wait_ms=1)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build(config, replicas=2, num_cpus=0.5), name="forgetpack", route_prefix="/")
        yield handle, port, read_patch(patches["seven"]).digest
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_identically_with_and_without_a_patch(ray_app):
    import httpx

    handle, port, seven = ray_app
    images = [png(im) for im in digits("seven", 2)]
    labels = digit_names()
    answers: dict[tuple[str, str], dict] = {}  # (patch set, replica) -> answer without the replica name
    for _ in range(15):  # bounded: rounds of 4 concurrent calls until both replicas answered both sets
        calls = [(name, handle.classify.remote(images, labels, patches=ids, top_k=10))
                 for name, ids in (("none", []), ("seven", ["seven"])) * 2]
        for name, call in calls:
            answer = call.result(timeout_s=60)
            answers[(name, answer.pop("replica"))] = answer
        if len({replica for _, replica in answers}) == 2 and len(answers) == 4:
            break
    replicas = sorted({replica for _, replica in answers})
    assert len(replicas) == 2, f"only {replicas} answered"
    for name in ("none", "seven"):
        a, b = (answers[(name, r)] for r in replicas)
        assert a == b  # identical, to the last bit of every probability
    assert answers[("seven", replicas[0])]["patch_state"]["patches"] == [seven]
    assert [r["label"] for r in answers[("none", replicas[0])]["results"]] == ["seven", "seven"]
    assert all(r["label"] != "seven" for r in answers[("seven", replicas[0])]["results"])

    # the same through Ray's HTTP proxy (loopback), which names the replica in a header
    seen = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for _ in range(20):
            r = client.post("/v1/classify", json={"images": [b64_of(images[0])], "labels": labels, "patches": ["seven"], "top_k": 10})
            assert r.status_code == 200, r.text
            seen[r.headers["x-forgetpack-replica"]] = r.json()
            if len(seen) == 2:
                break
    first = next(iter(seen.values()))
    assert all(answer == first for answer in seen.values())
    # one image here, two in the handle calls: a different batch may change the last bits, never the answer
    over_http, by_handle = first["results"][0], answers[("seven", replicas[0])]["results"][0]
    assert over_http["label"] == by_handle["label"]
    assert _numbers(over_http) == pytest.approx(_numbers(by_handle), abs=1e-5)


def _numbers(value: object) -> list[float]:
    """Every number in a JSON answer, in order."""
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _numbers(value[k])]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def b64_of(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
