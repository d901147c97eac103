"""Load-test ``forgetpack serve`` on loopback while the default patch set is switched every second.

In one run (bounded in time and count, 127.0.0.1 only), against a server started as a subprocess:

1. in-process baseline: ``runtime`` classifying batches of 32 images (images/s);
2. the main phase: ``--concurrency`` clients send ``--images`` images per request for ``--seconds``,
   naming no patches (so the default applies) while the default set is switched every ``--switch``
   seconds; every answer is checked against the in-process reference for the patch state it
   reports (``Model.set_patches`` with those patches), and any failed request is counted;
3. 100 distinct patch sets in flight (each request names one) against requests naming none;
4. the default-switch latency: from the PUT's answer to the first answer under the new default;
5. the micro-batching gain: the same load against a server started with ``--max-batch 1``.

It prints the CPU, requests/s, p50/p99 latency, the ratio of service to in-process images/s, the
CPU per request of the server and of the load generator (with the budget the ratio target leaves
them), the HTTP floor (``GET /healthz``), the cost of 100 patch sets (each set's first request
apart), the switch latency (and the same request's without a switch) and the batching gain.
Targets (issue 12, a benchmark): service >= 80% of in-process at batch-32-sized load; 100 patch sets cost <= 10% throughput; a switch takes
effect within 50 ms; 0 failed requests and 0 wrong answers.

    python tools/load_test.py --source mini --seconds 60              # exports mini into a temp dir
    python tools/load_test.py --source /tmp/vitb32 --forget "tabby cat,goldfish,pizza,tench,volcano"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine_limits import cpu_line  # tools/ is on the path when this script runs

TOLERANCE = 1e-4  # probabilities: a micro-batch of another size may round differently
RATIO_TARGET = 0.80  # service images/s against in-process (issue 12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: Path, registry: Path, token_file: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "forgetpack.cli", "serve", str(source), "--host", "127.0.0.1", "--port", str(port),
           "--patches", str(registry), "--admin-token-file", str(token_file), "--threads", str(threads), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # 60 s at most
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the server did not become ready in 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def make_patches(spec: str, names: list[str], folder: Path) -> list[Path]:
    """Real forget patches, one per name, as ``forgetpack forget SPEC --forget NAME`` makes them."""
    from forgetpack.engine.models import load_model
    from forgetpack.engine.solve import forget

    loaded = load_model(spec)
    paths = []
    for name in names:
        path = folder / f"{name.replace(' ', '_')}.fpatch.safetensors"
        forget(loaded, [name]).patch.save(path)
        paths.append(path)
    return paths


async def run_load(url: str, seconds: float, concurrency: int, make_body, on_answer, max_requests: int) -> dict:
    """``concurrency`` clients for ``seconds`` (and at most ``max_requests``); latency and failures."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.perf_counter() + seconds
    counter = itertools.count()

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline and next(counter) < max_requests:
            body, meta = make_body()
            start = time.perf_counter()
            try:
                r = await http.post("/v1/classify", json=body)
            except httpx.HTTPError as exc:
                failures.append(f"transport: {exc!r}")
                continue
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                failures.append(f"{r.status_code}: {r.text[:200]}")
                continue
            on_answer(r.json(), meta)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "failed": len(failures), "failures": failures[:5], "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def cpu_ms_each(per_s: float) -> float:
    """Milliseconds of this machine's CPU time each of ``per_s`` items a second gets with every CPU busy."""
    return (os.cpu_count() or 1) * 1000 / per_s


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process (all its threads) has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http_floor(url: str, seconds: float, concurrency: int, max_requests: int) -> tuple[float, int]:
    """Requests/s of ``GET /healthz``, which does nothing, at ``concurrency``: the most any route of
    this server answers on this machine with the load generator beside it; and how many."""
    import httpx

    deadline, counter, done = time.perf_counter() + seconds, itertools.count(), [0]

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline and next(counter) < max_requests:
            (await http.get("/healthz")).raise_for_status()
            done[0] += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return done[0] / (time.perf_counter() - start), done[0]


async def switch_defaults(url: str, headers: dict, sets: list[list[str]], every: float, seconds: float) -> int:
    import httpx

    switches = 0
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        end = time.perf_counter() + seconds
        for ids in itertools.cycle(sets):
            if time.perf_counter() + every > end:
                return switches
            await asyncio.sleep(every)
            r = await http.put("/v1/default-patches", json={"patches": ids})
            r.raise_for_status()
            switches += 1
    return switches


