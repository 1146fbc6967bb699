"""Tables from run folders: accuracy, published numbers beside ours, significance, selection.

Every table is built as a DataFrame (numbers, not typed by hand) and written as CSV, Markdown and
LaTeX by :func:`write_table`. Group means are means over a group's tasks of the per-task seed means;
the VTAB mean is the mean of the group means (not of the tasks); a group mean is left empty unless a
method has every task of the group.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats as sps

from ..config import METHODS, RELOCATING
from .runs import write_text

VTAB_GROUPS = {"natural", "specialized", "structured"}


# ----------------------------------------------------------------------------- order and groups


def method_order(methods) -> list[str]:
    methods = set(methods)
    return [m for m in METHODS if m in methods] + sorted(methods - set(METHODS))


def resolve_groups(groups: dict | None, datasets) -> dict[str, list[str]]:
    """The profile's groups; without any, one group ``all`` of the datasets seen."""
    datasets = sorted(set(datasets))
    if not groups:
        return {"all": datasets}
    grouped = {t for ts in groups.values() for t in ts}
    extra = [d for d in datasets if d not in grouped]
    if extra:
        warnings.warn(f"datasets {extra} are in no group of the profile: shown, left out of group means",
                      stacklevel=2)
    return {g: list(ts) for g, ts in groups.items()}


def task_order(groups: dict, datasets=()) -> list[str]:
    tasks = [t for ts in groups.values() for t in ts]
    return tasks + sorted(set(datasets) - set(tasks))


def sort_rows(df: pd.DataFrame, order, cols=("dataset", "method")) -> pd.DataFrame:
    """Sort by ``cols``, each value ranked by its position in ``order`` (unknown values last)."""
    rank = {k: i for i, k in enumerate(order)}
    return df.sort_values(list(cols), key=lambda c: c.map(rank), kind="stable").reset_index(drop=True)


def headline_key(groups: dict) -> str:
    """``vtab_mean`` (mean of the three VTAB group means), ``<group>_mean`` for one group, else
    ``mean_of_groups``."""
    if set(groups) == VTAB_GROUPS:
        return "vtab_mean"
    return f"{next(iter(groups))}_mean" if len(groups) == 1 else "mean_of_groups"


def mean_labels(groups: dict) -> dict[str, str]:
    """Column keys of the aggregate means and their printed labels."""
    head = headline_key(groups)
    if len(groups) == 1:
        g = next(iter(groups))
        return {head: f"{g.upper() if g == 'fgvc' else g} mean"}
    labels = {g: f"{g.capitalize()} mean" for g in groups}
    labels[head] = "VTAB mean (of group means)" if head == "vtab_mean" else "mean of group means"
    labels["all_tasks_mean"] = f"mean of all {sum(map(len, groups.values()))} tasks"
    return labels


# ----------------------------------------------------------------------------- statistics


DATA_COLUMNS = ["data_variant", "norm", "train_split"]  # what data a run trained on (metrics.json)


def _joined(values) -> str:
    """The distinct recorded values, in order, joined with '+' ('' where none was recorded)."""
    return "+".join(dict.fromkeys(str(v) for v in values if isinstance(v, str) and v))


def task_stats(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method): n, mean, std (ddof 1) over seeds, per-seed values, parameter counts,
    and the data its runs recorded (:data:`DATA_COLUMNS`; values that differ between seeds joined
    with '+')."""
    g = runs.groupby(["dataset", "method"], sort=False)
    out = g.agg(n=("acc", "size"), mean=("acc", "mean"), std=("acc", "std"),
                trainable_params=("trainable_params", "mean"), total_params=("total_params", "mean"),
                wall_time_s=("wall_time_s", "mean")).reset_index()
    data = runs.reindex(columns=["dataset", "method", *DATA_COLUMNS]).groupby(
        ["dataset", "method"], sort=False)[DATA_COLUMNS].agg(_joined).reset_index()
    seeds = runs.pivot_table(index=["dataset", "method"], columns="seed", values="acc", aggfunc="first")
    seeds.columns = [f"seed{s}" for s in seeds.columns]
    return out.merge(data, on=["dataset", "method"]).merge(seeds.reset_index(), on=["dataset", "method"])


def data_columns(stats: pd.DataFrame) -> pd.DataFrame:
    """dataset, method and :data:`DATA_COLUMNS` of ``stats``, '' where a value was not recorded."""
    df = stats.reindex(columns=["dataset", "method", *DATA_COLUMNS])
    df[DATA_COLUMNS] = df[DATA_COLUMNS].astype(object).map(lambda v: v if isinstance(v, str) else "")
    return df


def data_label(variant: str, norm: str) -> str:
    """``noah, vtab norm``: a run's data variant and normalisation as the tables print them."""
    return ", ".join(x for x in (variant, f"{norm} norm" if norm else "") if x)


