"""A prepared task in memory for training: its splits as uint8 tensors, normalised per batch.

Unlike the rest of :mod:`provpt.data` (numpy + PIL only) this module uses torch; it is not
imported by ``provpt.data`` itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from .cache import NORMALISATION, load_split, read_manifest
from .mini import MINI_TASKS

__all__ = ["TaskData", "data_variant", "random_crop_flip"]


def data_variant(manifest: dict) -> str:
    """Which data a prepared task is, for the results rows: ``noah`` (VTAB-1k read from the NOAH
    layout), ``vpt-json`` (FGVC from VPT's json splits), ``mini`` (generated here), ``synthetic``
    (tensors handed in)."""
    if manifest.get("synthetic"):
        return "synthetic"
    if manifest.get("kind") == "fgvc":
        return "vpt-json"
    return "mini" if manifest.get("task") in MINI_TASKS else "noah"


def random_crop_flip(x: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per image of ``x`` (n, C, H, W): a ``size`` x ``size`` crop at a random offset (top in
    0..H-size, left in 0..W-size, both inclusive, as torchvision's ``RandomCrop(size)``), flipped
    horizontally with probability 1/2 (``RandomHorizontalFlip``). One ``gather`` of each image's
    pixel indices on the device of ``x``, no loop over images. The numbers are drawn on the CPU from
    ``gen`` (tops, lefts, then flips) and moved to that device, so a seed gives the same crops on
    every device."""
    n, c, h, w = x.shape
    if size > min(h, w):
        raise ValueError(f"random_crop_flip: crop {size} is larger than the images ({h} x {w})")
    top = torch.randint(0, h - size + 1, (n,), generator=gen)
    left = torch.randint(0, w - size + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    step = torch.arange(size)
    rows = top[:, None] + step
    cols = torch.where(flip[:, None], left[:, None] + size - 1 - step, left[:, None] + step)
    pixel = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, size * size).to(x.device)
    return x.flatten(2).gather(2, pixel.expand(n, c, size * size)).view(n, c, size, size)


class TaskData:
    """A task's splits as uint8 tensors (on the training device), normalised batch by batch."""

    def __init__(self, cfg: RunConfig, device: torch.device, splits: dict | None = None, num_classes: int = 0):
        """The prepared task ``cfg.dataset`` under ``cfg.data_root``; or, with ``splits`` ({split: (uint8
        images (n, 3, H, W), int64 labels)}), those tensors as they are (benchmarks)."""
        if splits is None:
            task_dir = Path(cfg.data_root) / cfg.dataset
            self.manifest = read_manifest(task_dir)
            self.num_classes = int(self.manifest["num_classes"])
            self.splits = {}
            for split in dict.fromkeys([cfg.train_split, *cfg.eval_splits]):
                images, labels = load_split(task_dir, split)
                self.splits[split] = (torch.from_numpy(np.array(images)).to(device),
                                      torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device))
        else:
            self.manifest, self.num_classes = {"synthetic": True}, int(num_classes)
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
        self.variant = data_variant(self.manifest)
        mean, std = NORMALISATION[cfg.norm]
        self.dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
        self.mean = torch.tensor(mean, device=device, dtype=self.dtype).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=self.dtype).view(1, 3, 1, 1) * 255
        self.augment = cfg.augment
        self.crop = int(cfg.backbone_kwargs.get("img_size", 224)) if cfg.augment == "fgvc" else None

    def batch(self, split: str, idx: torch.Tensor, train: bool, gen: torch.Generator | None = None):
        """Images ``idx`` of ``split``, normalised, and their labels. FGVC (``augment: fgvc``): in
        training each image its own random crop and horizontal flip (:func:`random_crop_flip`, drawn
        from ``gen``), else the centre crop."""
        images, labels = self.splits[split]
        x = images[idx]
        if self.crop and x.shape[-1] > self.crop:
            if train:
                x = random_crop_flip(x, self.crop, gen)
            else:
                top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
                x = x[..., top:top + self.crop, left:left + self.crop]
        return x.to(self.dtype).sub_(self.mean).div_(self.std), labels[idx]

    def batches(self, split: str, batch_size: int, order: torch.Tensor | None = None, train=False, gen=None):
        n = len(self.splits[split][1])
        device = self.splits[split][1].device
        order = (torch.arange(n) if order is None else order).to(device)  # one copy, no per-batch sync
        for s in range(0, n, batch_size):
            yield self.batch(split, order[s:s + batch_size], train, gen)
