"""The training loop: one run of one method on one dataset, into one run folder.

Read top to bottom: set up (device, data, model, optimiser, relocator), resume if a checkpoint
exists, then per epoch: learning rate -> relocation (PRO-VPT) -> train -> evaluate -> checkpoint.
A run folder is complete when ``metrics.json`` exists; every file is written atomically, so a
killed run loses at most the epoch in progress and a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from .clock import NULL_CLOCK
from .config import RELOCATING, RunConfig
from .data.task import TaskData
from .io import file_sha256, json_sha256, save_safetensors, save_torch, write_text
from .model.methods import build_model, count_parameters, trainable_parameters
from .runtime import autocast_for, resolve_device

CHECKPOINT = "checkpoint.pt"
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- files


def save_trainable(model, path: Path) -> None:
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}, path)


def load_trainable(model, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_trainable_state(load_file(str(path)))


# ----------------------------------------------------------------------------- set-up


def load_checkpoint(path: Path, device) -> dict:
    """A run checkpoint, loaded with ``weights_only=True``: tensors and plain containers only, so a
    checkpoint from a shared remote cannot run code; anything else is refused, naming the file."""
    import pickle

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: it holds more than tensors and plain containers "
                         f"(torch.load weights_only=True: {str(e).splitlines()[0]}). Delete the file to "
                         "restart the run, or check where it came from.") from None


def make_optimizer(cfg: RunConfig, model) -> torch.optim.Optimizer:
    params = [p for _, p in trainable_parameters(model)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_run(cfg: RunConfig, num_classes: int, device) -> tuple:
    """What a run trains, built as every run builds it: (model, optimiser, relocator or None)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes).to(device)
    return model, make_optimizer(cfg, model), make_relocator(cfg, model)


def make_relocator(cfg: RunConfig, model):
    """PRO-VPT's relocator for ``model`` (None for every other method, or with relocation off)."""
    if cfg.method not in RELOCATING or not cfg.relocation.enabled:
        return None
    from .relocation.relocator import Relocator

    return Relocator(cfg.relocation, model.num_blocks, model.prompts.total, cfg.seed, grad_clip=cfg.grad_clip,
                     epochs=cfg.epochs)


def lr_at(cfg: RunConfig, epoch: int) -> float:
    """Constant (the authors') or cosine, both with an optional linear warm-up, per epoch."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        t = (epoch - cfg.warmup_epochs) / max(1, cfg.epochs - cfg.warmup_epochs)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr


def save_epochs(cfg: RunConfig) -> set[int]:
    """Epoch indices (completed epochs, 0 = before training) at which a study keeps a checkpoint."""
    return {int(round(float(f) * cfg.epochs)) for f in cfg.save_at}


# ----------------------------------------------------------------------------- phases


def train_epoch(model, data: TaskData, cfg: RunConfig, optimizer, epoch: int, autocast, clock=NULL_CLOCK,
                max_batches: int | None = None) -> dict:
    """One pass over the training split (or its first ``max_batches`` batches); metrics accumulate on
    the device (one sync at the end). ``clock`` times the phases (:mod:`provpt.clock`)."""
    model.train()
    params = [p for _, p in trainable_parameters(getattr(model, "_orig_mod", model))]  # compiled: the gates stay out
    labels = data.splits[cfg.train_split][1]
    n = len(labels)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen).to(labels.device)  # one copy, no per-batch sync
    loss_sum, correct = torch.zeros((), device=labels.device), torch.zeros((), device=labels.device)
    batches = images = 0
    for start in range(0, n, cfg.batch_size):
        if max_batches and batches >= max_batches:
            break
        with clock.batch("data"):
            x, y = data.batch(cfg.train_split, order[start:start + cfg.batch_size], True, gen)
        with clock.batch("forward_backward"):
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            clock.mark("forward")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with clock.batch("optimizer"):
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
        loss_sum += loss.detach()
        correct += (logits.argmax(-1) == y).sum()
        batches += 1
        images += len(y)
    loss_sum, correct = loss_sum.item(), correct.item()
    return {"train_loss": loss_sum / batches, "train_acc": 100.0 * correct / images,
            "train_loss_faithful": loss_sum / cfg.batch_size, "batches": batches, "images": images}


@torch.no_grad()
def evaluate(model, data: TaskData, split: str, autocast, batch_size: int = 256) -> dict:
    model.eval()
    dev = data.mean.device
    loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for x, y in data.batches(split, batch_size):
        with autocast:
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
    n = len(data.splits[split][1])
    return {"acc": 100.0 * correct.item() / n, "loss": loss_sum.item() / n}


def run_epoch(model, data: TaskData, cfg: RunConfig, optimizer, relocator, epoch: int, autocast,
              eval_splits=(), forward_model=None, clock=NULL_CLOCK, max_batches: int | None = None) -> dict:
    """One epoch as :func:`run` trains it: learning rate -> relocation (PRO-VPT) -> train -> the
    relocator's bookkeeping -> evaluation of ``eval_splits``. ``forward_model``: the (compiled) model
    to call, ``model`` by default. Returns the epoch's history row (without the distribution)."""
    fwd = forward_model or model
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, epoch)
    moves = []
    if relocator is not None:
        train_batches = lambda: data.batches(cfg.train_split, cfg.batch_size)  # noqa: E731 (fixed order)
        with clock.once("relocation"), autocast:
            moves = relocator.start_epoch(epoch, fwd, train_batches, F.cross_entropy, clock)
    t1 = time.perf_counter()
    stats = train_epoch(fwd, data, cfg, optimizer, epoch, autocast, clock, max_batches)
    if relocator is not None:
        relocator.end_epoch(epoch, model, stats["batches"], stats["train_loss"], stats["train_loss_faithful"], clock)
    t2 = time.perf_counter()
    with clock.once("eval"):
        evals = {s: evaluate(fwd, data, s, autocast) for s in eval_splits}
    t3 = time.perf_counter()
    return {"epoch": epoch, "lr": lr_at(cfg, epoch), **stats, "eval": evals, "moves": len(moves),
            "time_s": {"relocation": t1 - t0, "train": t2 - t1, "eval": t3 - t2}}


