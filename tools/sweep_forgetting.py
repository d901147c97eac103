#!/usr/bin/env python
"""Forget many requests on ``mini`` with default settings and measure each on real held-out images.

The requests: every digit alone (10), every pair of digits (45), and the letters A, K and X alone
(3), in that order (``--only N`` keeps the first N: ``--only 15`` is the ten digits and five
pairs). Each patch is solved from names alone, then ``forgetpack.evaluation.harness.evaluate``
classifies the held-out MNIST, UCI digits and letters images with each set's default template.
One row per request:

- forgotten: accuracy on the forgotten class(es) of each set that holds one, after the patch;
- aggregate: change of the retained classes' accuracy (a set holding a forgotten class) or of
  the full accuracy (any other set), in points;
- worst class: the retained class whose recall dropped most on each set, and by how much;
- the engine's text-space verdicts (retained candidates it repaired, and any it reports lost),
  rank and solve time.

Bounds (the summary counts them): forgotten ≤ 1% on every set; worst single class ≤ 2 pt on
MNIST and letters, ≤ 4 pt on UCI digits (50 images a class: one image is 2 pt); aggregate within
0.5 pt. Image embeddings are cached (``FORGETPACK_CACHE``), so only the first request pays for
encoding images.

    python tools/sweep_forgetting.py --only 15
    python tools/sweep_forgetting.py --json /tmp/sweep.json
    python tools/sweep_forgetting.py --harden --request one,five --request seven
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from forgetpack.engine.models import load_model  # noqa: E402
from forgetpack.engine.request import DEFAULT_HARDEN_FAMILIES, ForgetRequest  # noqa: E402
from forgetpack.engine.solve import forget  # noqa: E402
from forgetpack.evaluation.audit import audit  # noqa: E402
from forgetpack.evaluation.datasets import DIGIT_NAMES, LETTER_NAMES  # noqa: E402
from forgetpack.evaluation.harness import evaluate  # noqa: E402
from forgetpack.format.fileio import check_output_file, write_bytes_atomic  # noqa: E402

SETS = ("mnist", "digits", "letters")
CLASSES = {"mnist": DIGIT_NAMES, "digits": DIGIT_NAMES, "letters": LETTER_NAMES}
LETTERS = ("A", "K", "X")
FORGET_BOUND = 0.01  # accuracy left on a forgotten class
VARIANT_BOUND = 0.02  # accuracy on a forgotten class under any variant the base model recognises
WORST_CLASS_BOUND_PT = {"mnist": 2.0, "digits": 4.0, "letters": 2.0}  # largest drop of one retained class
AGGREGATE_BOUND_PT = 0.5  # largest drop of the retained (or full) accuracy
WORST_ROWS = 8  # rows the summary repeats, worst first


def requests() -> list[list[str]]:
    """Every digit alone, every pair of digits, then three letters alone."""
    digits = list(DIGIT_NAMES)
    return [[d] for d in digits] + [list(p) for p in itertools.combinations(digits, 2)] + [[x] for x in LETTERS]


def harden_option(wanted: bool) -> dict[str, Any]:
    """``{"harden": the default families}`` when asked for, else nothing."""
    return {"harden": DEFAULT_HARDEN_FAMILIES} if wanted else {}


def run(loaded: Any, names: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Solve one request, evaluate its patch on the three sets, and check the bounds."""
    started = time.perf_counter()
    result = forget(loaded, ForgetRequest(names, **options))
    seconds = time.perf_counter() - started
    report = evaluate(loaded, patches=[result.patch], forget=names, datasets=list(SETS))
    worst = report.worst_retained
    verdicts = result.report.get("classes", {})
    row: dict[str, Any] = {"forget": names, "seconds": round(seconds, 2), "rank": result.report["rank"],
                           "text_lost": sorted(result.report["effect"].get("lost", {})),
                           "repaired": [c for c, v in verdicts.items() if v == "repaired"], "sets": {}}
    for name in SETS:
        score = report.scores.get(name)
        if score is not None:
            base, after = score.retain_acc
            forgotten = score.forget_acc[1]
        else:
            base, after = report.base[name].acc1, report.patched[name].acc1
            forgotten = None
        row["sets"][name] = {"forgotten": forgotten, "aggregate_pt": round(100 * (after - base), 2),
                             "worst_class": worst[name].classname, "worst_drop_pt": round(worst[name].drop_pt, 2)}
    # every variant of every text family the base model recognises on images (audit: >= 50% base accuracy)
    bypass = audit(loaded, [result.patch], names, datasets=[n for n in SETS if any(x in CLASSES[n] for x in names)],
                   families=DEFAULT_HARDEN_FAMILIES, probes=False).image_summary()
    worst = max(((f, s) for f, s in bypass.items() if s["worst"] is not None), key=lambda fs: fs[1]["worst"], default=None)
    row["variant_worst"] = {"family": worst[0], "accuracy": worst[1]["worst"], "variant": worst[1]["worst_variant"]} if worst else None
    row["within"] = within_bounds(row)
    return row


