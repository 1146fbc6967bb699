"""Bytes of one finished ViT-B/16 run folder per method: the table `provpt plan` prices run folders with.

Each method trains for real (provpt.train.run, keep: all) on a generated 224 px task of --images
training and validation images with --classes classes, for --epochs epochs, batch 2, on the CPU, with
random ViT-B/16 weights (the sizes do not depend on the weights). Measured per method: trainable
parameters, the bytes of trainable.safetensors and checkpoint.pt per trainable parameter (weights;
weights + optimiser state + RNG + history), and what config.yaml, metrics.json, history.jsonl,
distribution.csv and moves.jsonl take in total, per epoch and per evaluation. Trainable parameters
per prompt per block and per class come from the method's model built at two prompt lengths and two
class counts (provpt.model.methods.build_model). provpt.plan scales the row to a run's prompts,
classes and epochs and applies the profile's `keep`.

    python benchmarks/run_bytes.py                          # writes provpt/resources/run_bytes.json
    python benchmarks/run_bytes.py --methods vpt-deep full --out /tmp/rb.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from provpt.config import METHODS, PROMPTED, RunConfig  # noqa: E402

BACKBONE = "vit_base_patch16_224"
METRIC_FILES = ("config.yaml", "metrics.json", "history.jsonl", "distribution.csv", "moves.jsonl")


def make_task(root: Path, n: int, classes: int) -> Path:
    from PIL import Image

    from provpt.data.cache import prepare_vtab_task

    src, cache = root / "raw", root / "cache"
    rng = np.random.default_rng(0)
    for split in ("train800", "val200"):
        lines = []
        for i in range(n):
            path = src / "task" / split / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
            lines.append(f"{split}/{i}.png {i % classes}")
        (src / "task" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    for split in ("train800val200", "test"):
        shutil.copy(src / "task" / "val200.txt", src / "task" / f"{split}.txt")
    prepare_vtab_task(src, "task", cache, size=224, num_classes=classes, group="natural", progress=False)
    return cache


def trainable(method: str, prompts: int, classes: int) -> int:
    from provpt.model.methods import build_model, trainable_parameters

    cfg = RunConfig(method=method, backbone=BACKBONE, num_prompts=prompts)
    return sum(p.numel() for _, p in trainable_parameters(build_model(cfg, classes)))


def measure(method: str, cache: Path, out: Path, args) -> dict:
    from provpt.train import run

    sizes = {}
    for epochs in (args.epochs, args.epochs + 1):
        folder = out / f"{method}-{epochs}"
        cfg = RunConfig(dataset="task", data_root=str(cache), backbone=BACKBONE, method=method,
                        num_prompts=args.prompts, epochs=epochs, batch_size=2, eval_splits=["val200"], device="cpu", threads=args.threads,
                        progress=False, keep="all", out=str(folder))
        t0 = time.perf_counter()
        m = run(cfg)
        print(f"{method}: {epochs} epochs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        sizes[epochs] = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    a, b = sizes[args.epochs], sizes[args.epochs + 1]
    params = m["trainable_params"]
    meta = lambda s: sum(s.get(f, 0) for f in METRIC_FILES)  # noqa: E731
    per_epoch = meta(b) - meta(a)  # one more epoch, evaluated (eval_every 1)
    per_prompt = (trainable(method, args.prompts + 1, args.classes) - trainable(method, args.prompts, args.classes)) \
        if method in PROMPTED else 0
    per_class = trainable(method, args.prompts, args.classes + 1) - trainable(method, args.prompts, args.classes)
    ck_epoch = b["checkpoint.pt"] - a["checkpoint.pt"]
    return {
        "params": params, "prompts": args.prompts if method in PROMPTED else 0, "classes": args.classes,
        "params_per_prompt": per_prompt, "params_per_class": per_class,
        "safetensors_bytes": b["trainable.safetensors"],
        "safetensors_bytes_per_param": 4.0, "safetensors_fixed": b["trainable.safetensors"] - 4 * params,
        "checkpoint_bytes": b["checkpoint.pt"],
        "checkpoint_bytes_per_param": round((b["checkpoint.pt"] - ck_epoch * (args.epochs + 1)) / params, 3),
        "checkpoint_fixed": 0,
        "metrics_bytes": meta(b), "fixed_bytes": meta(b) - per_epoch * (args.epochs + 1),
        "bytes_per_epoch": per_epoch, "bytes_per_eval": 0,
        "files": b,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--images", type=int, default=2, help="training (and validation) images (default 2)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--prompts", type=int, default=10, help="prompts per block (default 10)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the shorter run (the longer: one more)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "provpt" / "resources" / "run_bytes.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_task(Path(tmp), args.images, args.classes)
        for method in args.methods:
            rows[method] = measure(method, cache, Path(tmp) / "runs", args)
    table = {"backbone": BACKBONE, "command": "python benchmarks/run_bytes.py " + " ".join(argv or sys.argv[1:]),
             "torch": torch.__version__, "methods": rows}
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{'method':<15}{'trainable':>12}{'safetensors MB':>16}{'checkpoint MB':>15}{'metrics kB':>12}{'kB/epoch':>10}")
    for m, r in rows.items():
        print(f"{m:<15}{r['params']:>12,}{r['safetensors_bytes'] / 1e6:>16.2f}{r['checkpoint_bytes'] / 1e6:>15.2f}"
              f"{r['metrics_bytes'] / 1e3:>12.1f}{r['bytes_per_epoch'] / 1e3:>10.2f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
