"""What hardening costs on a real-sized model: a hardened one-class forget on ViT-B-32, cold and warm.

    python tools/bench_harden.py [--model ViT-B-32:none] [--forget "tabby cat"]

Targets (issue 10): cold (empty feature cache, new process) at most 60 s, warm (features cached,
new process) at most 5 s, the patch at most 32 KB. Each run is a fresh ``forgetpack forget``
process, so imports and model building count, as they do for a user. ``ARCH:none`` is written
as a random-init local safetensors checkpoint first, so that warm runs take the warm path
(``forgetpack.engine.weights``: the projection read from the file, features from the cache). The plain (unhardened)
forget runs beside it for the ratio. Prints the CPU and its instruction-set features.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_warm_forget import write_checkpoint  # tools/ is on the path when this script runs
from machine_limits import cpu_line

TARGETS = {"cold_s": 60.0, "warm_s": 5.0, "patch_kb": 32.0}


def run(model: str, name: str, harden: bool, cache: str, out: Path) -> tuple[float, dict]:
    command = [sys.executable, "-m", "forgetpack.cli", "forget", model, "--forget", name, "-o", str(out), "--json",
               "--harden" if harden else "--no-harden"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "FORGETPACK_CACHE": cache})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"forget failed: {result.stderr.strip()[-500:]}")
    return elapsed, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32:none")
    parser.add_argument("--forget", default="tabby cat")
    args = parser.parse_args()
    print(cpu_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        arch, _, weights = args.model.partition(":")
        if weights == "none":  # a local checkpoint, as users hold one: warm runs then read only the projection
            checkpoint = Path(tmp) / f"{arch}.safetensors"
            write_checkpoint(arch, checkpoint)
            args.model = f"{arch}:{checkpoint}"
        for harden in (False, True):
            cache = str(Path(tmp) / f"cache-{harden}")
            out = Path(tmp) / f"p-{harden}.fpatch.safetensors"
            cold, report = run(args.model, args.forget, harden, cache, out)
            warm, _ = run(args.model, args.forget, harden, cache, out)
            audit = report["effect"].get("audit", {})
            rows.append({"hardened": harden, "cold_s": cold, "warm_s": warm, "patch_kb": out.stat().st_size / 1024,
                         "rank": report["rank"], "audit": audit})
    print(f"{'hardened':<9} {'cold s':>7} {'warm s':>7} {'patch KB':>9} {'rank':>5}  bypasses left")
    for r in rows:
        left = sum(f.get("bypasses", 0) for f in r["audit"].get("families", {}).values()) if r["audit"] else "-"
        print(f"{str(r['hardened']):<9} {r['cold_s']:>7.1f} {r['warm_s']:>7.1f} {r['patch_kb']:>9.1f} {r['rank']:>5}  {left}")
    hard, plain = rows[1], rows[0]
    verdicts = ", ".join(f"{k} {hard[k]:.1f} ({'ok' if hard[k] <= v else 'OVER'} ≤ {v:g})" for k, v in TARGETS.items())
    print(f"hardened: {verdicts}; cold {hard['cold_s'] / plain['cold_s']:.2f}x and warm {hard['warm_s'] / plain['warm_s']:.2f}x the plain forget")


if __name__ == "__main__":
    main()
