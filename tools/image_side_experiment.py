#!/usr/bin/env python
"""Can an image-free change of mini's visual projection stop image-side probes? Measured.

A text-only patch moves the forget names; the image embeddings stay exactly as they were, so
probes that never read text still separate the forgotten class:

- **1-NN**: each held-out test image's nearest train-split image (cosine over image embeddings);
- **linear probe**: standardised logistic regression trained on train-split embeddings, tested
  on the test split ("probe"); and the base model's probe applied to the changed embeddings
  ("old probe": a linear head someone trained before the patch).

Each candidate changes the visual projection in feature form (image embedding = x @ M_v, x the
ViT's pre-projection features) using only the text tower, and is applied together with the
default text patch (``forgetpack.engine.solve.forget``):

- ``remove u a=α``: ``M_v (I − α u uᵀ)``, u the forget name's base text direction (template
  mean) minus its component along the mean of the other candidates (α 1 removes, 2 reflects);
- ``remove u⊥R a=α``: the same with u orthogonalised against every retained candidate's text
  direction (nullspace-consistent, as the ``nullspace`` solver does on the text side);
- ``remove span⊥R``: every forget prompt's direction (each template, and aliases) orthogonalised
  against the retained directions, the whole span removed;
- ``oracle LEACE`` (reference, *not* image-free: uses the forget class's train images): the
  rank-1 least-squares concept eraser (Belrose et al. 2023) of "is the forget class" on x: after
  it no linear classifier of that binary concept beats a constant.

Then, for scale, a reference sweep (also using images, no text patch): removing the forgotten
digit's whitened mean differences from 1, 3 or all 9 other digits, or the top principal directions.

Each is built as a second patch layer on ``visual.proj``, applied to a copy of the model through
the ordinary patch path, and measured on the held-out mnist/digits/letters test splits: zero-shot
accuracy on the forgotten class(es), on the retained classes, the worst single retained class's
drop, and the probes.

    python tools/image_side_experiment.py --json /tmp/image_side.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from forgetpack.engine.models import load_model  # noqa: E402
from forgetpack.engine.projections import find_projection, projection_matrix  # noqa: E402
from forgetpack.engine.solve import forget  # noqa: E402
from forgetpack.engine.torch_patch import apply_patches  # noqa: E402
from forgetpack.evaluation.datasets import LabeledImages, load_dataset  # noqa: E402
from forgetpack.evaluation.harness import classify, encode_classnames  # noqa: E402
from forgetpack.format.fileio import check_output_file, write_bytes_atomic  # noqa: E402
from forgetpack.format.patch import Layer, Patch  # noqa: E402

SETS = ("mnist", "digits", "letters")
DIGIT_SETS = ("mnist", "digits")
REQUESTS = (("seven",), ("three",), ("one",), ("one", "seven"))
GALLERY = 3000  # train images per set for 1-NN and the probe (a seeded draw when a split is larger)
SEED = 0
SPAN_TOL = 1e-6
KEEP_BOUND = 0.01  # a change "hurts" a retained class when it drops it by more than 1 pt


# ---------------------------------------------------------------------------- features


def cpu_name() -> str:
    """The CPU model, for the timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def visual_features(loaded: Any, data: LabeledImages, batch: int = 256) -> np.ndarray:
    """The ViT's pre-projection features (float64): every image-side change is a function of these."""
    import torch

    visual = copy.deepcopy(loaded.model.visual).eval()
    visual.proj = None
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            images = torch.stack([loaded.preprocess(im) for im in data.images[start : start + batch]])
            out.append(visual(images).double().numpy())
    return np.concatenate(out)


