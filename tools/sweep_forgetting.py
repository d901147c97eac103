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

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from forgetpack.engine.models import load_model  # noqa: E402
from forgetpack.engine.request import DEFAULT_HARDEN_FAMILIES, ForgetRequest  # noqa: E402
from forgetpack.engine.solve import forget  # noqa: E402
from forgetpack.evaluation import everyday  # noqa: E402
from forgetpack.evaluation.audit import audit  # noqa: E402
from forgetpack.evaluation.datasets import DIGIT_NAMES, LETTER_NAMES  # noqa: E402
from forgetpack.evaluation.harness import evaluate  # noqa: E402
from forgetpack.format.fileio import check_output_file, write_bytes_atomic  # noqa: E402

SETS = ("mnist", "digits", "letters")
OBJECT_SETS = ("quickdraw", "fashion", *SETS)
CLASSES = {"mnist": DIGIT_NAMES, "digits": DIGIT_NAMES, "letters": LETTER_NAMES}
LETTERS = ("A", "K", "X")
# Pairs inside the neighbour groups (quickdraw; the last is on fashion): forgetting both members of a pair.
OBJECT_PAIRS = (("cat", "dog"), ("tiger", "lion"), ("car", "truck"), ("bus", "school bus"), ("violin", "cello"),
                ("trumpet", "trombone"), ("cup", "mug"), ("apple", "pear"), ("pants", "shorts"), ("t-shirt", "shirt"))
FORGET_BOUND = 0.01  # accuracy left on a forgotten class
VARIANT_BOUND = 0.02  # accuracy on a forgotten class under any variant the base model recognises
WORST_CLASS_BOUND_PT = {"mnist": 2.0, "digits": 4.0, "letters": 2.0}  # largest drop of one retained class
AGGREGATE_BOUND_PT = 0.5  # largest drop of the retained (or full) accuracy
WORST_ROWS = 8  # rows the summary repeats, worst first
# The object suite counts images: at most this many of a forgotten class still found, and no retained
# class (neighbours included) losing more than IMAGES_LOST of its held-out images.
IMAGES_LEFT = 1
IMAGES_LOST = 2
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "harden": {"harden": DEFAULT_HARDEN_FAMILIES},
    # Kravets & Namboodiri as published: their solver and target, unit norm, the bare name only.
    "paper": {"solver": "paper", "target": "empty", "target_norm": "unit", "templates": ["{}"]},
}


def requests() -> list[list[str]]:
    """Every digit alone, every pair of digits, then three letters alone."""
    digits = list(DIGIT_NAMES)
    return [[d] for d in digits] + [list(p) for p in itertools.combinations(digits, 2)] + [[x] for x in LETTERS]


def object_requests() -> list[list[str]]:
    """Every class of the six target groups alone, then ten pairs inside groups."""
    alone = [[c] for g in everyday.TARGET_GROUPS for c in everyday.QUICKDRAW_GROUPS[g]]
    return alone + [list(p) for p in OBJECT_PAIRS]


def harden_option(wanted: bool) -> dict[str, Any]:
    """``{"harden": the default families}`` when asked for, else nothing."""
    return METHODS["harden"] if wanted else METHODS["default"]


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



def neighbours_of(dataset: str, classnames: list[str], forget: list[str]) -> set[str]:
    """The retained classes a user expects to survive beside the forgotten ones: the QuickDraw group,
    or every other class of a set that holds a forgotten class (Fashion-MNIST is all clothing)."""
    if dataset == "quickdraw":
        return {c for f in forget for c in everyday.group_of(f)} - set(forget)
    return set(classnames) - set(forget) if any(f in classnames for f in forget) else set()


def image_counts(report: Any, dataset: str, forget: list[str]) -> dict[str, Any]:
    """Images of each class found before and after, in counts: forgotten left, neighbours' and the
    rest's largest loss, and the aggregate change in points."""
    base, after = report.base[dataset], report.patched[dataset]
    n = np.bincount(base.labels, minlength=len(base.classnames))
    found_before = np.round(np.nan_to_num(base.per_class) * n).astype(int)
    found_after = np.round(np.nan_to_num(after.per_class) * n).astype(int)
    near = neighbours_of(dataset, base.classnames, forget)
    lost = {c: int(found_before[i] - found_after[i]) for i, c in enumerate(base.classnames) if c not in forget}

    def worst(names: set[str]) -> tuple[str | None, int]:
        return max(((c, lost[c]) for c in names), key=lambda cl: cl[1], default=(None, 0))

    score = report.scores.get(dataset)
    b, a = score.retain_acc if score is not None else (base.acc1, after.acc1)
    return {
        "forgotten_left": {c: int(found_after[base.classnames.index(c)]) for c in forget if c in base.classnames},
        "forgotten_base": {c: int(found_before[base.classnames.index(c)]) for c in forget if c in base.classnames},
        "per_class_images": int(n.max()),
        "neighbours": dict(zip(("class", "lost"), worst(near), strict=True)),
        "rest": dict(zip(("class", "lost"), worst(set(lost) - near), strict=True)),
        "aggregate_pt": round(100 * (a - b), 2),
    }


def variant_counts(loaded: Any, patch: Any, names: list[str], sets: tuple[str, ...]) -> dict[str, Any]:
    """Variants the base model recognises on held-out images (audit: >= 50% of the class) and how many
    still reach the class after the patch (above VARIANT_BOUND), with the worst one."""
    held = [n for n in sets if any(x in load_classnames(n) for x in names)]
    report = audit(loaded, [patch], names, datasets=held, families=DEFAULT_HARDEN_FAMILIES, probes=False)
    counted = [r for r in report.images if r.counted]
    reaching = [r for r in counted if r.patched > VARIANT_BOUND]
    worst = max(counted, key=lambda r: r.patched, default=None)
    return {"recognised": len(counted), "still_reach": len(reaching),
            "worst": {"accuracy": worst.patched, "variant": worst.variant.to_json(), "dataset": worst.dataset} if worst else None}


