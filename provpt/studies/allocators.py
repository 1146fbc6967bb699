"""Allocator ablation: PRO-VPT with PPO, Thompson sampling, random or greedy allocation, prompt-norm
pruning, the L^2 action space and the authors' scoring pass, against VPT-Deep.

One job = one variant, one dataset, one seed: ``provpt study allocators dataset=<d> seed=<k>
study.variant=<v> out=results/<profile>/studies/allocators/<d>/<v>/seed<k>`` trains that run (a
thin call of :func:`provpt.train.run` with the variant's overrides, under the profile's ``final``
protocol: ``final.train_split``, ``final.eval_split``, ``final.overrides``) into ``out`` and
writes ``out/summary.json``. Without ``study.variant`` one job trains every variant of
``study.variants`` into ``out/<variant>/seed<k>/`` (and indexes them in ``out/summary.json``).
``hparams=<selection json>`` sets lr and weight decay (the workflow passes PRO-VPT's selection).

Variants (:data:`VARIANTS`): ``vpt-deep``; ``ppo`` (PRO-VPT as the profile configures it, with
allocator ppo, Taylor pruning, target actions); ``thompson``, ``random``, ``greedy`` (other
allocators); ``norm`` (prune by relative prompt norm, the authors' ablation); ``pair`` (the policy
picks source and target, L^2 actions); ``pass`` (the authors' scoring pass instead of online scores).

Settling. ``D_e`` is the distribution at the end of epoch ``e`` (after that epoch's relocation).
The *settle epoch* is the first epoch ``s`` after which the distribution stays within ``study.tol``
prompts of ``D_s`` in every block (``max_b |D_e[b] - D_s[b]| <= tol`` for all ``e >= s``); the run
*settled* if that held for at least ``study.window`` epochs before the end. Also reported: moves
made (prompts that changed block) until the settle epoch and in total, the last epoch in which the
distribution changed, and the net displacement ``sum_b |D_last[b] - D_0[b]| / 2`` (prompts).

Options (``study.<key>=``; defaults):
  variant: null          the variant of this job (null: all of ``variants``)
  variants: [vpt-deep, ppo, thompson, random, greedy, norm, pair]
  stage: final           final (train800val200 -> test as the final runs) | search (the train section)
  tol: 1                 settle tolerance (prompts per block)
  window: 3              epochs the distribution must stay settled before the end

``report`` aggregates every run of the study (``<dataset>/<variant>/seed<k>/``) and, for the
variants ``ppo`` and ``vpt-deep``, the main grid's final runs (``results/<profile>/runs/final/
<dataset>/{pro-vpt,vpt-deep}/<seed>/``, PRO-VPT only if its relocation is the ``ppo`` variant's)
when the study has no run of that variant and seed: tables ``allocators`` (accuracy mean +- std
over seeds, per dataset) and ``allocators_settling``; figures ``allocators_accuracy`` and
``allocators_distance`` (displacement from the start over epochs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import dataset_summaries, parse_overrides, run_config, write_json

NAME = "allocators"
DEFAULTS = {"variant": None, "variants": ["vpt-deep", "ppo", "thompson", "random", "greedy", "norm", "pair"],
            "stage": "final", "tol": 1, "window": 3}
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
    initial = [int(cfg.get("num_prompts", 0))] * L if cfg.get("method") in ("vpt-deep", "pro-vpt") else None
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
    return run_config(profile, {**over, "out": str(out)}, method=method, extra={**hparams, **extra},
                      stage=None if stage == "search" else stage)


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
    out = Path(run_over.get("out") or "results/studies/allocators")
    if opts["variant"]:
        return train_variant(profile, run_over, hparams, str(opts["variant"]), opts, out)
    seed = run_over.get("seed", (profile.get("train") or {}).get("seed", 0))
    runs = [train_variant(profile, run_over, hparams, v, opts, out / v / f"seed{seed}") for v in opts["variants"]]
    index = {"study": NAME, "index": True, "runs": [r["run_dir"] for r in runs]}
    write_json(out / "summary.json", index)
    return index


# ----------------------------------------------------------------------------- report


def collect(study_dir: Path, tol: int | None = None, window: int | None = None) -> list[dict]:
    """Every variant run of the study, plus the main grid's final runs standing in for ppo/vpt-deep."""
    import yaml

    rows = [s for _, s in dataset_summaries(study_dir, "**/summary.json") if "variant" in s]
    have = {(r["dataset"], r["variant"], r["seed"]) for r in rows}
    datasets = sorted({r["dataset"] for r in rows} | {p.name for p in Path(study_dir).iterdir() if p.is_dir()})
    tol = tol if tol is not None else (rows[0]["tol"] if rows else DEFAULTS["tol"])
    window = window if window is not None else (rows[0]["window"] if rows else DEFAULTS["window"])
    grid = Path(study_dir).parent.parent / "runs" / "final"
    for ds in datasets:
        for variant, method in (("ppo", "pro-vpt"), ("vpt-deep", "vpt-deep")):
            for m in sorted((grid / ds / method).glob("*/metrics.json")):
                path = m.parent / "config.yaml"
                cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
                reloc = cfg.get("relocation") or {}
                if method == "pro-vpt" and any(reloc.get(k.split(".")[1], v) != v for k, v in _PRO.items()):
                    continue
                d = describe_run(m.parent, tol, window)
                if (ds, variant, d["seed"]) in have:
                    continue
                rows.append({"variant": variant, "source": "grid", **d})
    return rows


def _acc(r: dict) -> tuple[str, float]:
    split = r.get("eval_split") or next(iter(r["eval"]))
    return split, float(r["eval"][split]["acc"])