def data_note(stats: pd.DataFrame) -> str:
    """Which data the runs trained on (one clause per distinct variant, normalisation, split)."""
    combos = data_columns(stats)[DATA_COLUMNS].drop_duplicates()
    parts = [", ".join(x for x in (data_label(v, n) or "not recorded", s and f"trained on {s}") if x)
             for v, n, s in combos.itertuples(index=False)]
    return ("data: " + "; ".join(parts) + " (noah: VTAB-1k from the NOAH files; vpt-json: FGVC from VPT's "
            "json splits; mini: generated here)")


def benchmark_means(stats: pd.DataFrame, groups: dict) -> pd.DataFrame:
    """Per method: each group mean, the headline mean and the mean over all tasks (NaN if a task is
    missing)."""
    acc = stats.pivot(index="method", columns="dataset", values="mean")
    out = pd.DataFrame(index=pd.Index(method_order(acc.index), name="method"))
    for g, tasks in groups.items():
        out[g] = acc.reindex(columns=tasks).mean(axis=1, skipna=False)
    out[headline_key(groups)] = out[list(groups)].mean(axis=1, skipna=False)
    out["all_tasks_mean"] = acc.reindex(columns=task_order(groups)).mean(axis=1, skipna=False)
    return out


def accuracy_note(groups: dict) -> str:
    head = mean_labels(groups)[headline_key(groups)]
    how = "the mean of its tasks" if len(groups) == 1 else "the mean of the group means, not of the tasks"
    return (f"{head} is {how}; a group mean is the mean of its tasks' seed means and is empty when a "
            "method lacks one of them; std: sample std (ddof 1) over seeds; trainable params: mean over "
            "tasks, classification head included")


def fmt_acc(mean: float, std: float) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def fmt_params(n: float) -> str:
    if pd.isna(n):
        return ""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


# ----------------------------------------------------------------------------- tables


