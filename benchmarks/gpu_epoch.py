"""GPU training epochs of the paper profile's runs: ViT-B/16 at the per-task prompt lengths, every precision, alone and packed.

Per (precision, prompts per block, method, pack size K): K runs of the vtab1k profile's search
configuration (``provpt.config.resolve(params/vtab1k.yaml, method, "search")``, random backbone
weights: the cost does not depend on them) train one task of --images random uint8 training images
each (the cache's layout, on the device) through the training loop's own
``provpt.train.run_members`` (K = 1: a run alone; K > 1: a pack). Methods: ``vpt-deep``,
``pro-vpt`` as the profile runs it (``relocation.scoring: pass``: a scoring forward + backward per
epoch) and ``pro-vpt-exact``. Warm-up epochs first (up to and including the first scheduled
relocation, ``relocation.warmup_epochs``, so the timed epochs include moves and PPO updates), then
--epochs timed epochs (>= 3); the figure is their median. Peak memory is measured per record over
warm-up and timed epochs, with only the training split on the device (no test split). Then, per
(precision, prompts per block), an evaluation of one VPT-Deep run over --eval-images images.
A record that runs out of GPU memory, and every record past --budget-s, goes to ``not_measured``
with the reason, so ``records`` holds measurements only. The JSON is rewritten after every record,
so a run cut short still leaves what it measured.

Writes --json (default gpu_epoch.json), read by ``provpt plan --measured`` and benchmarks/projection.py:

    {"schema": 1, "machine": {...}, "args": {...},
     "records": [  # training epochs, one flat record per (precision, prompts_per_block, method, pack)
        {"method": "vpt-deep" | "pro-vpt" | "pro-vpt-exact",
         "scoring": "pass" | "online" | null,   # relocation.scoring (null: vpt-deep)
         "prompts_per_block": int, "tokens": int,  # sequence length through the blocks
         "precision": "fp32" | "tf32" | "bf16", "pack": int, "batch_size": int,  # batch per run
         "images": int,                         # training images per run and epoch
         "images_per_s": float,                 # training images per second, all runs of the pack
         "epoch_s_median": float,               # median seconds of one epoch of the whole pack
         "epoch_s": [float, ...],               # every timed epoch
         "relocation_s_median": float,          # of which relocation (scoring pass, verify, PPO), all runs
         "train_s_median": float,               # of which the training pass (host clock: approximate on CUDA)
         "warmup_epochs": int, "warmup_moves": int, "timed_moves": int,
         "peak_mem_gib": float | null,          # torch.cuda.max_memory_allocated (null on the CPU)
         "packed_speedup": float | null,        # images_per_s / the K = 1 record's (null without one)
         "device": str, "model": str}, ...],
     "eval": [  # evaluation passes (no gradient), one per (precision, prompts_per_block)
        {"method": "vpt-deep", "prompts_per_block", "tokens", "precision", "batch_size", "images",
         "images_per_s", "epoch_s_median", "epoch_s", "peak_mem_gib", "device", "model"}, ...],
     "not_measured": [  # out of memory, or past the time budget
        {"phase": "train" | "eval", "method", "prompts_per_block", "precision", "pack", "error": str}, ...]}

    python benchmarks/gpu_epoch.py --device cuda                  # the full grid (54 records + 9 evaluations)
    python benchmarks/gpu_epoch.py --device cuda --budget-s 150 --images 64 --prompts 200 100 10   # make gpu-check's

--images is small beside VTAB-1k's 800 (train800) so that the grid fits minutes: per-epoch fixed costs
(pro-vpt-exact's verification, PPO updates) weigh more per image here; ``train_s_median`` and
``relocation_s_median`` keep them apart. Records run in the order prompts x precision x method x pack,
so ``--prompts 200 100 10`` measures the longest sequences first when the budget is short.
    python benchmarks/gpu_epoch.py --smoke --json /tmp/g.json     # tiny ViT, seconds on a CPU: does it run?
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch

from common import MODELS, ROOT, machine, parser, setup_device, sync, table

METHODS = ("vpt-deep", "pro-vpt", "pro-vpt-exact")
PRECISIONS = ("fp32", "tf32", "bf16")
PROFILE = ROOT / "params" / "vtab1k.yaml"


def run_configs(method: str, prompts: int, precision: str, k: int, args, device) -> list:
    """The K run configurations of one record, as the vtab1k profile's search resolves them."""
    from provpt.config import resolve

    backbone, kw = MODELS[args.model]
    over = {"num_prompts": prompts, "precision": precision, "device": str(device), "weights": None,
            "backbone": backbone, "backbone_kwargs": kw, "batch_size": args.batch_size, "train_split": "train",
            "eval_splits": ["eval"], "progress": False, "epochs": 100}
    return [resolve(PROFILE, method, "search", overrides={**over, "seed": s}) for s in range(k)]


