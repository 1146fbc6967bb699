"""Report of the adjustment study (:mod:`provpt.studies.adjustment`): which relocation helps most.

Reads ``<study_dir>/<dataset>/summary.json`` and ``arms.csv``; writes tables ``adjustment_best``
(best move per point, and whether it changes over training) and ``adjustment_arms``, figures
``adjustment_heatmap_<dataset>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import save
from .runs import study_summaries
from .tables import write_table

ARM_COLUMNS = ["dataset", "epoch", "prompt", "source", "target", "moved", "score", "rule", "immediate_gain_loss",
               "gain_loss", "gain_acc", "loss", "acc"]


def best_table(summaries) -> pd.DataFrame:
    """One row per dataset and training point: the rule's prompt, the best move and its gain."""
    rows = []
    for _, s in summaries:
        for p in s["points"]:
            b = p["best"] or {}
            rows.append({"dataset": s["dataset"], "point_pct": round(100 * p["fraction"]), "epoch": p["epoch"],
                         "rule_source": p["rule_source"], "would_prune": "yes" if p["would_prune"] else "no",
                         "best_source": b.get("source"), "best_target": b.get("target"),
                         "gain_loss": b.get("gain_loss"), "gain_acc_pp": b.get("gain_acc"),
                         "no_move_loss": p["no_move"]["loss"], "no_move_acc": p["no_move"]["acc"],
                         "beats_no_move": "yes" if p["best_beats_no_move"] else "no",
                         "best_changes_over_training": "yes" if s["best_changes"] else "no"})
    return pd.DataFrame(rows)


def arms_table(summaries) -> pd.DataFrame:
    """Every arm of every dataset (``arms.csv`` with a ``dataset`` column); empty if none."""
    frames = []
    for folder, s in summaries:
        if (Path(folder) / "arms.csv").is_file():
            a = pd.read_csv(Path(folder) / "arms.csv")
            a.insert(0, "dataset", s["dataset"])
            frames.append(a)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def heatmap(d: pd.DataFrame, s: dict) -> Figure:
    """Gain in eval loss by target block: one row per point (rule), or one panel per point (pairs)."""
    L = int(s["num_blocks"])
    epochs = sorted(d["epoch"].unique())
    scale = 1e3
    if not s["pairs"]:
        grid = np.full((len(epochs), L), np.nan)
        src = {}
        for i, e in enumerate(epochs):
            for r in d[d["epoch"] == e].itertuples():
                grid[i, int(r.target)] = r.gain_loss * scale
                src[i] = int(r.source)
        fig = Figure(figsize=(1.0 + 0.7 * L, 1.2 + 0.55 * len(epochs)), layout="constrained")
        ax = fig.subplots()
        panels = [(ax, grid, [f"ep {e}" for e in epochs], "point", src)]
    else:
        fig = Figure(figsize=(0.5 + 2.9 * len(epochs), 3.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(epochs), squeeze=False)[0])
        panels = []
        for ax, e in zip(axes, epochs):
            grid = np.full((L, L), np.nan)
            for r in d[d["epoch"] == e].itertuples():
                grid[int(r.source), int(r.target)] = r.gain_loss * scale
            panels.append((ax, grid, [str(b) for b in range(L)], f"source block (epoch {e})", None))
    vmax = max(np.nanmax(np.abs(np.concatenate([p[1].ravel() for p in panels]))), 1e-9)
    for ax, grid, rows, ylabel, src in panels:
        im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(L))
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("target block")
        ax.set_ylabel(ylabel)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                mark = "*" if src is not None and src.get(i) == j else ""
                ax.text(j, i, f"{v:.1f}{mark}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=[p[0] for p in panels], label="gain in eval loss (x1e-3)")
    fig.suptitle(f"{s['dataset']}: gain of a relocation over no move, after {s['budget_epochs']} epoch(s)"
                 + ("" if s["pairs"] else "  (* = source: no move)"), fontsize=9)
    return fig


def report(study_dir, tables_dir, figures_dir) -> dict:
    summaries = study_summaries(study_dir)
    if not summaries:
        return {"skipped": f"{study_dir}: no */summary.json"}
    written = {}
    notes = [f"{s['dataset']}: {s['method']} run of {s['epochs']} epochs; each arm continues {s['budget_epochs']} "
             f"epoch(s) from the checkpoint; "
             f"{'all source/target pairs' if s['pairs'] else 'the rule prompt to every block'} "
             f"(pruned by {s.get('prune', 'taylor')} idleness); "
             f"eval on {s['split']}; gain = no-move loss - arm loss (> 0: the move helped)" for _, s in summaries]
    written["adjustment_best"] = write_table(best_table(summaries), tables_dir, "adjustment_best",
                                             "Best prompt relocation per training point", notes)
    arms = arms_table(summaries)
    if arms.empty:
        return written
    written["adjustment_arms"] = write_table(arms[[c for c in ARM_COLUMNS if c in arms]], tables_dir,
                                             "adjustment_arms", "Every relocation arm of the sweep", notes[:1])
    for _, s in summaries:
        d = arms[arms["dataset"] == s["dataset"]]
        if not d.empty:
            stem = f"adjustment_heatmap_{s['dataset']}"
            written[stem] = save(heatmap(d, s), figures_dir, stem)
    return written