def accuracy_tables(runs: pd.DataFrame, groups: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(wide display table, long per-task table, benchmark means)."""
    st = task_stats(runs)
    means = benchmark_means(st, groups)
    tasks = task_order(groups, st["dataset"])
    st["group"] = st["dataset"].map({t: g for g, ts in groups.items() for t in ts})
    long = sort_rows(st, tasks + method_order(st["method"]))
    long = long[["group"] + [c for c in long.columns if c != "group"]]

    cells = st.assign(cell=[fmt_acc(m, s) for m, s in zip(st["mean"], st["std"])])
    wide = cells.pivot(index="method", columns="dataset", values="cell").astype(object).reindex(
        index=means.index, columns=tasks, fill_value="").fillna("")
    for k, label in mean_labels(groups).items():
        wide[label] = means[k].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    par = runs.groupby("method")[["trainable_params", "total_params"]].mean()
    wide["trainable params"] = par["trainable_params"].map(fmt_params)
    wide["% of total"] = (100 * par["trainable_params"] / par["total_params"]).map(
        lambda v: "" if pd.isna(v) else f"{v:.2f}")
    return wide.reset_index(), long, means


def load_published() -> dict:
    text = resources.files("provpt").joinpath("resources/published.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def match_benchmark(groups: dict, published: dict) -> str | None:
    """The published benchmark whose task names contain all the profile's tasks, if any."""
    tasks = set(task_order(groups))
    for name, b in published["benchmarks"].items():
        if tasks and tasks <= {t for ts in b["groups"].values() for t in ts}:
            return name
    return None


PUBLISHED_COLUMNS = ["benchmark", "method", "metric", "published", "ours", "delta", "source",
                     "published_data", "ours_data"]


def published_table(stats: pd.DataFrame, means: pd.DataFrame, params: pd.Series, groups: dict,
                    published: dict | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Each published number with its source, ours beside it and ours minus published.

    Group and headline means are compared only when the profile's groups are the benchmark's.
    """
    published = published or load_published()
    name = match_benchmark(groups, published)
    st = data_columns(stats)
    st["label"] = [data_label(v, n) for v, n in zip(st["data_variant"], st["norm"])]
    task_data = st.set_index(["dataset", "method"])["label"]
    method_data = st.groupby("method")["label"].agg(_joined)
    if name is None:  # ours only, so the table still says what there is to compare
        ours = means.rename_axis(index="method", columns="metric").stack().rename("ours").reset_index()
        table = ours.assign(benchmark="none", published=np.nan, delta=np.nan, source="none published",
                            ours_data=ours["method"].map(method_data).fillna(""))
        return table.reindex(columns=PUBLISHED_COLUMNS), [
            "no published numbers for this profile's tasks (they are not VTAB-1k or FGVC task names): ours only"]
    bench = published["benchmarks"][name]
    same_groups = {g: set(t) for g, t in groups.items()} == {g: set(t) for g, t in bench["groups"].items()}
    acc = stats.pivot(index="method", columns="dataset", values="mean")
    rows = []
    for e in bench["entries"]:
        source = published["sources"][e["source"]]
        for metric, value in e["values"].items():
            ours, data = np.nan, ""
            if metric == "params_M":
                ours = params.get(e["method"], np.nan) / 1e6
            elif metric in acc.columns:
                ours = acc[metric].get(e["method"], np.nan)
                data = task_data.get((metric, e["method"]), "") if not pd.isna(ours) else ""
            elif same_groups and metric in means.columns:
                ours = means[metric].get(e["method"], np.nan)
                data = method_data.get(e["method"], "") if not pd.isna(ours) else ""
            rows.append({"benchmark": name, "method": e["method"], "metric": metric, "published": value,
                         "ours": ours, "delta": ours - value, "source": source["cite"],
                         "published_data": "" if metric == "params_M" else (source.get("data") or {}).get(name, ""),
                         "ours_data": data})
    g = bench["groups"]
    table = sort_rows(pd.DataFrame(rows, columns=PUBLISHED_COLUMNS), task_order(g) + list(g) +
                      [headline_key(g), "params_M"] + method_order({r["method"] for r in rows}), ("metric", "method"))
    notes = ["delta = ours - published (pp; M for params_M). Ours: mean over seeds of the last-epoch "
             "accuracy; params_M is our mean trainable count over tasks (heads included)."]
    notes += [f"{s['cite']}: {s['detail']}" for s in published["sources"].values()
              if s["cite"] in set(table["source"])]
    if published.get("data_note"):
        notes.append(published["data_note"])
    if not same_groups:
        notes.append("group and headline means are not compared: the profile's groups differ from "
                     f"the {name} benchmark's")
    return table, notes


def paired(runs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Accuracies of methods a and b on the same (dataset, seed)."""
    acc = runs.pivot_table(index=["dataset", "seed"], columns="method", values="acc", aggfunc="first")
    if a not in acc or b not in acc:
        return pd.DataFrame(columns=["dataset", "seed", a, b])
    return acc[[a, b]].dropna().reset_index()


def paired_tests(x, y) -> dict:
    """Mean difference, Wilcoxon signed-rank and paired t-test p-values of x vs y."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = {"n_pairs": len(x), "mean_diff": float(np.mean(x - y)) if len(x) else np.nan,
           "wilcoxon_p": np.nan, "ttest_p": np.nan, "note": ""}
    if len(x) < 2:
        out["note"] = f"{len(x)} pair(s): no test"
        return out
    if np.allclose(x, y):
        out["note"] = "all differences are zero: no test"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["wilcoxon_p"] = float(sps.wilcoxon(x, y).pvalue)
        out["ttest_p"] = float(sps.ttest_rel(x, y).pvalue)
    if math.isnan(out["ttest_p"]):
        out["note"] = "constant differences: t-test undefined"
    return out


def significance_table(runs: pd.DataFrame, groups: dict,
                       pairs=(("pro-vpt", "vpt-deep"), ("pro-vpt-exact", "vpt-deep"), ("pro-vpt-exact", "pro-vpt"),
                              ("pro-vpt", "linear"))) -> tuple[pd.DataFrame, list]:
    """Paired tests over (task, seed) pairs, then wins/ties/losses per task (first row per comparison:
    all pairs)."""
    rows, notes = [], []
    for a, b in pairs:
        p = paired(runs, a, b)
        comp = f"{a} vs {b}"
        rows.append({"comparison": comp, "task": "all (task, seed) pairs", "n_tasks": p["dataset"].nunique(),
                     **paired_tests(p.get(a, []), p.get(b, [])), **wtl(p, a, b)})
        if rows[-1]["note"]:
            notes.append(f"{comp}: {rows[-1]['note']}")
        for task in task_order(groups, p["dataset"]):
            q = p[p["dataset"] == task]
            if q.empty:
                continue
            rows.append({"comparison": comp, "task": task, "n_tasks": 1, "n_pairs": len(q),
                         "mean_diff": float((q[a] - q[b]).mean()), **wtl(q, a, b)})
    cols = ["comparison", "task", "n_tasks", "n_pairs", "mean_diff", "wilcoxon_p", "ttest_p",
            "wins", "ties", "losses", "note"]
    notes.append("mean_diff = first minus second method (pp); p-values two-sided, scipy.stats.wilcoxon "
                 "and ttest_rel over all pairs; wins/ties/losses count seeds")
    return pd.DataFrame(rows).reindex(columns=cols), notes


def wtl(p: pd.DataFrame, a: str, b: str) -> dict:
    if p.empty:
        return {"wins": 0, "ties": 0, "losses": 0}
    d = (p[a] - p[b]).to_numpy(float)
    tie = np.isclose(d, 0, atol=1e-9)
    return {"wins": int(((d > 0) & ~tie).sum()), "ties": int(tie.sum()), "losses": int(((d < 0) & ~tie).sum())}


def selection_table(sel: pd.DataFrame, groups: dict) -> pd.DataFrame:
    sel = sort_rows(sel, task_order(groups, sel["dataset"]) + method_order(sel["method"]))
    for c in ("lr", "weight_decay"):
        sel[c] = sel[c].map(lambda v: "" if v is None or pd.isna(v) else f"{v:g}")
    return sel


def summary(means: pd.DataFrame, stats: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Metrics for DVC: per method the mean accuracy over tasks, group means, headline mean."""
    def num(v):
        return None if pd.isna(v) else round(float(v), 4)

    out = {}
    for m in means.index:
        s = stats[stats["method"] == m]
        out[m] = {"mean_acc": num(s["mean"].mean()), "n_tasks": int(len(s)),
                  "n_runs": int((runs["method"] == m).sum()),
                  **{k: num(means.at[m, k]) for k in means.columns},
                  "tasks": {t: num(v) for t, v in zip(s["dataset"], s["mean"])}}
    return out


# ----------------------------------------------------------------------------- writers


def _cell(v) -> str:
    """One cell as printed in Markdown and LaTeX: empty for a missing value, floats to 2 decimals
    (3 significant digits below 1)."""
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.2f}" if v == 0 or abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def to_markdown(df: pd.DataFrame, notes=()) -> str:
    """A pipe table (``DataFrame.to_markdown``, tabulate) of the formatted cells, then the notes."""
    cells = df.map(lambda v: _cell(v).replace("|", "\\|"))
    cells.columns = [str(c).replace("|", "\\|") for c in df.columns]
    align = ["right" if pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) else "left"
             for t in df.dtypes]
    table = cells.to_markdown(index=False, disable_numparse=True, colalign=align) if len(df.columns) else ""
    return table + "\n" + "".join(f"\nNote: {n}\n" for n in notes)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}


