"""Is the embedded mini benchmark meaningful? Linear probes on a pretrained vs a random-init backbone.

For every mini task: logistic regression (scikit-learn) on the frozen CLS features after the final
norm, standardised with train statistics, C chosen on val200, trained on train800, reported on test;
for the pretrained backbone, the same architecture at random init (the pretraining's starting point),
and raw pixels. Criterion: pretrained LP >= random LP + 15 pp on average over the tasks.

    python benchmarks/mini_check.py                       # generate, prepare, pretrain if needed, probe
    python benchmarks/mini_check.py --json out.json --tasks count size

Data go to ``data/mini/{raw,cache}`` and the backbone to ``data/mini/backbone.safetensors`` by
default (existing ones are reused). Numbers on a busy machine differ only in the timings, except
that a time-budgeted pretraining trains fewer steps there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provpt.data.cache import load_split, prepare_vtab_task  # noqa: E402
from provpt.data.mini import DEFAULT_FMNIST_DIR, MINI_TASKS, generate  # noqa: E402

BACKBONE = "vit_tiny_patch16_224"
BACKBONE_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 4}
LP_C = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
RAW_C = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
MARGIN = 15.0


def features(model, images: np.ndarray, batch: int = 250) -> np.ndarray:
    """CLS features after the final norm of uint8 (N, 3, S, S) images, mean = std = 0.5."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.array(images[i:i + batch])).float() / 127.5 - 1).numpy()
                               for i in range(0, len(images), batch)])


def probe(x: dict, y: dict, grid) -> dict:
    """Standardised logistic regression; C by val accuracy (ties: smaller C); test accuracy in %.

    The C grid is walked upwards with warm starts, which keeps raw pixels (3072 inputs) cheap.
    """
    from sklearn.linear_model import LogisticRegression

    mu, sd = x["train800"].mean(0), x["train800"].std(0) + 1e-6
    z = {s: (v - mu) / sd for s, v in x.items()}
    clf, best = LogisticRegression(max_iter=1000, warm_start=True), None
    for c in sorted(grid):
        clf.set_params(C=c).fit(z["train800"], y["train800"])
        val, test = clf.score(z["val200"], y["val200"]), clf.score(z["test"], y["test"])
        if best is None or val > best["val"]:
            best = {"val": val, "test": test, "C": c}
    return {"test": 100 * best["test"], "val": 100 * best["val"], "C": best["C"]}


