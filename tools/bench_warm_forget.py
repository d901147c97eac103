"""Wall time of a warm `forgetpack forget` (new process, feature cache filled) against a cold one.

    python tools/bench_warm_forget.py [--arch ViT-B-32] [--runs 7] [--forget "tabby cat"]

Issue 11's target: a warm run on a local ViT-B-32 checkpoint takes at most 1.5 s of wall time.
A random-init checkpoint of ``--arch`` is written as safetensors in a temporary folder, forgotten
once cold (which fills the feature cache and the warm record), then ``--runs`` times warm, each in
a new process. Printed in one run, so the figures can be read against each other whatever the
machine's load: the median warm wall time, the cold one, ``python -c pass`` and the bare imports a
warm run cannot avoid (numpy + safetensors), plus the machine's load average and whether the warm
patches equal the cold one but for the creation time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

TARGET_S = 1.5


def _wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}… failed:\n{done.stderr[-2000:]}")
    return elapsed


def write_checkpoint(arch: str, path: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--forget", default="tabby cat")
    args = parser.parse_args()

    from forgetpack.format.patch import read_patch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = folder / f"{args.arch}.safetensors"
        write_checkpoint(args.arch, checkpoint)
        env = {**os.environ, "FORGETPACK_CACHE": str(folder / "cache")}
        spec = f"{args.arch}:{checkpoint}"
        script = Path(sys.executable).parent / "forgetpack"  # the console script itself, not a shim

        def forget(out: Path) -> list[str]:
            return [str(script), "forget", spec, "--forget", args.forget, "-o", str(out), "--json"]

        cold_out = folder / "cold.fpatch.safetensors"
        cold_s = _wall(forget(cold_out), env)
        bare_s = statistics.median(_wall([sys.executable, "-c", "pass"], env) for _ in range(args.runs))
        imports_s = statistics.median(
            _wall([sys.executable, "-c", "import numpy, safetensors.numpy"], env) for _ in range(args.runs))
        warm_times, identical = [], True
        cold = read_patch(cold_out)
        for run in range(args.runs):
            out = folder / f"warm{run}.fpatch.safetensors"
            warm_times.append(_wall(forget(out), env))
            identical &= replace(read_patch(out), created=cold.created).digest == cold.digest
        warm_s = statistics.median(warm_times)

    print(json.dumps({
        "arch": args.arch, "forget": args.forget, "runs": args.runs, "load_average": os.getloadavg(),
        "cold_s": round(cold_s, 2), "warm_median_s": round(warm_s, 3),
        "warm_min_s": round(min(warm_times), 3), "warm_max_s": round(max(warm_times), 3),
        "python_pass_s": round(bare_s, 3), "numpy_safetensors_import_s": round(imports_s, 3),
        "warm_patch_identical_to_cold": identical, "target_s": TARGET_S, "met": warm_s <= TARGET_S,
    }, indent=2))


if __name__ == "__main__":
    main()
