"""The training loop: one run of one method on one dataset, into one run folder.

Read top to bottom: set up (device, data, model, optimiser, relocator), resume if a checkpoint
exists, then per epoch: learning rate -> relocation (PRO-VPT) -> train -> evaluate -> checkpoint.
A run folder is complete when ``metrics.json`` exists; every file is written atomically, so a
killed run loses at most the epoch in progress and a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from .config import RunConfig
from .data.cache import NORMALISATION, load_split, read_manifest
from .model.backbone import file_sha256
from .model.methods import build_model, count_parameters, trainable_parameters

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------- files


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_trainable(model, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}, str(tmp))
    os.replace(tmp, path)


def load_trainable(model, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_trainable_state(load_file(str(path)))


# ----------------------------------------------------------------------------- set-up


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={cfg.device} but CUDA is not available on this machine")
    return torch.device(cfg.device)


class TaskData:
    """A task's splits as uint8 tensors (on the training device), normalised batch by batch."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        task_dir = Path(cfg.data_root) / cfg.dataset
        self.manifest = read_manifest(task_dir)
        self.num_classes = int(self.manifest["num_classes"])
        self.splits = {}
        for split in dict.fromkeys([cfg.train_split, *cfg.eval_splits]):
            images, labels = load_split(task_dir, split)
            self.splits[split] = (torch.from_numpy(np.array(images)).to(device),
                                  torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device))
        mean, std = NORMALISATION[cfg.norm]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.augment = cfg.augment
        self.crop = int(cfg.backbone_kwargs.get("img_size", 224)) if cfg.augment == "fgvc" else None

    def batch(self, split: str, idx: torch.Tensor, train: bool, gen: torch.Generator | None = None):
        images, labels = self.splits[split]
        x = images[idx].float()
        if self.crop and x.shape[-1] > self.crop:  # FGVC: random crop + flip in training, centre crop else
            room = x.shape[-1] - self.crop
            if train:
                i, j = (int(v) for v in torch.randint(0, room + 1, (2,), generator=gen))
                x = x[..., i:i + self.crop, j:j + self.crop]
                if torch.rand((), generator=gen) < 0.5:
                    x = x.flip(-1)
            else:
                x = x[..., room // 2:room // 2 + self.crop, room // 2:room // 2 + self.crop]
        return x.sub_(self.mean).div_(self.std), labels[idx]

    def batches(self, split: str, batch_size: int, order: torch.Tensor | None = None, train=False, gen=None):
        n = len(self.splits[split][1])
        device = self.splits[split][1].device
        order = (torch.arange(n) if order is None else order).to(device)  # one copy, no per-batch sync
        for s in range(0, n, batch_size):
            yield self.batch(split, order[s:s + batch_size], train, gen)


def make_optimizer(cfg: RunConfig, model) -> torch.optim.Optimizer:
    params = [p for _, p in trainable_parameters(model)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def train_epoch(model, data: TaskData, cfg: RunConfig, optimizer, epoch: int, autocast):
    """One pass over the training split; metrics accumulate on the device (one sync at the end)."""
    model.train()
    params = [p for _, p in trainable_parameters(getattr(model, "_orig_mod", model))]  # compiled: the gates stay out
    n = len(data.splits[cfg.train_split][1])
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    dev = data.mean.device
    loss_sum, correct, batches = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
    for x, y in data.batches(cfg.train_split, cfg.batch_size, order, train=True, gen=gen):
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        loss_sum += loss.detach()
        correct += (logits.argmax(-1) == y).sum()
        batches += 1
    loss_sum, correct = loss_sum.item(), correct.item()
    return {"train_loss": loss_sum / batches, "train_acc": 100.0 * correct / n,
            "train_loss_faithful": loss_sum / cfg.batch_size, "batches": batches}


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


# ----------------------------------------------------------------------------- the run


def run(cfg: RunConfig, on_epoch_end=None) -> dict:
    """Train ``cfg`` into ``cfg.out`` (resuming if a checkpoint is there); returns the metrics."""
    out = Path(cfg.out)
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    torch.manual_seed(cfg.seed)
    data = TaskData(cfg, device)
    model = build_model(cfg, data.num_classes).to(device)
    optimizer = make_optimizer(cfg, model)
    forward_model = torch.compile(model) if cfg.compile else model
    relocator = None
    if cfg.method == "pro-vpt" and cfg.relocation.enabled:
        from .relocation.relocator import Relocator

        relocator = Relocator(cfg.relocation, model.num_blocks, model.prompts.total, cfg.seed, grad_clip=cfg.grad_clip)

    start, history, wall = 0, [], 0.0
    if (out / CHECKPOINT).exists():
        ck = torch.load(out / CHECKPOINT, map_location=device, weights_only=False)
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
        (out / "checkpoints").mkdir(exist_ok=True)
        save_atomic(checkpoint(0), out / "checkpoints" / "epoch000.pt")
    train_batches = lambda: data.batches(cfg.train_split, cfg.batch_size)  # noqa: E731 (fixed order)
    bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, disable=not cfg.progress,
               desc=f"{cfg.dataset}/{cfg.method}", leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        moves = []
        if relocator is not None:
            with autocast:
                moves = relocator.start_epoch(epoch, forward_model, train_batches, F.cross_entropy)
        t1 = time.perf_counter()
        stats = train_epoch(forward_model, data, cfg, optimizer, epoch, autocast)
        if relocator is not None:
            relocator.end_epoch(epoch, model, stats["batches"], stats["train_loss"], stats["train_loss_faithful"])
        t2 = time.perf_counter()
        last = epoch == cfg.epochs - 1
        evals = {s: evaluate(forward_model, data, s, autocast) for s in cfg.eval_splits
                 if last or (epoch + 1) % cfg.eval_every == 0}
        t3 = time.perf_counter()
        wall += t3 - t0
        history.append({"epoch": epoch, "lr": lr_at(cfg, epoch), **stats, "eval": evals,
                        "distribution": model.distribution(), "moves": len(moves),
                        "time_s": {"relocation": t1 - t0, "train": t2 - t1, "eval": t3 - t2}})
        if (epoch + 1) % cfg.checkpoint_every == 0 or last or epoch + 1 in keep:
            ck = checkpoint(epoch + 1)
            save_atomic(ck, out / CHECKPOINT)
            if epoch + 1 in keep:
                (out / "checkpoints").mkdir(exist_ok=True)
                save_atomic(ck, out / "checkpoints" / f"epoch{epoch + 1:03d}.pt")
        write_logs(out, history, relocator)
        if evals:
            bar.set_postfix(loss=f"{stats['train_loss']:.3f}",
                            **{s: f"{v['acc']:.1f}" for s, v in evals.items()})
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    save_trainable(model, out / "trainable.safetensors")
    metrics = final_metrics(cfg, model, data, history, wall)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def write_logs(out: Path, history: list, relocator) -> None:
    write_atomic(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    L = len(history[0]["distribution"])
    rows = ["epoch," + ",".join(f"b{i}" for i in range(L))]
    rows += [f"{h['epoch']}," + ",".join(map(str, h["distribution"])) for h in history]
    write_atomic(out / "distribution.csv", "\n".join(rows) + "\n")
    if relocator is not None:
        write_atomic(out / "moves.jsonl", "".join(json.dumps(m) + "\n" for m in relocator.moves))


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
        "data_manifest_sha256": data.manifest.get("sha256") or _dict_sha(data.manifest),
        "norm": cfg.norm, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "selection_rule": "last-epoch accuracy on the search eval split; ties to the smaller lr",
        "versions": {"provpt": provpt.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def _dict_sha(d: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
