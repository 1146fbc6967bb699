"""Report of the allocator ablation (:mod:`provpt.studies.allocators`).

Aggregates every run of the study (``<study_dir>/<dataset>/<variant>/seed<k>/summary.json``) and,
for the variants ``ppo``, ``vpt-deep`` and ``exact``, the main grid's final runs (``results/<profile>/runs/
final/<dataset>/{pro-vpt,vpt-deep,pro-vpt-exact}/<seed>/``, PRO-VPT only if its relocation is the ``ppo``
variant's) when the study has no run of that variant and seed. Writes tables ``allocators``
(accuracy mean +- std over seeds, per dataset) and ``allocators_settling``; figures
``allocators_accuracy`` and ``allocators_distance`` (displacement from the start over epochs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..studies.allocators import DEFAULTS, ORDER, VARIANTS, describe_run
from .figures import save
from .runs import study_summaries
from .tables import write_table

GRID_STAND_INS = (("ppo", "pro-vpt"), ("vpt-deep", "vpt-deep"), ("exact", "pro-vpt-exact"))  # (variant, grid method)


def collect(study_dir: Path, tol: int | None = None, window: int | None = None) -> list[dict]:
    """Every variant run of the study, plus the main grid's final runs standing in for ppo/vpt-deep."""
    study_dir = Path(study_dir)
    rows = [s for _, s in study_summaries(study_dir, "**/summary.json") if "variant" in s]
    have = {(r["dataset"], r["variant"], r["seed"]) for r in rows}
    datasets = sorted({r["dataset"] for r in rows} | {p.name for p in study_dir.iterdir() if p.is_dir()})
    tol = tol if tol is not None else (rows[0]["tol"] if rows else DEFAULTS["tol"])
    window = window if window is not None else (rows[0]["window"] if rows else DEFAULTS["window"])
    ppo = VARIANTS["ppo"][1]  # the relocation settings a grid PRO-VPT run needs to stand in for ppo
    grid = study_dir.parent.parent / "runs" / "final"
    for ds in datasets:
        for variant, method in GRID_STAND_INS:
            for m in sorted((grid / ds / method).glob("*/metrics.json")):
                path = m.parent / "config.yaml"
                cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
                reloc = cfg.get("relocation") or {}
                if method == "pro-vpt" and any(reloc.get(k.split(".")[1], v) != v for k, v in ppo.items()):
                    continue
                d = describe_run(m.parent, tol, window)
                if (ds, variant, d["seed"]) in have:
                    continue
                rows.append({"variant": variant, "source": "grid", **d})
    return rows


