"""Report of the reward study (:mod:`provpt.studies.rewards`): does each reward measure the move?

Reads ``<study_dir>/<dataset>/summary.json`` and ``moves.csv``; writes the table ``rewards`` (per
dataset and reward: moves, Spearman and Pearson with the counterfactual effect over all moves and
within training points, sign agreement) and figures ``rewards_<dataset>`` (each reward against the
effect, coloured by training point).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..studies.rewards import REWARDS
from .figures import save
from .runs import study_summaries
from .tables import write_table

LABELS = {"mean": "mean (authors' formula)", "faithful": "faithful (authors' scaling)",
          "move": "move (ours)", "trend": "loss drop alone (the trend)"}


def rewards_table(summaries) -> pd.DataFrame:
    rows = []
    for _, s in summaries:
        for r in (*REWARDS, "trend"):
            c = s["correlation"].get(r)
            if c:
                rows.append({"dataset": s["dataset"], "reward": LABELS[r], "moves": c["n"],
                             "spearman": c["spearman"], "pearson": c["pearson"],
                             "spearman_within_points": c["spearman_within_points"],
                             "sign_agreement": c["sign_agreement"]})
    return pd.DataFrame(rows)


def scatter(moves: pd.DataFrame, s: dict) -> Figure:
    fig = Figure(figsize=(3.0 * (len(REWARDS) + 1), 3.0), layout="constrained")
    axes = fig.subplots(1, len(REWARDS) + 1)
    epochs = sorted(moves["epoch"].unique())
    cmap = colormaps["viridis"]
    for ax, r in zip(axes, (*REWARDS, "trend")):
        for i, e in enumerate(epochs):
            d = moves[moves["epoch"] == e]
            ax.scatter(d[r], d["effect"], s=14, color=cmap(i / max(1, len(epochs) - 1)), label=f"epoch {e}")
        c = s["correlation"][r]
        rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.2f}"
        ax.set_title(f"{LABELS[r]}\nSpearman {rho}", fontsize=8)
        ax.axhline(0, color="0.7", lw=0.5)
        ax.axvline(0, color="0.7", lw=0.5)
        ax.set_xlabel("reward")
    axes[0].set_ylabel("effect: no-move loss - move loss")
    axes[-1].legend(fontsize=6)
    fig.suptitle(f"{s['dataset']}: rewards against the counterfactual effect of {s['moves']} moves", fontsize=9)
    return fig


def report(study_dir, tables_dir, figures_dir) -> dict:
    summaries = study_summaries(study_dir)
    if not summaries:
        return {"skipped": f"{study_dir}: no */summary.json"}
    notes = [f"{s['dataset']}: the highest log-gate prompt of a {s['method']} run moved to every other block at "
             f"{len({p for p in s['options']['points']})} points; effect = no-move eval loss - move eval loss on "
             f"{s['split']} after {s['budget_epochs']} epoch(s), same checkpoint, data order and dropout stream"
             for _, s in summaries]
    written = {"rewards": write_table(rewards_table(summaries), tables_dir, "rewards",
                                      "Rewards against the counterfactual effect of the move", notes)}
    for folder, s in summaries:
        path = Path(folder) / "moves.csv"
        if path.is_file():
            written[f"rewards_{s['dataset']}"] = save(scatter(pd.read_csv(path), s), figures_dir, f"rewards_{s['dataset']}")
    return written