def tex_escape(s: str) -> str:
    return re.sub("|".join(map(re.escape, _TEX)), lambda m: _TEX[m.group()], str(s))


def to_latex(df: pd.DataFrame, caption: str, label: str, notes=()) -> str:
    """A booktabs table float (``DataFrame.style.to_latex``, pandas' Styler) with the notes below it."""
    styler = (df.style.hide(axis="index")
              .format(lambda v: tex_escape(_cell(v)))
              .format_index(tex_escape, axis="columns"))
    tex = styler.to_latex(caption=tex_escape(caption), label=f"tab:{label}", position="t",
                          position_float="centering", hrules=True,
                          column_format="l" + "r" * (len(df.columns) - 1))
    end = tex.rindex(r"\end{table}")
    notes_tex = "".join(rf"\par\footnotesize {tex_escape(n)}" + "\n" for n in notes)
    return r"% generated by provpt report; needs \usepackage{booktabs}" + "\n" + tex[:end] + notes_tex + tex[end:]


def write_table(df: pd.DataFrame, tables_dir: Path, stem: str, caption: str, notes=()) -> list[Path]:
    """``<stem>.csv`` (raw numbers), ``<stem>.md`` and ``<stem>.tex`` (formatted, with notes)."""
    d = Path(tables_dir)
    return [write_text(d / f"{stem}.csv", df.to_csv(index=False)),
            write_text(d / f"{stem}.md", f"**{caption}**\n\n" + to_markdown(df, notes)),
            write_text(d / f"{stem}.tex", to_latex(df, caption, stem, notes))]


