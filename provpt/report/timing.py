"""Report of the timing study (:mod:`provpt.studies.timing`) and of Snakemake's benchmark files.

Reads ``<study_dir>/<dataset>/summary.json``; writes table ``timing`` (means per method over the
timed epochs, so a PPO update every other epoch is amortised; ratios to VPT-Deep) and the
stacked-bar figure ``timing_phases``. If Snakemake ``benchmark:`` files exist under
``results/<profile>/benchmarks/`` (the study folder's grandparent), also table ``timing_benchmarks``.

The workflow writes those files as ``benchmarks/<stage>/<dataset>/<method>/<file>.tsv`` (stage
``search`` or ``final``), ``benchmarks/studies/<study>/<dataset>[/...].tsv`` and
``benchmarks/pretrain.tsv``: the stage is the first path component; dataset and method are the
next two, for ``search`` and ``final`` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..studies.timing import PHASES, REFERENCE
from .figures import save
from .runs import study_summaries
from .tables import write_table

RUN_STAGES = ("search", "final")  # benchmarks/<stage>/<dataset>/<method>/<file>.tsv
TIMING_COLUMNS = ["dataset", "method", "wall_s", "wall_median_s", "wall_vs_vpt_deep", "train_vs_vpt_deep",
                  *(f"{p}_s" for p in PHASES), "ppo_update_s", "train_images_per_s", "epoch_images_per_s",
                  "mem_peak_mb", "mem_extra_mb", "trainable_params", "epochs"]


def timing_table(summaries) -> pd.DataFrame:
    """One row per dataset and method: the study's per-method means, and its trainable parameters."""
    rows = []
    for _, s in summaries:
        for r in s["methods"]:
            rows.append({"dataset": s["dataset"], "device": s["device"], **r,
                         "trainable_params": s["params"].get(r["method"], {}).get("trainable_params")})
    return pd.DataFrame(rows)


def phases_figure(df: pd.DataFrame) -> Figure:
    """Per dataset, a stacked bar of each method's seconds per epoch by phase (label: ratio to VPT-Deep)."""
    datasets = list(dict.fromkeys(df["dataset"]))
    fig = Figure(figsize=(max(4.5, 1.0 + 1.3 * df["method"].nunique()) * len(datasets) ** 0.5 + 1, 3.8),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(datasets), squeeze=False)[0])
    colors = colormaps["tab10"]
    for ax, ds in zip(axes, datasets):
        d = df[df["dataset"] == ds]
        bottom = np.zeros(len(d))
        for i, p in enumerate(PHASES):
            v = d[f"{p}_s"].to_numpy(dtype=float)
            ax.bar(d["method"], v, bottom=bottom, label=p.replace("_", "+") if p == "forward_backward" else p,
                   color=colors(i))
            bottom += v
        for x, (tot, ratio) in enumerate(zip(bottom, d["wall_vs_vpt_deep"])):
            ax.text(x, tot, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=7)
        ax.set_title(ds)
        ax.set_ylabel("seconds per epoch")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Time per epoch by phase (label: ratio to VPT-Deep)")
    return fig


def read_benchmarks(root: Path) -> pd.DataFrame:
    """Snakemake ``benchmark:`` files (TSV with an ``s`` column) under ``root``, one row per file.

    ``stage`` is the first component of the path below ``root`` (``pretrain`` for ``pretrain.tsv``);
    ``dataset`` and ``method`` are the next two for the stages ``search`` and ``final``, else empty.
    Files that are not such TSVs are skipped.
    """
    root = Path(root)
    rows = []
    for p in sorted(root.rglob("*.tsv")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            df = pd.read_csv(p, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue
        if "s" not in df.columns or df.empty:
            continue
        parts = p.relative_to(root).with_suffix("").parts
        stage, dataset, method = parts[0], "", ""
        if stage in RUN_STAGES:
            dataset = parts[1] if len(parts) > 2 else ""
            method = parts[2] if len(parts) > 3 else ""
        rows.append({"file": p.relative_to(root).as_posix(), "stage": stage, "dataset": dataset, "method": method,
                     "s": float(pd.to_numeric(df["s"], errors="coerce").mean()),
                     "max_rss_mb": float(pd.to_numeric(df["max_rss"], errors="coerce").mean())
                     if "max_rss" in df.columns else float("nan")})
    return pd.DataFrame(rows, columns=["file", "stage", "dataset", "method", "s", "max_rss_mb"])


def benchmark_table(bench: pd.DataFrame) -> pd.DataFrame:
    """Jobs, mean/median/total seconds and memory per stage and method; mean time / VPT-Deep's in the stage."""
    agg = (bench.groupby(["stage", "method"], dropna=False)
           .agg(jobs=("s", "size"), mean_s=("s", "mean"), median_s=("s", "median"), total_s=("s", "sum"),
                max_rss_mb=("max_rss_mb", "mean")).reset_index())
    ref = agg[(agg["method"] == REFERENCE)].set_index("stage")["mean_s"]
    agg["vs_vpt_deep"] = [r.mean_s / ref[r.stage] if r.stage in ref.index and ref[r.stage] > 0 else float("nan")
                          for r in agg.itertuples()]
    return agg


def report(study_dir, tables_dir, figures_dir) -> dict:
    study_dir = Path(study_dir)
    summaries = study_summaries(study_dir)
    written = {}
    if summaries:
        df = timing_table(summaries)
        notes = [f"{s['dataset']}: {s['device_name']}, {s['threads']} threads, batch {s['batch_size']}, "
                 f"{s['methods'][0]['train_images']} training images per epoch, means over "
                 f"{s['options']['epochs']} timed epochs (after {s['options']['warmup_epochs']} untimed), "
                 f"memory: {s['memory']}" for _, s in summaries]
        notes.append("wall_vs_vpt_deep: epoch wall time / VPT-Deep's in the same process; train_vs_vpt_deep: "
                     "(data + forward/backward + optimiser + scoring + allocation) / VPT-Deep's training phases")
        written["timing"] = write_table(df[[c for c in TIMING_COLUMNS if c in df]], tables_dir, "timing",
                                        "Time per epoch by phase (s), ratios to VPT-Deep, memory (MB)", notes)
        written["timing_phases"] = save(phases_figure(df), figures_dir, "timing_phases")
    bench_root = study_dir.parent.parent / "benchmarks"
    bench = read_benchmarks(bench_root) if bench_root.is_dir() else pd.DataFrame()
    if not bench.empty:
        written["timing_benchmarks"] = write_table(
            benchmark_table(bench), tables_dir, "timing_benchmarks",
            "Snakemake benchmark files: wall seconds per job by stage and method",
            [f"{len(bench)} files under {bench_root.name}/; vs_vpt_deep: mean job time / VPT-Deep's in the "
             "same stage (jobs may have shared the machine)"])
    if not written:
        return {"skipped": f"{study_dir}: no */summary.json and no benchmark files"}
    return written
