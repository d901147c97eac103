#!/usr/bin/env python
"""Train the vision tower of ``mini`` and write ``forgetpack/mini/mini.safetensors``.

What is trained: the open_clip ViT (``visual.*``), the text projection ``text.proj`` and
``logit_scale``. MiniLM stays frozen, so its pooled features for every (template, class)
prompt are computed once up front and training only ever runs the linear projection on
the text side.

Objective: CLIP's image-to-text cross-entropy against the prompts of all 20 classes (ten
digit words, ten letters), each class read through a template drawn at random every step
from a list of phrasings, so the text side keeps working across wordings.

Data: the *train* splits of ``mnist``, ``digits`` and ``letters`` only (forgetpack.evaluation.datasets);
the held-out test splits are touched once, at the end, to report accuracy.

Deterministic: fixed seeds, ``torch.use_deterministic_algorithms(True)``, fixed thread count.
Runs in about 7 minutes on 2 CPU cores (399 s measured, bit-identical weights on a rerun):

    python tools/train_mini.py            # writes forgetpack/mini/mini.safetensors
    python tools/train_mini.py --epochs 2 --out /tmp/mini.safetensors   # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from forgetpack import mini
from forgetpack.evaluation import datasets as fd

DIGIT_TEMPLATES = (
    "a photo of the number {}.",
    "a photo of the digit {}.",
    "the number {}.",
    "the digit {}.",
    "a handwritten {}.",
    "a handwritten number {}.",
    "an image of the number {}.",
    "a drawing of the number {}.",
    "a blurry photo of the number {}.",
    "a low resolution photo of the digit {}.",
)
LETTER_TEMPLATES = (
    "a photo of the letter {}.",
    "the letter {}.",
    "the capital letter {}.",
    "a picture of the letter {}.",
    "an image of the letter {}.",
    "a printed letter {}.",
    "the character {}.",
    "a drawing of the letter {}.",
    "a blurry photo of the letter {}.",
    "a low resolution photo of the letter {}.",
)
SHARED_TEMPLATES = ("a photo of a {}.", "{}")
# Never trained on: reported at the end to show how the text side generalises.
UNSEEN_TEMPLATES = {"digit": "an illustration of the number {}.", "letter": "an illustration of the letter {}."}


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def to_tensor(data: fd.LabeledImages, preprocess) -> torch.Tensor:
    """Images through mini's own eval preprocess, so training sees exactly what evaluation sees."""
    return torch.stack([preprocess(im) for im in data.images])


