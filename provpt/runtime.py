"""Where and how a run computes: the torch device and the autocast context of a run config.

Torch-free at import (the studies package re-exports :func:`autocast_for` and is read by the
workflow without torch); torch is imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .config import RunConfig

__all__ = ["resolve_device", "autocast_for"]


def resolve_device(cfg: RunConfig) -> torch.device:
    """``cfg.device`` as a torch device (``auto``: CUDA when available, else CPU)."""
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={cfg.device} but CUDA is not available on this machine")
    return torch.device(cfg.device)


def autocast_for(cfg: RunConfig, device):
    """The training loop's autocast: bf16 on CUDA under precision auto, else none."""
    from contextlib import nullcontext

    import torch

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