def relocation_table(runs: pd.DataFrame, window: int = 3) -> pd.DataFrame:
    """Per relocating method and task, from the runs' ``moves.jsonl``: prompts moved, distinct prompts
    moved, and the re-prune rate: the share of prunes that picked a prompt moved in the previous
    epoch, or within the last ``window`` epochs (a fresh prompt scaled by 1e-3 picked again)."""
    from .runs import read_jsonl

    rows = []
    for r in runs[runs["method"].isin(RELOCATING)].itertuples():
        path = Path(r.path) / "moves.jsonl"
        if not path.is_file():
            continue
        moves = [m for m in read_jsonl(path) if m["target"] != m["source"]]
        last: dict[int, int] = {}
        again1 = again_w = 0
        for m in moves:
            e = last.get(m["prompt"])
            again1 += e is not None and m["epoch"] - e <= 1
            again_w += e is not None and m["epoch"] - e <= window
            last[m["prompt"]] = m["epoch"]
        rows.append({"method": r.method, "dataset": r.dataset, "runs": 1, "moves": len(moves),
                     "distinct": len(last), "again1": again1, "againw": again_w})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    out = df.groupby(["method", "dataset"], sort=False).sum(numeric_only=True).reset_index()
    total = df.groupby("method", sort=False).sum(numeric_only=True).reset_index().assign(dataset="all")
    out = pd.concat([out, total], ignore_index=True)
    out["reprune_prev_epoch"] = out["again1"] / out["moves"].where(out["moves"] > 0)
    out[f"reprune_within_{window}"] = out["againw"] / out["moves"].where(out["moves"] > 0)
    return out[["method", "dataset", "runs", "moves", "distinct", "reprune_prev_epoch", f"reprune_within_{window}"]]


def write_tables(runs: pd.DataFrame, selections: pd.DataFrame, groups: dict, tables_dir: Path,
                 split: str = "test") -> tuple[dict, dict]:
    """Write every built-in table; returns ({name: [paths]}, {name: why skipped})."""
    written, skipped = {}, {}
    if runs.empty:
        skipped.update(dict.fromkeys(["accuracy", "published", "significance", "summary"],
                                     "no finished final runs"))
    else:
        groups = resolve_groups(groups, runs["dataset"])
        wide, long, means = accuracy_tables(runs, groups)
        n_seeds = int(long["n"].max())
        written["accuracy"] = write_table(
            wide, tables_dir, "accuracy",
            f"Top-1 {split} accuracy (%), mean ± std over seeds (up to {n_seeds}), last epoch",
            [accuracy_note(groups), data_note(long)])
        written["accuracy_long"] = write_table(long, tables_dir, "accuracy_long",
                                               "Per-task accuracy over seeds (long form)")
        params = runs.groupby("method")["trainable_params"].mean()
        pub, notes = published_table(long, means, params, groups)
        written["published"] = write_table(pub, tables_dir, "published",
                                           "Published numbers beside ours", notes)
        sig, notes = significance_table(runs, groups)
        written["significance"] = write_table(sig, tables_dir, "significance",
                                              "Paired comparison over (task, seed) pairs", notes)
        reloc = relocation_table(runs)
        if not reloc.empty:
            written["relocation"] = write_table(
                reloc, tables_dir, "relocation", "Relocation: moves and re-prunes per method",
                ["moves: prompts that changed block (summed over seeds); distinct: different prompts moved; "
                 "reprune: share of moves whose prompt had moved in the previous epoch / within 3 epochs"])
        written["summary"] = [write_text(Path(tables_dir) / "summary.json", json.dumps(
            {"eval_split": split, "methods": summary(means, long, runs)}, indent=2) + "\n")]
    if selections.empty:
        skipped["selection"] = "no selection files"
    else:
        written["selection"] = write_table(
            selection_table(selections, resolve_groups(groups, selections["dataset"])), tables_dir,
            "selection", "Chosen lr / weight decay per task and method (val accuracy, last epoch)")
    return written, skipped
