"""How long the torch-free commands take from a cold process, against a bare Python start.

    python tools/bench_startup.py [--runs 15]

`forgetpack --help`, `inspect` and `verify` must stay torch-free and quick (target: under 0.3 s
of wall time on the project's 2-core machines). Each command runs ``--runs`` times in a new
process; the median is printed next to the median of ``python -c pass`` on the same machine, so
the figure can be read as "our share" whatever the machine's load. It also checks that no run
imported torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from patch_factory import make_patch, write_base  # noqa: E402

TARGET_S = 0.3


def _median_wall(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = write_base(Path(tmp) / "base.safetensors")
        patch = str(make_patch(base, 1).save(Path(tmp) / "p.fpatch.safetensors"))
        cli = [sys.executable, "-m", "forgetpack.cli"]
        rows = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "forgetpack --help": [*cli, "--help"],
            "forgetpack inspect P": [*cli, "inspect", patch],
            "forgetpack verify P --base B": [*cli, "verify", patch, "--base", str(Path(tmp) / "base.safetensors")],
        }
        probe = (f"import sys; from forgetpack.cli.main import main; main(['inspect', {patch!r}]); "
                 "print('torch' in sys.modules)")
        imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        bare = None
        print(f"{'command':<32} {'median s':>9} {'over bare python':>17}  target")
        for name, argv in rows.items():
            t = _median_wall(argv, args.runs)
            bare = t if bare is None else bare
            verdict = "" if name.startswith("python") else ("ok" if t < TARGET_S else f"OVER {TARGET_S} s")
            print(f"{name:<32} {t:>9.3f} {t - bare:>+17.3f}  {verdict}")
        print(f"torch imported by inspect: {imported}")


if __name__ == "__main__":
    main()
