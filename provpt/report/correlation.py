"""Report of the correlation study (:mod:`provpt.studies.correlation`): Taylor vs true idleness.

Reads ``<study_dir>/<dataset>/summary.json`` and ``scores.csv``; writes tables ``correlation`` (one
row per dataset, training point and method) and ``correlation_summary`` (means over the points),
figures ``correlation_scatter_<dataset>`` and ``correlation_over_training``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import save
from .runs import study_summaries
from .tables import write_table


def long_table(summaries) -> pd.DataFrame:
    """One row per dataset, training point and method (``<a>_vs_<b>`` rows too) of the summaries."""
    rows = []
    for _, s in summaries:
        for p in s["points"]:
            for m, a in p["methods"].items():
                ref = m.split("_vs_")[0] if "_vs_" in m else m
                rows.append({"dataset": s["dataset"], "point_pct": round(100 * p["fraction"]), "epoch": p["epoch"],
                             "method": m, "pearson": a["pearson"], "spearman": a["spearman"],
                             "kendall": a["kendall"], "argmax_agrees": a["argmax_agrees"],
                             "pick_in_true_top3": a.get("pick_in_true_top3"),
                             "top_overlap": a["top_overlap"], "sign_agreement": a["sign_agreement"],
                             "magnitude_ratio": a.get("magnitude_ratio"),
                             "decision_agrees": a["decision_agrees"],
                             "spearman_within_block": a.get("spearman_within_block"),
                             "spearman_block_sums": a.get("spearman_block_sums"),
                             "time_s": p["times_s"].get(ref), "time_true_s": p["times_s"]["true"],
                             "cost_ratio": p["cost_ratio"].get(ref)})
    return pd.DataFrame(rows)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and method (``_vs_`` rows left out): means over the training points."""
    main = df[~df["method"].str.contains("_vs_")]
    return (main.groupby(["dataset", "method"], sort=False)
            .agg(points=("epoch", "size"), pearson=("pearson", "mean"), spearman=("spearman", "mean"),
                 spearman_min=("spearman", "min"), kendall=("kendall", "mean"),
                 argmax_agrees=("argmax_agrees", "mean"), pick_in_true_top3=("pick_in_true_top3", "mean"),
                 top_overlap=("top_overlap", "mean"),
                 sign_agreement=("sign_agreement", "mean"), magnitude_ratio=("magnitude_ratio", "median"),
                 time_s=("time_s", "mean"),
                 time_true_s=("time_true_s", "mean"), cost_ratio=("cost_ratio", "mean")).reset_index())


def scatter_figure(scores: pd.DataFrame, df: pd.DataFrame, s: dict) -> Figure:
    """One panel per training point: each prompt's Taylor scores against its true idleness."""
    pts = sorted(scores["epoch"].unique())
    fig = Figure(figsize=(3.2 * len(pts), 3.2), layout="constrained")
    axes = fig.subplots(1, len(pts), squeeze=False)[0]
    for ax, e in zip(axes, pts):
        d = scores[scores["epoch"] == e]
        ys = []
        for m, mk in (("online", "o"), ("pass", "^"), ("logit", "x"), ("run", "s")):
            if m in d and d[m].notna().any():
                ax.scatter(d["true"], d[m], s=10, marker=mk, alpha=0.7, label=m)
                ys.append(d[m].to_numpy())
        if ys:  # Taylor scores live on their own scale (see the magnitude ratio): fit the axis to them
            y = np.concatenate(ys)
            pad = 0.05 * (np.nanmax(y) - np.nanmin(y) or 1e-12)
            ax.set_ylim(np.nanmin(y) - pad, np.nanmax(y) + pad)
        rho = df[(df.dataset == s["dataset"]) & (df.epoch == e) & (df.method == "online")]
        title = f"epoch {e}"
        if len(rho):
            title += f"  rho={rho['spearman'].iloc[0]:.2f}"
        if "online" in d and np.median(np.abs(d["true"])) > 0:
            title += f"  |T|/|I|={np.median(np.abs(d['online'])) / np.median(np.abs(d['true'])):.0e}"
        ax.set_title(title, fontsize=8, pad=14)
        ax.set_xlabel("true idleness (loss difference)")
        ax.axhline(0, color="k", lw=0.4)
        ax.axvline(0, color="k", lw=0.4)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[0].set_ylabel("Taylor score")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{s['dataset']}: Taylor vs true idleness per prompt ({s['method']})")
    return fig


def over_training_figure(df: pd.DataFrame) -> Figure:
    """Spearman rho with the true idleness per training point, one line per dataset and method."""
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    main = df[~df["method"].str.contains("_vs_")]
    for (ds, m), d in main.groupby(["dataset", "method"], sort=False):
        ax.plot(d["point_pct"], d["spearman"], marker="o", label=f"{ds} {m}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("training point (% of epochs)")
    ax.set_ylabel("Spearman rho with true idleness")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=7)
    return fig


def report(study_dir, tables_dir, figures_dir) -> dict:
    summaries = study_summaries(study_dir)
    if not summaries:
        return {"skipped": f"{study_dir}: no */summary.json"}
    df = long_table(summaries)
    written = {}
    notes = [f"{s['dataset']}: {s['method']} run, {s['num_prompts']} prompts, true idleness on {s['eval_images']} "
             f"images of {s['split']} (dropout off); times on {s['device']}" for _, s in summaries]
    notes.append("magnitude_ratio = median |score| / median |true|: a VPT-Deep prompt reaches the sequence only "
                 "through LayerNorm(gate * p), invariant to the gate's scale but for LayerNorm's eps, so "
                 "d loss / d gate is orders of magnitude below the removal effect")
    notes.append("online: gate gradients over the same fixed batches (dropout off); pass: the authors' scoring "
                 "pass over the training split (dropout on); logit: log-gate gradients (first-order exact removal) "
                 "over the fixed batches; verify: logit's shortlist re-ranked by exact removal on training probe "
                 "batches; run: the scores the PRO-VPT run's relocator held; cost ratio = time(true) / time(method)")
    shown = df.copy()
    for c in ("argmax_agrees", "decision_agrees", "pick_in_true_top3"):
        shown[c] = shown[c].map({True: "yes", False: "no"})
    written["correlation"] = write_table(shown, tables_dir, "correlation",
                                         "Taylor vs true idleness per training point", notes)
    written["correlation_summary"] = write_table(
        summary_table(df), tables_dir, "correlation_summary", "Taylor vs true idleness, mean over training points",
        ["argmax_agrees (top-1): fraction of points where the score's argmax is the true argmax; "
         "pick_in_true_top3 (top-3): where it is among the 3 truly idlest; magnitude_ratio: "
         "median |score| / median |true idleness| (median over points)"])
    for folder, s in summaries:
        if not (Path(folder) / "scores.csv").is_file():
            continue
        stem = f"correlation_scatter_{s['dataset']}"
        written[stem] = save(scatter_figure(pd.read_csv(Path(folder) / "scores.csv"), df, s), figures_dir, stem)
    written["correlation_over_training"] = save(over_training_figure(df), figures_dir, "correlation_over_training")
    return written
