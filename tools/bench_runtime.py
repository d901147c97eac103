"""Benchmark the ViT-B-32 image tower: torch eager vs onnxruntime fp32 vs int8, and patch hot-swap time.

In one run, on ``--threads`` threads (default 2): images per second at batch 1 and 32 for
torch (eager, inference mode), onnxruntime fp32 and onnxruntime int8, their ratios, and the
time to hot-swap a text-projection patch into a loaded onnxruntime model (``apply_patch``,
``remove_patch``, and the first classification after a swap, text features cached).

Targets (a benchmark, not a test): onnxruntime >= 1.5x torch at batch 1; int8 >= 2x
onnxruntime fp32; hot-swap <= 50 ms. On a shared machine the load average is printed too:
other processes skew every number.

    python tools/bench_runtime.py                       # exports ViT-B-32:none into a temp dir
    python tools/bench_runtime.py --export /tmp/vitb32 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def throughput(fn, batch: int, seconds: float) -> float:
    """Images per second of ``fn`` (one batch per call), after one warm-up call."""
    fn()
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 3:
            return count * batch / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="ViT-B-32:none")
    parser.add_argument("--export", type=Path, help="fp32 export of --spec to reuse (default: export into a temp dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per configuration")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    import runtime
    from forgetpack.engine.models import load_model
    from forgetpack.export import export, quantize_export
    from forgetpack.format.patch import Layer, Patch

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench-")
    fp32_dir = args.export or Path(tmp.name) / "fp32"
    if not (fp32_dir / "manifest.json").is_file():
        t = time.perf_counter()
        export(args.spec, fp32_dir)
        print(f"exported {args.spec} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    int8_dir = Path(tmp.name) / "int8"
    t = time.perf_counter()
    quantize_export(fp32_dir, int8_dir)
    print(f"quantized to int8 in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    def session(directory: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(directory / "image.onnx"), options, providers=["CPUExecutionProvider"])

    model = load_model(args.spec).model
    sessions = {"onnxruntime fp32": session(fp32_dir), "onnxruntime int8": session(int8_dir)}
    size = runtime.load(fp32_dir).backend.manifest.preprocess["size"]
    results: dict[str, dict[int, float]] = {}
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        pixels = rng.standard_normal((batch, 3, *size)).astype(np.float32)
        tensor = torch.from_numpy(pixels)

        def run_torch(tensor=tensor):
            with torch.inference_mode():
                model.encode_image(tensor)

        results.setdefault("torch eager", {})[batch] = throughput(run_torch, batch, args.seconds)
        for name, sess in sessions.items():
            results.setdefault(name, {})[batch] = throughput(lambda s=sess, p=pixels: s.run(["embeddings"], {"pixel_values": p}), batch, args.seconds)

    # Hot-swap: a rank-1 text-projection patch into a loaded onnxruntime model.
    served = runtime.load(fp32_dir, threads=args.threads)
    backend = served.backend
    target = backend.manifest.towers["text"].projection
    w = backend.matrices[target]
    x = backend.text_features(["a photo of a dog."])[0].astype(np.float64)
    info = backend.targets[target]
    u = x / (x @ x)  # feature side
    v = np.full(w.shape[1] if info.layout == "in_out" else w.shape[0], 1e-3)  # embedding side
    layer = Layer.lowrank(target, u[:, None], v[None, :]) if info.layout == "in_out" else Layer.lowrank(target, v[:, None], u[None, :])
    patch = Patch.create(args.spec, {target: w}, [layer], layouts={target: info.layout})
    labels = ["dog", "cat", "car", "tree", "house", "bird", "boat", "plane", "horse", "ship"]
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    served.classify([image], labels)  # warm: text features cached
    swap, unswap, first = [], [], []
    for _ in range(20):
        t = time.perf_counter()
        served.apply_patch(patch)
        swap.append(time.perf_counter() - t)
        t = time.perf_counter()
        served.classifier(labels)
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        served.remove_patch(patch)
        unswap.append(time.perf_counter() - t)

    lines = [f"ViT-B-32 image tower ({args.spec}), {args.threads} threads, load average {os.getloadavg()[0]:.2f}"]
    lines.append(f"{'backend':<18}" + "".join(f"{f'batch {b} img/s':>16}" for b in results["torch eager"]))
    for name, per_batch in results.items():
        lines.append(f"{name:<18}" + "".join(f"{v:>16.2f}" for v in per_batch.values()))
    ratios = {}
    for b in results["torch eager"]:
        ratios[f"ort_fp32/torch@{b}"] = results["onnxruntime fp32"][b] / results["torch eager"][b]
        ratios[f"ort_int8/ort_fp32@{b}"] = results["onnxruntime int8"][b] / results["onnxruntime fp32"][b]
        ratios[f"ort_int8/torch@{b}"] = results["onnxruntime int8"][b] / results["torch eager"][b]
    lines += [f"{k:<22} {v:6.2f}x" for k, v in ratios.items()]
    hot = {"apply_patch_ms": 1e3 * float(np.median(swap)), "remove_patch_ms": 1e3 * float(np.median(unswap)),
           "classifier_after_swap_ms": 1e3 * float(np.median(first))}
    lines.append("hot-swap (median of 20): " + ", ".join(f"{k} {v:.2f}" for k, v in hot.items()))
    targets = {
        "ort >= 1.5x torch at batch 1": ratios.get("ort_fp32/torch@1", 0) >= 1.5,
        "int8 >= 2x ort fp32 (batch 1)": ratios.get("ort_int8/ort_fp32@1", 0) >= 2.0,
        "hot-swap <= 50 ms": hot["apply_patch_ms"] <= 50,
    }
    lines += [f"target {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"throughput": {k: {str(b): v for b, v in d.items()} for k, d in results.items()},
                                         "ratios": ratios, "hot_swap": hot, "targets": targets,
                                         "loadavg": os.getloadavg()}, indent=2) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
