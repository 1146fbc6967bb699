"""What a profile will cost before it runs: jobs and runs per rule, GPU-hours, disk (``provpt plan``).

Torch-free: the workflow prices every search and final job with :func:`job_minutes` when it builds
the DAG (each job's ``runtime``). The work is counted from the resolved run configurations
(:func:`provpt.config.resolve`, :func:`provpt.protocol.search_configs`): epochs, evaluations, prompts
per block, scoring pass, precision; split sizes and class counts from a prepared cache's manifest,
else the public VTAB-1k / VPT-FGVC sizes below.

Time: FLOPs of a ViT (geometry from the backbone's timm name and ``backbone_kwargs``) counted per
image: the blocks' matmuls (24 n d^2) and attention (4 n^2 d) over n = 1 + patches + prompts tokens;
training = forward + input-gradient backward (frozen backbone), + a weight-gradient backward for
``full``; ``linear`` on cached features pays one forward per split; ``pro-vpt`` with
``relocation.scoring: pass`` pays one more forward + backward per training image and epoch; ``verify``
(pro-vpt-exact) pays its exact-removal forwards. Seconds = FLOPs / an effective rate per precision
(:data:`EFFECTIVE_FLOPS`, an assumption: *projected*), or, with a file of measured GPU epochs (records
``{method, prompts_per_block, precision, pack, images_per_s, ...}``, benchmarks/gpu_epoch.py), the
measured images per second of the nearest record (same method and precision; other prompt lengths
scaled by FLOPs): *measured*.

Disk: the data cache (uint8 3 x S x S per image and split), the run folders per the profile's
``keep`` policy from bytes measured per finished ViT-B/16 run (provpt/resources/run_bytes.json,
written by benchmarks/run_bytes.py), and the DVC cache, which copies the stage's outs (data and
results) once more.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path

from .config import PROMPTED, RELOCATING, read_profile, resolve

# Effective training FLOP/s of one H100/H200 per precision: an assumption, not a measurement.
# fp32 runs on CUDA cores (67 TFLOPS peak), tf32 and bf16 on tensor cores (494 / 989 dense);
# ViT-B/16 at batch 64 reaches roughly 30-70% of the fp32 peak and 15-40% of the tensor-core one.
EFFECTIVE_FLOPS = {"fp32": 45e12, "tf32": 150e12, "bf16": 300e12, "fp64": 30e12}
MARGIN, MARGIN_MIN = 1.5, 10  # a job's runtime: projection x MARGIN + MARGIN_MIN minutes (at least the floor)
GIB = 2 ** 30

# Public split sizes and class counts (a prepared cache's manifest wins).
VTAB_TEST = {"cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
             "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
             "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
             "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150}
VTAB_CLASSES = {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
                "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
                "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9}
VTAB_SPLITS = {"train800": 800, "val200": 200, "train800val200": 1000}
FGVC = {"cub": (5394, 600, 5794, 200), "nabirds": (21536, 2393, 24633, 555),
        "oxford_flowers": (1020, 1020, 6149, 102), "stanford_dogs": (10800, 1200, 8580, 120),
        "stanford_cars": (7329, 815, 8041, 196)}  # train, val, test, classes (VPT's splits)
VIT = {"tiny": (192, 12), "small": (384, 12), "base": (768, 12), "large": (1024, 24), "huge": (1280, 32)}
RUN_BYTES = Path(__file__).parent / "resources" / "run_bytes.json"


# ----------------------------------------------------------------------------- sizes


def _manifest(cfg, dataset: str) -> dict:
    return _read_manifest(str(Path(cfg.data_root) / dataset / "manifest.json"))


@cache
def _read_manifest(name: str) -> dict:  # (read once per process: the workflow prices thousands of jobs)
    path = Path(name)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def split_size(cfg, dataset: str, split: str) -> int | None:
    """Images in ``split`` of ``dataset``: the prepared manifest, else the public size, else None."""
    entry = (_manifest(cfg, dataset).get("splits") or {}).get(split) or {}
    if "n" in entry:
        return int(entry["n"])
    if dataset in FGVC:
        tr, va, te, _ = FGVC[dataset]
        return {"train": tr, "val": va, "trainval": tr + va, "test": te}.get(split)
    if dataset in VTAB_TEST:
        return VTAB_SPLITS.get(split) or (VTAB_TEST[dataset] if split == "test" else None)
    return None


def num_classes(cfg, dataset: str) -> int:
    n = _manifest(cfg, dataset).get("num_classes")
    return int(n or VTAB_CLASSES.get(dataset) or (FGVC[dataset][3] if dataset in FGVC else 100))


def geometry(backbone: str, kwargs: dict | None = None) -> dict:
    """``dim, depth, patch, img`` of a timm ViT name (``vit_base_patch16_224...``) and its kwargs."""
    kwargs = kwargs or {}
    m = re.match(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)", backbone)
    dim, depth = VIT[m.group(1)] if m else (768, 12)
    return {"dim": int(kwargs.get("embed_dim", dim)), "depth": int(kwargs.get("depth", depth)),
            "patch": int(kwargs.get("patch_size", m.group(2) if m else 16)),
            "img": int(kwargs.get("img_size", m.group(3) if m else 224))}


# ----------------------------------------------------------------------------- time


def forward_flops(geo: dict, prompts: int = 0) -> float:
    """FLOPs of one image's forward through the ViT with ``prompts`` extra tokens per block."""
    d, L, p = geo["dim"], geo["depth"], geo["patch"]
    patches = (geo["img"] // p) ** 2
    n = 1 + patches + prompts
    return 2 * patches * 3 * p * p * d + L * (24 * n * d * d + 4 * n * n * d)


def run_flops(cfg, n_train: int, n_eval: int) -> float:
    """FLOPs of one whole run of ``cfg`` (training, its relocation's extra passes, evaluations)."""
    geo = geometry(cfg.backbone, cfg.backbone_kwargs)
    f = forward_flops(geo, cfg.num_prompts if cfg.method in PROMPTED else 0)
    per_train = {"full": 3 * f, "linear": f}.get(cfg.method, 2 * f)
    if cfg.method == "linear" and cfg.feature_cache and cfg.augment == "none":
        train = f * n_train  # features once; the heads' epochs are free beside the backbone
    else:
        train = per_train * n_train * cfg.epochs
    r = cfg.relocation
    if cfg.method in RELOCATING and r.enabled:
        moving = max(0, min(cfg.epochs, math.ceil(r.until * cfg.epochs)) - r.warmup_epochs) // r.every
        if r.scoring == "pass":
            train += 2 * f * n_train * cfg.epochs  # the scoring pass: forward + backward each epoch
        if r.verify:
            train += f * r.probe_batches * cfg.batch_size * (r.verify + 1) * moving
    evals = cfg.epochs // cfg.eval_every + (cfg.epochs % cfg.eval_every != 0)
    return train + f * n_eval * evals


def precision(cfg) -> str:
    return "bf16" if cfg.precision == "auto" else cfg.precision


def _measured_rate(cfg, measured: list[dict], pack: int, n_train: int) -> float | None:
    """FLOP/s of the nearest measured record (same method and precision), or None: its training
    images/s times the FLOPs per training image of ``cfg`` at the record's prompt length."""
    same = [r for r in measured if r.get("method") == cfg.method and r.get("precision") == precision(cfg)
            and (r.get("scoring") in (None, cfg.relocation.scoring))]
    if not same:
        return None
    t = cfg.num_prompts if cfg.method in PROMPTED else 0
    best = min(same, key=lambda r: (abs(math.log1p(r.get("prompts_per_block", 0)) - math.log1p(t)),
                                    abs(r.get("pack", 1) - pack)))
    per_image = run_flops(_like(cfg, best.get("prompts_per_block", t)), n_train, 0) / (n_train * cfg.epochs)
    return float(best["images_per_s"]) * per_image


def _like(cfg, prompts: int):
    import copy

    c = copy.copy(cfg)
    c.num_prompts, c.eval_every = int(prompts), cfg.epochs
    return c


def job_seconds(cfgs: list, measured: list[dict] | None = None) -> tuple[float, str] | None:
    """Projected GPU seconds of a job that trains ``cfgs`` (one pack or one by one) and how
    ("measured" or "projected"); None where a split size is unknown."""
    total, how = 0.0, "measured" if measured else "projected"
    for cfg in cfgs:
        n_train = split_size(cfg, cfg.dataset, cfg.train_split)
        n_eval = sum(split_size(cfg, cfg.dataset, s) or 0 for s in cfg.eval_splits)
        if n_train is None:
            return None
        flops = run_flops(cfg, n_train, n_eval)
        rate = _measured_rate(cfg, measured, len(cfgs), n_train) if measured else None
        if rate is None:
            rate, how = EFFECTIVE_FLOPS[precision(cfg)], "projected"
        total += flops / rate
    return total, how


def job_minutes(cfgs: list, floor: int, measured: list[dict] | None = None, cap: int | None = None) -> int:
    """A job's ``runtime`` (minutes): the projection x MARGIN + MARGIN_MIN, at least ``floor`` and at
    most ``cap`` (a cluster's limit: a job cut there resumes its runs on the retry); the floor alone
    for CPU runs and where the projection has no split sizes."""
    if not cfgs or str(cfgs[0].device) == "cpu":
        return floor
    sec = job_seconds(cfgs, measured)
    return floor if sec is None else runtime_minutes(sec[0], floor, cap)


def runtime_minutes(seconds: float, floor: int, cap: int | None = None) -> int:
    """A time limit for ``seconds`` of projected work: x MARGIN + MARGIN_MIN minutes, in [floor, cap]."""
    minutes = max(floor, math.ceil(MARGIN * seconds / 60 + MARGIN_MIN))
    return min(minutes, cap) if cap else minutes


# ----------------------------------------------------------------------------- disk


@cache
def run_bytes_table(path: str = str(RUN_BYTES)) -> dict:
    return json.loads(Path(path).read_text())


def run_bytes(cfg, n_classes: int, keep: str, table: dict | None = None) -> int:
    """Bytes of one finished run folder of ``cfg`` under ``keep`` (all | weights | metrics), from the
    per-method bytes measured on ViT-B/16 (run_bytes.json), scaled to this run's prompts, classes
    and epochs."""
    table = table or run_bytes_table()
    row = table["methods"][cfg.method]
    t = cfg.num_prompts if cfg.method in PROMPTED else 0
    params = row["params"] + row["params_per_prompt"] * (t - row["prompts"]) + \
        row["params_per_class"] * (n_classes - row["classes"])
    evals = cfg.epochs // cfg.eval_every + (cfg.epochs % cfg.eval_every != 0)
    metrics = (row["fixed_bytes"] + row["bytes_per_epoch"] * cfg.epochs
               + row["bytes_per_eval"] * evals * len(cfg.eval_splits))
    weights = row["safetensors_bytes_per_param"] * params + row["safetensors_fixed"]
    checkpoint = row["checkpoint_bytes_per_param"] * params + row["checkpoint_fixed"] + \
        row["bytes_per_epoch"] * cfg.epochs
    return int(metrics + (weights if keep != "metrics" else 0) + (checkpoint if keep == "all" else 0))


def cache_bytes(prof: dict, dataset: str, base) -> int | None:
    """Bytes of the prepared cache of ``dataset``: the manifest's arrays, else every split's images
    as uint8 3 x S x S (+ int64 labels)."""
    splits = (_manifest(base, dataset).get("splits") or {})
    if splits:
        return sum(math.prod(e.get("shape") or [0]) + 8 * e.get("n", 0) for e in splits.values())
    size = int((prof.get("data") or {}).get("image_size") or 224)
    names = ("train", "val", "test") if dataset in FGVC else ("train800", "val200", "train800val200", "test")
    ns = [split_size(base, dataset, s) for s in names]
    return None if None in ns else sum(n * (3 * size * size + 8) for n in ns)


# ----------------------------------------------------------------------------- the plan


def plan(profile, overrides=(), measured: list[dict] | None = None) -> dict:
    """Jobs, runs, GPU-hours and disk of a merged profile (``overrides``: ``key=value`` of the profile)."""
    from .config import SUBSET_KEYS, as_mapping, deep_merge, profile_names, restrict_profile
    from .protocol import final_configs, pack_size, packs_of, search_configs

    prof = read_profile(profile)
    over = as_mapping(overrides, "command line")
    chosen = {k: over.pop(k) for k in SUBSET_KEYS if k in over}
    prof = deep_merge(prof, over)
    if chosen or not isinstance(profile, dict):  # a subset, as the workflow cuts it (provpt.config.restrict_profile)
        known = profile_names(profile) if not isinstance(profile, dict) else None
        prof, _ = restrict_profile(prof, **chosen, known=known)
    base = resolve(prof)
    datasets, methods, seeds = list(prof["datasets"]), list(prof["methods"]), list(prof.get("seeds") or [])
    keep = {"search": "all", "final": "all", **(prof.get("keep") or {})}
    rules = {name: {"jobs": 0, "runs": 0, "gpu_s": 0.0, "longest_s": 0.0, "how": set()}
             for name in ("search_pack", "final_seeds")}
    per_method = {m: {"runs": 0, "gpu_s": 0.0} for m in methods}
    disk = {"runs": 0, "runs_keep_all": 0}
    unknown = set()
    for d in datasets:
        classes = num_classes(base, d)
        for m in methods:
            finals = final_configs(prof, d, m, f"runs/final/{d}/{m}", seeds) if seeds else []
            stages = {"search_pack": ("search", search_configs(prof, d, m, f"runs/search/{d}/{m}")),
                      "final_seeds": ("final", finals)}
            for rule, (stage, cfgs) in stages.items():
                # a search job per pack; a final job per (dataset, method), its seeds in packs
                size = pack_size(prof, stage, m) if rule == "search_pack" else max(1, len(cfgs))
                for pack in packs_of(cfgs, size):
                    sec = job_seconds(pack, measured)
                    r = rules[rule]
                    r["jobs"] += 1
                    r["runs"] += len(pack)
                    per_method[m]["runs"] += len(pack)
                    if sec is None:
                        unknown.add(d)
                        continue
                    r["gpu_s"] += sec[0]
                    r["longest_s"] = max(r["longest_s"], sec[0])
                    r["how"].add(sec[1])
                    per_method[m]["gpu_s"] += sec[0]
                for c in cfgs:
                    disk["runs"] += run_bytes(c, classes, c.keep)
                    disk["runs_keep_all"] += run_bytes(c, classes, "all")
    train = (prof.get("resources") or {}).get("train") or {}
    floor, cap = int(train.get("runtime", 60)), train.get("max_runtime")
    for r in rules.values():
        r["runtime_min"] = runtime_minutes(r["longest_s"], floor, cap)
        r["how"] = "measured" if r["how"] == {"measured"} else "projected"
    other = {"prepare": len(datasets), "search_grid": len(datasets) * len(methods),
             "select": len(datasets) * len(methods), "report": 1}
    studies = {}
    if prof.get("studies"):
        from .studies import study_jobs

        studies = {name: len(study_jobs(prof, name)) for name in prof["studies"]}
    data = [cache_bytes(prof, d, base) for d in datasets]
    disk["data_cache"] = sum(b for b in data if b)
    disk["dvc_cache"] = disk["data_cache"] + disk["runs"]
    return {"profile": prof.get("profile"), "datasets": len(datasets), "methods": methods, "seeds": seeds,
            "precision": precision(base), "keep": keep, "rules": rules, "other_jobs": other,
            "study_jobs": studies, "per_method": per_method, "disk": disk, "unknown_sizes": sorted(unknown),
            "measured": bool(measured)}


def read_measured(path) -> list[dict]:
    """The training records of a measured-epochs JSON (benchmarks/gpu_epoch.py's ``{"records": [...]}``,
    or a list); each must name method, precision, prompts_per_block and images_per_s (null where the
    record failed: left out)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--measured {path}: file not found (benchmarks/gpu_epoch.py writes it)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--measured {path}: not valid JSON ({e})") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise ValueError(f"--measured {path}: expected a list of records or {{\"records\": [...]}}")
    for i, r in enumerate(records):
        missing = [k for k in ("method", "precision", "prompts_per_block", "images_per_s") if k not in r]
        if missing:
            raise ValueError(f"--measured {path}: record {i} lacks {missing}")
    return [r for r in records if r["images_per_s"]]  # (out of memory or skipped: no figure)


def render(p: dict) -> str:
    """The plan as the text ``provpt plan`` prints."""
    gb = lambda b: f"{b / 1e9:,.1f} GB" if b >= 1e9 else f"{b / 1e6:,.0f} MB"  # noqa: E731
    rate = EFFECTIVE_FLOPS[p["precision"]] / 1e12
    how = "measured" if p["measured"] else f"projected from FLOPs at {rate:.0f} TFLOP/s"
    lines = [f"profile {p['profile']}: {p['datasets']} datasets x {len(p['methods'])} methods, seeds {p['seeds']}, "
             f"precision {p['precision']} (GPU time {how} per GPU)",
             f"{'rule':<14}{'jobs':>7}{'runs':>7}{'GPU-h':>10}{'longest job h':>15}{'runtime min':>13}"]
    for name, r in p["rules"].items():
        mark = "" if r["how"] == "measured" else " (projected)"
        lines.append(f"{name:<14}{r['jobs']:>7}{r['runs']:>7}{r['gpu_s'] / 3600:>10.1f}{r['longest_s'] / 3600:>15.2f}"
                     f"{r['runtime_min']:>13}{mark}")
    total = sum(r["gpu_s"] for r in p["rules"].values()) / 3600
    lines.append(f"{'total':<14}{'':>7}{sum(r['runs'] for r in p['rules'].values()):>7}{total:>10.1f}")
    lines.append("other jobs: " + ", ".join(f"{k} {v}" for k, v in p["other_jobs"].items())
                 + (", studies " + ", ".join(f"{k} {v}" for k, v in p["study_jobs"].items()) + " (not priced)"
                    if p["study_jobs"] else ""))
    lines.append("GPU-h per method: " + ", ".join(f"{m} {v['gpu_s'] / 3600:.1f}" for m, v in p["per_method"].items()))
    d = p["disk"]
    lines.append(f"disk: data cache {gb(d['data_cache'])}; run folders {gb(d['runs'])} (keep search={p['keep']['search']},"
                 f" final={p['keep']['final']}; keep all: {gb(d['runs_keep_all'])}); DVC cache {gb(d['dvc_cache'])}"
                 " (a copy of data and results; more with keep all)")
    if p["unknown_sizes"]:
        lines.append(f"not priced (split sizes unknown: prepare them first): {', '.join(p['unknown_sizes'])}")
    return "\n".join(lines)
