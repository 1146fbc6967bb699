"""provpt.report on synthetic run folders with known accuracies."""

import json
import sys
import types
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import stats as sps

from provpt.report import make_report
from provpt.report.runs import ReportError, collect_runs, load_histories
from provpt.report.tables import benchmark_means, load_published, published_table

GROUPS = {"natural": ["cifar", "dtd"], "specialized": ["eurosat"], "structured": ["clevr_count"]}
PROFILE = {"profile": "toy", "groups": GROUPS, "final": {"eval_split": "test"}}
SEEDS = (18, 25, 42)
BASE = {"cifar": 70.0, "dtd": 60.0, "eurosat": 90.0, "clevr_count": 50.0}
OFFSET = {"linear": -5.0, "vpt-deep": 0.0, "pro-vpt": 1.5}
PARAMS = {"linear": 1_000, "vpt-deep": 20_000, "pro-vpt": 20_000}
DISTS = [[2, 2, 2, 2], [3, 2, 2, 1], [3, 3, 2, 0], [4, 3, 1, 0]]  # pro-vpt, epochs 0..3


def acc(task, method, seed):
    i, j = list(BASE).index(task), SEEDS.index(seed)
    wobble = (0.37 * (3 * i + j) - 2.0) * (method == "pro-vpt")  # distinct paired differences, some < 0
    return BASE[task] + OFFSET.get(method, 0.0) + (j - 1) * 1.0 + wobble


def write_run(root, task, method, seed, metrics=True):
    d = root / "runs" / "final" / task / method / f"seed{seed}"
    d.mkdir(parents=True)
    dists = DISTS if method == "pro-vpt" else [[2, 2, 2, 2]] * 4
    final = acc(task, method, seed)
    with open(d / "history.jsonl", "w") as f:
        for e in range(4):
            a = final - 3 * (3 - e)
            f.write(json.dumps({"epoch": e, "train_loss": 2.0 - 0.3 * e, "train_acc": a, "lr": 0.1, "time_s": 1.0,
                                "eval": {"test": {"acc": a, "loss": 1.0}}, "distribution": dists[e]}) + "\n")
    (d / "distribution.csv").write_text(
        "epoch,b0,b1,b2,b3\n" + "".join(f"{e}," + ",".join(map(str, v)) + "\n" for e, v in enumerate(dists)))
    if metrics:
        (d / "metrics.json").write_text(json.dumps({
            "dataset": task, "method": method, "seed": seed, "lr": 0.1, "weight_decay": 1e-4, "epochs": 4,
            "eval": {"test": {"acc": final, "loss": 1.0}}, "trainable_params": PARAMS[method],
            "total_params": 1_000_000, "wall_time_s": 3.0, "distribution": dists[-1]}))
    return d


def make_results(root, methods=tuple(OFFSET), tasks=tuple(BASE)):
    for task in tasks:
        for method in methods:
            for seed in SEEDS:
                write_run(root, task, method, seed)
            sel = root / "selection" / task / f"{method}.json"
            sel.parent.mkdir(parents=True, exist_ok=True)
            sel.write_text(json.dumps({"lr": 0.1, "weight_decay": 1e-4, "acc": 55.5, "candidates": [{}] * 4}))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("results") / "toy")
    write_run(root, "cifar", "lora", 18, metrics=False)  # unfinished: skipped with a warning
    with pytest.warns(UserWarning, match="unfinished"):
        out = make_report(PROFILE, root.parent)  # the top-level results folder is accepted too
    return root, out