def make_split(n: int, size: int, classes: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).to(device),
            torch.randint(0, classes, (n,), generator=g).to(device))


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def tokens_of(model, prompts: int) -> int:
    vit = model.vit
    return int(vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1) + prompts)


def epoch_record(args, device, data, method: str, prompts: int, precision: str, k: int) -> dict:
    """One training record: warm-up through the first relocation, then the timed epochs."""
    from provpt.model.backbone import create_backbone
    from provpt.runtime import autocast_for, dtype_for
    from provpt.train import Member, build_run, run_members

    cfgs = run_configs(method, prompts, precision, k, args, device)
    c = cfgs[0]
    rec = {"method": method, "scoring": c.relocation.scoring if method != "vpt-deep" else None,
           "prompts_per_block": prompts, "tokens": None, "precision": precision, "pack": k,
           "batch_size": c.batch_size, "images": args.images, "images_per_s": None, "epoch_s_median": None,
           "epoch_s": [], "relocation_s_median": None, "train_s_median": None, "warmup_epochs": 0, "warmup_moves": 0, "timed_moves": 0, "peak_mem_gib": None,
           "packed_speedup": None, "device": device_name(device), "model": args.model, "error": None}
    members = []
    try:
        free(device)
        shared = create_backbone(c.backbone, None, **c.backbone_kwargs).to(device, dtype_for(c)) if k > 1 else None
        members = [Member(cfg, *build_run(cfg, data.num_classes, device, shared)) for cfg in cfgs]
        rec["tokens"] = tokens_of(members[0].model, prompts)
        autocast = autocast_for(c, device)
        warmup = c.relocation.warmup_epochs + 1 if method != "vpt-deep" else 1
        phases = []
        for epoch in range(warmup + args.epochs):
            sync(device)
            t0 = time.perf_counter()
            rows = run_members(members, data, epoch, autocast)
            sync(device)
            took = time.perf_counter() - t0
            moves = sum(r["moves"] for r in rows)
            if epoch < warmup:
                rec["warmup_epochs"] += 1
                rec["warmup_moves"] += moves
            else:
                rec["epoch_s"].append(took)
                rec["timed_moves"] += moves
                phases.append([sum(r["time_s"][ph] for r in rows) for ph in ("relocation", "train")])
        rec["epoch_s_median"] = statistics.median(rec["epoch_s"])
        rec["relocation_s_median"] = statistics.median(ph[0] for ph in phases)
        rec["train_s_median"] = statistics.median(ph[1] for ph in phases)
        rec["images_per_s"] = k * args.images / rec["epoch_s_median"]
        rec["peak_mem_gib"] = peak_gib(device)
    except torch.OutOfMemoryError as e:
        rec["error"] = f"out of memory: {str(e).splitlines()[0]}"
        rec["peak_mem_gib"] = peak_gib(device)
    finally:
        del members
        free(device)
    return rec


