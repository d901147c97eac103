"""Benchmark the embedding index: indexing local vs Ray, rescoring and searching a million rows.

In one run:

1. index throughput of the local engine and of Ray Data on a local instance, on the same images
   (held-out MNIST digits written as PNG; every image costs the same after resizing), and the
   Ray overhead (target <= 15%), with its start cost and steady rate apart;
2. rescore of ``--rows`` stored embeddings (synthetic unit vectors in a real index, default
   1,000,000) with a new patch: time and peak memory of a fresh process (targets <= 10 s and
   <= 1 GB on 2 cores), and the ratio of rescoring to re-embedding the same collection;
3. search latency p50 on those rows: exact scan, then through the IVF-PQ index.

The machine may be shared: the load average is printed with each measurement, and each process's CPU
time (``resource.getrusage``) beside its wall time, since other processes stretch the wall time only.
The CPU model and its instruction-set features are printed first (tools/machine_limits.py).

    python tools/bench_index.py                                  # mini, exported into a temp dir
    python tools/bench_index.py --export /tmp/vitb32 --images 128 # a ViT-B-32 export (512-d)
    python tools/bench_index.py --rows 100000 --no-ann           # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
from machine_limits import cpu_features  # tools/ is on the path when this script runs

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_images(folder: Path, count: int) -> None:
    from forgetpack.evaluation.datasets import load_dataset

    data = load_dataset("mnist")
    folder.mkdir(parents=True)
    for i in range(count):  # past the held-out set, shift the image by a pixel so every file is new content
        image = data.images[i % len(data.images)]
        if i >= len(data.images):
            image = image.rotate(0, translate=(i // len(data.images), 0))
        image.save(folder / f"{i:06d}.png")


def index_throughput(export: Path, images: Path, work: Path, threads: int, workers: int, shard: int) -> dict:
    """Each engine on the same images, LanceDB imported and Ray started (and ``ray.data`` imported)
    beforehand. Two figures per engine, from the time each shard was committed:

    - the whole run's rate (model loading and, for Ray, starting its actor processes included);
    - the start cost (until the first shard is committed) and the steady rate after it, which needs
      four shards or more to mean anything.

    Ray's start is a fixed cost of seconds; what it costs a collection depends on how long the run
    is, so the overhead is also extrapolated to a run of ``--extrapolate`` images at the steady rates."""
    import ray

    from runtime.index import build_index

    warm = work / "warm"
    warm.mkdir()
    for image in sorted(images.iterdir())[:4]:
        (warm / image.name).write_bytes(image.read_bytes())
    build_index(warm, work / "warm.index", export, threads=threads, ann=False)  # imports lancedb, onnxruntime

    def timed(engine: str, **options) -> tuple[object, dict]:
        stamps: list[tuple[int, float]] = []
        load = [round(x, 2) for x in os.getloadavg()]
        report = build_index(images, work / engine, export, engine=engine, shard_size=shard, ann=False,
                             progress=lambda p: stamps.append((p.items_done, p.seconds)), **options)
        # Ray Data hands a shard's result over when the next shard is done and the last ones in a burst,
        # so the steady rate runs from the first commit to the last but one (the same for both engines)
        (first_items, first_s), (last_items, last_s) = stamps[0], stamps[max(0, len(stamps) - 2)]
        steady = (last_items - first_items) / (last_s - first_s) if last_s > first_s else float("nan")
        return report, {"s": round(report.seconds, 2), "images_per_s": round(report.images_per_s, 2),
                        "first_shard_s": round(first_s, 2), "steady_images_per_s": round(steady, 2), "load_average": load}

    local, local_figures = timed("local", threads=threads)
    start = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    import ray.data  # noqa: F401  (a one-time import, like LanceDB's above)

    ray_start = time.perf_counter() - start
    try:
        remote, ray_figures = timed("ray", workers=workers, threads=max(1, threads // workers))
    finally:
        ray.shutdown()
    return {"images": local.items, "shard_size": shard, "ray_init_s": round(ray_start, 2),
            "local": local_figures, "ray": ray_figures,
            "ray_overhead": round(1 - remote.images_per_s / local.images_per_s, 4),
            "ray_steady_overhead": round(1 - ray_figures["steady_images_per_s"] / local_figures["steady_images_per_s"], 4),
            "ray_start_cost_s": round(ray_figures["first_shard_s"] - local_figures["first_shard_s"], 2)}


def extrapolated_overhead(index: dict, images: int) -> float:
    """Ray's overhead on a run of ``images``: its extra start cost plus both steady rates."""
    local = index["local"]["first_shard_s"] + images / index["local"]["steady_images_per_s"]
    remote = index["ray"]["first_shard_s"] + images / index["ray"]["steady_images_per_s"]
    return round(1 - local / remote, 4)