def test_accuracy_values(report):
    root, _ = report
    long = pd.read_csv(root / "tables" / "accuracy_long.csv")
    assert len(long) == len(BASE) * len(OFFSET)  # the unfinished lora run is not counted
    for r in long.itertuples():
        a = [acc(r.dataset, r.method, s) for s in SEEDS]
        assert r.n == 3 and r.mean == pytest.approx(np.mean(a)) and r.std == pytest.approx(np.std(a, ddof=1))
        assert r.seed18 == pytest.approx(a[0])
    wide = pd.read_csv(root / "tables" / "accuracy.csv", index_col="method")
    m = np.mean([acc("cifar", "pro-vpt", s) for s in SEEDS])
    s = np.std([acc("cifar", "pro-vpt", s) for s in SEEDS], ddof=1)
    assert wide.at["pro-vpt", "cifar"] == f"{m:.1f} ± {s:.1f}"
    assert list(wide.index) == ["linear", "vpt-deep", "pro-vpt"]
    assert wide.at["vpt-deep", "trainable params"] == "20.0K" and wide.at["vpt-deep", "% of total"] == 2.0

    summ = json.loads((root / "tables" / "summary.json").read_text())["methods"]
    for method in OFFSET:
        task_mean = {t: np.mean([acc(t, method, s) for s in SEEDS]) for t in BASE}
        groups = {g: np.mean([task_mean[t] for t in ts]) for g, ts in GROUPS.items()}
        vtab = np.mean(list(groups.values()))
        for g, v in groups.items():
            assert summ[method][g] == pytest.approx(v, abs=1e-4)
        assert summ[method]["vtab_mean"] == pytest.approx(vtab, abs=1e-4)
        assert summ[method]["all_tasks_mean"] == pytest.approx(np.mean(list(task_mean.values())), abs=1e-4)
        assert abs(vtab - np.mean(list(task_mean.values()))) > 0.5  # the two means differ here
        assert wide.at[method, "VTAB mean (of group means)"] == pytest.approx(round(vtab, 1))


def test_significance_matches_scipy(report):
    root, _ = report
    sig = pd.read_csv(root / "tables" / "significance.csv")
    for other in ("vpt-deep", "linear"):
        x = [acc(t, "pro-vpt", s) for t in BASE for s in SEEDS]
        y = [acc(t, other, s) for t in BASE for s in SEEDS]
        row = sig[(sig["comparison"] == f"pro-vpt vs {other}") & sig["task"].str.startswith("all")].iloc[0]
        assert row.n_pairs == 12 and row.mean_diff == pytest.approx(np.mean(np.subtract(x, y)))
        assert row.wilcoxon_p == pytest.approx(sps.wilcoxon(x, y).pvalue)
        assert row.ttest_p == pytest.approx(sps.ttest_rel(x, y).pvalue)
        per_task = sig[(sig["comparison"] == f"pro-vpt vs {other}") & (sig["task"] == "cifar")].iloc[0]
        d = [acc("cifar", "pro-vpt", s) - acc("cifar", other, s) for s in SEEDS]
        assert (per_task.wins, per_task.ties, per_task.losses) == (
            sum(v > 1e-9 for v in d), sum(abs(v) <= 1e-9 for v in d), sum(v < -1e-9 for v in d))


def test_every_output_non_trivial(report):
    root, out = report
    tables = [p for ps in out["tables"].values() for p in ps]
    figures = [p for ps in out["figures"].values() for p in ps]
    for stem in ("accuracy", "accuracy_long", "published", "significance", "selection"):
        for ext in ("csv", "md", "tex"):
            p = root / "tables" / f"{stem}.{ext}"
            assert p in tables and p.stat().st_size > 100, p
    assert "\\begin{tabular}" in (root / "tables" / "accuracy.tex").read_text()
    curves = pd.read_csv(root / "tables" / "curves.csv")  # DVC's plot: one row per run and epoch
    assert {"dataset", "method", "seed", "epoch", "acc"} <= set(curves.columns) and curves["epoch"].nunique() > 1
    assert "$\\pm$" in (root / "tables" / "accuracy.tex").read_text()
    assert (root / "tables" / "accuracy.md").read_text().count("\n|") >= 4
    expected = ["accuracy_by_method", "training_curves", "final_distributions"] + [
        f"distribution_over_epochs_{t}" for t in BASE]
    for stem in expected:
        png, pdf = root / "figures" / f"{stem}.png", root / "figures" / f"{stem}.pdf"
        assert png in figures and pdf in figures
        assert png.stat().st_size > 5_000, png
        assert imread(png).std() > 0.01, f"{png} looks blank"
        assert pdf.read_bytes()[:4] == b"%PDF" and pdf.stat().st_size > 2_000
    assert not list(root.rglob("*.tmp"))
    sel = pd.read_csv(root / "tables" / "selection.csv")
    assert len(sel) == 12 and set(sel["candidates"]) == {4} and sel.iloc[0]["dataset"] == "cifar"