def eval_record(args, device, prompts: int, precision: str) -> dict:
    """One evaluation record: a VPT-Deep run's forward over the eval images, median of --epochs passes."""
    from provpt.data.task import TaskData
    from provpt.runtime import autocast_for
    from provpt.train import build_run, evaluate

    cfg = run_configs("vpt-deep", prompts, precision, 1, args, device)[0]
    rec = {"method": "vpt-deep", "prompts_per_block": prompts, "tokens": None, "precision": precision,
           "batch_size": 256, "images": args.eval_images, "images_per_s": None, "epoch_s_median": None,
           "epoch_s": [], "peak_mem_gib": None, "device": device_name(device), "model": args.model, "error": None}
    try:
        free(device)
        size = int(cfg.backbone_kwargs.get("img_size", 224))
        data = TaskData(cfg, device, {"eval": make_split(args.eval_images, size, 100, 1, device)}, num_classes=100)
        model, _, _ = build_run(cfg, 100, device)
        rec["tokens"] = tokens_of(model, prompts)
        autocast = autocast_for(cfg, device)
        for i in range(1 + args.epochs):  # the first pass warms up
            sync(device)
            t0 = time.perf_counter()
            evaluate(model, data, "eval", autocast, batch_size=256)
            sync(device)
            if i:
                rec["epoch_s"].append(time.perf_counter() - t0)
        rec["epoch_s_median"] = statistics.median(rec["epoch_s"])
        rec["images_per_s"] = args.eval_images / rec["epoch_s_median"]
        rec["peak_mem_gib"] = peak_gib(device)
        del data, model
    except torch.OutOfMemoryError as e:
        rec["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        free(device)
    return rec


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def speedups(records: list[dict]) -> None:
    """``packed_speedup`` of every record that has a K = 1 record of the same method, length and precision."""
    alone = {(r["method"], r["prompts_per_block"], r["precision"]): r["images_per_s"]
             for r in records if r["pack"] == 1 and r["images_per_s"]}
    for r in records:
        one = alone.get((r["method"], r["prompts_per_block"], r["precision"]))
        r["packed_speedup"] = r["images_per_s"] / one if one and r["images_per_s"] else None


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=128, help="training images per run and epoch (default 128)")
    p.add_argument("--eval-images", type=int, default=1024, help="images of the evaluation records (default 1024)")
    p.add_argument("--prompts", type=int, nargs="+", default=[10, 100, 200],
                   help="prompts per block (default: the vtab1k profile's 10 100 200)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 8], help="pack sizes (default 1 8)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per record, >= 3 (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="batch per run (default 64, the profile's)")
    p.add_argument("--model", default="vitb", choices=list(MODELS), help="vitb (ViT-B/16 at 224, default) or embedded")
    p.add_argument("--budget-s", type=float, help="start no record after this many seconds (the rest: skipped)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run to check the script: defaults become the embedded ViT, 8 images (eval 8), "
                        "batch 4, prompts 1 2, packs 1 2")
    p.set_defaults(json=Path("gpu_epoch.json"))
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(model="embedded", images=8, eval_images=8, batch_size=4, prompts=[1, 2], ks=[1, 2])
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error(f"--epochs {args.epochs}: expected >= 3 (the figure is a median of timed epochs)")
    if min(args.ks) < 1 or min(args.prompts) < 1 or args.images < 1 or args.eval_images < 1:
        p.error("--ks, --prompts, --images and --eval-images: expected integers >= 1")
    device = setup_device(args.device)
    start = time.perf_counter()
    out = {"schema": 1, "machine": machine(),
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "records": [], "eval": [], "not_measured": []}

    def save():
        speedups(out["records"])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(args.json)

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    from provpt.data.task import TaskData

    size = int(MODELS[args.model][1].get("img_size", 224))
    for prompts in args.prompts:
        for precision in args.precisions:
            cfg = run_configs("vpt-deep", prompts, precision, 1, args, device)[0]
            data = TaskData(cfg, device, {"train": make_split(args.images, size, 100, 0, device)}, num_classes=100)
            for method in args.methods:
                for k in args.ks:
                    key = {"method": method, "prompts_per_block": prompts, "precision": precision, "pack": k}
                    if over_budget():
                        out["not_measured"].append({"phase": "train", **key, "error": "skipped: time budget"})
                        continue
                    rec = epoch_record(args, device, data, method, prompts, precision, k)
                    error = rec.pop("error")
                    if error:
                        out["not_measured"].append({"phase": "train", **key, "error": error})
                        print(f"{precision} T={prompts} {method} K={k}: {error}", flush=True)
                    else:
                        out["records"].append(rec)
                        print(f"{precision} T={prompts} {method} K={k}: {rec['images_per_s']:.1f} img/s, epoch "
                              f"{rec['epoch_s_median']:.3f} s, peak {rec['peak_mem_gib'] or 0:.1f} GiB", flush=True)
                    save()
            del data
            free(device)
            key = {"method": "vpt-deep", "prompts_per_block": prompts, "precision": precision, "pack": 1}
            if over_budget():
                out["not_measured"].append({"phase": "eval", **key, "error": "skipped: time budget"})
                continue
            rec = eval_record(args, device, prompts, precision)
            error = rec.pop("error")
            if error:
                out["not_measured"].append({"phase": "eval", **key, "error": error})
            else:
                out["eval"].append(rec)
    save()
    cols = ["precision", "prompts_per_block", "method", "pack", "images_per_s", "epoch_s_median", "packed_speedup",
            "peak_mem_gib"]
    if out["records"]:
        print(table([{c: r.get(c) for c in cols} for r in out["records"]],
                    f"Training epochs, {args.model} on {device_name(device)}, {args.images} images per run"))
    if out["not_measured"]:
        print(table(out["not_measured"], "Not measured"))
    if out["eval"]:
        print(table([{c: r.get(c) for c in ("precision", "prompts_per_block", "images_per_s", "peak_mem_gib")}
                     for r in out["eval"]], "Evaluation"))
    print(f"wrote {args.json} ({time.perf_counter() - start:.0f} s)")
    return out


if __name__ == "__main__":
    main()
