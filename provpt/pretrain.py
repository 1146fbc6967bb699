"""Pretrain the embedded profile's small ViT on Fashion-MNIST, within a wall-clock budget.

Recipe (from our embedded-benchmark experiments): the 60k training images zero-padded to the model's input
size, replicated to 3 channels, normalised with mean = std = 0.5; ±2 px translation (one offset per
batch) and a horizontal flip per sample; AdamW, label smoothing 0.1; linear warmup then cosine decay
over the *elapsed training time* (or over ``max_steps``), with a hard stop at the budget. A linear
head is trained on the CLS features and dropped when saving; the 10k test split gives the upstream
accuracy. Everything is deterministic given the seed except where the wall-clock budget stops.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .data.mini import DEFAULT_FMNIST_DIR, load_fashion_mnist
from .io import file_sha256, write_text
from .model.backbone import create_backbone, save_backbone

SHIFT = 2  # ± pixels of random translation


def _prepare(images, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> uint8 (N, 1, size + 2*SHIFT, size + 2*SHIFT), the item centred."""
    x = torch.from_numpy(images).unsqueeze(1)
    inner = round(size * 28 / 32)  # 28 px inside a 32 px input, scaled for other input sizes
    if inner != 28:
        x = F.interpolate(x.float(), size=(inner, inner), mode="bilinear", antialias=True,
                          align_corners=False).round().clamp(0, 255).to(torch.uint8)
    pad = size + 2 * SHIFT - inner
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


def _to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> float (B, 3, S, S) normalised with mean = std = 0.5."""
    return (x.float() / 127.5 - 1.0).expand(-1, 3, -1, -1)


def _lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


@torch.no_grad()
def evaluate(model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    s = SHIFT
    correct = sum(int((head(model(_to_input(x[i:i + batch, :, s:-s, s:-s]))).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    return correct / len(x)


def pretrain(backbone: str, backbone_kwargs: dict, out: str | os.PathLike, fmnist_dir=DEFAULT_FMNIST_DIR,
             budget_s: float | None = 270.0, seed: int = 0, threads: int = 2, batch_size: int = 128,
             lr: float = 1.5e-3, weight_decay: float = 0.05, warmup: float = 0.05, label_smoothing: float = 0.1,
             max_steps: int | None = None, progress: bool = True) -> dict:
    """Train ``create_backbone(backbone, **backbone_kwargs)`` plus a linear head on Fashion-MNIST.

    The schedule runs over ``max_steps`` optimiser steps when given (then the result depends only on
    the seed, and ``budget_s``, if set, is only a hard stop), else over ``budget_s`` seconds of
    training (then a slower or busier machine trains for fewer steps). Saves the backbone (no head)
    to ``out`` with :func:`save_backbone` and a summary to ``out`` with suffix ``.json`` (upstream
    test accuracy, steps, images seen, seconds, settings); returns the summary.
    """
    if budget_s is None and max_steps is None:
        raise ValueError("pretrain: give budget_s or max_steps (or both)")
    out = Path(out)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = create_backbone(backbone, **backbone_kwargs)
        head = nn.Linear(model.num_features, 10)
        size = model.patch_embed.img_size[0]
        xtr, ytr = load_fashion_mnist(fmnist_dir, "train")
        xte, yte = load_fashion_mnist(fmnist_dir, "test")
        xtr, xte = _prepare(xtr, size), _prepare(xte, size)
        ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()

        skip = set(model.no_weight_decay())  # timm: pos_embed, cls_token, ...; plus biases and norms
        named = list(model.named_parameters()) + [(f"head.{k}", v) for k, v in head.named_parameters()]
        decay = [p for k, p in named if p.ndim >= 2 and k not in skip]
        no_decay = [p for k, p in named if p.ndim < 2 or k in skip]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        n = len(xtr)
        perm, pos, step, seen = torch.randperm(n, generator=gen), 0, 0, 0
        losses, hits = [], []

        from tqdm import tqdm

        bar = tqdm(total=max_steps or 100, desc="pretrain", unit="step" if max_steps else "%",
                   disable=not progress, mininterval=2.0)
        model.train()
        t0 = time.perf_counter()
        elapsed = 0.0
        while True:
            elapsed = time.perf_counter() - t0
            prog = step / max_steps if max_steps else elapsed / budget_s
            if prog >= 1.0 or (budget_s and elapsed >= budget_s):
                break
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(prog, warmup)
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,), generator=gen).tolist()
            xb = xtr[idx, :, dy:dy + size, dx:dx + size]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            logits = head(model(_to_input(xb)))
            loss = F.cross_entropy(logits, ytr[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(idx)
            losses.append(loss.item())
            hits.append(int((logits.argmax(1) == ytr[idx]).sum()) / len(idx))
            new = step if max_steps else min(100, int(100 * prog))
            if new > bar.n:
                bar.update(new - bar.n)
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", step=step)
        bar.close()
        train_s = elapsed
        t1 = time.perf_counter()
        acc = evaluate(model, head, xte, yte)
        eval_s = time.perf_counter() - t1
        save_backbone(model, out)
        last, last_hits = losses[-100:], hits[-100:]
        summary = {
            "backbone": backbone, "backbone_kwargs": dict(backbone_kwargs),
            "upstream": "fashion-mnist", "upstream_test_acc": acc,
            "steps": step, "images_seen": seen, "epochs": seen / n,
            "stopped_by": "max_steps" if max_steps and step >= max_steps else "budget_s",
            "train_seconds": round(train_s, 2), "eval_seconds": round(eval_s, 2),
            "images_per_s": round(seen / max(train_s, 1e-9), 1),
            "final_train_loss": sum(last) / max(len(last), 1),
            "final_train_acc": sum(last_hits) / max(len(last_hits), 1),  # last 100 steps, augmented
            "seed": seed, "budget_s": budget_s, "max_steps": max_steps, "threads": torch.get_num_threads(),
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
            "label_smoothing": label_smoothing, "norm": "vtab", "augment": f"translate±{SHIFT}px+hflip",
            "weights": out.name, "weights_sha256": file_sha256(out),
            "torch": torch.__version__, "timm": timm.__version__,
        }
        write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
        return summary
    finally:
        torch.set_num_threads(old_threads)