def test_published_deltas(report):
    root, _ = report
    pub = pd.read_csv(root / "tables" / "published.csv")
    row = pub[(pub["method"] == "vpt-deep") & (pub["metric"] == "cifar")].iloc[0]
    ours = np.mean([acc("cifar", "vpt-deep", s) for s in SEEDS])
    assert row.published == 78.8 and row.ours == pytest.approx(ours) and row.delta == pytest.approx(ours - 78.8)
    assert "Jia et al." in row.source
    # a 4-task profile's group means are not the benchmark's: no delta for them
    grp = pub[(pub["method"] == "pro-vpt") & (pub["metric"] == "vtab_mean")]
    assert grp["ours"].isna().all() and set(grp["published"]) == {78.0}
    assert "not compared" in (root / "tables" / "published.md").read_text()


def test_published_full_benchmark_and_unknown_tasks():
    pub = load_published()
    for name, key, val in (("vtab1k", "vtab_mean", 80.0), ("fgvc", "fgvc_mean", 90.0)):
        groups = pub["benchmarks"][name]["groups"]
        tasks = [t for ts in groups.values() for t in ts]
        stats = pd.DataFrame({"dataset": tasks, "method": "pro-vpt", "mean": val})
        means = benchmark_means(stats, groups)
        table, _ = published_table(stats, means, pd.Series({"pro-vpt": 6e5}), groups, pub)
        head = table[(table["method"] == "pro-vpt") & table["metric"].str.endswith("_mean")].iloc[0]
        assert head.metric == key and head.delta == pytest.approx(val - head.published)
    table, notes = published_table(stats.assign(dataset="digits"), means, pd.Series(dtype=float),
                                   {"natural": ["digits"]}, pub)
    assert table["published"].isna().all() and (table["ours"] == 90.0).all() and "no published" in notes[0]


def test_fgvc_mean_is_task_mean():
    groups = {"fgvc": ["cub", "nabirds", "stanford_cars"]}
    stats = pd.DataFrame({"dataset": groups["fgvc"], "method": "vpt-deep", "mean": [80.0, 70.0, 90.0]})
    means = benchmark_means(stats, groups)
    assert means.at["vpt-deep", "fgvc_mean"] == pytest.approx(80.0)
    assert np.isnan(benchmark_means(stats.iloc[:2], groups).at["vpt-deep", "fgvc_mean"])  # a task missing


def test_corrupt_metrics_names_the_file(tmp_path):
    d = write_run(tmp_path, "cifar", "linear", 18)
    (d / "metrics.json").write_text('{"dataset": "cifar", "eval": ')
    with pytest.raises(ReportError, match=r"cifar/linear/seed18/metrics\.json"):
        collect_runs(tmp_path)
    d = write_run(tmp_path, "dtd", "linear", 18)
    with open(d / "history.jsonl", "a") as f:
        f.write('{"epoch": 4, "eval"\n')
    with pytest.raises(ReportError, match=r"dtd/linear/seed18/history\.jsonl:5"):
        load_histories(pd.DataFrame([{"dataset": "dtd", "method": "linear", "seed": 18, "path": d}]))


def test_no_provpt_and_study_hook(tmp_path, monkeypatch):
    root = make_results(tmp_path / "toy", methods=("linear", "vpt-deep"), tasks=("cifar",))
    called = []
    study = types.ModuleType("provpt.studies.fakestudy")
    study.report = lambda d, t, f: called.append((d.name, t.name, f.name)) or ["x"]
    monkeypatch.setitem(sys.modules, "provpt.studies.fakestudy", study)
    for name in ("fakestudy", "nosuchstudy"):
        (root / "studies" / name).mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = make_report(PROFILE, root)
    assert "distribution_figures" in out["skipped"] and not any("distribution" in k for k in out["figures"])
    assert called == [("fakestudy", "tables", "figures")] and out["studies"] == {"fakestudy": ["x"]}
    assert "study:nosuchstudy" in out["skipped"]
    sig = pd.read_csv(root / "tables" / "significance.csv")
    assert sig["wilcoxon_p"].isna().all() and sig["note"].str.contains("no test").all()
