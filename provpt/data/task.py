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

__all__ = ["TaskData"]


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
        mean, std = NORMALISATION[cfg.norm]
        self.dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
        self.mean = torch.tensor(mean, device=device, dtype=self.dtype).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=self.dtype).view(1, 3, 1, 1) * 255
        self.augment = cfg.augment
        self.crop = int(cfg.backbone_kwargs.get("img_size", 224)) if cfg.augment == "fgvc" else None

    def batch(self, split: str, idx: torch.Tensor, train: bool, gen: torch.Generator | None = None):
        images, labels = self.splits[split]
        x = images[idx].to(self.dtype)
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
