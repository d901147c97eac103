"""Kill exports at random moments and at the publish step; report what the destination held.

Run by tests/test_reliability_export.py as ``python tests/kill_harness.py DEST RUNS SEED``. An
export of mini costs seconds of torch start-up and model loading, so this process loads once
and forks a child per export (torch on one thread, so the fork is safe; the child inherits the
parent's trace of the tower, as a second export in one process would); the parent SIGKILLs
the child at a random moment, or the child kills itself inside the publish step. Each export is
``export_loaded(..., force=True)``, the function ``forgetpack export --force`` calls. Prints one
JSON object: the export id found at DEST after each kill.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from forgetpack.engine.models import load_model
    from forgetpack.export import export_loaded
    from forgetpack.format import fileio
    from forgetpack.format.errors import ForgetpackError
    from forgetpack.format.manifest import Manifest

    dest, runs, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    loaded = load_model("mini")

    def export(out: Path, opset: int) -> str:
        return export_loaded(loaded, out, towers=("image",), opset=opset, force=True).export_id

    old_dir, new_dir = dest.parent / "reference-old", dest.parent / "reference-new"
    old = export(old_dir, 18)  # what DEST holds before every kill
    new = export(new_dir, 19)  # what the killed runs write: another opset, another export id
    start = time.perf_counter()  # the children inherit this process's trace (forgetpack.export.traced):
    export(new_dir, 19)  # kill moments are drawn over the export they run
    duration = time.perf_counter() - start

    def restore_old() -> None:
        with fileio.atomic_directory(dest, replace=True) as tmp:
            for f in old_dir.iterdir():
                shutil.copy2(f, tmp / f.name)

    def run_child(kill_at: float | None, inside: str | None) -> None:
        pid = os.fork()
        if pid == 0:  # the child: export over DEST, dying where it is told to
            if inside is not None:
                real = getattr(fileio, inside)

                def die(*args: object) -> object:
                    if inside == "_exchange":
                        real(*args)  # swapped: the new folder is in place, the old one in the temporary
                    os.kill(os.getpid(), signal.SIGKILL)
                    return None

                setattr(fileio, inside, die)
            try:
                export(dest, 19)
            finally:
                os._exit(0)
        if kill_at is not None:
            time.sleep(kill_at)
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    def found() -> str:
        try:
            return Manifest.read(dest).export_id
        except (ForgetpackError, OSError) as exc:
            return f"broken: {exc}"

    results = []
    plans = [(None, "_publish_directory"), (None, "_exchange")] + [(rng.uniform(0, duration * 1.1), None) for _ in range(runs)]
    for kill_at, inside in plans:
        if found() != old:  # an earlier run completed: put the old export back
            restore_old()
        run_child(kill_at, inside)
        results.append({"kill_at": kill_at, "inside": inside, "found": found()})
    export(dest, 18)  # one more complete export: it must sweep every temporary the killed ones left
    leftovers = sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))
    print(json.dumps({"old": old, "new": new, "duration": duration, "results": results, "leftovers": leftovers}))


if __name__ == "__main__":
    main()
