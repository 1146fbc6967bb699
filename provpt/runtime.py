"""Where and how a run computes: the torch device, the float precision and the autocast context of a run config.

GPUs on one workstation (``snakemake --cores 16 --resources gpu=4``): Snakemake only counts the
``gpu`` resource, it does not hand out devices, so every job would see all GPUs and pick the first,
and two jobs on a one-GPU machine would share its memory. Here a job that resolves ``device: auto``
(or ``cuda``) takes a slot: an exclusive lock on one file per visible GPU (:func:`claim_gpu_slot`),
held for the life of the process, so the OS releases it when the job exits or is killed; with one GPU
the jobs take turns. A SLURM job that was given its GPU (:func:`slurm_gave_gpu`) sees only that one
and takes no lock: SLURM already made it exclusive.

Precision (``cfg.precision``): ``fp32`` (the authors': float32 weights and IEEE float32 matmuls and
convolutions), ``tf32`` (float32 weights, matmuls and convolutions on TF32 tensor cores on CUDA; on
the CPU the same as fp32), ``bf16`` (float32 weights, bf16 autocast), ``auto`` (bf16 on CUDA, fp32 on
the CPU) and ``fp64`` (exactness checks).

Torch-free at import (the studies package re-exports :func:`autocast_for` and is read by the
workflow without torch); torch is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .config import RunConfig

__all__ = ["resolve_device", "autocast_for", "dtype_for", "float32_mode", "claim_gpu_slot", "gpu_lock_dir",
           "slurm_gave_gpu", "Autocast"]

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
    start, told = time.monotonic(), False
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
        if not told:
            logging.getLogger(__name__).warning("all %d GPU slot(s) in %s are taken by other jobs: waiting for one",
                                                count, folder)
            told = True
        time.sleep(poll_s)


def slurm_gave_gpu(env=None) -> bool:
    """Is this a SLURM job that was allocated its GPU(s) (``--gpus``/``--gres=gpu``)? SLURM then shows
    the job only its own devices, exclusively; a SLURM job without a GPU allocation is not covered."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return False
    return any(env.get(k) for k in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS",
                                    "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK"))


def resolve_device(cfg: RunConfig) -> torch.device:
    """``cfg.device`` as a torch device (``auto``: CUDA when available, else CPU). ``auto`` or
    ``cuda``: the GPU of this job's slot (:func:`claim_gpu_slot`, also with one visible GPU, so
    concurrent jobs take turns), or GPU 0 in a SLURM job given its GPU (:func:`slurm_gave_gpu`)."""
    import torch

    if cfg.device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if cfg.device == "cuda":
                raise RuntimeError("device=cuda but CUDA is not available on this machine")
            return torch.device("cpu")
        count = torch.cuda.device_count()
        index = 0 if slurm_gave_gpu() else claim_gpu_slot(count)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={cfg.device} but CUDA is not available on this machine")
    return torch.device(cfg.device)


def dtype_for(cfg: RunConfig):
    """The dtype of a run's parameters and inputs: float64 under precision fp64, else float32."""
    import torch

    return torch.float64 if cfg.precision == "fp64" else torch.float32


def float32_mode(cfg: RunConfig, device) -> str:
    """Set how float32 matmuls and convolutions run on CUDA for this process, from ``cfg.precision``:
    ``"tf32"`` (TF32 tensor cores) under precision tf32, else ``"ieee"`` (full float32: fp32 is
    faithful, and under bf16 only what autocast leaves in float32 remains). Returns the mode in effect
    on ``device``: on the CPU nothing is set and it is always ``"ieee"`` (tf32 behaves as fp32)."""
    import torch

    if torch.device(device).type != "cuda":
        return "ieee"
    tf32 = cfg.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return "tf32" if tf32 else "ieee"


class Autocast:
    """A reusable, re-entrant ``torch.autocast``: each ``with`` opens a fresh ``torch.autocast`` and
    closes it on exit, so nested uses (the oracle's lookahead trains inside the epoch's context)
    restore exactly the state they found. One ``torch.autocast`` object entered twice would instead
    overwrite its saved state and leave autocast on after the outer exit."""

    def __init__(self, device_type: str, dtype=None):
        self.device_type, self.dtype = device_type, dtype
        self._open = []

    def __enter__(self):
        import torch

        ctx = torch.autocast(self.device_type, dtype=self.dtype)
        ctx.__enter__()
        self._open.append(ctx)
        return self

    def __exit__(self, *exc):
        return self._open.pop().__exit__(*exc)

    def __repr__(self) -> str:
        return f"Autocast({self.device_type!r}, dtype={self.dtype})"


def autocast_for(cfg: RunConfig, device):
    """The training loop's autocast context (re-entrant, :class:`Autocast`): bf16 under precision bf16,
    and on CUDA under auto; none (a null context) for fp32, tf32 and fp64. Also sets the process's
    float32 matmul mode for the run (:func:`float32_mode`)."""
    from contextlib import nullcontext

    import torch

    device = torch.device(device)
    float32_mode(cfg, device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return Autocast(device.type, torch.bfloat16) if bf16 else nullcontext()