def report(study_dir, tables_dir, figures_dir) -> dict:
    import numpy as np
    import pandas as pd
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from ..report.figures import save
    from ..report.tables import write_table

    runs = collect(Path(study_dir))
    if not runs:
        return {"skipped": f"{study_dir}: no finished variant runs"}
    df = pd.DataFrame([{"dataset": r["dataset"], "variant": r["variant"], "seed": r["seed"],
                        "split": _acc(r)[0], "acc": _acc(r)[1], "source": r.get("source", "study"),
                        "moves": r["moves"], "moves_to_settle": r["moves_to_settle"],
                        "settle_epoch": r["settle_epoch"], "settled": r["settled"],
                        "last_change_epoch": r["last_change_epoch"], "displacement": r["displacement"],
                        "epochs": r["epochs"], "wall_time_s": r["wall_time_s"]} for r in runs])
    order = [v for v in ORDER if v in set(df["variant"])]
    datasets = sorted(df["dataset"].unique())
    written = {}

    def fmt(a):
        return f"{np.mean(a):.2f} ± {np.std(a, ddof=1):.2f}" if len(a) > 1 else f"{np.mean(a):.2f}"

    wide = []
    for v in order:
        row = {"variant": v}
        means = []
        for ds in datasets:
            a = df[(df.variant == v) & (df.dataset == ds)]["acc"].to_numpy()
            row[ds] = fmt(a) if len(a) else ""
            row[f"n_{ds}"] = len(a)
            if len(a):
                means.append(a.mean())
        row["mean"] = float(np.mean(means)) if len(means) == len(datasets) else float("nan")
        ppo = df[df.variant == "ppo"].groupby("dataset")["acc"].mean()
        mine = df[df.variant == v].groupby("dataset")["acc"].mean()
        common = ppo.index.intersection(mine.index)
        row["vs_ppo_pp"] = float((mine[common] - ppo[common]).mean()) if len(common) else float("nan")
        wide.append(row)
    splits = sorted(df["split"].unique())
    notes = [f"accuracy (%) on {', '.join(splits)}: mean ± std over seeds (n_<task> seeds); vs_ppo_pp: mean over "
             "tasks of the difference to PPO; 'grid' rows reuse the main grid's final runs"]
    if (df["source"] == "grid").any():
        notes.append("runs from the main grid: " + ", ".join(sorted({f"{r.dataset}/{r.variant}" for r in
                                                                     df[df.source == 'grid'].itertuples()})))
    written["allocators"] = write_table(pd.DataFrame(wide), tables_dir, "allocators",
                                        "Allocator ablation: accuracy per task", notes)
    settle = (df[df.variant != "vpt-deep"].groupby(["dataset", "variant"], sort=False)
              .agg(seeds=("seed", "size"), acc=("acc", "mean"), moves=("moves", "mean"),
                   moves_to_settle=("moves_to_settle", "mean"), settle_epoch=("settle_epoch", "mean"),
                   settled=("settled", "mean"), last_change_epoch=("last_change_epoch", "mean"),
                   displacement=("displacement", "mean"), epochs=("epochs", "first"),
                   wall_time_s=("wall_time_s", "mean")).reset_index())
    settle["variant"] = pd.Categorical(settle["variant"], order)
    settle = settle.sort_values(["dataset", "variant"]).reset_index(drop=True)
    settle["variant"] = settle["variant"].astype(str)
    tol, window = runs[0].get("tol", DEFAULTS["tol"]), runs[0].get("window", DEFAULTS["window"])
    written["allocators_settling"] = write_table(
        settle, tables_dir, "allocators_settling", "Allocator ablation: how the prompt distribution settles",
        [f"settle epoch: first epoch after which no block moves by more than {tol} prompt(s) from it; settled: "
         f"fraction of seeds where that held for >= {window} epochs before the end; moves: prompts that changed "
         "block (to_settle: up to the settle epoch); displacement: sum |final - initial| / 2 prompts"])

    colors = colormaps["tab10"]
    fig = Figure(figsize=(1.2 + 0.45 * len(order) * len(datasets) + 1.5, 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(order)
    for i, v in enumerate(order):
        for j, ds in enumerate(datasets):
            a = df[(df.variant == v) & (df.dataset == ds)]["acc"].to_numpy()
            if not len(a):
                continue
            x = j + (i - (len(order) - 1) / 2) * width
            ax.bar(x, a.mean(), width, color=colors(i), label=v if j == 0 else None,
                   yerr=a.std(ddof=1) if len(a) > 1 else None, capsize=2)
            ax.scatter(np.full(len(a), x), a, s=6, color="k", zorder=3)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("accuracy (%)")
    lo = df["acc"].min()
    ax.set_ylim(max(0, lo - 10), min(100, df["acc"].max() + 5))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Allocator ablation (bars: mean, points: seeds)")
    written["allocators_accuracy"] = save(fig, figures_dir, "allocators_accuracy")

    fig = Figure(figsize=(3.6 * len(datasets) + 1, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(datasets), squeeze=False)[0])
    for ax, ds in zip(axes, datasets):
        for i, v in enumerate(order):
            curves = [r["displacement_curve"] for r in runs if r["dataset"] == ds and r["variant"] == v
                      and r.get("displacement_curve")]
            if not curves or v == "vpt-deep":
                continue
            n = min(map(len, curves))
            ax.plot(range(n), np.mean([c[:n] for c in curves], axis=0), color=colors(i), label=v)
        ax.set_title(ds)
        ax.set_xlabel("epoch")
        ax.set_ylabel("prompts displaced from the start")
    axes[-1].legend(fontsize=7)
    written["allocators_distance"] = save(fig, figures_dir, "allocators_distance")
    return written
