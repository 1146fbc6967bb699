"""Evidence over several backbones: the final runs of several results folders of one benchmark (e.g.
the embedded profile with differently seeded pretraining, ``results/mini`` and ``results/mini-b1``),
compared as (backbone, task, seed) triples.

``compare(roots, groups, out)`` writes to ``out``:

- ``backbones_accuracy``: per backbone and method, the group means and the headline mean (mean of
  group means), and their mean over backbones;
- ``backbones_significance``: per comparison, the paired Wilcoxon signed-rank and t-test over all
  (backbone, task, seed) triples, the mean difference of the headline means over backbones, wins /
  ties / losses; then the same per backbone.

A backbone's name is its results folder's name. Only triples where both methods have a finished
run count.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .runs import collect_runs
from .tables import (benchmark_means, headline_key, paired, paired_tests, resolve_groups, task_stats, wtl,
                     write_table)

PAIRS = (("pro-vpt", "vpt-deep"), ("pro-vpt-exact", "vpt-deep"), ("pro-vpt-exact", "pro-vpt"))


def collect(roots, split: str = "test") -> pd.DataFrame:
    frames = []
    for root in map(Path, roots):
        if not (root / "runs" / "final").is_dir():
            raise FileNotFoundError(f"{root}: no runs/final folder (a profile's results folder, e.g. results/mini)")
        frames.append(collect_runs(root, "final", split).assign(backbone=root.name))
    return pd.concat(frames, ignore_index=True)


def accuracy(runs: pd.DataFrame, groups: dict) -> pd.DataFrame:
    rows = []
    for bb, r in runs.groupby("backbone", sort=False):
        means = benchmark_means(task_stats(r), groups)
        rows += [{"backbone": bb, "method": m, **means.loc[m].to_dict()} for m in means.index]
    df = pd.DataFrame(rows)
    avg = df.groupby("method", sort=False).mean(numeric_only=True).reset_index().assign(backbone="mean")
    return pd.concat([df, avg], ignore_index=True)[["backbone", "method", *list(groups), headline_key(groups),
                                                    "all_tasks_mean"]]


def significance(runs: pd.DataFrame, groups: dict, pairs=PAIRS) -> pd.DataFrame:
    head = headline_key(groups)
    acc = accuracy(runs, groups)
    rows = []
    pooled = runs.assign(dataset=runs["backbone"] + "/" + runs["dataset"])  # pairs on (backbone, task, seed)
    for a, b in pairs:
        scopes = [("all backbones", pooled)] + [(bb, r) for bb, r in runs.groupby("backbone", sort=False)]
        for scope, r in scopes:
            p = paired(r, a, b)
            if p.empty:
                continue
            sel = acc[acc["backbone"] == ("mean" if scope == "all backbones" else scope)].set_index("method")[head]
            rows.append({"comparison": f"{a} vs {b}", "backbones": scope,
                         "headline_diff": float(sel.get(a, float("nan")) - sel.get(b, float("nan"))),
                         **paired_tests(p[a], p[b]), **wtl(p, a, b)})
    cols = ["comparison", "backbones", "n_pairs", "headline_diff", "mean_diff", "wilcoxon_p", "ttest_p",
            "wins", "ties", "losses", "note"]
    return pd.DataFrame(rows).reindex(columns=cols)


def compare(roots, groups: dict | None, out: Path, split: str = "test") -> dict:
    runs = collect(roots, split)
    groups = resolve_groups(groups, runs["dataset"])
    head = headline_key(groups)
    names = ", ".join(Path(r).name for r in roots)
    out = Path(out)
    return {
        "backbones_accuracy": write_table(
            accuracy(runs, groups), out, "backbones_accuracy",
            f"Top-1 {split} accuracy (%) per backbone ({names}): group means and {head}",
            ["each backbone: the mean over seeds per task, then group means and their mean; "
             "mean: the mean of those over backbones"]),
        "backbones_significance": write_table(
            significance(runs, groups), out, "backbones_significance",
            "Paired comparison over (backbone, task, seed) triples",
            [f"headline_diff: difference of the {head} (pp; all backbones: of its mean over backbones); "
             "mean_diff: mean paired difference (pp); p-values two-sided, scipy.stats.wilcoxon and "
             "ttest_rel; wins/ties/losses count triples"]),
    }
