"""Figures from run folders (matplotlib object API, no pyplot state): PNG (150 dpi) and PDF each.

- ``distribution_over_epochs_<task>``: PRO-VPT prompt count per block and epoch, mean over seeds;
- ``final_distributions``: PRO-VPT's last distribution per task (tasks x blocks);
- ``accuracy_by_method``: per task, the mean accuracy per method as bars with the seeds as points;
- ``training_curves``: per task, eval accuracy per epoch per method (mean over seeds, ± std band).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..config import METHODS
from .runs import atomic_path, load_distributions, load_histories
from .tables import method_order, resolve_groups, task_order

DPI = 150


def save(fig: Figure, figures_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = Path(figures_dir) / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI)
        paths.append(path)
    return paths


def method_color(method: str):
    return colormaps["tab10"](METHODS.index(method) if method in METHODS else len(METHODS))


def task_grid(n: int, title: str, w: float = 3.3, h: float = 2.7):
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n]


def distribution_over_epochs(dist: pd.DataFrame, task: str) -> Figure:
    """Heatmap of one task's PRO-VPT distribution: epochs on x, blocks on y, count as colour."""
    m = dist.groupby(["block", "epoch"])["count"].mean().unstack("epoch")
    fig = Figure(figsize=(min(12, 6 + 0.06 * m.shape[1]), 1.6 + 0.3 * m.shape[0]), layout="constrained")
    ax = fig.subplots()
    mesh = ax.pcolormesh(m.columns, m.index, m.to_numpy(float), shading="nearest", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="prompts in block")
    n = dist["seed"].nunique()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="block", yticks=list(m.index),
           title=f"PRO-VPT prompt distribution over epochs: {task}\n(mean of {n} seed{'s' * (n > 1)})")
    return fig


def final_distributions(final: pd.DataFrame) -> Figure:
    """Heatmap tasks x blocks of the last distribution (mean over seeds), cells annotated."""
    fig = Figure(figsize=(max(6.0, 2.5 + 0.55 * final.shape[1]), 1.6 + 0.38 * final.shape[0]),
                 layout="constrained")
    ax = fig.subplots()
    v = final.to_numpy(float)
    im = ax.imshow(v, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="prompts in block")
    hi, digits = np.nanmax(v), 0 if np.allclose(v, np.round(v)) else 1
    for (i, j), c in np.ndenumerate(v):
        ax.text(j, i, f"{c:.{digits}f}", ha="center", va="center", fontsize=7,
                color="black" if c > 0.6 * hi else "white")
    ax.set(xticks=range(v.shape[1]), xticklabels=final.columns, yticks=range(v.shape[0]),
           yticklabels=final.index, xlabel="block",
           title="PRO-VPT final prompt distribution per task\n(mean over seeds)")
    return fig


def accuracy_by_method(runs: pd.DataFrame, tasks: list[str], split: str) -> Figure:
    fig, axes = task_grid(len(tasks), f"Top-1 {split} accuracy by method: bars = mean, points = seeds")
    rng = np.random.default_rng(0)
    for ax, task in zip(axes, tasks):
        r = runs[runs["dataset"] == task]
        methods = method_order(r["method"])
        for i, m in enumerate(methods):
            acc = r.loc[r["method"] == m, "acc"].to_numpy(float)
            ax.bar(i, acc.mean(), color=method_color(m), alpha=0.75, width=0.7)
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(acc)), acc, s=12, color="black", zorder=3)
        lo, hi = r["acc"].min(), r["acc"].max()
        pad = max(2.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set(title=task, ylabel="accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    return fig


def training_curves(hist: pd.DataFrame, tasks: list[str]) -> Figure:
    splits = "/".join(sorted(hist["split"].unique()))
    fig, axes = task_grid(len(tasks), f"Eval ({splits}) accuracy per epoch, mean over seeds (band: ± std)")
    for ax, task in zip(axes, tasks):
        h = hist[hist["dataset"] == task]
        for m in method_order(h["method"]):
            s = h[h["method"] == m].groupby("epoch")["acc"].agg(["mean", "std"]).fillna({"std": 0})
            ax.plot(s.index, s["mean"], color=method_color(m), label=m, lw=1.5)
            ax.fill_between(s.index, s["mean"] - s["std"], s["mean"] + s["std"], color=method_color(m),
                            alpha=0.15, lw=0)
        ax.set(title=task, xlabel="epoch", ylabel="accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = {l: h for ax in axes for h, l in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(7, len(handles)))
    return fig


def write_figures(runs: pd.DataFrame, groups: dict, figures_dir: Path, split: str = "test") -> tuple[dict, dict]:
    """Write every built-in figure; returns ({name: [paths]}, {name: why skipped})."""
    written, skipped = {}, {}
    if runs.empty:
        return written, {"figures": "no finished final runs"}
    tasks = [t for t in task_order(resolve_groups(groups, runs["dataset"]), runs["dataset"])
             if t in set(runs["dataset"])]
    written["accuracy_by_method"] = save(accuracy_by_method(runs, tasks, split), figures_dir, "accuracy_by_method")

    hist = load_histories(runs, split)
    if hist.empty:
        skipped["training_curves"] = "no history.jsonl with eval accuracy"
    else:
        written["training_curves"] = save(
            training_curves(hist, [t for t in tasks if t in set(hist["dataset"])]), figures_dir, "training_curves")

    pro = runs[runs["method"] == "pro-vpt"]  # (the authors' method; pro-vpt-exact has its own table rows)
    if pro.empty:
        skipped["distribution_figures"] = "no pro-vpt run: no distribution figures"
        return written, skipped
    dist = load_distributions(pro)
    if dist.empty:
        skipped["distribution_over_epochs"] = "pro-vpt runs have no distribution.csv / history distribution"
    for task in [t for t in tasks if t in set(dist["dataset"])]:
        written[f"distribution_over_epochs_{task}"] = save(
            distribution_over_epochs(dist[dist["dataset"] == task], task), figures_dir,
            f"distribution_over_epochs_{task}")
    final = pro.dropna(subset=["distribution"])
    if final.empty:
        skipped["final_distributions"] = "pro-vpt metrics.json have no distribution"
    else:
        vecs = pd.DataFrame(final["distribution"].tolist(), index=final["dataset"]).groupby(level=0).mean()
        vecs = vecs.reindex([t for t in tasks if t in vecs.index])
        written["final_distributions"] = save(final_distributions(vecs), figures_dir, "final_distributions")
    return written, skipped