def switch_latency(url: str, headers: dict, sets: list[list[str]], body: dict, rounds: int) -> dict:
    """Milliseconds from a switch's answer to the first classify answer that reports the new default
    state, how many requests that took, and the same request's latency with no switch before it:
    the difference is what the switch itself costs (the rest is the request's own inference)."""
    import httpx

    def timed(http: httpx.Client) -> tuple[float, str]:
        start = time.perf_counter()
        digest = http.post("/v1/classify", json=body).json()["patch_state"]["digest"]
        return 1000 * (time.perf_counter() - start), digest

    after, requests, plain = [], [], []
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
        for i in range(rounds):
            want = http.put("/v1/default-patches", json={"patches": sets[i % len(sets)]}).json()["default"]["digest"]
            waited, seen, digest = 0.0, 0, None
            while digest != want and seen < 1000:
                ms, digest = timed(http)
                waited, seen = waited + ms, seen + 1
            after.append(waited)
            requests.append(seen)
            plain.append(timed(http)[0])  # the same state again: no switch before it
    return {"p50": float(np.median(after)), "max": float(max(after)), "requests_max": max(requests),
            "unswitched_p50": float(np.median(plain)), "cost_p50": float(np.median(after) - np.median(plain))}


def service_core(source: Path, args: argparse.Namespace, pool: list, labels: list[str]) -> float:
    """Images/s of the service's own request path (``Service.classify``: decoding, patch states,
    micro-batching) at the same concurrency, without HTTP: what the web layer and the client cost."""
    from runtime.serve import ServeConfig
    from runtime.serve.service import Service

    blobs = []
    for im in pool:
        out = io.BytesIO()
        im.save(out, "PNG")
        blobs.append(out.getvalue())
    service = Service(ServeConfig(source=str(source), threads=args.server_threads))
    seconds = max(3.0, args.seconds / 10)

    async def client(end: float, done: list[int], offset: int) -> None:
        i = offset
        while time.perf_counter() < end:
            await service.classify([blobs[(i + k) % len(blobs)] for k in range(args.images)], labels, None, [], len(labels))
            done[0] += args.images
            i += 7

    async def run() -> float:
        done, start = [0], time.perf_counter()
        await asyncio.gather(*(client(start + seconds, done, c) for c in range(args.concurrency)))
        return done[0] / (time.perf_counter() - start)

    try:
        return asyncio.run(run())
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="mini", help="an export directory, or a model spec to export first")
    parser.add_argument("--forget", default="seven,three,one,four,nine", help="names to make patches for (5 give >100 sets)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the main phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--images", type=int, default=2, help="images per request (16 clients x 2 = batch-32-sized load)")
    parser.add_argument("--switch", type=float, default=1.0, help="seconds between default switches")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the in-process baseline")
    parser.add_argument("--server-threads", type=int, help="onnxruntime threads of the server (default: --threads)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="a bound on requests per phase")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    args.server_threads = args.server_threads or args.threads

    import runtime
    from forgetpack.evaluation.datasets import load_dataset
    from forgetpack.format.patch import read_patch

    tmp = tempfile.TemporaryDirectory(prefix="load-test-")
    work = Path(tmp.name)
    source = Path(args.source)
    if not source.is_dir():
        from forgetpack.export import export

        print(f"exporting {args.source} ...", file=sys.stderr)
        source = work / "export"
        export(args.source, source, force=True)
    spec = runtime.load(source).model_id
    print(f"making patches for {args.forget} ...", file=sys.stderr)
    (work / "patches").mkdir()
    names = [n.strip() for n in args.forget.split(",") if n.strip()]
    paths = make_patches(spec if spec != "mini" else "mini", names, work / "patches")
    patches = {name: read_patch(p) for name, p in zip(names, paths, strict=True)}

    data = load_dataset("mnist")
    pool = data.images[:64]
    labels = list(data.classnames) if spec == "mini" else sorted(set(names) | {"dog", "cat", "car", "tree", "house"})
    encoded = []
    for im in pool:
        out = io.BytesIO()
        im.save(out, "PNG")
        encoded.append(base64.b64encode(out.getvalue()).decode())

    # 1. in-process baseline and the references
    model = runtime.load(source, threads=args.threads)

    def in_process(batch: list) -> float:
        model.classify(batch, labels)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < max(3.0, args.seconds / 10) or count < 3:
            model.classify(batch, labels)
            count += 1
        return count * len(batch) / (time.perf_counter() - start)

    inprocess = in_process(pool[:32])  # decoded images: the model's own rate
    # PNG bytes, as the service gets them: a caller classifying files decodes them too
    inprocess_png = in_process([base64.b64decode(e) for e in encoded[:32]])
    core = service_core(source, args, pool, labels)
    references: dict[tuple[str, ...], np.ndarray] = {}

    def reference(digests: tuple[str, ...]) -> np.ndarray:
        if digests not in references:
            by_digest = {p.digest: p for p in patches.values()}
            model.set_patches([by_digest[d] for d in digests])
            references[digests] = np.stack([p.probs for p in model.classify(pool, labels)])
            model.set_patches([])
        return references[digests]

    token = secrets.token_hex(24)
    token_file = work / "token"
    token_file.write_text(token)
    headers = {"Authorization": f"Bearer {token}"}
    registry = work / "registry"
    proc, url = start_server(source, registry, token_file, args.server_threads, [])
    results: dict = {"source": str(args.source), "model": spec, "in_process_images_per_s": inprocess,
                     "in_process_png_images_per_s": inprocess_png,
                     "service_core_images_per_s": core,
                     "cpu": cpu_line(), "load_average": os.getloadavg()}
    try:
        import httpx

        for name, path in zip(names, paths, strict=True):
            with path.open("rb") as handle:
                httpx.post(url + "/v1/patches", files={"file": handle}, data={"name": name.replace(" ", "_")},
                           headers=headers, timeout=60).raise_for_status()
        ids = [n.replace(" ", "_") for n in names]
        rng = np.random.default_rng(0)
        answers: list[tuple[dict, list[int]]] = []

        def body(patch_ids=None):
            def make():
                picked = [int(i) for i in rng.integers(0, len(pool), args.images)]
                b = {"images": [encoded[i] for i in picked], "labels": labels, "top_k": len(labels)}
                if patch_ids is not None:
                    b["patches"] = patch_ids()
                return b, picked
            return make

        def keep(answer: dict, picked: list[int]) -> None:
            answers.append((answer, picked))

        # 2. the main phase, with the default switched every second
        sets = [[], ids[:1], ids[1:2], ids[:2]]

        async def main_phase() -> tuple[dict, int]:
            load = run_load(url, args.seconds, args.concurrency, body(), keep, args.max_requests)
            return await asyncio.gather(load, switch_defaults(url, headers, sets, args.switch, args.seconds))

        used = cpu_seconds(proc.pid)
        main_result, switches = asyncio.run(main_phase())
        main_result["server_cpu_ms"] = 1000 * (cpu_seconds(proc.pid) - used) / max(main_result["requests"], 1)
        wrong, states = 0, set()
        for answer, picked in answers:
            digests = tuple(answer["patch_state"]["patches"])
            states.add(digests)
            got = np.array([[{t["label"]: t["prob"] for t in r["top"]}[label] for label in labels] for r in answer["results"]])
            if not np.allclose(got, reference(digests)[picked], atol=TOLERANCE, rtol=0):
                wrong += 1
        main_result.update(switches=switches, states_seen=len(states), wrong_answers=wrong,
                           images_per_s=main_result["requests_per_s"] * args.images)
        main_result["ratio_to_in_process"] = main_result["images_per_s"] / inprocess
        main_result["ratio_to_in_process_png"] = main_result["images_per_s"] / inprocess_png
        results["main"] = main_result

        # 3. 100 distinct patch sets in flight against none
        distinct = [list(p) for n in range(1, len(ids) + 1) for p in itertools.permutations(ids, n)][:100]
        cycle = itertools.cycle(distinct)
        short = max(3.0, args.seconds / 4)
        used = cpu_seconds(proc.pid)
        floor, count = asyncio.run(http_floor(url, short, args.concurrency, args.max_requests))
        cpu_ms = 1000 * (cpu_seconds(proc.pid) - used) / max(count, 1)  # the server's own, whatever the client costs
        results["http_floor"] = {"requests_per_s": floor, "images_per_s": floor * args.images,
                                 "ratio_to_in_process_png": floor * args.images / inprocess_png, "server_cpu_ms": cpu_ms,
                                 # the CPUs are saturated: what the server did not use per request, the client did
                                 "client_cpu_ms": cpu_ms_each(floor) - cpu_ms,
                                 "budget_cpu_ms": args.images * cpu_ms_each(RATIO_TARGET * inprocess_png)}
        # each set's first request builds its state and classifier: timed apart, so the phases compare steady states
        first = time.perf_counter()
        for patch_set in distinct:
            httpx.post(url + "/v1/classify", json={**body(lambda s=patch_set: s)()[0], "images": encoded[:1]},
                       timeout=60).raise_for_status()
        first_use_ms = 1000 * (time.perf_counter() - first) / len(distinct)
        none = asyncio.run(run_load(url, short, args.concurrency, body(lambda: []), lambda a, m: None, args.max_requests))
        many = asyncio.run(run_load(url, short, args.concurrency, body(lambda: next(cycle)), lambda a, m: None, args.max_requests))
        results["patch_sets"] = {"sets": len(distinct), "none_requests_per_s": none["requests_per_s"],
                                 "sets_requests_per_s": many["requests_per_s"], "failed": none["failed"] + many["failed"],
                                 "cost": 1 - many["requests_per_s"] / none["requests_per_s"], "first_use_ms": first_use_ms}

        # 4. default-switch latency
        one = {"images": encoded[:1], "labels": labels}
        results["switch_ms"] = switch_latency(url, headers, sets[1:] + sets[:1], one, 20)
    finally:
        stop(proc)

    # 5. the micro-batching gain: the same load without batching
    proc, url = start_server(source, work / "registry-nobatch", token_file, args.server_threads, ["--max-batch", "1"])
    try:
        nobatch = asyncio.run(run_load(url, max(3.0, args.seconds / 4), args.concurrency, body(lambda: []),
                                       lambda a, m: None, args.max_requests))
    finally:
        stop(proc)
    results["batching_gain"] = none["requests_per_s"] / nobatch["requests_per_s"]

    m, ps, sw = results["main"], results["patch_sets"], results["switch_ms"]
    print(cpu_line())
    print(f"model {spec}, {args.concurrency} clients x {args.images} images, {m['seconds']:.0f} s, "
          f"default switched {m['switches']} times ({m['states_seen']} states seen); load average {results['load_average'][0]:.2f}")
    print(f"requests/s {m['requests_per_s']:.1f} (images/s {m['images_per_s']:.1f}); p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms")
    print(f"failed requests {m['failed']}, wrong answers {m['wrong_answers']} of {m['requests']}")
    print(f"in-process runtime, batch 32: {inprocess:.1f} images/s decoded, {inprocess_png:.1f} from PNG bytes; "
          f"service/in-process {m['ratio_to_in_process']:.2f}, {m['ratio_to_in_process_png']:.2f} from PNG bytes "
          f"(target >= {RATIO_TARGET:.2f})")
    server_only = args.images * cpu_ms_each(inprocess_png) / m["server_cpu_ms"]  # images/s on every CPU, as a ratio
    print(f"the server's CPU per request: {m['server_cpu_ms']:.2f} ms, so with a client that cost nothing {os.cpu_count()} "
          f"CPUs would pass at most {server_only:.2f} of in-process from PNG bytes (the client shares them here)")
    per_request_ms = 1000 * (1 / m["requests_per_s"] - args.images / inprocess_png)
    print(f"what a request costs beyond decoding and inference: {per_request_ms:.2f} ms "
          f"(inference and decoding of its {args.images} images: {1000 * args.images / inprocess_png:.2f} ms)")
    fl = results["http_floor"]
    print(f"a request that does nothing (GET /healthz), same concurrency: {fl['requests_per_s']:.0f} requests/s, so at "
          f"{args.images} images a request no route here passes {fl['images_per_s']:.0f} images/s: "
          f"{fl['ratio_to_in_process_png']:.2f} of in-process from PNG bytes; it costs the server {fl['server_cpu_ms']:.2f} ms of CPU")
    print(f"the load generator's CPU per request: about {fl['client_cpu_ms']:.2f} ms; {RATIO_TARGET:.2f} of in-process at "
          f"{args.images} images a request leaves {fl['budget_cpu_ms']:.2f} ms of CPU per request for client and server together")
    print(f"service request path without HTTP (Service.classify, same concurrency): {core:.1f} images/s, "
          f"{core / inprocess:.2f} of in-process")
    print(f"100 distinct patch sets: {ps['sets_requests_per_s']:.1f} req/s vs {ps['none_requests_per_s']:.1f} with none: "
          f"cost {100 * ps['cost']:.1f}% (target <= 10%); a set's first request, one image: {ps['first_use_ms']:.1f} ms")
    print(f"default switch takes effect in p50 {sw['p50']:.1f} ms, max {sw['max']:.1f} ms (target <= 50 ms), seen by "
          f"request {sw['requests_max']} at the latest; the same request with no switch before it: p50 "
          f"{sw['unswitched_p50']:.1f} ms, so the switch itself costs {sw['cost_p50']:.1f} ms")
    print(f"micro-batching gain: {results['batching_gain']:.2f}x requests/s over --max-batch 1")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    ok = m["failed"] == 0 and m["wrong_answers"] == 0 and ps["failed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
