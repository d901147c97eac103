"""Benchmark ViT-B-32 in the runtime against the machine's limit: images, text prompts and patch hot-swap.

In one run, on ``--threads`` threads (default 2):

- the machine: CPU model and instruction-set features (AVX2, AVX-512, VNNI: int8 speed
  depends on them) and a measured fp32 GEMM rate (onnxruntime MatMul, GFLOP/s);
- images per second at batch 1 and 32 for torch (eager, inference mode), onnxruntime fp32
  and int8, their ratios, and FLOPs per image;
- text prompts per second for ImageNet class names under one template, as the runtime
  encodes them today with a dynamic sequence axis (sorted by length, each batch cut to its
  longest prompt) and as before (every prompt at the full 77-token context), side by side
  on the same graph, with FLOPs per prompt at both lengths;
- every throughput as a share of what the GEMM rate allows (int8 may pass 100%: its GEMMs
  are not fp32);
- the time to hot-swap a text-projection patch into a loaded onnxruntime model
  (``apply_patch``, ``remove_patch``, and the first classification after a swap).

Targets (a benchmark, not a test): onnxruntime >= 1.5x torch at batch 1; int8 >= 2x
onnxruntime fp32; hot-swap <= 50 ms; dynamic text >= 6x full-context prompts/s. On a shared
machine the load average is printed too: other processes skew every number.

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
from machine_limits import cpu_features, flops, gemm_rate


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
    parser.add_argument("--prompts", type=int, default=300, help="ImageNet class names to encode (one template)")
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

    loaded = load_model(args.spec)
    model = loaded.model
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

    text = text_throughput(fp32_dir, loaded, args.threads, args.prompts)
    cpu = cpu_features()
    rate = gemm_rate(args.threads)
    pixels1 = torch.from_numpy(rng.standard_normal((1, 3, *size)).astype(np.float32))
    image_flops = flops(model.encode_image, pixels1)

    lines = [f"CPU {cpu['model']} ({cpu['cpus']} logical), " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items()),
             f"fp32 GEMM rate (onnxruntime MatMul, {args.threads} threads): {rate:.1f} GFLOP/s",
             f"ViT-B-32 image tower ({args.spec}), {args.threads} threads, load average {os.getloadavg()[0]:.2f}"]
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
    limit = [f"{'against the limit':<34}{'per s':>10}{'GFLOP each':>12}{'GFLOP/s':>10}{'share':>8}"]
    for name, per_batch in results.items():
        for b, v in per_batch.items():
            limit.append(_share_row(f"image {name} batch {b}", v, image_flops, rate))
    for kind in ("full", "dynamic"):
        limit.append(_share_row(f"text {kind} ({text[kind]['tokens']:.1f} tokens fed)", text[kind]["per_s"],
                                text[kind]["flops"], rate))
    speedup = text["dynamic"]["per_s"] / text["full"]["per_s"]
    lines += limit
    lines.append(f"text: {text['count']} prompts, mean {text['mean_tokens']:.1f} tokens; dynamic/full {speedup:.2f}x; "
                 f"max |features difference| {text['max_diff']:.2e}")
    targets = {
        "dynamic text >= 6x full-context prompts/s": speedup >= 6,
        "ort >= 1.5x torch at batch 1": ratios.get("ort_fp32/torch@1", 0) >= 1.5,
        "int8 >= 2x ort fp32 (batch 1)": ratios.get("ort_int8/ort_fp32@1", 0) >= 2.0,
        "hot-swap <= 50 ms": hot["apply_patch_ms"] <= 50,
    }
    lines += [f"target {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"throughput": {k: {str(b): v for b, v in d.items()} for k, d in results.items()},
                                         "ratios": ratios, "hot_swap": hot, "targets": targets, "text": text,
                                         "cpu": cpu, "gemm_gflops": rate, "image_flops": image_flops,
                                         "loadavg": os.getloadavg()}, indent=2) + "\n")
    tmp.cleanup()
    return 0


def _share_row(name: str, per_s: float, flops_each: float, rate: float) -> str:
    done = per_s * flops_each / 1e9
    return f"{name:<34}{per_s:>10.2f}{flops_each / 1e9:>12.3f}{done:>10.1f}{done / rate:>8.0%}"


def text_throughput(export_dir: Path, loaded, threads: int, count: int, rounds: int = 2) -> dict:
    """Prompts/s of the runtime's text graph for ``count`` ImageNet names in "a photo of a {}.":
    ``dynamic`` as the runtime encodes them (sorted, each batch cut to its longest prompt),
    ``full`` as it did before (each batch of 64 at the full context). Best of ``rounds``; and
    the FLOPs per prompt of the work each way does."""
    import runtime
    from forgetpack.engine.vocabulary import builtin_vocabulary
    from forgetpack.export.text_graph import text_encoder
    from runtime.backends.onnx import TEXT_BATCH

    backend = runtime.load(export_dir, threads=threads).backend
    tok, session, spec = backend._tokenizer, backend._state.sessions["text"], backend.manifest.towers["text"]
    prompts = [f"a photo of a {name}." for name in builtin_vocabulary()[:count]]
    lengths = [len(ids) for ids in tok.token_ids(prompts)]

    def full() -> np.ndarray:
        return np.concatenate([session.run([spec.features], {spec.input: tok(prompts[i : i + TEXT_BATCH])})[0]
                               for i in range(0, len(prompts), TEXT_BATCH)])

    def dynamic() -> np.ndarray:
        rows = backend._encode_text_features(prompts)
        return np.stack([rows[p] for p in prompts])

    out = {"count": len(prompts), "mean_tokens": float(np.mean(lengths)), "axis": spec.input_shape[1]}
    results = {}
    for name, fn in (("full", full), ("dynamic", dynamic)):
        best = 0.0
        for _ in range(rounds):
            t = time.perf_counter()
            results[name] = fn()
            best = max(best, len(prompts) / (time.perf_counter() - t))
        out[name] = {"per_s": best}
    out["max_diff"] = float(np.abs(results["full"] - results["dynamic"]).max())
    # work per prompt: full context; dynamic: each batch's longest prompt (what the graph is fed)
    import torch

    module = text_encoder(loaded.model)
    cut = spec.input_shape[1:] == ["sequence"]
    ordered = sorted(lengths)
    fed = [max(ordered[i : i + TEXT_BATCH]) if cut else tok.context_length for i in range(0, len(ordered), TEXT_BATCH)
           for _ in ordered[i : i + TEXT_BATCH]]
    shortest = tok.token_ids([""])  # start and end tokens: fits any length
    per_length = {n: flops(module, torch.from_numpy(tok.pad(shortest, n))) for n in {*fed, tok.context_length}}
    out["full"].update(tokens=float(tok.context_length), flops=per_length[tok.context_length])
    out["dynamic"].update(tokens=float(np.mean(fed)), flops=float(np.mean([per_length[n] for n in fed])))
    return out


if __name__ == "__main__":
    sys.exit(main())
