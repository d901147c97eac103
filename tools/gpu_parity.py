"""Parity of an onnxruntime execution provider with torch on the held-out sets (one short run).

Made for a machine with a GPU (``--provider cuda``, the default), and just as useful on CPU
(``--provider cpu``): exports the model if no export directory is given, then for each
held-out set compares, against open_clip in torch, the normalised image embeddings and the
zero-shot class weights (max abs difference) and the top-1 predictions; with ``--int8`` it
also reports an int8 copy's accuracy and cosine to fp32. Exit status 0 when every set is
within ``--tolerance`` and agrees on every top-1, 1 otherwise, 2 when the provider is missing.

    python tools/gpu_parity.py --spec mini --provider cuda
    python tools/gpu_parity.py --spec ViT-B-32:none --export /tmp/vitb32 --provider cpu --per-set 200 --int8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETS = ("mnist", "digits", "letters")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="mini", help="model spec (default mini)")
    parser.add_argument("--export", type=Path, help="existing export of --spec (default: export into a temp dir)")
    parser.add_argument("--provider", default="cuda", help="onnxruntime provider: cuda, cpu, or a full name")
    parser.add_argument("--torch-device", default=None, help="torch device for the reference (default: cuda if the provider is cuda)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--per-set", type=int, default=0, help="images per set (0 = the whole held-out set)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on the CUDA provider (off by default for parity)")
    parser.add_argument("--int8", action="store_true", help="also measure an int8 copy of the export")
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args(argv)

    import runtime
    from forgetpack.format.errors import ForgetpackError

    provider = args.provider
    options = {"use_tf32": "1" if args.tf32 else "0"} if provider.lower() in ("cuda", "cudaexecutionprovider") else None
    providers = [(provider, options)] if options else [provider]
    tmp = tempfile.TemporaryDirectory(prefix="parity-")
    export_dir = args.export or Path(tmp.name) / "export"
    try:
        if not (export_dir / "manifest.json").is_file():
            from forgetpack.export import export

            t = time.perf_counter()
            export(args.spec, export_dir, progress=lambda line: print(line, file=sys.stderr))
            print(f"exported {args.spec} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        try:
            onnx_model = runtime.load(export_dir, providers=providers)
        except ForgetpackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        device = args.torch_device or ("cuda" if options is not None else "cpu")
        torch_model = runtime.load(args.spec, backend="torch", device=device)
        int8 = None
        if args.int8:
            from forgetpack.export import quantize_export

            quantize_export(export_dir, Path(tmp.name) / "int8")
            int8 = runtime.load(Path(tmp.name) / "int8", providers=providers)
        report = {"spec": args.spec, "provider": onnx_model.backend.providers, "torch_device": device, "sets": {}}
        ok = True
        from forgetpack.evaluation.datasets import DEFAULT_TEMPLATES, load_dataset

        for name in args.sets.split(","):
            data = load_dataset(name)
            idx = np.arange(len(data.images))
            if args.per_set:
                idx = idx[:: max(len(idx) // args.per_set, 1)][: args.per_set]
            images, labels = [data.images[i] for i in idx], np.asarray(data.labels)[idx]
            templates = list(DEFAULT_TEMPLATES[name])
            t = time.perf_counter()
            a, wa = onnx_model.encode_image(images), onnx_model.classifier(data.classnames, templates)
            t_onnx = time.perf_counter() - t
            t = time.perf_counter()
            b, wb = torch_model.encode_image(images), torch_model.classifier(data.classnames, templates)
            t_torch = time.perf_counter() - t
            pa, pb = (a @ wa).argmax(1), (b @ wb).argmax(1)
            entry = {
                "images": len(images),
                "max_abs_image": float(np.abs(a - b).max()),
                "max_abs_text": float(np.abs(wa - wb).max()),
                "top1_agreement": float(np.mean(pa == pb)),
                "acc_onnx": float(np.mean(pa == labels)),
                "acc_torch": float(np.mean(pb == labels)),
                "seconds_onnx": round(t_onnx, 2),
                "seconds_torch": round(t_torch, 2),
            }
            if int8 is not None:
                q, wq = int8.encode_image(images), int8.classifier(data.classnames, templates)
                entry.update({
                    "acc_int8": float(np.mean((q @ wq).argmax(1) == labels)),
                    "cos_int8_image_mean": float((q * a).sum(1).mean()),
                    "cos_int8_image_min": float((q * a).sum(1).min()),
                    "cos_int8_text_min": float((wq * wa).sum(0).min()),
                })
            ok &= entry["max_abs_image"] <= args.tolerance and entry["max_abs_text"] <= args.tolerance
            ok &= entry["top1_agreement"] == 1.0
            report["sets"][name] = entry
            print(f"{name:8} n={entry['images']:5} max|img| {entry['max_abs_image']:.2e} max|txt| {entry['max_abs_text']:.2e} "
                  f"top1 agree {entry['top1_agreement']:.4f} acc onnx {entry['acc_onnx']:.4f} torch {entry['acc_torch']:.4f}"
                  + (f" int8 {entry['acc_int8']:.4f} cos {entry['cos_int8_image_mean']:.4f}" if int8 is not None else ""))
        report["ok"] = bool(ok)
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0 if ok else 1
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