def synthetic_index(export: Path, uri: Path, rows: int, chunk: int = 16384) -> float:
    """An index of ``rows`` random unit embeddings, recorded as made by ``export``'s image tower, in shards
    (fragments) of ``chunk`` rows, as ``forgetpack index --shard-size`` would commit them."""
    import runtime
    from runtime.index.build import _embed_dim
    from runtime.index.store import IndexStore, ShardRows, model_identity

    model = runtime.load(export)
    dim = _embed_dim(model)
    store = IndexStore.create(uri, model_identity(model, str(export)), dim)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for ordinal, first in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - first)
        e = rng.standard_normal((n, dim), dtype=np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        names = [f"synthetic/{first + i:09d}" for i in range(n)]
        store.commit_shard(f"synthetic-{ordinal}", ordinal, ShardRows(names, names, e, n, []), "bench", 0.0)
    return time.perf_counter() - start


def new_patch(export: Path, out: Path) -> Path:
    """A rank-2 patch on the export's text projection (what matters here is its shape, not what it forgets)."""
    import runtime
    from forgetpack.format.patch import Layer, Patch

    model = runtime.load(export)
    target = model.backend.manifest.towers["text"].projection
    info = model.backend.targets[target]
    w = model.backend.matrices[target]
    rng = np.random.default_rng(1)
    layer = Layer.lowrank(target, rng.standard_normal((w.shape[0], 2)) * 0.01, rng.standard_normal((2, w.shape[1])))
    Patch.create(model.model_id, {target: w}, [layer], layouts={target: info.layout}, recipe={"forget": ["bench"]}).save(out)
    return out


# Peak memory is the process's VmHWM: resource.getrusage's ru_maxrss would include the parent's size at
# fork (Linux carries the old mm's high-water mark across exec), and this parent holds models.
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"
RESCORE = textwrap.dedent(f"""
    import json, resource, sys, time
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    from runtime.index import rescore
    times, cpus = [], []
    for _ in range(2):  # cold (imports lancedb, loads the model), then warm
        start, used = time.perf_counter(), cpu()
        report = rescore(sys.argv[1], sys.argv[3].split(","), patches=[sys.argv[2]], compare=sys.argv[4] == "1")
        times.append(time.perf_counter() - start)
        cpus.append(cpu() - used)
    print(json.dumps({{"cold_s": round(times[0], 2), "warm_s": round(times[1], 2), "cold_cpu_s": round(cpus[0], 2),
                      "warm_cpu_s": round(cpus[1], 2), "rows": report.rows, "peak_rss_mb": round({PEAK})}}))
""")
BASELINE = textwrap.dedent(f"""
    import json, sys
    import lancedb, pyarrow
    from runtime.index import IndexStore
    from runtime.index.rescore import open_session
    open_session(IndexStore.open(sys.argv[1]))  # the model as rescore loads it
    print(json.dumps({{"peak_rss_mb": round({PEAK})}}))
""")


def run_json(script: str, *args: str) -> dict:
    load = [round(x, 2) for x in os.getloadavg()]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_average": load}


def search_latency(uri: Path, queries: int, k: int = 10) -> float:
    """p50 of query embedding (text tower, patched model) plus nearest-neighbour lookup, in ms."""
    from runtime.index.rescore import open_session
    from runtime.index.search import nearest, query_vector
    from runtime.index.store import IndexStore

    store = IndexStore.open(uri)
    model, _ = open_session(store)
    times = []
    for i in range(queries + 1):
        start = time.perf_counter()
        nearest(store, query_vector(model, [], f"a photo of the number {DIGITS[i % 10]} {i}"), k)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]) * 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="mini", help="model spec to export when --export is not given")
    parser.add_argument("--export", type=Path, help="an export directory to reuse")
    parser.add_argument("--images", type=int, default=4096,
                        help="images for the throughput comparison (enough for mini to amortise Ray's actor start)")
    parser.add_argument("--shard-size", type=int, default=256, help="shard size for the throughput comparison")
    parser.add_argument("--extrapolate", type=int, default=100_000,
                        help="images of the run to which Ray's overhead is extrapolated from the measured rates")
    parser.add_argument("--rows", type=int, default=1_000_000, help="stored embeddings to rescore and search (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="Ray actors (threads are split between them)")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--ann", action=argparse.BooleanOptionalAction, default=True, help="also time IVF-PQ search")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="lancedb fork support")  # our children exec a new interpreter

    tmp = tempfile.TemporaryDirectory(prefix="bench-index-")
    work = Path(tmp.name)
    export = args.export
    if export is None:
        from forgetpack.export import export as run_export

        export = work / "export"
        run_export(args.spec, export, force=True)
    from runtime.index.store import IndexStore

    results: dict = {"model": str(export), "cpu": cpu_features(), "threads": args.threads,
                     "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps({"cpu": results["cpu"]}), flush=True)
    write_images(work / "images", args.images)
    results["index"] = index_throughput(export, work / "images", work, args.threads, args.workers, args.shard_size)
    results["index"][f"ray_overhead_at_{args.extrapolate}_images"] = extrapolated_overhead(results["index"], args.extrapolate)
    print(json.dumps({"index": results["index"]}), flush=True)

    if args.rows == 0:  # the throughput comparison only
        print(json.dumps(results, indent=2))
        return 0
    uri = work / "million"
    results["synthetic_write_s"] = round(synthetic_index(export, uri, args.rows), 2)
    patch = new_patch(export, work / "new.fpatch.safetensors")
    labels = ",".join(DIGITS)
    results["embed_dim"] = IndexStore.open(uri).dim
    results["rescore"] = run_json(RESCORE, str(uri), str(patch), labels, "0")
    results["rescore_compare"] = run_json(RESCORE, str(uri), str(patch), labels, "1")
    results["process_baseline_rss_mb"] = run_json(BASELINE, str(uri))["peak_rss_mb"]
    reembed_s = args.rows / results["index"]["local"]["images_per_s"]
    results["reembed_estimate_s"] = round(reembed_s, 1)
    results["rescore_vs_reembed"] = round(results["rescore"]["cold_s"] / reembed_s, 6)
    print(json.dumps({"rescore": results["rescore"], "rescore_vs_reembed": results["rescore_vs_reembed"]}), flush=True)

    results["search_exact_p50_ms"] = round(search_latency(uri, 3), 2)
    if args.ann:
        start = time.perf_counter()
        IndexStore.open(uri).build_ann(min_rows=1)
        results["ann_build_s"] = round(time.perf_counter() - start, 1)
        results["search_ann_p50_ms"] = round(search_latency(uri, args.queries), 2)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
