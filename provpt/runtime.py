"""Where and how a run computes: the torch device and the autocast context of a run config.

Several GPUs on one workstation (``snakemake --cores 8 --resources gpu=4``): Snakemake only counts
the ``gpu`` resource, it does not hand out devices, so every job would see all GPUs and pick the
first. Here a job that resolves ``device: auto`` (or ``cuda``) with more than one visible GPU takes
a slot: an exclusive lock on one file per GPU (:func:`claim_gpu_slot`), held for the life of the
process, so the OS releases it when the job exits or is killed. Under SLURM a job sees only the
GPU it was given (one visible device) and takes no lock.

Torch-free at import (the studies package re-exports :func:`autocast_for` and is read by the
workflow without torch); torch is imported inside the functions.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .config import RunConfig

__all__ = ["resolve_device", "autocast_for", "dtype_for", "claim_gpu_slot", "gpu_lock_dir"]

_held = {}  # (count, lock folder) -> (index, lock): the slot this process holds, kept until it exits


def gpu_lock_dir() -> Path:
    """Where the per-GPU lock files live: ``$PROVPT_GPU_LOCKS``, else one folder per user in the
    system's temp dir (every job of one user on this machine sees the same one)."""
    env = os.environ.get("PROVPT_GPU_LOCKS")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"provpt-gpu-slots-{os.getuid()}"


def claim_gpu_slot(count: int, lock_dir: str | os.PathLike | None = None, poll_s: float = 1.0,
                   timeout_s: float | None = None) -> int:
    """The index of a GPU no other process holds, of ``count`` visible ones; waits while all are
    taken (more GPU jobs than GPUs: ``--resources gpu=N`` above the device count). The lock is held
    until this process exits; a second call in the same process returns the same index."""
    from filelock import FileLock, Timeout

    folder = Path(lock_dir) if lock_dir is not None else gpu_lock_dir()
    if (count, folder) in _held:
        return _held[count, folder][0]
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    while True:
        for index in range(count):
            lock = FileLock(folder / f"gpu{index}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            _held[count, folder] = (index, lock)
            return index
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"all {count} GPU slots in {folder} stayed taken for {timeout_s} s")
        time.sleep(poll_s)


def resolve_device(cfg: RunConfig) -> torch.device:
    """``cfg.device`` as a torch device (``auto``: CUDA when available, else CPU). ``auto`` or
    ``cuda`` with several visible GPUs: the GPU of this job's slot (:func:`claim_gpu_slot`)."""
    import torch

    if cfg.device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if cfg.device == "cuda":
                raise RuntimeError("device=cuda but CUDA is not available on this machine")
            return torch.device("cpu")
        count = torch.cuda.device_count()
        index = claim_gpu_slot(count) if count > 1 else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={cfg.device} but CUDA is not available on this machine")
    return torch.device(cfg.device)


def dtype_for(cfg: RunConfig):
    """The dtype of a run's parameters and inputs: float64 under precision fp64, else float32."""
    import torch

    return torch.float64 if cfg.precision == "fp64" else torch.float32


def autocast_for(cfg: RunConfig, device):
    """The training loop's autocast: bf16 on CUDA under precision auto, else none."""
    from contextlib import nullcontext

    import torch

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
