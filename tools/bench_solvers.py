#!/usr/bin/env python
"""Benchmark the forgetting solvers: wall time, paper/closed-form ratio, text-space metrics.

One run covers:

1. **Cold and warm auto-preserve** on ``ViT-B-32:none``: a forget run with an empty feature
   cache (the 1,000-name vocabulary is encoded, context cut), then the same run as a new process
   would see it (memory cache cleared, disk cache kept). The full-77-token cost of encoding the
   vocabulary is extrapolated from a sample, for comparison.
2. **Solvers** on ``ViT-B-32:none`` and on ``mini``: each solver on the same features, preserve
   set, templates and target; the paper's loop also as published (``empty`` unit target, bare
   template). Metrics are text-space (original embeddings stand in for images): whether every
   forget prompt is outranked, mean similarity of each forget prompt to its original embedding,
   share of the other candidates that keep their class (mean and worst template), share of the
   whole vocabulary that keeps its class (bare names), mean drift of the preserve embeddings.
3. **Stacked vs composed** patches on ``ViT-B-32:none`` (text space).
4. With ``--harness``, the same solvers (and targets) on ``mini`` measured on real held-out
   images by ``forgetpack.evaluation.harness`` (needs the mini weights).

    python tools/bench_solvers.py                # all of it
    python tools/bench_solvers.py --quick        # skip the paper's loop as published
    python tools/bench_solvers.py --harness      # also real-image results on mini
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from forgetpack.engine import features  # noqa: E402
from forgetpack.engine.measure import measure_patches  # noqa: E402
from forgetpack.engine.models import load_model  # noqa: E402
from forgetpack.engine.request import DEFAULT_SOLVER, DEFAULT_TARGET  # noqa: E402
from forgetpack.engine.solve import compose, forget  # noqa: E402
from forgetpack.engine.vocabulary import builtin_vocabulary  # noqa: E402
from forgetpack.format.errors import ForgetpackError  # noqa: E402
from forgetpack.format.patch import stack  # noqa: E402

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LETTERS = ["A", "C", "E", "H", "K", "M", "P", "R", "W", "X"]
CASES = {
    "ViT-B-32:none": ([["tabby cat"], ["goldfish", "volcano", "pizza"]], []),
    "mini": ([["seven"], ["one", "four", "seven"]], [*DIGITS, *LETTERS]),
}


def timing_section(out: dict) -> None:
    print("\n## Cold and warm auto-preserve on ViT-B-32:none\n", flush=True)
    t0 = time.perf_counter()
    loaded = load_model("ViT-B-32:none")
    load_s = time.perf_counter() - t0
    features.clear_memory_cache()
    t0 = time.perf_counter()
    cold = forget(loaded, ["tabby cat"], auto_preserve=20)
    cold_s = time.perf_counter() - t0
    features.clear_memory_cache()  # a new process: only the disk cache is left
    t0 = time.perf_counter()
    warm = forget(loaded, ["tabby cat"], auto_preserve=20)
    warm_s = time.perf_counter() - t0
    sample = list(builtin_vocabulary()[:48])
    t0 = time.perf_counter()
    features.encode(loaded, sample, cut=False)
    full_s = (time.perf_counter() - t0) * len(builtin_vocabulary()) / len(sample)
    t0 = time.perf_counter()
    features.encode(loaded, list(builtin_vocabulary()))
    cut_s = time.perf_counter() - t0
    rows = [
        ("load ViT-B-32:none (random init)", load_s),
        ("encode 1,000 names, full 77-token context (extrapolated from 48)", full_s),
        ("encode 1,000 names, context cut", cut_s),
        ("cold auto-preserve forget run (empty cache, model loaded)", cold_s),
        ("warm auto-preserve forget run (new process, disk cache)", warm_s),
    ]
    print("| step | seconds |\n|---|---:|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} |")
    print(f"\ncold breakdown: {_fmt(cold.report['timings'])}; warm breakdown: {_fmt(warm.report['timings'])}")
    out["timing"] = {name: round(s, 3) for name, s in rows}
    out["timing_breakdown"] = {"cold": cold.report["timings"], "warm": warm.report["timings"]}


def _fmt(timings: dict) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())


def _row(label: str, result, solve_s: float) -> dict:
    e = result.report["effect"]
    return {
        "run": label,
        "solve_s": round(solve_s, 3),
        "rank": result.report["rank"],
        "attempts": len(result.report["attempts"]),
        "outranked": e["all_outranked"],
        "self_sim": round(sum(f["self_similarity"] for f in e["forget"].values()) / len(e["forget"]), 3),
        "retained": e["retained"],
        "retained_min": e["retained_min"],
        "vocab_retained": e["vocabulary_retained"],
        "drift": e["preserve_drift"],
    }


def solver_section(out: dict, quick: bool) -> None:
    for spec, (name_sets, extra) in CASES.items():
        try:
            loaded = load_model(spec)
        except ForgetpackError as exc:
            print(f"\n## {spec}: skipped ({exc})")
            continue
        for names in name_sets:
            print(f"\n## Solvers on {spec}, forgetting {', '.join(names)}\n", flush=True)
            rows = []
            runs = [(s, {"solver": s}) for s in ("closed-form", "paper", "nullspace")]
            if not quick:
                runs.append(("paper as published", {"solver": "paper", "target": "empty", "target_norm": "unit", "templates": ["{}"]}))
            for label, kwargs in runs:
                try:
                    result = forget(loaded, names, vocabulary=extra, **kwargs)
                    verified = True
                except ForgetpackError:
                    result = forget(loaded, names, vocabulary=extra, verify=False, **kwargs)
                    verified = False
                row = _row(label, result, result.report["timings"]["solve"])
                row["verified"] = verified
                rows.append(row)
                print(f"  {label}: {row}", file=sys.stderr, flush=True)
            base = next(r["solve_s"] for r in rows if r["run"] == "closed-form")
            paper = next(r["solve_s"] for r in rows if r["run"] == "paper")
            print("| solver | solve s | rank | tries | verified | outranked | self-sim | retained | worst template | vocabulary | preserve drift |")
            print("|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['run']} | {r['solve_s']:.2f} | {r['rank']} | {r['attempts']} | {'yes' if r['verified'] else 'no'} | "
                      f"{'yes' if r['outranked'] else 'no'} | {r['self_sim']:+.3f} | {r['retained']:.1%} | {r['retained_min']:.1%} | "
                      f"{r['vocab_retained']:.1%} | {r['drift']:.4f} |")
            print(f"\npaper / closed-form solve time: {paper / max(base, 1e-9):.0f}x")
            out.setdefault("solvers", {})[f"{spec} {'+'.join(names)}"] = {"rows": rows, "ratio": paper / max(base, 1e-9)}


def compose_section(out: dict) -> None:
    print("\n## Stacked vs composed on ViT-B-32:none\n", flush=True)
    loaded = load_model("ViT-B-32:none")
    pairs = (["goldfish"], ["tench"]), (["tabby cat"], ["volcano"])
    print("| requests | patch | outranked | retained | worst template | vocabulary | preserve drift |\n|---|---|---|---:|---:|---:|---:|")
    for a_names, b_names in pairs:
        a, b = forget(loaded, a_names), forget(loaded, b_names)
        composed = compose(loaded, [a.patch, b.patch])
        label = f"{a_names[0]} + {b_names[0]}"
        for kind, patches in (("stacked", [stack([a.patch, b.patch])]), ("composed", [composed.patch])):
            e = measure_patches(loaded, patches, composed.report).report()
            print(f"| {label} | {kind} | {'yes' if e['all_outranked'] else 'no'} | {e['retained']:.1%} | {e['retained_min']:.1%} | "
                  f"{e['vocabulary_retained']:.1%} | {e['preserve_drift']:.4f} |")
            out.setdefault("compose", []).append({"requests": label, "patch": kind, **{k: e[k] for k in ("all_outranked", "retained", "retained_min", "vocabulary_retained", "preserve_drift")}})


def harness_section(out: dict, loaded=None) -> None:
    from forgetpack.evaluation.harness import evaluate

    print("\n## mini on real held-out images (forgetpack.evaluation.harness)\n", flush=True)
    if loaded is None:
        try:
            loaded = load_model("mini")
        except ForgetpackError as exc:
            print(f"skipped ({exc})")
            return
    runs = [("closed-form", "antipode"), ("closed-form", "mirror"), ("closed-form", "empty"), ("paper", "antipode"),
            ("paper", "empty"), ("nullspace", "antipode")]
    print("| forget | solver | target | MNIST forget | MNIST others | UCI forget | UCI others | letters | S (mnist) |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    for names in (["seven"], ["one", "four", "seven"]):
        for solver, target in runs:
            try:
                result = forget(loaded, names, vocabulary=[*DIGITS, *LETTERS], solver=solver, target=target)
            except ForgetpackError as exc:
                print(f"| {', '.join(names)} | {solver} | {target} | failed: {exc} |||||")
                continue
            report = evaluate(loaded, patches=[result.patch], forget=names, datasets=["mnist", "digits", "letters"])
            m, d = report.scores["mnist"], report.scores["digits"]
            row = {"forget": names, "solver": solver, "target": target, "mnist": m.to_json(), "digits": d.to_json()}
            out.setdefault("harness", []).append(row)
            letters = m.others["letters"]
            print(f"| {', '.join(names)} | {solver} | {target} | {m.forget_acc[0]:.1%} → {m.forget_acc[1]:.1%} | "
                  f"{m.retain_acc[0]:.1%} → {m.retain_acc[1]:.1%} | {d.forget_acc[0]:.1%} → {d.forget_acc[1]:.1%} | "
                  f"{d.retain_acc[0]:.1%} → {d.retain_acc[1]:.1%} | {letters[0]:.1%} → {letters[1]:.1%} | {m.score:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the paper's loop as published")
    parser.add_argument("--harness", action="store_true", help="also measure mini on real images")
    parser.add_argument("--skip", nargs="*", default=[], choices=["timing", "solvers", "compose"])
    parser.add_argument("--json", type=Path, help="write all numbers here")
    args = parser.parse_args()
    out: dict = {"defaults": {"solver": DEFAULT_SOLVER, "target": DEFAULT_TARGET}}
    with tempfile.TemporaryDirectory(prefix="forgetpack-bench-") as cache:
        os.environ["FORGETPACK_CACHE"] = cache
        if "timing" not in args.skip:
            timing_section(out)
        if "solvers" not in args.skip:
            solver_section(out, args.quick)
        if "compose" not in args.skip:
            compose_section(out)
        if args.harness:
            harness_section(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
