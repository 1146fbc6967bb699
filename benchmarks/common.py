"""Helpers shared by the benchmark scripts: model specs, interleaved timing, tables, fixture data.

Timing rule of every script: the variants being compared run in the same process, alternating
(the order rotates every repetition), and each figure is the median over repetitions; ratios are
medians of the per-repetition ratios, so a burst of load from another process hits one pair, not
one variant. Wall-clock numbers are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# The embedded profile's backbone (params/mini.yaml) and the paper's ViT-B/16 at 224.
MODELS = {
    "embedded": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 4}),
    "vitb": ("vit_base_patch16_224", {}),
}


def image_size(model: str) -> int:
    return int(MODELS[model][1].get("img_size", 224))


# ----------------------------------------------------------------------------- command line


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every script shares (--device, --repeats, --json)."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0], epilog="\n".join(doc.strip().splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per variant (default: 5)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    return p


def setup_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing


def interleaved(variants: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run ``variants`` (name -> zero-argument callable returning its own seconds, or None to be
    timed here) ``repeats`` times, alternating and rotating the order; returns name -> seconds."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            took = variants[name]()
            times[name].append(took if took is not None else time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-repetition ratios ``num[i] / den[i]``."""
    return median([a / b for a, b in zip(num, den)])


# ----------------------------------------------------------------------------- reporting


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict], title: str | None = None) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys); floats to 3 significant figures."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return (f"\n{title}\n\n" if title else "") + "\n".join(lines)


def report(args, name: str, rows: list[dict], extra: dict | None = None, title: str | None = None) -> None:
    """Print the table and the machine line; write JSON if asked."""
    info = machine()
    print(table(rows, title))
    print(f"\nmachine: {info}")
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": name, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "machine": info, "rows": rows, **(extra or {})}
        args.json.write_text(json.dumps(payload, indent=2))


# ----------------------------------------------------------------------------- fixture data


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` photo-like uint8 images (n, size, size, 3): smooth colour fields plus a little noise
    (pure noise would make JPEGs unrealistically large and slow to decode)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        out[i] = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255)
    return out


def write_images(folder: Path, n: int, size: int, fmt: str = "jpg", seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(synthetic_images(n, size, seed)):
        path = folder / f"{i:06d}.{fmt}"
        Image.fromarray(img).save(path, quality=90) if fmt == "jpg" else Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def random_task(root: Path, splits: dict[str, int], size: int, num_classes: int = 10, task: str = "bench",
                fmt: str = "png") -> Path:
    """A prepared task ``<root>/cache/<task>`` with random labels, built through ``prepare_split``;
    returns the cache root (``data_root`` of a RunConfig)."""
    from provpt.data.cache import prepare_split

    rng = np.random.default_rng(0)
    info = {"task": task, "kind": "vtab", "group": "natural", "num_classes": num_classes,
            "norm": "vtab", "mean": [0.5] * 3, "std": [0.5] * 3}
    for k, (split, n) in enumerate(splits.items()):
        paths = write_images(root / "raw" / task / split, n, size, fmt, seed=k)
        labels = rng.integers(0, num_classes, n)
        prepare_split(list(zip(paths, labels)), root / "cache" / task, split, size, info=info, progress=False)
    return root / "cache"