# ----------------------------------------------------------------------------- the run


def run(cfg: RunConfig, on_epoch_end=None) -> dict:
    """Train ``cfg`` into ``cfg.out`` (resuming if a checkpoint is there); returns the metrics."""
    out = Path(cfg.out)
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    autocast = autocast_for(cfg, device)
    data = TaskData(cfg, device)  # a missing dataset fails here, before the run folder exists
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    model, optimizer, relocator = build_run(cfg, data.num_classes, device)
    forward_model = torch.compile(model) if cfg.compile else model

    start, history, wall = 0, [], 0.0
    if (out / CHECKPOINT).exists():
        ck = load_checkpoint(out / CHECKPOINT, device)
        model.load_trainable_state(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        if relocator is not None:
            relocator.load_state_dict(ck["relocator"])
        start, history, wall = ck["epoch"], ck["history"], ck["wall_time_s"]

    def checkpoint(epoch: int) -> dict:
        return {"epoch": epoch, "model": model.trainable_state(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": history, "wall_time_s": wall,
                "relocator": relocator.state_dict() if relocator is not None else None}

    keep = save_epochs(cfg)
    if start == 0 and 0 in keep:
        save_torch(checkpoint(0), out / "checkpoints" / "epoch000.pt")
    bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, disable=not cfg.progress,
               desc=f"{cfg.dataset}/{cfg.method}", leave=False)
    for epoch in bar:
        last = epoch == cfg.epochs - 1
        splits = [s for s in cfg.eval_splits if last or (epoch + 1) % cfg.eval_every == 0]
        row = run_epoch(model, data, cfg, optimizer, relocator, epoch, autocast, splits, forward_model)
        seconds = sum(row["time_s"].values())
        wall += seconds
        history.append({**row, "distribution": model.distribution()})
        evals = row["eval"]
        log.info("%s/%s seed %d epoch %d/%d: loss %.4f, train acc %.2f%%%s, %d move(s), %.1f s", cfg.dataset,
                 cfg.method, cfg.seed, epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"],
                 "".join(f", {s} {v['acc']:.2f}%" for s, v in evals.items()), row["moves"], seconds)
        if (epoch + 1) % cfg.checkpoint_every == 0 or last or epoch + 1 in keep:
            ck = checkpoint(epoch + 1)
            save_torch(ck, out / CHECKPOINT)
            if epoch + 1 in keep:
                save_torch(ck, out / "checkpoints" / f"epoch{epoch + 1:03d}.pt")
        write_logs(out, history, relocator)
        if evals:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                            **{s: f"{v['acc']:.1f}" for s, v in evals.items()})
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    save_trainable(model, out / "trainable.safetensors")
    metrics = final_metrics(cfg, model, data, history, wall)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def write_logs(out: Path, history: list, relocator) -> None:
    write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    L = len(history[0]["distribution"])
    rows = ["epoch," + ",".join(f"b{i}" for i in range(L))]
    rows += [f"{h['epoch']}," + ",".join(map(str, h["distribution"])) for h in history]
    write_text(out / "distribution.csv", "\n".join(rows) + "\n")
    if relocator is not None:
        write_text(out / "moves.jsonl", "".join(json.dumps(m) + "\n" for m in relocator.moves))


def final_metrics(cfg: RunConfig, model, data: TaskData, history: list, wall: float) -> dict:
    import timm

    import provpt

    last = history[-1]
    return {
        "dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed, "lr": cfg.lr,
        "weight_decay": cfg.weight_decay, "epochs": cfg.epochs, "train_split": cfg.train_split,
        "eval": last["eval"], "train_loss": last["train_loss"], "train_acc": last["train_acc"],
        **count_parameters(model), "num_prompts": model.prompts.total,
        "distribution": model.distribution(), "wall_time_s": wall,
        "backbone": cfg.backbone, "weights_sha256": file_sha256(cfg.weights),
        "data_manifest_sha256": json_sha256(data.manifest),
        "norm": cfg.norm, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "selection_rule": "last-epoch accuracy on the search eval split; ties to the smaller lr",
        "versions": {"provpt": provpt.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }
