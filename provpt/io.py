"""Files: atomic writes (text, bytes, JSON, CSV, torch, safetensors) and sha256 hashes.

Every writer goes through :func:`atomic_path`: the data is written to a temporary sibling
``.<name>.<pid>.tmp`` and moved onto the target with ``os.replace`` only once it is complete, so
a reader (or a rerun after a kill) sees either the old file or the new one, never half of one.
Parent folders are created. No torch at import: torch is imported by the functions that save it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text", "write_bytes", "write_json", "write_csv", "save_torch",
           "save_safetensors", "json_safe", "file_sha256", "json_sha256"]


# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling of ``path`` to write to; move it into place on success.

    The parent folder is created; on an exception the temporary file is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8, byte for byte (no newline translation)."""
    return write_bytes(path, text.encode("utf-8"))


def json_safe(obj):
    """JSON-safe: NaN/inf -> None, numpy/torch 0-d scalars -> Python numbers, tuples -> lists,
    dict keys -> str (recursively)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """``json.dumps(json_safe(obj), indent=indent)`` (no trailing newline)."""
    return write_text(path, json.dumps(json_safe(obj), indent=indent))


def write_csv(path: str | os.PathLike, df) -> Path:
    """A pandas DataFrame as ``df.to_csv(index=False)``."""
    return write_text(path, df.to_csv(index=False))


def save_torch(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file(tensors, path)``, atomically (tensors contiguous, any device
    safetensors accepts; callers detach/move them)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


# ----------------------------------------------------------------------------- hashes


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks; None for None (or no such file)."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_sha256(obj) -> str:
    """sha256 hex digest of ``json.dumps(obj, sort_keys=True)`` (a manifest's or config's hash)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
