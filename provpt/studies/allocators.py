"""Allocator ablation: PRO-VPT with PPO, Thompson sampling, random or greedy allocation, prompt-norm
pruning, the L^2 action space and the authors' scoring pass, against VPT-Deep.

One job = one variant, one dataset, one seed: ``provpt study allocators dataset=<d> seed=<k>
study.variant=<v> out=results/<profile>/studies/allocators/<d>/<v>/seed<k>`` trains that run (a
thin call of :func:`provpt.train.run` with the variant's overrides, under the profile's ``final``
protocol: ``final.train_split``, ``final.eval_split``, ``final.overrides``) into ``out`` and
writes ``out/summary.json``. The workflow makes one job per variant of the profile's
``studies.allocators.variants`` (a DAG wildcard). ``hparams=<selection json>`` sets lr and weight decay (the workflow passes PRO-VPT's selection).

Variants (:data:`VARIANTS`): ``vpt-deep``; ``ppo`` (PRO-VPT as the profile configures it, with
allocator ppo, Taylor pruning, target actions); ``thompson``, ``random``, ``greedy`` (other
allocators); ``norm`` (prune by relative prompt norm, the authors' ablation); ``pair`` (the policy
picks source and target, L^2 actions); ``pass`` (the authors' scoring pass instead of online scores);
``exact`` (``pro-vpt-exact``, ours) and ``oracle`` (``pro-vpt-exact`` whose allocator tries every target
block by a short lookahead and keeps the best: what any allocator could gain with that pruning and
schedule, the upper bound).

Settling. ``D_e`` is the distribution at the end of epoch ``e`` (after that epoch's relocation).
The *settle epoch* is the first epoch ``s`` after which the distribution stays within ``study.tol``
prompts of ``D_s`` in every block (``max_b |D_e[b] - D_s[b]| <= tol`` for all ``e >= s``); the run
*settled* if that held for at least ``study.window`` epochs before the end. Also reported: moves
made (prompts that changed block) until the settle epoch and in total, the last epoch in which the
distribution changed, and the net displacement ``sum_b |D_last[b] - D_0[b]| / 2`` (prompts).

Options (``study.<key>=``; defaults):
  variant: null          the variant of this job (required)
  stage: final           final (train800val200 -> test as the final runs) | search (train800 -> val200)
  tol: 1                 settle tolerance (prompts per block)
  window: 3              epochs the distribution must stay settled before the end

:mod:`provpt.report.allocators` aggregates every run of the study (``<dataset>/<variant>/seed<k>/``)
and, for the variants ``ppo`` and ``vpt-deep``, the main grid's final runs (``results/<profile>/runs/final/
<dataset>/{pro-vpt,vpt-deep}/<seed>/``, PRO-VPT only if its relocation is the ``ppo`` variant's)
when the study has no run of that variant and seed: tables ``allocators`` (accuracy mean +- std
over seeds, per dataset) and ``allocators_settling``; figures ``allocators_accuracy`` and
``allocators_distance`` (displacement from the start over epochs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import RELOCATING
from . import parse_overrides, run_config, write_json

NAME = "allocators"
DEFAULTS = {"variant": None, "stage": "final", "tol": 1, "window": 3}
_PRO = {"relocation.allocator": "ppo", "relocation.pruning": "taylor", "relocation.action_space": "target"}
VARIANTS = {
    "vpt-deep": ("vpt-deep", {}),
    "ppo": ("pro-vpt", _PRO),
    "thompson": ("pro-vpt", {**_PRO, "relocation.allocator": "thompson"}),
    "random": ("pro-vpt", {**_PRO, "relocation.allocator": "random"}),
    "greedy": ("pro-vpt", {**_PRO, "relocation.allocator": "greedy"}),
    "norm": ("pro-vpt", {**_PRO, "relocation.pruning": "norm"}),
    "pair": ("pro-vpt", {**_PRO, "relocation.action_space": "pair"}),
    "pass": ("pro-vpt", {**_PRO, "relocation.scoring": "pass"}),
    "exact": ("pro-vpt-exact", {}),
    "oracle": ("pro-vpt-exact", {"relocation.allocator": "oracle"}),
}
ORDER = list(VARIANTS)


# ----------------------------------------------------------------------------- settling


def settling(distributions: list[list[int]], moves: list[dict], initial: list[int] | None = None,
             tol: int = 1, window: int = 3) -> dict:
    """Settle statistics of a run's per-epoch distributions and move records (see the module doc)."""
    import numpy as np

    D = np.asarray(distributions, dtype=np.int64)
    if D.size == 0:
        return {"settle_epoch": None, "settled": False, "moves_to_settle": 0, "moves": 0, "last_change_epoch": None,
                "displacement": 0.0}
    start = np.asarray(initial if initial is not None else D[0], dtype=np.int64)
    E = len(D)
    settle = E - 1
    for s in range(E):
        if np.abs(D[s:] - D[s]).max() <= tol:
            settle = s
            break
    prev = np.vstack([start[None], D[:-1]])
    changed = np.flatnonzero(np.abs(D - prev).sum(axis=1) > 0)
    executed = [m for m in moves if m.get("target") != m.get("source")]
    return {"settle_epoch": int(settle), "settled": bool(settle <= E - 1 - window),
            "moves_to_settle": int(sum(1 for m in executed if m["epoch"] <= settle)), "moves": len(executed),
            "attempts": len(moves), "last_change_epoch": int(changed[-1]) if len(changed) else None,
            "displacement": float(np.abs(D[-1] - start).sum() / 2),
            "displacement_curve": [float(v) for v in np.abs(D - start).sum(axis=1) / 2]}