def load_classnames(dataset: str) -> list[str]:
    from forgetpack.evaluation.datasets import load_dataset

    return load_dataset(dataset, "test").classnames


def run_object(loaded: Any, names: list[str], options: dict[str, Any], with_variants: bool) -> dict[str, Any]:
    """One object request: solve, evaluate on every set, count images against the bounds."""
    started = time.perf_counter()
    result = forget(loaded, ForgetRequest(names, **options))
    seconds = time.perf_counter() - started
    sets = list(OBJECT_SETS)
    report = evaluate(loaded, patches=[result.patch], forget=[n for n in names if any(n in load_classnames(s) for s in sets)],
                      datasets=sets)
    row: dict[str, Any] = {"forget": names, "seconds": round(seconds, 2), "rank": result.report["rank"],
                           "sets": {s: image_counts(report, s, names) for s in sets}}
    if with_variants:
        row["variants"] = variant_counts(loaded, result.patch, names, ("quickdraw", "fashion"))
    sets_rows = row["sets"].values()
    row["within"] = {
        "forgotten": all(v <= IMAGES_LEFT for s in sets_rows for v in s["forgotten_left"].values()),
        "neighbours": all(s["neighbours"]["lost"] <= IMAGES_LOST for s in sets_rows),
        "rest": all(s["rest"]["lost"] <= IMAGES_LOST for s in sets_rows),
        "aggregate": all(s["aggregate_pt"] >= -AGGREGATE_BOUND_PT for s in sets_rows),
    }
    if with_variants:
        row["within"]["variants"] = row["variants"]["still_reach"] == 0
    return row


def print_object_row(row: dict[str, Any], method: str) -> None:
    holding = {k: s for k, s in row["sets"].items() if s["forgotten_left"]}
    forgotten = ", ".join(f"{k} {sum(s['forgotten_left'].values())}/{sum(s['forgotten_base'].values())}"
                          for k, s in holding.items())
    near = "; ".join(f"{s['neighbours']['class']} -{s['neighbours']['lost']}" for s in holding.values() if s["neighbours"]["class"])
    rest = max(((k, s["rest"]) for k, s in row["sets"].items()), key=lambda ks: ks[1]["lost"])
    agg = min(s["aggregate_pt"] for s in row["sets"].values())
    v = row.get("variants")
    variants = f"{v['still_reach']}/{v['recognised']}" if v else "-"
    missed = [k for k, ok in row["within"].items() if not ok]
    print(f"| {' + '.join(row['forget'])} | {method} | {forgotten} | {near or '-'} | {rest[1]['class']} ({rest[0]}) "
          f"-{rest[1]['lost']} | {agg:+.1f} | {variants} | {row['rank']} | {row['seconds']:.1f} | "
          f"{'NO (' + ', '.join(missed) + ')' if missed else 'yes'} |", flush=True)


def object_summary(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for method in dict.fromkeys(m for m, _ in rows):
        mine = [r for m, r in rows if m == method]
        keys = list(mine[0]["within"])
        counts = {k: sum(r["within"][k] for r in mine) for k in keys}
        counts["all"] = sum(all(r["within"].values()) for r in mine)
        seconds = [r["seconds"] for r in mine]
        out[method] = {"requests": len(mine), "within": counts, "mean_seconds": round(sum(seconds) / len(mine), 3)}
        print(f"{method}: " + "; ".join(f"{k} {v}/{len(mine)}" for k, v in counts.items())
              + f"; solve mean {sum(seconds) / len(mine):.2f} s, max {max(seconds):.2f} s")
    return out


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
    parser.add_argument("--objects", action="store_true",
                        help="the object suite: QuickDraw's neighbour groups and Fashion-MNIST, counted in images")
    parser.add_argument("--method", action="append", choices=sorted(METHODS),
                        help="with --objects: the methods side by side (repeatable; default: all three)")
    parser.add_argument("--no-variants", action="store_true", help="with --objects: skip the variant audit")
    parser.add_argument("--json", type=Path, help="write every row and the summary here")
    args = parser.parse_args()
    if args.json:
        check_output_file(args.json, "JSON results")
    todo = [[n.strip() for n in r.split(",")] for r in args.request] if args.request else (
        object_requests() if args.objects else requests())
    todo = todo[: args.only] if args.only else todo
    loaded = load_model("mini")
    if args.objects:
        methods = args.method or list(METHODS)
        print("| forget | method | forgotten left (images) | worst neighbour (images lost) | worst other class | "
              "Δ agg pt (worst set) | variants still reaching / recognised | rank | solve s | within |")
        print("|---|---|---|---|---|---:|---:|---:|---:|---|")
        object_rows = []
        for names in todo:
            for method in methods:
                object_rows.append((method, run_object(loaded, names, METHODS[method], not args.no_variants)))
                print_object_row(object_rows[-1][1], method)
        totals = object_summary(object_rows)
        if args.json:
            data = {"methods": {m: METHODS[m] for m in methods}, "rows": [{"method": m, **r} for m, r in object_rows],
                    "summary": totals}
            write_bytes_atomic(args.json, json.dumps(data, indent=2).encode())
        return
    options = harden_option(args.harden)
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
