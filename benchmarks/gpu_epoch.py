"""The GPU figures the README's GPU table needs, in one run: ViT-B/16 VPT-Deep and PRO-VPT epochs, alone and
packed, bf16 and fp32, and a test evaluation.

Per (precision, method, K): one training epoch of K runs over --images training images each (VPT-Deep,
or PRO-VPT with the authors' scoring pass and online scoring, one relocation per epoch), through the
training loop's own `provpt.train.run_members` (K = 1: a run alone; K > 1: a pack), after one warm-up
epoch; seconds per epoch, training images per second over all runs, and the pack's speed-up over K
runs alone. Then one evaluation pass of one run over --eval-images test images (26,032: SVHN's VTAB-1k
test split). Images are random uint8 tensors on the device (the cache's layout), random backbone
weights (the cost does not depend on them).

Writes --json (default gpu_epoch.json): the rows, and the `--measured` input of projection.py
({"device", "train_epoch_s": {"vpt-deep", "pro-vpt"}, "train_epoch_images", "eval_images_per_s",
"packed": {...}}). On a CPU, use small sizes to check that it runs: --images 8 --eval-images 16 --ks 1 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common import MODELS, machine, parser, setup_device, sync, table

METHODS = {
    "vpt-deep": ("vpt-deep", {}),
    "pro-vpt pass": ("pro-vpt", {"scoring": "pass", "clip_scores": True, "reward": "faithful"}),
    "pro-vpt online": ("pro-vpt", {}),
}


def make_data(cfg, device, n_train: int, n_eval: int, size: int = 224):
    from provpt.data.task import TaskData

    g = torch.Generator().manual_seed(0)
    splits = {"train800val200": (torch.randint(0, 256, (n_train, 3, size, size), dtype=torch.uint8, generator=g),
                                 torch.randint(0, 100, (n_train,), generator=g)),
              "test": (torch.randint(0, 256, (n_eval, 3, size, size), dtype=torch.uint8, generator=g),
                       torch.randint(0, 100, (n_eval,), generator=g))}
    return TaskData(cfg, device, splits, num_classes=100)


def epoch_row(args, device, data, precision: str, name: str, k: int) -> dict:
    from provpt.config import RelocationConfig, RunConfig
    from provpt.model.backbone import create_backbone
    from provpt.runtime import autocast_for, dtype_for
    from provpt.train import Member, build_run, run_members

    method, reloc = METHODS[name]
    backbone, kw = MODELS["vitb"]
    cfgs = [RunConfig(method=method, backbone=backbone, backbone_kwargs=kw, seed=s, lr=0.01, precision=precision,
                      train_split="train800val200", eval_splits=["test"], relocation=RelocationConfig(**reloc),
                      device=str(device), epochs=100) for s in range(k)]
    vit = create_backbone(backbone, None, **kw).to(device, dtype_for(cfgs[0])) if k > 1 else None
    members = [Member(c, *build_run(c, 100, device, vit)) for c in cfgs]
    autocast = autocast_for(cfgs[0], device)
    times = []
    for epoch in range(1 + args.repeats):  # epoch 0: warm-up (no move: relocation starts at epoch 1)
        sync(device)
        t0 = time.perf_counter()
        run_members(members, data, epoch, autocast)
        sync(device)
        times.append(time.perf_counter() - t0)
    s = sorted(times[1:])[len(times[1:]) // 2]
    n = len(data.splits["train800val200"][1])
    return {"precision": precision, "method": name, "K": k, "epoch_s": s, "train_img_per_s": k * n / s,
            "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=1000, help="training images per run (default 1000)")
    p.add_argument("--eval-images", type=int, default=26032, help="test images of the evaluation (default 26032)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 8], help="pack sizes (default 1 8)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.set_defaults(repeats=2, json=Path("gpu_epoch.json"))
    args = p.parse_args()
    device = setup_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    from provpt.config import RunConfig
    from provpt.runtime import autocast_for
    from provpt.train import build_run, evaluate

    rows = []
    for precision in args.precisions:
        cfg = RunConfig(precision=precision, train_split="train800val200", eval_splits=["test"])
        data = make_data(cfg, device, args.images, args.eval_images)
        for name in args.methods:
            for k in args.ks:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rows.append(epoch_row(args, device, data, precision, name, k))
                one = next(r for r in rows if r["precision"] == precision and r["method"] == name and r["K"] == 1)
                rows[-1]["packed_speedup"] = rows[-1]["train_img_per_s"] / one["train_img_per_s"]
                print(rows[-1], flush=True)
        backbone, kw = MODELS["vitb"]
        ecfg = RunConfig(method="vpt-deep", backbone=backbone, backbone_kwargs=kw, precision=precision)
        model, _, _ = build_run(ecfg, 100, device)
        sync(device)
        t0 = time.perf_counter()
        evaluate(model, data, "test", autocast_for(ecfg, device))
        sync(device)
        rows.append({"precision": precision, "method": "eval (vpt-deep)", "K": 1, "epoch_s": time.perf_counter() - t0,
                     "train_img_per_s": None, "eval_img_per_s": args.eval_images / (time.perf_counter() - t0)})
        del data
    cols = ["precision", "method", "K", "epoch_s", "train_img_per_s", "packed_speedup", "eval_img_per_s", "memory_gb"]
    print(table([{c: r.get(c) for c in cols} for r in rows], f"ViT-B/16 epochs on {args.device}"))
    bf = [r for r in rows if r["precision"] == rows[0]["precision"]]
    measured = {"device": machine().get("gpu", str(device)), "train_epoch_images": args.images,
                "train_epoch_s": {n.split()[0] if n != "pro-vpt online" else "pro-vpt": r["epoch_s"]
                                  for r in bf for n in [r["method"]] if r["K"] == 1 and n in ("vpt-deep", "pro-vpt online")},
                "eval_images_per_s": next(r["eval_img_per_s"] for r in bf if r["method"].startswith("eval")),
                "packed": {f"{r['method']} K={r['K']}": r["train_img_per_s"] for r in bf if r["K"] > 1}}
    args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "measured": measured}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