def within_bounds(row: dict[str, Any]) -> dict[str, bool]:
    sets = row["sets"]
    return {
        "forgotten": all(s["forgotten"] is None or s["forgotten"] <= FORGET_BOUND for s in sets.values()),
        "worst_class": all(sets[n]["worst_drop_pt"] <= WORST_CLASS_BOUND_PT[n] for n in SETS),
        "aggregate": all(s["aggregate_pt"] >= -AGGREGATE_BOUND_PT for s in sets.values()),
        "variants": row.get("variant_worst") is None or row["variant_worst"]["accuracy"] <= VARIANT_BOUND,
    }


def header() -> None:
    forgotten = " | ".join(f"{n} forgotten" for n in SETS)
    aggregate = " | ".join(f"{n} Δ agg" for n in SETS)
    worst = " | ".join(f"{n} worst class" for n in SETS)
    print(f"| forget | {forgotten} | {aggregate} | {worst} | worst variant | repaired | lost | rank | solve s | within |")
    print("|---|" + "---:|" * (3 * len(SETS)) + "---|---|---|---:|---:|---|")


def print_row(row: dict[str, Any]) -> None:
    sets = row["sets"]
    forgotten = " | ".join("-" if s["forgotten"] is None else f"{s['forgotten']:.1%}" for s in sets.values())
    aggregate = " | ".join(f"{s['aggregate_pt']:+.1f}" for s in sets.values())
    worst = " | ".join(f"{s['worst_class']} {-s['worst_drop_pt']:+.1f}" for s in sets.values())
    missed = [k for k, v in row["within"].items() if not v]
    ok = f"NO ({', '.join(missed)})" if missed else "yes"
    lost = ", ".join(row["text_lost"]) or "-"
    repaired = ", ".join(row.get("repaired", [])) or "-"
    v = row.get("variant_worst")
    variant = f"{v['accuracy']:.0%} {v['variant']['template'].format(v['variant']['label'])!r}" if v else "-"
    print(f"| {' + '.join(row['forget'])} | {forgotten} | {aggregate} | {worst} | {variant} | {repaired} | {lost} | "
          f"{row['rank']} | {row['seconds']:.1f} | {ok} |", flush=True)


def badness(row: dict[str, Any]) -> float:
    """How far a row is from its bounds (worst single class relative to its set's bound, first)."""
    sets = row["sets"]
    forgotten = max((s["forgotten"] or 0.0) for s in sets.values()) / FORGET_BOUND
    return max(forgotten, *(sets[n]["worst_drop_pt"] / WORST_CLASS_BOUND_PT[n] for n in SETS),
               *(-s["aggregate_pt"] / AGGREGATE_BOUND_PT for s in sets.values()))


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts within each bound, the worst single-class drop per set, and the worst rows."""
    n = len(rows)
    counts = {k: sum(r["within"][k] for r in rows) for k in ("forgotten", "variants", "worst_class", "aggregate")}
    counts["all"] = sum(all(r["within"].values()) for r in rows)
    worst = {name: max(rows, key=lambda r, name=name: r["sets"][name]["worst_drop_pt"]) for name in SETS}
    print(f"\n{n} requests. Within bounds: forgotten ≤ {FORGET_BOUND:.0%}: {counts['forgotten']}/{n}; under every "
          f"recognised variant ≤ {VARIANT_BOUND:.0%}: {counts['variants']}/{n}; worst class "
          f"(≤ {', '.join(f'{k} {v:g} pt' for k, v in WORST_CLASS_BOUND_PT.items())}): {counts['worst_class']}/{n}; "
          f"aggregate within {AGGREGATE_BOUND_PT} pt: {counts['aggregate']}/{n}; all: {counts['all']}/{n}")
    for name, r in worst.items():
        s = r["sets"][name]
        request = " + ".join(r["forget"])
        print(f"worst single class on {name}: {s['worst_class']} -{s['worst_drop_pt']:.1f} pt ({request})")
    seconds = [r["seconds"] for r in rows]
    repaired, lost = sum(bool(r["repaired"]) for r in rows), sum(bool(r["text_lost"]) for r in rows)
    print(f"solve time: mean {sum(seconds) / n:.2f} s, max {max(seconds):.2f} s; text space: classes repaired in "
          f"{repaired}/{n} requests, still lost in {lost}/{n}")
    print("\nworst rows:")
    header()
    for r in sorted(rows, key=badness, reverse=True)[:WORST_ROWS]:
        print_row(r)
    return {"requests": n, "within": counts,
            "worst_class": {k: {"forget": r["forget"], **r["sets"][k]} for k, r in worst.items()},
            "mean_seconds": round(sum(seconds) / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, help="run only the first N requests")
    parser.add_argument("--request", action="append", metavar="NAMES",
                        help="run this request instead (comma-separated forget names; repeatable)")
    parser.add_argument("--harden", action="store_true", help="harden each patch against the default bypass families")
    parser.add_argument("--json", type=Path, help="write every row and the summary here")
    args = parser.parse_args()
    if args.json:
        check_output_file(args.json, "JSON results")
    options = harden_option(args.harden)
    todo = [[n.strip() for n in r.split(",")] for r in args.request] if args.request else requests()
    todo = todo[: args.only] if args.only else todo
    loaded = load_model("mini")
    header()
    rows = []
    for names in todo:
        rows.append(run(loaded, names, options))
        print_row(rows[-1])
    totals = summary(rows)
    if args.json:
        data = {"options": options, "rows": rows, "summary": totals}
        write_bytes_atomic(args.json, json.dumps(data, indent=2).encode())


if __name__ == "__main__":
    main()