def subsample(data: LabeledImages, count: int) -> LabeledImages:
    """A seeded draw of ``count`` images (stratification is not needed at these sizes)."""
    if len(data) <= count:
        return data
    idx = np.sort(np.random.default_rng(SEED).choice(len(data), size=count, replace=False))
    return LabeledImages(data.name, [data.images[i] for i in idx], data.labels[idx], data.classnames, data.templates)


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def text_rows(loaded: Any, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Base text embeddings, unit length, [template, name, dim]."""
    import torch

    with torch.no_grad():
        rows = [loaded.model.encode_text(loaded.tokenizer([t.format(n) for n in names]), normalize=True).double().numpy()
                for t in templates]
    return np.stack(rows)


# ---------------------------------------------------------------------------- candidate directions


def orth(columns: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns' span (relative tolerance ``SPAN_TOL``)."""
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    return u[:, s > SPAN_TOL * s[0]] if s.size and s[0] > 0 else u[:, :0]


def without(vectors: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Rows of ``vectors`` with their component in the span of ``basis`` (columns, orthonormal) removed."""
    return vectors - (vectors @ basis) @ basis.T


def text_directions(loaded: Any, forget_names: Sequence[str], retained: Sequence[str], aliases: Sequence[str],
                    templates: Sequence[str]) -> dict[str, np.ndarray]:
    """The joint-space directions each image-free candidate removes, as orthonormal columns [dim, k]."""
    f_rows = text_rows(loaded, forget_names, templates)  # [t, f, d]
    r_rows = text_rows(loaded, retained, templates)
    e_f = unit(f_rows.mean(0))  # [f, d] template-mean forget directions
    e_r = unit(r_rows.mean(0))  # [r, d]
    mean_other = unit(e_r.mean(0))[:, None]
    retained_span = orth(e_r.T)
    u_a = unit(without(e_f, mean_other))
    u_b = unit(without(e_f, retained_span))
    prompts = f_rows.reshape(-1, f_rows.shape[-1])
    if aliases:
        prompts = np.concatenate([prompts, text_rows(loaded, aliases, templates).reshape(-1, f_rows.shape[-1])])
    span = orth(without(prompts, retained_span).T)
    return {"u": orth(u_a.T), "u_perp": orth(u_b.T), "span_perp": span}


def removal_layer(M_v: np.ndarray, U: np.ndarray, alpha: float) -> Layer:
    """``M_v (I − α U Uᵀ)`` as a low-rank layer on ``visual.proj`` (in_out: the feature form)."""
    return Layer.lowrank("visual.proj", -alpha * (M_v @ U), U.T)


def leace_layer(M_v: np.ndarray, x: np.ndarray, concept: np.ndarray, ridge: float = 1e-6) -> Layer:
    """Rank-1 LEACE of a binary concept on the features x, folded into ``visual.proj``.

    ``x' = x − x W P W⁺`` with ``W = Σ^{-1/2}`` and ``P`` the projector onto ``W σ_xz``: after it the
    concept's two class means coincide, so no linear classifier of it beats a constant. The
    affine eraser's constant shift is dropped (a projection has no bias); the means still coincide.
    """
    z = concept.astype(np.float64)
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x) + ridge * np.eye(x.shape[1])
    vals, vecs = np.linalg.eigh(cov)
    W = (vecs / np.sqrt(vals)) @ vecs.T
    W_pinv = (vecs * np.sqrt(vals)) @ vecs.T
    sigma = xc.T @ (z - z.mean()) / len(x)
    w = W @ sigma
    w /= np.linalg.norm(w)
    a = W @ w  # x Q = (x · a) b
    b = w @ W_pinv
    return Layer.lowrank("visual.proj", -a[:, None], (b @ M_v)[None, :])


# ---------------------------------------------------------------------------- measurement


def probe_fit(train: np.ndarray, labels: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(train, labels)


def recall(pred: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> float:
    mask = np.isin(labels, classes)
    return float(np.mean(pred[mask] == labels[mask])) if mask.any() else float("nan")


def fit_probes(emb: dict[str, dict[str, np.ndarray]], data: dict[str, dict[str, LabeledImages]]) -> dict[str, Any]:
    """One linear probe per set, trained on the train-split embeddings (the adversary's own labelled images)."""
    return {s: probe_fit(emb[s]["train"], data[s]["train"].labels) for s in SETS}


def image_probes(emb: dict[str, dict[str, np.ndarray]], data: dict[str, dict[str, LabeledImages]],
                 forgotten: dict[str, list[int]], probes: dict[str, Any], base_probes: dict[str, Any]) -> dict[str, Any]:
    """1-NN, linear-probe and old-probe numbers on each set for one set of image embeddings."""
    out = {}
    for name in SETS:
        test, train = emb[name]["test"], emb[name]["train"]
        y_test, y_train = data[name]["test"].labels, data[name]["train"].labels
        f = forgotten[name]
        rest = [c for c in range(len(data[name]["test"].classnames)) if c not in f]
        nn = y_train[np.argmax(test @ train.T, axis=1)]
        lp = probes[name].predict(test)
        old = base_probes[name].predict(test)
        row = {"nn_forget": recall(nn, y_test, f), "nn_rest": recall(nn, y_test, rest),
               "probe_forget": recall(lp, y_test, f), "probe_acc": float(np.mean(lp == y_test)),
               "old_probe_forget": recall(old, y_test, f), "old_probe_rest": recall(old, y_test, rest)}
        out[name] = row
    return out


def zero_shot(text: dict[str, np.ndarray], emb: dict[str, dict[str, np.ndarray]], data: dict[str, dict[str, LabeledImages]],
              forgotten: dict[str, list[int]]) -> dict[str, Any]:
    """Zero-shot accuracy on the forgotten and retained classes, and per-class recall, on each test set."""
    out = {}
    for name in SETS:
        labels = data[name]["test"].labels
        pred = classify(emb[name]["test"], text[name])
        f = forgotten[name]
        n = len(data[name]["test"].classnames)
        rest = [c for c in range(n) if c not in f]
        out[name] = {"forget": recall(pred, labels, f), "retained": recall(pred, labels, rest),
                     "per_class": [recall(pred, labels, [c]) for c in range(n)]}
    return out


def image_drift(before: dict[str, dict[str, np.ndarray]], after: dict[str, dict[str, np.ndarray]],
                data: dict[str, dict[str, LabeledImages]], forgotten: dict[str, list[int]]) -> dict[str, float]:
    """Mean cosine drift (1 − cos) of the digit test images' embeddings: forgotten class vs the rest.
    Shows how much of the image embedding a direction actually touches."""
    drift = {"forget": [], "rest": []}
    for name in DIGIT_SETS:
        cos = np.sum(before[name]["test"] * after[name]["test"], axis=1)
        mask = np.isin(data[name]["test"].labels, forgotten[name])
        drift["forget"].append(1.0 - cos[mask])
        drift["rest"].append(1.0 - cos[~mask])
    return {k: round(float(np.mean(np.concatenate(v))), 4) for k, v in drift.items()}


def worst_drop(base: dict[str, Any], zs: dict[str, Any], forgotten: dict[str, list[int]]) -> tuple[float, str]:
    """The largest drop of any single retained class's zero-shot recall (pt), and which class."""
    worst, where = 0.0, "-"
    for name in SETS:
        for c, (b, a) in enumerate(zip(base[name]["per_class"], zs[name]["per_class"], strict=True)):
            if c not in forgotten[name] and b - a > worst:
                worst, where = b - a, f"{name}:{c}"
    return 100 * worst, where


# ---------------------------------------------------------------------------- one request


def run_request(loaded: Any, names: list[str], x: dict[str, dict[str, np.ndarray]], data: dict[str, dict[str, LabeledImages]],
                base_rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Base, text patch only, and every image-side candidate for one forget request."""
    model = loaded.model
    v_proj = find_projection(model, "image")
    t_proj = find_projection(model, "text")
    M_v = v_proj.feature_form(projection_matrix(model, v_proj))
    W_v = projection_matrix(model, v_proj)
    W_t = projection_matrix(model, t_proj)
    forgotten = {s: [data[s]["test"].classnames.index(n) for n in names if n in data[s]["test"].classnames] for s in SETS}

    t0 = time.perf_counter()
    result = forget(loaded, names)
    text_s = time.perf_counter() - t0
    recipe = result.patch.recipe
    retained = [n for n in dict.fromkeys([*recipe["preserve"], *(m for v in result.report["neighbours"].values() for m, _ in v)])
                if n not in names]
    aliases = [a for v in result.report["aliases"].values() for a, _ in v]
    dirs = text_directions(loaded, names, retained, aliases, recipe["templates"])
    train_x = np.concatenate([x[s]["train"] for s in DIGIT_SETS])
    concept = np.concatenate([np.isin(data[s]["train"].labels, forgotten[s]) for s in DIGIT_SETS])

    candidates: list[tuple[str, Any]] = [("text patch only", None)]
    for alpha in (1.0, 2.0):
        candidates.append((f"+ remove u, a={alpha:g}", lambda a=alpha: removal_layer(M_v, dirs["u"], a)))
    for alpha in (1.0, 2.0):
        candidates.append((f"+ remove u⊥R, a={alpha:g}", lambda a=alpha: removal_layer(M_v, dirs["u_perp"], a)))
    candidates.append(("+ remove span⊥R", lambda: removal_layer(M_v, dirs["span_perp"], 1.0)))
    candidates.append(("+ oracle LEACE (uses images)", lambda: leace_layer(M_v, train_x, concept)))

    base_zs = zero_shot(base_rows["text"], base_rows["emb"], data, forgotten)
    base_probes = base_rows["probes"]
    base_probe = image_probes(base_rows["emb"], data, forgotten, base_probes, base_probes)
    rows = [{"forget": names, "variant": "base", "rank": 0, "seconds": 0.0, "zero_shot": base_zs, "probes": base_probe,
             "worst_drop_pt": 0.0, "worst_class": "-", "drift": {"forget": 0.0, "rest": 0.0}}]
    for label, build in candidates:
        t0 = time.perf_counter()
        layers = [result.patch.layers[0]]
        if build is not None:
            layers.append(build())
        patch = Patch.create(loaded.model_id, base={t_proj.target: W_t, v_proj.target: W_v}, layers=layers,
                             layouts={t_proj.target: t_proj.layout, v_proj.target: v_proj.layout})
        patched = copy.deepcopy(model)
        apply_patches(patched, [patch])
        M_new = v_proj.feature_form(projection_matrix(patched, v_proj))
        emb = {s: {k: unit(v @ M_new).astype(np.float32) for k, v in x[s].items()} for s in SETS}
        view = dataclasses.replace(loaded, model=patched)
        text = {s: encode_classnames(view, data[s]["test"].classnames, data[s]["test"].templates) for s in SETS}
        zs = zero_shot(text, emb, data, forgotten)
        drift = image_drift(base_rows["emb"], emb, data, forgotten)
        if build is None:  # image embeddings unchanged: the base probes stand
            probes = base_probe
        else:
            probes = image_probes(emb, data, forgotten, fit_probes(emb, data), base_probes)
        drop, where = worst_drop(base_zs, zs, forgotten)
        seconds = time.perf_counter() - t0 + (text_s if build is None else 0.0)
        rows.append({"forget": names, "variant": label, "rank": sum(layer.rank for layer in layers[1:]),
                     "seconds": round(seconds, 2), "zero_shot": zs, "probes": probes, "worst_drop_pt": round(drop, 2),
                     "worst_class": where, "drift": drift})
    return rows


# ---------------------------------------------------------------------------- reference: erasure with images


def oracle_sweep(x: dict[str, dict[str, np.ndarray]], data: dict[str, dict[str, LabeledImages]], M_v: np.ndarray,
                 base_text: dict[str, np.ndarray], name: str = "seven") -> list[dict[str, Any]]:
    """How far *any* linear change of the visual projection gets against the probes, using the train images.

    Removes whitened directions found from labelled train images (mnist + digits): the forget class's mean
    difference from each other digit (k = 1, 3, 9; k = 9 makes every class mean coincide, multi-class LEACE),
    and, for scale, the top principal directions. No text patch: this is about the image side alone.
    """
    train_x = np.concatenate([x[s]["train"] for s in DIGIT_SETS])
    labels = np.concatenate([data[s]["train"].labels for s in DIGIT_SETS])
    f = data["mnist"]["test"].classnames.index(name)
    xc = train_x - train_x.mean(0)
    vals, vecs = np.linalg.eigh(xc.T @ xc / len(xc) + 1e-6 * np.eye(xc.shape[1]))
    W, W_pinv = (vecs / np.sqrt(vals)) @ vecs.T, (vecs * np.sqrt(vals)) @ vecs.T
    means = np.stack([train_x[labels == c].mean(0) for c in range(10)])
    pairwise = np.stack([W @ (means[f] - means[j]) for j in range(10) if j != f], axis=1)
    changes: list[tuple[str, np.ndarray]] = [("none", np.zeros((M_v.shape[0], M_v.shape[0])))]
    for k in (1, 3, 9):
        U = np.linalg.qr(pairwise[:, :k])[0]
        changes.append((f"{name}-vs-each-digit directions, k={k}", W @ U @ U.T @ W_pinv))
    for k in (8, 32):
        changes.append((f"top-{k} principal directions", vecs[:, -k:] @ vecs[:, -k:].T))
    rows = []
    for label, Q in changes:
        M_new = (np.eye(M_v.shape[0]) - Q) @ M_v
        emb = {s: {k: unit(v @ M_new).astype(np.float32) for k, v in x[s].items()} for s in DIGIT_SETS}
        row: dict[str, Any] = {"change": label, "rank": int(np.linalg.matrix_rank(Q)) if Q.any() else 0}
        for s in DIGIT_SETS:
            test, train = emb[s]["test"], emb[s]["train"]
            y_test, y_train = data[s]["test"].labels, data[s]["train"].labels
            rest = [c for c in range(10) if c != f]
            nn = y_train[np.argmax(test @ train.T, axis=1)]
            lp = probe_fit(train, y_train).predict(test)
            zs = classify(test, base_text[s])
            row[s] = {"nn_forget": recall(nn, y_test, [f]), "nn_rest": recall(nn, y_test, rest),
                      "probe_forget": recall(lp, y_test, [f]), "probe_rest": recall(lp, y_test, rest),
                      "zs_forget": recall(zs, y_test, [f]), "zs_rest": recall(zs, y_test, rest)}
        rows.append(row)
    return rows


def print_oracle(rows: list[dict[str, Any]]) -> None:
    print("\nReference, not image-free: linear erasure of one digit found from labelled train images (no text patch)\n")
    print("| change | rank | ZS forget m/d | ZS rest m/d | 1-NN forget m/d | 1-NN rest m/d | probe forget m/d | probe rest m/d |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [" / ".join(pct(r[s][k]) for s in DIGIT_SETS)
                 for k in ("zs_forget", "zs_rest", "nn_forget", "nn_rest", "probe_forget", "probe_rest")]
        print(f"| {r['change']} | {r['rank']} | {' | '.join(cells)} |", flush=True)


# ---------------------------------------------------------------------------- output


def pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.0f}"


def pair(row: dict[str, Any], group: str, key: str) -> str:
    return " / ".join(pct(row[group][s][key]) for s in DIGIT_SETS)


def print_header() -> None:
    print("| forget | variant | rank | ZS forget m/d | ZS retained m/d/L | worst class drop (pt) | 1-NN forget m/d | "
          "1-NN rest m/d | probe forget m/d | probe acc m/d/L | old probe forget m/d | old probe rest m/d | drift f/r | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def print_row(row: dict[str, Any]) -> None:
    zs, pr = row["zero_shot"], row["probes"]
    retained = " / ".join(pct(zs[s]["retained"]) for s in SETS)
    probe_acc = " / ".join(pct(pr[s]["probe_acc"]) for s in SETS)
    old = pair(row, "probes", "old_probe_forget")
    old_rest = pair(row, "probes", "old_probe_rest")
    drift = f"{row['drift']['forget']:.3f} / {row['drift']['rest']:.3f}"
    print(f"| {' + '.join(row['forget'])} | {row['variant']} | {row['rank']} | {pair(row, 'zero_shot', 'forget')} | "
          f"{retained} | {row['worst_drop_pt']:.1f} ({row['worst_class']}) | {pair(row, 'probes', 'nn_forget')} | "
          f"{pair(row, 'probes', 'nn_rest')} | {pair(row, 'probes', 'probe_forget')} | {probe_acc} | {old} | "
          f"{old_rest} | {drift} | {row['seconds']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--model", default="mini", help="a model spec whose image tower is a ViT (visual.proj)")
    args = parser.parse_args()
    if args.json:
        check_output_file(args.json, "JSON results")

    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores visible)", flush=True)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    if find_projection(loaded.model, "image").rule != "vit":
        # measured (docs/engine.md, "The image side") when mini's tower was a ViT; since mini learned
        # everyday things its tower is a ModifiedResNet, whose projection is the attention pool's output
        sys.exit(f"{args.model}: this experiment needs a ViT image tower (visual.proj); give --model ARCH:PATH of one")
    data = {s: {"test": load_dataset(s, "test"), "train": subsample(load_dataset(s, "train"), GALLERY)} for s in SETS}
    x = {s: {k: visual_features(loaded, d) for k, d in splits.items()} for s, splits in data.items()}
    M_v = find_projection(loaded.model, "image").feature_form(projection_matrix(loaded.model, find_projection(loaded.model, "image")))
    base_emb = {s: {k: unit(v @ M_v).astype(np.float32) for k, v in x[s].items()} for s in SETS}
    check = loaded.model.encode_image(_batch(loaded, data["mnist"]["test"], 64), normalize=True).detach().numpy()
    assert np.allclose(check, base_emb["mnist"]["test"][:64], atol=1e-4), "pre-projection features do not reproduce encode_image"
    base_text = {s: encode_classnames(loaded, data[s]["test"].classnames, data[s]["test"].templates) for s in SETS}
    base_probes = fit_probes(base_emb, data)
    setup_s = time.perf_counter() - t0
    sizes = {s: {k: len(d) for k, d in splits.items()} for s, splits in data.items()}
    print(f"setup (load mini, datasets, features of {sizes}): {setup_s:.1f} s\n", flush=True)

    print_header()
    rows = []
    for names in REQUESTS:
        for row in run_request(loaded, list(names), x, data, {"text": base_text, "emb": base_emb, "probes": base_probes}):
            rows.append(row)
            print_row(row)
    verdict = decide(rows)
    print(f"\n{verdict['summary']}")
    t0 = time.perf_counter()
    oracle = oracle_sweep(x, data, M_v, base_text)
    print_oracle(oracle)
    print(f"\n(reference sweep: {time.perf_counter() - t0:.1f} s)")
    if args.json:
        payload = {"cpu": cpu_name(), "sizes": sizes, "setup_seconds": round(setup_s, 2), "rows": rows, "decision": verdict,
                   "oracle_sweep": oracle}
        write_bytes_atomic(args.json, json.dumps(payload, indent=2, default=float).encode())


def _batch(loaded: Any, data: LabeledImages, count: int) -> Any:
    import torch

    return torch.stack([loaded.preprocess(im) for im in data.images[:count]])


def decide(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Does an image-free candidate lower a probe on the forgotten class (by 10 pt or more on both digit sets,
    against the text patch alone) in every request, without a retained class dropping by more than 1 pt?"""
    verdicts = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        if variant in ("base", "text patch only") or "uses images" in variant:
            continue
        ok = True
        for names in REQUESTS:
            mine = {r["variant"]: r for r in rows if tuple(r["forget"]) == names}
            ref, cand = mine["text patch only"]["probes"], mine[variant]["probes"]
            lowered = any(all(ref[s][k] - cand[s][k] >= 0.10 for s in DIGIT_SETS) for k in ("nn_forget", "probe_forget"))
            ok &= lowered and mine[variant]["worst_drop_pt"] <= 100 * KEEP_BOUND
        verdicts[variant] = ok
    helping = [v for v, ok in verdicts.items() if ok]
    summary = (f"image-free changes that lower a probe by ≥ 10 pt on both digit sets in every request with no retained "
               f"class down > 1 pt: {', '.join(helping) if helping else 'none'}")
    return {"helps": verdicts, "summary": summary}


if __name__ == "__main__":
    main()