def describe_run(run_dir: Path, tol: int = 1, window: int = 3) -> dict:
    """Accuracy and settling of one finished run folder (``metrics.json``, ``history.jsonl``, ``moves.jsonl``)."""
    import yaml

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    moves = []
    if (run_dir / "moves.jsonl").is_file():
        moves = [json.loads(line) for line in (run_dir / "moves.jsonl").read_text().splitlines() if line.strip()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    L = len(history[0]["distribution"]) if history else 0
    initial = [int(cfg.get("num_prompts", 0))] * L if cfg.get("method") in ("vpt-deep", *RELOCATING) else None
    stats = settling([h["distribution"] for h in history], moves, initial, tol, window)
    return {"dataset": metrics["dataset"], "method": metrics["method"], "seed": metrics["seed"],
            "eval": metrics["eval"], "wall_time_s": metrics.get("wall_time_s"), "epochs": metrics.get("epochs"),
            "relocation": cfg.get("relocation"), "final_distribution": metrics.get("distribution"),
            "run_dir": str(run_dir), **stats}


# ----------------------------------------------------------------------------- main


def variant_config(profile: dict, run_over: dict, hparams: dict, variant: str, stage: str, out: Path):
    if variant not in VARIANTS:
        raise ValueError(f"study allocators: unknown variant {variant!r}; expected one of {ORDER}")
    method, extra = VARIANTS[variant]
    over = {k: v for k, v in run_over.items() if k not in ("method", "out")}
    return run_config(profile, {**over, "out": str(out)}, method=method, extra=extra, stage=stage,
                      hparams=hparams)


def train_variant(profile, run_over, hparams, variant: str, opts: dict, out: Path) -> dict:
    from ..train import run

    cfg = variant_config(profile, run_over, hparams, variant, opts["stage"], out)
    t0 = time.perf_counter()
    run(cfg)
    summary = {"study": NAME, "variant": variant, **describe_run(out, int(opts["tol"]), int(opts["window"])),
               "eval_split": cfg.eval_splits[0], "train_split": cfg.train_split, "lr": cfg.lr,
               "weight_decay": cfg.weight_decay, "tol": opts["tol"], "window": opts["window"],
               "job_time_s": time.perf_counter() - t0}
    write_json(out / "summary.json", summary)
    acc = summary["eval"][cfg.eval_splits[0]]["acc"]
    print(f"allocators {cfg.dataset} {variant} seed {cfg.seed}: {cfg.eval_splits[0]} {acc:.2f}%, "
          f"{summary['moves']} moves, settled at epoch {summary['settle_epoch']}")
    return summary


def main(profile: dict, overrides) -> dict:
    opts, run_over, hparams = parse_overrides(profile, overrides, NAME, DEFAULTS)
    if opts["stage"] not in ("final", "search"):
        raise ValueError(f"study allocators: study.stage={opts['stage']!r}: expected final or search")
    if not opts["variant"]:
        raise ValueError(f"study allocators: one job trains one variant: set study.variant= one of {ORDER}")
    out = Path(run_over.get("out") or f"results/studies/allocators/{opts['variant']}")
    return train_variant(profile, run_over, hparams, str(opts["variant"]), opts, out)