@torch.no_grad()
def pooled_text_features(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """MiniLM's mean-pooled features (before ``text.proj``), exactly as ``model.text`` computes them."""
    text = model.text
    tokens = tokenizer(prompts)
    mask = (tokens != text.config.pad_token_id).long()
    out = text.transformer(input_ids=tokens, attention_mask=mask)
    return text.pooler(out, mask)


def random_affine(x: torch.Tensor, background: float, gen: torch.Generator) -> torch.Tensor:
    """Small random rotation, scale, shear and shift of a batch, filling with the background."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = u(-0.2, 0.2)
    scale = u(0.85, 1.15)
    shear = u(-0.15, 0.15)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, :, 2] = torch.stack([u(-0.15, 0.15), u(-0.15, 0.15)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background


@torch.no_grad()
def zero_shot_accuracy(model, preprocess, tokenizer, data: fd.LabeledImages, template: str) -> float:
    """Held-out accuracy through the plain open_clip API (encode_image / encode_text)."""
    images = to_tensor(data, preprocess)
    image_features = torch.cat([model.encode_image(b, normalize=True) for b in images.split(500)])
    text_features = model.encode_text(tokenizer([template.format(c) for c in data.classnames]), normalize=True)
    predictions = (image_features @ text_features.T).argmax(dim=1).numpy()
    return float((predictions == data.labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps before the cosine decay")
    parser.add_argument("--init-scale", type=float, default=30.0, help="initial logit scale (temperature 1/30)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=mini.WEIGHTS_PATH)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    seed_everything(args.seed, args.threads)
    model, preprocess, tokenizer = mini.create_untrained()
    pp = mini.config()["preprocess_cfg"]
    background = (0.0 - pp["mean"][0]) / pp["std"][0]  # black ink-free pixel after normalisation

    with torch.no_grad():
        model.logit_scale.fill_(math.log(args.init_scale))

    # --- data: train splits only. The real digits are seen twice per epoch: there are fewer
    # of them than rendered letters, and handwriting is the harder task.
    train_sets = [fd.load_dataset(n, "train") for n in ("mnist", "digits", "letters")]
    repeats = {"mnist": 2, "digits": 2, "letters": 1}
    class_offset = {"mnist": 0, "digits": 0, "letters": len(fd.DIGIT_NAMES)}
    xs, ys = [], []
    for data in train_sets:
        x = to_tensor(data, preprocess)
        y = torch.from_numpy(data.labels) + class_offset[data.name]
        xs += [x] * repeats[data.name]
        ys += [y] * repeats[data.name]
    x_train, y_train = torch.cat(xs), torch.cat(ys)
    print(f"train images: {len(x_train)} (after repeats) in {time.perf_counter() - start:.1f}s")

    # --- frozen text side: pooled MiniLM features of every (class, template) prompt.
    classnames = fd.DIGIT_NAMES + fd.LETTER_NAMES
    templates = [DIGIT_TEMPLATES + SHARED_TEMPLATES] * 10 + [LETTER_TEMPLATES + SHARED_TEMPLATES] * 10
    n_templates = len(templates[0])
    prompts = [t.format(c) for c, ts in zip(classnames, templates, strict=True) for t in ts]
    pooled = pooled_text_features(model, tokenizer, prompts).view(len(classnames), n_templates, -1)

    # --- optimisation: AdamW, warmup + cosine; no decay on gains, biases, embeddings, scale.
    model.text.transformer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    no_decay_ids = {id(p) for p in no_decay}
    for name, p in model.named_parameters():  # positional/class embeddings are not weights to shrink
        if p.requires_grad and ("embedding" in name) and id(p) not in no_decay_ids:
            decay.remove(p)
            no_decay.append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    steps_per_epoch = len(x_train) // args.batch_size
    total = args.epochs * steps_per_epoch
    warmup = min(args.warmup, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    model.text.transformer.eval()  # frozen and unused in the loop; keep dropout off
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        running, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = random_affine(x_train[idx], background, gen)
            y = y_train[idx]
            pick = torch.randint(n_templates, (len(classnames),), generator=gen)
            text = F.normalize(model.text.proj(pooled[torch.arange(len(classnames)), pick]), dim=-1)
            image = F.normalize(model.visual(x), dim=-1)
            logits = model.logit_scale.exp() * image @ text.T
            loss = F.cross_entropy(logits, y)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            step += 1
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {running / seen:.4f}  train acc {correct / seen:.4f}  "
            f"scale {model.logit_scale.exp().item():.1f}  {time.perf_counter() - start:.0f}s",
            flush=True,
        )

    # --- held-out evaluation through the ordinary open_clip code path.
    model.eval()
    train_seconds = time.perf_counter() - start
    accuracies = {}
    for name in ("mnist", "digits", "letters"):
        data = fd.load_dataset(name, "test")
        kind = "letter" if name == "letters" else "digit"
        acc = zero_shot_accuracy(model, preprocess, tokenizer, data, data.templates[0])
        unseen = zero_shot_accuracy(model, preprocess, tokenizer, data, UNSEEN_TEMPLATES[kind])
        accuracies[name] = {"acc1": round(acc, 4), "template": data.templates[0], "acc1_unseen_template": round(unseen, 4)}
        print(f"held-out {name:8s} {acc:.4f}  ({data.templates[0]!r}; unseen template {unseen:.4f})")

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in mini.trainable_state(model).items()}
    metadata = {
        "arch": mini.MINI_ARCH,
        "config": json.dumps(json.loads(mini.CONFIG_PATH.read_text(encoding="utf-8"))),
        "heldout_accuracy": json.dumps(accuracies),
        "train_args": json.dumps({k: str(v) for k, v in vars(args).items() if k != "out"}),
        "train_seconds": f"{train_seconds:.0f}",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, {len(state)} tensors) after {train_seconds:.0f}s of training")


if __name__ == "__main__":
    main()
