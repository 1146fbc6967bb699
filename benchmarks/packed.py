"""Packed runs against separate ones: K runs in one process and one forward vs K runs one by one.

Two measurements, K in --ks (default 1 2 4 8 16):

- ``embedded`` (whole processes, start-up included): a search grid of K learning rates of one method
  on a random 800/200-image task at 32 px, trained either as K `provpt train` processes one after
  another or as one `provpt search` process with `pack.search: K`; training images per second of
  wall time, and the ratio separate / packed (> 1: packing is faster). Every process gets --threads
  torch threads (1: a workflow job).
- ``vitb`` (in one process, steady state): K VPT-Deep ViT-B/16 runs at 224, --vitb-batch images each,
  one training step (forward, backward, clip, SGD) of all K through `packed_forward`, against K steps
  of the runs one after another; images per second and ratio, medians of interleaved repetitions.

`--device cuda` runs both on the GPU (bf16 autocast as the training loop uses it). The figures are in
benchmarks/README.md; nothing here is asserted by a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import MODELS, ROOT, interleaved, median, parser, random_task, report, setup_device, sync


def embedded_rows(args, root: Path) -> list[dict]:
    backbone, kw = MODELS["embedded"]
    data_root = random_task(root / "task", {"train800": args.train, "val200": 200}, 32, num_classes=10)
    rows = []
    for k in args.ks:
        lrs = [round(0.001 * (1 + j), 6) for j in range(k)]
        profile = {
            "search": {"train_split": "train800", "eval_split": "val200", "seed": 18, "lr": lrs,
                       "weight_decay": [0.01], "lr_base_batch": None, "overrides": {}},
            "pack": {"search": k},
            "train": {"data_root": str(data_root), "backbone": backbone, "backbone_kwargs": kw, "method": args.method,
                      "epochs": args.epochs, "batch_size": 64, "optimizer": "adamw", "schedule": "cosine",
                      "eval_every": args.epochs, "progress": False, "threads": args.threads, "device": args.device},
        }
        prof = root / f"profile{k}.yaml"
        prof.write_text(yaml.safe_dump(profile))
        cli = [sys.executable, "-m", "provpt.cli"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def separate(k=k, lrs=lrs, prof=prof):
            out = Path(tempfile.mkdtemp(dir=root))
            t0 = time.perf_counter()
            for lr in lrs:
                subprocess.run(cli + ["train", "--profile", str(prof), "--stage", "search", "dataset=bench",
                                      f"lr={lr}", "weight_decay=0.01", f"out={out / str(lr)}"],
                               check=True, env=env, capture_output=True)
            return time.perf_counter() - t0

        def packed(prof=prof):
            out = Path(tempfile.mkdtemp(dir=root))
            t0 = time.perf_counter()
            subprocess.run(cli + ["search", "--profile", str(prof), "--out", str(out), "dataset=bench",
                                  f"method={args.method}"], check=True, env=env, capture_output=True)
            return time.perf_counter() - t0

        times = interleaved({"separate": separate, "packed": packed}, args.repeats, warmup=0)
        images = k * args.epochs * args.train
        s, p = median(times["separate"]), median(times["packed"])
        rows.append({"model": "embedded", "method": args.method, "K": k, "separate s": s, "packed s": p,
                     "separate img/s": images / s, "packed img/s": images / p,
                     "packed/separate": median([a / b for a, b in zip(times["separate"], times["packed"])])})
        print(rows[-1], flush=True)
    return rows


def vitb_rows(args, device) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from provpt.config import RunConfig
    from provpt.model.backbone import create_backbone
    from provpt.model.methods import build_model, trainable_parameters
    from provpt.model.prompted_vit import packed_forward
    from provpt.runtime import autocast_for

    backbone, kw = MODELS["vitb"]
    b = args.vitb_batch or (64 if device.type == "cuda" else 4)
    rows = []
    for k in [k for k in args.ks if k <= args.vitb_max_k]:
        cfgs = [RunConfig(method="vpt-deep", backbone=backbone, backbone_kwargs=kw, seed=s, lr=0.01) for s in range(k)]
        vit = create_backbone(backbone, None, **kw).to(device)
        models = [build_model(c, 100, vit).to(device) for c in cfgs]
        opts = [torch.optim.SGD([p for _, p in trainable_parameters(m)], lr=0.01, momentum=0.9) for m in models]
        autocast = autocast_for(cfgs[0], device)
        x = torch.randn(k * b, 3, 224, 224, device=device)
        y = torch.randint(0, 100, (k * b,), device=device)

        def step(group):
            idx = [models.index(m) for m in group]
            xs = torch.cat([x[i * b:(i + 1) * b] for i in idx])
            with autocast:
                logits = packed_forward(group, xs, [b] * len(group))
            loss = sum(F.cross_entropy(z.float(), y[i * b:(i + 1) * b]) for z, i in zip(logits, idx))
            for i in idx:
                opts[i].zero_grad(set_to_none=True)
            loss.backward()
            for i in idx:
                torch.nn.utils.clip_grad_norm_([p for _, p in trainable_parameters(models[i])], 0.25)
                opts[i].step()

        def timed(fn):
            def go():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                sync(device)
                return time.perf_counter() - t0
            return go

        for m in models:
            m.train()
        times = interleaved({"separate": timed(lambda: [step([m]) for m in models]),
                             "packed": timed(lambda: step(models))}, args.repeats)
        images = k * b * args.steps
        s, p = median(times["separate"]), median(times["packed"])
        rows.append({"model": "vitb", "method": "vpt-deep", "K": k, "separate s": s, "packed s": p,
                     "separate img/s": images / s, "packed img/s": images / p,
                     "packed/separate": median([a / c for a, c in zip(times["separate"], times["packed"])])})
        print(rows[-1], flush=True)
        del models, opts, vit
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="pack sizes")
    p.add_argument("--models", nargs="+", default=["embedded", "vitb"], choices=["embedded", "vitb"])
    p.add_argument("--method", default="vpt-deep", help="embedded: the method of the grid (default vpt-deep)")
    p.add_argument("--epochs", type=int, default=2, help="embedded: epochs per run (default 2)")
    p.add_argument("--train", type=int, default=800, help="embedded: training images (default 800)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--vitb-batch", type=int, default=None, help="vitb: images per run per step (4 on cpu, 64 on cuda)")
    p.add_argument("--vitb-max-k", type=int, default=8, help="vitb: largest K (default 8)")
    p.add_argument("--steps", type=int, default=2, help="vitb: steps per timing (default 2)")
    p.set_defaults(repeats=1)
    args = p.parse_args()
    device = setup_device(args.device)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "embedded" in args.models:
            rows += embedded_rows(args, Path(tmp))
    if "vitb" in args.models:
        rows += vitb_rows(args, device)
    report(args, "packed", rows, title=f"packed vs separate runs ({args.device}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