def backbone(name, kwargs, weights=None, seed=0):
    import torch

    from provpt.model.backbone import create_backbone

    torch.manual_seed(seed)
    return create_backbone(name, weights=weights, **kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "data/mini"), help="folder for raw/, cache/ and the backbone")
    ap.add_argument("--weights", help="pretrained backbone (default <data>/backbone.safetensors; pretrained if missing)")
    ap.add_argument("--fmnist-dir", default=DEFAULT_FMNIST_DIR)
    ap.add_argument("--seed", type=int, default=0, help="data generation and random-init seed")
    ap.add_argument("--tasks", nargs="+", default=list(MINI_TASKS), choices=list(MINI_TASKS))
    ap.add_argument("--backbone", default=BACKBONE)
    ap.add_argument("--backbone-kwargs", type=json.loads, default=BACKBONE_KWARGS)
    ap.add_argument("--max-steps", type=int, default=1600, help="pretraining steps, if it pretrains (0: use --budget)")
    ap.add_argument("--budget", type=float, default=None, help="pretraining wall-clock budget / hard stop in seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (features; pretraining if needed)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(1)  # BLAS for the small solves: 2 threads ran 20x slower on a busy 2-core machine
    data = Path(args.data)
    weights = Path(args.weights or data / "backbone.safetensors")
    t0 = time.perf_counter()
    generate(data / "raw", fmnist_dir=args.fmnist_dir, seed=args.seed, tasks=args.tasks)
    for t in args.tasks:
        group, classes = MINI_TASKS[t]
        prepare_vtab_task(data / "raw", t, data / "cache", size=args.backbone_kwargs.get("img_size", 32),
                          num_classes=classes, group=group, progress=False)
    print(f"data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if not weights.is_file():
        from provpt.pretrain import pretrain

        pretrain(args.backbone, args.backbone_kwargs, weights, args.fmnist_dir, budget_s=args.budget,
                 max_steps=args.max_steps or None, seed=args.seed, threads=args.threads)
    up = json.loads(weights.with_suffix(".json").read_text()) if weights.with_suffix(".json").is_file() else {}
    models = {"random": backbone(args.backbone, args.backbone_kwargs, None, args.seed),
              "pretrained": backbone(args.backbone, args.backbone_kwargs, weights, args.seed)}

    rows = []
    head = f"{'task':10s} {'group':12s} {'C':>3s} {'chance':>7s} {'raw LR':>7s} {'LP rand':>8s} {'LP pre':>7s} {'gain':>6s}"
    print(head + "\n" + "-" * len(head))
    for t in args.tasks:
        t1 = time.perf_counter()
        group, classes = MINI_TASKS[t]
        arrays = {s: load_split(data / "cache" / t, s) for s in ("train800", "val200", "test")}
        y = {s: np.asarray(a[1]) for s, a in arrays.items()}
        raw = probe({s: np.asarray(a[0], np.float32).reshape(len(a[0]), -1) / 255 for s, a in arrays.items()}, y, RAW_C)
        res = {k: probe({s: features(m, a[0]) for s, a in arrays.items()}, y, LP_C) for k, m in models.items()}
        row = {"task": t, "group": group, "classes": classes, "chance": 100 / classes, "raw_lr": raw["test"],
               "lp_random": res["random"]["test"], "lp_pretrained": res["pretrained"]["test"],
               "C": {"raw": raw["C"], "random": res["random"]["C"], "pretrained": res["pretrained"]["C"]},
               "val": {"raw": raw["val"], "random": res["random"]["val"], "pretrained": res["pretrained"]["val"]},
               "n_test": len(y["test"]), "seconds": round(time.perf_counter() - t1, 1)}
        rows.append(row)
        print(f"{t:10s} {group:12s} {classes:3d} {row['chance']:7.1f} {row['raw_lr']:7.1f} {row['lp_random']:8.1f} "
              f"{row['lp_pretrained']:7.1f} {row['lp_pretrained'] - row['lp_random']:+6.1f}", flush=True)

    def mean(key, group=None):
        vals = [r[key] for r in rows if group in (None, r["group"])]
        return float(np.mean(vals)) if vals else float("nan")

    print("-" * len(head))
    summary = {}
    for g in [None] + [g for g in ("natural", "specialized", "structured") if any(r["group"] == g for r in rows)]:
        m = {k: mean(k, g) for k in ("chance", "raw_lr", "lp_random", "lp_pretrained")}
        summary[g or "all"] = m
        print(f"{'mean ' + (g or 'all'):23s} {m['chance']:7.1f} {m['raw_lr']:7.1f} {m['lp_random']:8.1f} "
              f"{m['lp_pretrained']:7.1f} {m['lp_pretrained'] - m['lp_random']:+6.1f}")
    gain = summary["all"]["lp_pretrained"] - summary["all"]["lp_random"]
    ok = gain >= MARGIN
    if up:
        print(f"\nbackbone: Fashion-MNIST test accuracy {100 * up['upstream_test_acc']:.1f}% after {up['steps']} steps "
              f"({up['images_seen']} images, {up['train_seconds']:.0f} s training)")
    print(f"criterion: pretrained LP >= random LP + {MARGIN:.0f} pp on average: {gain:+.1f} pp -> "
          f"{'PASS' if ok else 'FAIL'}   ({time.perf_counter() - t0:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps({"tasks": rows, "means": summary, "gain": gain, "pass": ok,
                                               "pretraining": up, "seed": args.seed}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
