"""How much each extra installs: the distributions ``pip install 'forgetpack[EXTRA]'`` brings in, and their size.

Reads the extras from pyproject.toml, follows every requirement (transitively, markers evaluated
for this machine) through the *installed* distributions (importlib.metadata), and adds up the
file sizes their RECORD lists (a file RECORD gives no size for, such as a compiled .pyc, is
measured on disk). Each row counts the core dependencies too: it is what a fresh environment
would hold in site-packages (pip itself aside). Sizes are for the builds installed here: when torch is a
CUDA build, the CUDA libraries it pulls in (nvidia-*, triton, cuda-*) are shown apart, and the
torch wheel itself is then the CUDA one too (a CPU-only wheel is smaller still).

    python tools/extras_size.py            # a table
    python tools/extras_size.py --json     # the numbers
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SELF = "forgetpack"
CUDA = re.compile(r"^(nvidia-|triton$|cuda-)")


def read_extras(pyproject: Path = PYPROJECT) -> tuple[list[str], dict[str, list[str]]]:
    """The core requirements and ``{extra: requirements}`` as pyproject.toml states them."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"]), {k: list(v) for k, v in project["optional-dependencies"].items()}


def closure(requirements: Iterable[str], extras: dict[str, list[str]]) -> tuple[dict[str, metadata.Distribution], set[str]]:
    """Every installed distribution ``requirements`` need, by canonical name, and the names needed
    but not installed. ``forgetpack[X]`` expands to extra X of ``extras``. A requirement's marker is
    evaluated where it is listed: for this machine, and for the extra of its distribution it belongs to."""
    found: dict[str, metadata.Distribution] = {}
    missing: set[str] = set()
    seen: set[tuple[str, str]] = set()
    todo = [(text, "") for text in requirements]
    while todo:
        text, listed_under = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": listed_under}):
            continue  # another platform or Python, or another extra
        name = canonicalize_name(req.name)
        if name == SELF:
            for extra in req.extras - {e for n, e in seen if n == SELF}:
                seen.add((SELF, extra))
                todo.extend((sub, "") for sub in extras[extra])
            continue
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.add(name)
            continue
        found[name] = dist
        for extra in {"", *req.extras} - {e for n, e in seen if n == name}:
            seen.add((name, extra))
            todo.extend((sub, extra) for sub in dist.requires or [])
    return found, missing


def dist_size(dist: metadata.Distribution) -> int:
    """Bytes of the files a distribution's RECORD lists."""
    total = 0
    for file in dist.files or []:
        if file.size is not None:
            total += file.size
        else:
            path = Path(file.locate())
            if path.is_file():
                total += path.stat().st_size
    return total


def torch_build() -> str:
    """The installed torch, from its files (no import): version and CPU or CUDA build."""
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return "torch: not installed"
    cuda = any(re.search(r"libtorch_cuda\.(so|dll)|torch_cuda\.dll", str(f)) for f in dist.files or [])
    return f"torch {dist.version}: {'a CUDA build (libtorch_cuda inside)' if cuda else 'a CPU-only build'}"


def measure(pyproject: Path = PYPROJECT) -> dict[str, dict[str, object]]:
    """``{"core" or extra: {distributions, bytes, cuda_bytes, missing}}``, each with the core counted in."""
    core, extras = read_extras(pyproject)
    rows: dict[str, dict[str, object]] = {}
    for name in ["core", *extras]:
        found, missing = closure(core + ([f"{SELF}[{name}]"] if name != "core" else []), extras)
        sizes = {n: dist_size(d) for n, d in found.items()}
        rows[name] = {"distributions": len(found), "bytes": sum(sizes.values()),
                      "cuda_bytes": sum(s for n, s in sizes.items() if CUDA.match(n)), "missing": sorted(missing)}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    rows = measure()
    if args.json:
        print(json.dumps({"torch": torch_build(), "python": sys.version.split()[0], "extras": rows}, indent=2))
        return 0
    mib = 2**20
    print(f"{torch_build()}; Python {sys.version.split()[0]}; sizes in MiB, core dependencies included")
    print(f"{'extra':<8} {'dists':>5} {'installed':>10} {'CUDA libs':>10} {'without':>10}  not installed")
    for name, r in rows.items():
        total, cuda = int(r["bytes"]), int(r["cuda_bytes"])  # type: ignore[call-overload]
        print(f"{name:<8} {r['distributions']:>5} {total / mib:>10,.0f} {cuda / mib:>10,.0f} {(total - cuda) / mib:>10,.0f}"
              f"  {', '.join(r['missing']) or '-'}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