def _acc(r: dict) -> tuple[str, float]:
    """(eval split, accuracy) of one collected run."""
    split = r.get("eval_split") or next(iter(r["eval"]))
    return split, float(r["eval"][split]["acc"])


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per collected run: accuracy and settling statistics."""
    return pd.DataFrame([{"dataset": r["dataset"], "variant": r["variant"], "seed": r["seed"],
                          "split": _acc(r)[0], "acc": _acc(r)[1], "source": r.get("source", "study"),
                          "moves": r["moves"], "moves_to_settle": r["moves_to_settle"],
                          "settle_epoch": r["settle_epoch"], "settled": r["settled"],
                          "last_change_epoch": r["last_change_epoch"], "displacement": r["displacement"],
                          "epochs": r["epochs"], "wall_time_s": r["wall_time_s"]} for r in runs])


def _fmt(a) -> str:
    return f"{np.mean(a):.2f} ± {np.std(a, ddof=1):.2f}" if len(a) > 1 else f"{np.mean(a):.2f}"


def accuracy_table(df: pd.DataFrame, order: list[str], datasets: list[str]) -> pd.DataFrame:
    """Per variant: accuracy per dataset (mean ± std, seeds), the mean over datasets, the difference to PPO."""
    ppo = df[df.variant == "ppo"].groupby("dataset")["acc"].mean()
    wide = []
    for v in order:
        row = {"variant": v}
        means = []
        for ds in datasets:
            a = df[(df.variant == v) & (df.dataset == ds)]["acc"].to_numpy()
            row[ds] = _fmt(a) if len(a) else ""
            row[f"n_{ds}"] = len(a)
            if len(a):
                means.append(a.mean())
        row["mean"] = float(np.mean(means)) if len(means) == len(datasets) else float("nan")
        mine = df[df.variant == v].groupby("dataset")["acc"].mean()
        common = ppo.index.intersection(mine.index)
        row["vs_ppo_pp"] = float((mine[common] - ppo[common]).mean()) if len(common) else float("nan")
        wide.append(row)
    return pd.DataFrame(wide)


def settling_table(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per dataset and relocating variant: means over seeds of the settling statistics."""
    settle = (df[df.variant != "vpt-deep"].groupby(["dataset", "variant"], sort=False)
              .agg(seeds=("seed", "size"), acc=("acc", "mean"), moves=("moves", "mean"),
                   moves_to_settle=("moves_to_settle", "mean"), settle_epoch=("settle_epoch", "mean"),
                   settled=("settled", "mean"), last_change_epoch=("last_change_epoch", "mean"),
                   displacement=("displacement", "mean"), epochs=("epochs", "first"),
                   wall_time_s=("wall_time_s", "mean")).reset_index())
    settle["variant"] = pd.Categorical(settle["variant"], order)
    settle = settle.sort_values(["dataset", "variant"]).reset_index(drop=True)
    settle["variant"] = settle["variant"].astype(str)
    return settle


def accuracy_figure(df: pd.DataFrame, order: list[str], datasets: list[str]) -> Figure:
    """Bars: mean accuracy per dataset and variant (± std); points: the seeds."""
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
    ax.set_ylim(max(0, df["acc"].min() - 10), min(100, df["acc"].max() + 5))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Allocator ablation (bars: mean, points: seeds)")
    return fig


def distance_figure(runs: list[dict], order: list[str], datasets: list[str]) -> Figure:
    """Per dataset: prompts displaced from the start over epochs, mean over seeds per relocating variant."""
    colors = colormaps["tab10"]
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
    return fig


def report(study_dir, tables_dir, figures_dir) -> dict:
    runs = collect(Path(study_dir))
    if not runs:
        return {"skipped": f"{study_dir}: no finished variant runs"}
    df = runs_frame(runs)
    order = [v for v in ORDER if v in set(df["variant"])]
    datasets = sorted(df["dataset"].unique())
    written = {}
    splits = sorted(df["split"].unique())
    notes = [f"accuracy (%) on {', '.join(splits)}: mean ± std over seeds (n_<task> seeds); vs_ppo_pp: mean over "
             "tasks of the difference to PPO; 'grid' rows reuse the main grid's final runs"]
    if (df["source"] == "grid").any():
        notes.append("runs from the main grid: " + ", ".join(sorted({f"{r.dataset}/{r.variant}" for r in
                                                                     df[df.source == "grid"].itertuples()})))
    written["allocators"] = write_table(accuracy_table(df, order, datasets), tables_dir, "allocators",
                                        "Allocator ablation: accuracy per task", notes)
    tol, window = runs[0].get("tol", DEFAULTS["tol"]), runs[0].get("window", DEFAULTS["window"])
    written["allocators_settling"] = write_table(
        settling_table(df, order), tables_dir, "allocators_settling",
        "Allocator ablation: how the prompt distribution settles",
        [f"settle epoch: first epoch after which no block moves by more than {tol} prompt(s) from it; settled: "
         f"fraction of seeds where that held for >= {window} epochs before the end; moves: prompts that changed "
         "block (to_settle: up to the settle epoch); displacement: sum |final - initial| / 2 prompts"])
    written["allocators_accuracy"] = save(accuracy_figure(df, order, datasets), figures_dir, "allocators_accuracy")
    written["allocators_distance"] = save(distance_figure(runs, order, datasets), figures_dir,
                                          "allocators_distance")
    return written
