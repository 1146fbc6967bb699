"""Projected cost of the full vtab1k and fgvc reproductions (search grid + final seeds), in hours.

Work is counted from the profiles (params/<profile>.yaml: datasets, methods, per-method lr x wd
grid, seeds, epochs, eval_every, splits) and split sizes (a prepared cache's manifest when there is
one, else the public VTAB-1k / VPT-FGVC sizes below). Cost per image and method is the FLOP count of
one training step (forward + backward as the method trains: frozen backbone or not) and of one
evaluation forward of ViT-B/16 at 224 with T=10 prompts, counted with torch.utils.flop_counter
(explicit attention, so every matmul is counted). Columns:

- ``here_h``: hours on this machine's --device (cpu by default; cuda: bf16 autocast), at the FLOP
  rate measured now on a few ViT-B VPT-Deep training steps and evaluation batches (--rate-batch);
  skipped with --no-measure;
- ``h200_h@MFU``: FLOPs / (989 TFLOPS dense bf16 x MFU), for each --mfu (an assumption, not a
  measurement: ViT-B/16 at batch 64 reaches roughly 15-40% of peak depending on compile/fusion);
- ``h200_h measured``: from --measured JSON of GPU timings, when someone has them:
  {"device": "...", "train_epoch_s": {"vpt-deep": s, "pro-vpt": s, ...}, "train_epoch_images": 1000,
   "eval_images_per_s": n}; methods missing there are scaled from vpt-deep by their FLOPs.

PRO-VPT costs VPT-Deep's FLOPs plus a fixed CPU-side time per epoch (scoring bookkeeping, the
allocator's action and PPO updates), which does not shrink on a GPU: --relocation-s, or the online
variant's ``relocation_s`` of a relocation_overhead.py --json file (--relocation-json). Studies are
not counted. Rows marked "eval at last epoch only" count one evaluation per run instead of the profile's
eval_every: all the protocol reads is the last epoch's val (search) or test (final) accuracy.

    python benchmarks/projection.py
    python benchmarks/projection.py --relocation-json reloc.json      # reloc.json: relocation_overhead.py --json
    python benchmarks/projection.py --no-measure --measured h200.json
    python benchmarks/projection.py --device cuda          # here_h = hours at this GPU's measured rate
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ROOT, median, parser, report, setup_device, sync, table

H200_BF16_FLOPS = 989e12  # dense bf16 peak of an H100/H200 SXM
# Test split sizes of VTAB-1k (the VTAB definitions; NOAH's test.txt lists the same images).
VTAB_TEST = {"cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
             "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
             "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
             "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150}
VTAB_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
# VPT's FGVC splits (train, val, test); trainval = train + val.
FGVC = {"cub": (5394, 600, 5794), "nabirds": (21536, 2393, 24633), "oxford_flowers": (1020, 1020, 6149),
        "stanford_dogs": (10800, 1200, 8580), "stanford_cars": (7329, 815, 8041)}


# ----------------------------------------------------------------------------- the work


def split_size(prof: dict, dataset: str, split: str) -> int:
    manifest = ROOT / prof["train"]["data_root"] / dataset / "manifest.json"
    if manifest.is_file():
        entry = json.loads(manifest.read_text())["splits"].get(split) or {}
        if "n" in entry:
            return int(entry["n"])
    if dataset in FGVC:
        tr, va, te = FGVC[dataset]
        return {"train": tr, "val": va, "trainval": tr + va, "test": te}[split]
    return VTAB_SIZES.get(split) or VTAB_TEST[dataset]


def evaluations(epochs: int, every: int) -> int:
    """How often provpt.train evaluates: every ``every`` epochs and at the last one."""
    return epochs // every + (epochs % every != 0)


def grid_size(search: dict, method: str) -> int:
    own = (search.get("by_method") or {}).get(method, {})
    return len(own.get("lr", search["lr"])) * len(own.get("weight_decay", search["weight_decay"]))


def work(prof: dict, last_only: bool = False) -> dict:
    """stage -> method -> (runs, training images, evaluation images, epochs), summed over datasets.
    ``last_only``: as if every run evaluated once, at its last epoch (all the protocol reads:
    last-epoch val / test accuracy)."""
    from provpt.config import resolve

    per_dataset = {"search": lambda m: grid_size(prof["search"], m), "final": lambda m: len(prof["seeds"])}
    datasets, out = prof["datasets"], {}
    for stage, runs_of in per_dataset.items():
        n_tr = sum(split_size(prof, d, prof[stage]["train_split"]) for d in datasets)
        n_ev = sum(split_size(prof, d, prof[stage]["eval_split"]) for d in datasets)
        out[stage] = {}
        for m in prof["methods"]:
            cfg = resolve(prof, m, stage)  # epochs and evaluation schedule as the runs resolve them
            evals = 1 if last_only else evaluations(cfg.epochs, cfg.eval_every)
            out[stage][m] = (runs_of(m) * len(datasets), runs_of(m) * cfg.epochs * n_tr, runs_of(m) * evals * n_ev,
                             runs_of(m) * len(datasets) * cfg.epochs)
    return out


# ----------------------------------------------------------------------------- cost per image


def build(method: str, prompts: int, fused: bool = False):
    """ViT-B/16 of ``method``; ``fused=False``: explicit attention matmuls (seen by the FLOP counter)."""
    import timm.layers

    from provpt.config import RunConfig
    from provpt.model.methods import build_model

    timm.layers.set_fused_attn(fused)  # read when the attention modules are created
    cfg = RunConfig.from_dict(dict(backbone="vit_base_patch16_224", method=method, num_prompts=prompts))
    return build_model(cfg, 100)


def method_flops(methods, prompts: int) -> dict:
    """method -> (training FLOPs per image, evaluation FLOPs per image), ViT-B/16 at 224."""
    from torch.utils.flop_counter import FlopCounterMode

    out, x, y = {}, torch.randn(1, 3, 224, 224), torch.zeros(1, dtype=torch.long)
    for m in methods:
        if m == "pro-vpt" and "vpt-deep" in out:
            out[m] = out["vpt-deep"]
            continue
        net = build(m, prompts).train()
        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(net(x), y).backward()
        train = fc.get_total_flops()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net.eval()(x)
        out[m] = (train, fc.get_total_flops())
    return out


def measured_rates(device, prompts: int, batch: int, steps: int, flops: tuple) -> tuple[float, float]:
    """FLOP/s reached here on ViT-B VPT-Deep training steps and evaluation forwards (median)."""
    net = build("vpt-deep", prompts, fused=True).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad and p is not net.prompts.gates]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, 3, 224, 224, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def train_step():
        with autocast:
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    def eval_step():
        with torch.no_grad(), autocast:
            net(x)
        sync(device)

    def timed(fn):
        fn()  # warm-up
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return median(ts)

    t_train = timed(train_step)
    net.eval()
    t_eval = timed(eval_step)
    return batch * flops[0] / t_train, batch * flops[1] / t_eval


# ----------------------------------------------------------------------------- the projection


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--profiles", nargs="+", default=["vtab1k", "fgvc"])
    p.add_argument("--prompts", type=int, default=10, help="T per block (default 10)")
    p.add_argument("--mfu", nargs="+", type=float, default=[0.15, 0.4], help="assumed H200 utilisations")
    p.add_argument("--measured", type=Path, help="JSON of measured GPU epoch times (see above)")
    p.add_argument("--relocation-json", type=Path, help="relocation_overhead.py --json output")
    p.add_argument("--relocation-s", type=float, help="PRO-VPT's relocation seconds per epoch (default: from the JSON, else 0)")
    p.add_argument("--rate-batch", type=int, help="batch of the rate measurement (default: 4 on cpu, 64 on cuda)")
    p.add_argument("--rate-steps", type=int, default=2, help="timed steps of the rate measurement (default 2)")
    p.add_argument("--no-measure", action="store_true", help="skip the rate measurement")
    args = p.parse_args(argv)
    device = setup_device(args.device)
    batch = args.rate_batch or (64 if device.type == "cuda" else 4)

    from provpt.config import load_profile

    profiles = {name: load_profile(ROOT / "params" / f"{name}.yaml") for name in args.profiles}
    methods = list(dict.fromkeys(m for prof in profiles.values() for m in prof["methods"]))
    flops = method_flops(methods, args.prompts)
    reloc_s = args.relocation_s
    if reloc_s is None and args.relocation_json:
        rows = json.loads(args.relocation_json.read_text())["rows"]
        reloc_s = next(r["relocation_s"] for r in rows if r["variant"] == "pro-vpt online")
    reloc_s = reloc_s or 0.0
    here = None if args.no_measure else measured_rates(device, args.prompts, batch, args.rate_steps, flops["vpt-deep"])
    gpu = json.loads(args.measured.read_text()) if args.measured else None
    gpu = gpu.get("measured", gpu) if gpu else None  # gpu_epoch.py's output holds it under "measured"
    packed = 1.0  # training time of a packed run / alone (gpu_epoch.py's largest VPT-Deep pack)
    if gpu and gpu.get("packed"):
        k, rate = max(((int(n.split("K=")[1]), r) for n, r in gpu["packed"].items() if n.startswith("vpt-deep")),
                      default=(1, None))
        if rate:
            packed = (gpu["train_epoch_images"] / gpu["train_epoch_s"]["vpt-deep"]) / rate
            print(f"measured: packs of {k} train at {1 / packed:.2f}x the images/s of one run; search and final "
                  "runs are projected packed")
    columns = {f"h200_h@{mfu:g}": (1 / (H200_BF16_FLOPS * mfu),) * 2 for mfu in args.mfu}
    if here:
        columns = {"here_h": (1 / here[0], 1 / here[1]), **columns}

    def seconds(per_method: dict, spf: tuple) -> float:
        """Seconds of ``per_method`` work at seconds-per-FLOP ``spf`` (train, eval), plus relocation."""
        return sum(v[1] * flops[m][0] * spf[0] + v[2] * flops[m][1] * spf[1] + (v[3] * reloc_s if m == "pro-vpt" else 0)
                   for m, v in per_method.items())

    def measured_seconds(per_method: dict) -> float:
        epoch, total = gpu["train_epoch_s"], 0.0
        for m, v in per_method.items():
            per = epoch[m] if m in epoch else epoch["vpt-deep"] * flops[m][0] / flops["vpt-deep"][0]
            total += v[1] * per * packed / gpu["train_epoch_images"] + v[2] / gpu["eval_images_per_s"]
        return total

    rows = []
    for name, prof in profiles.items():
        for label, last_only in (("", False), (", eval at last epoch only", True)):
            for stage, per_method in work(prof, last_only).items():
                row = {"profile": name, "stage": stage + label, "runs": sum(v[0] for v in per_method.values()),
                       "train_Mimg": sum(v[1] for v in per_method.values()) / 1e6,
                       "eval_Mimg": sum(v[2] for v in per_method.values()) / 1e6,
                       "PFLOP": sum(v[1] * flops[m][0] + v[2] * flops[m][1] for m, v in per_method.items()) / 1e15}
                row.update({col: seconds(per_method, spf) / 3600 for col, spf in columns.items()})
                row["h200_h measured"] = measured_seconds(per_method) / 3600 if gpu else None
                rows.append(row)

    # one final VTAB-1k run: 100 epochs on 1000 images, the SVHN test split (26,032) evaluated once
    one = []
    for m in ("vpt-deep", "pro-vpt"):
        run = {m: (1, 100 * 1000, VTAB_TEST["svhn"], 100)}
        one.append({"run": f"{m}, 100 epochs x 1000 img + 26,032 test once",
                    **{col.replace("_h", "_s"): seconds(run, spf) for col, spf in columns.items()},
                    "h200_s measured": measured_seconds(run) if gpu else None})
    per_image = [{"method": m, "train_GFLOP/img": f[0] / 1e9, "eval_GFLOP/img": f[1] / 1e9} for m, f in flops.items()]
    print(table(per_image, f"FLOPs per image, ViT-B/16 at 224, T={args.prompts}"))
    print(f"\nPRO-VPT relocation: +{reloc_s * 1000:.0f} ms per epoch (CPU-side, not scaled)")
    if here:
        print(f"Rates measured now on {device}: train {here[0] / 1e9:.1f} GFLOP/s, eval {here[1] / 1e9:.1f} GFLOP/s "
              f"(ViT-B VPT-Deep, batch {batch}, median of {args.rate_steps})")
    print(table(one, "One final run (seconds)"))
    report(args, "projection", rows, {"flops": flops, "one_run": one, "relocation_s_per_epoch": reloc_s,
                                      "measured_flops_per_s": here, "measured": gpu},
           title="Projected cost of the reproductions (hours)")


if __name__ == "__main__":
    main()
