"""provpt.report on synthetic run folders with known accuracies."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import stats as sps

from provpt.config import STUDIES, ConfigError
from provpt.report import STUDY_REPORTS, make_report
from provpt.report.runs import ReportError, collect_runs, load_histories
from provpt.report.tables import benchmark_means, load_published, published_table, write_table
from provpt.report.timing import benchmark_table, read_benchmarks

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
    monkeypatch.setitem(STUDY_REPORTS, "fakestudy",
                        lambda d, t, f: called.append((d.name, t.name, f.name)) or ["x"])
    for name in ("fakestudy", "notinprofile", "correlation"):
        (root / "studies" / name).mkdir(parents=True)
    monkeypatch.setitem(STUDY_REPORTS, "correlation", lambda d, t, f: pytest.fail("not in the profile"))
    profile = {**PROFILE, "studies": {"fakestudy": {"datasets": ["cifar"]}, "timing": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = make_report(profile, root)
    assert "distribution_figures" in out["skipped"] and not any("distribution" in k for k in out["figures"])
    # the profile's studies with a folder are reported; folders of other studies are ignored
    assert called == [("fakestudy", "tables", "figures")] and out["studies"] == {"fakestudy": ["x"]}
    assert "study:timing" in out["skipped"] and not any("notinprofile" in k or "correlation" in k for k in out["skipped"])
    sig = pd.read_csv(root / "tables" / "significance.csv")
    assert sig["wilcoxon_p"].isna().all() and sig["note"].str.contains("no test").all()


def test_study_without_report_is_an_error(tmp_path):
    root = make_results(tmp_path / "toy", methods=("linear",), tasks=("cifar",))
    (root / "studies" / "nosuchstudy").mkdir(parents=True)
    with pytest.raises(ConfigError, match="nosuchstudy"):
        make_report({**PROFILE, "studies": {"correlation": {}, "nosuchstudy": {}}}, root)
    assert not (root / "tables").exists()  # checked before anything is written


def test_every_study_has_a_report():
    assert set(STUDY_REPORTS) == set(STUDIES)


def test_studies_do_not_import_matplotlib_or_report():
    """Studies compute, the report presents: no study module pulls in matplotlib or provpt.report."""
    code = ("import importlib, pkgutil, sys, provpt.studies as s\n"
            "for m in pkgutil.iter_modules(s.__path__):\n"
            "    importlib.import_module(f'provpt.studies.{m.name}')\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'matplotlib' or k.startswith('provpt.report')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_read_benchmarks_stage_dataset_method(tmp_path):
    rows = {"search/cifar/pro-vpt/lr0.1.tsv": 4.0, "search/cifar/vpt-deep/lr0.1.tsv": 2.0,
            "final/cifar/vpt-deep/seed18.tsv": 10.0, "final/cifar/pro-vpt/seed18.tsv": 15.0,
            "final/dtd/pro-vpt/seed25.tsv": 25.0, "studies/timing/cifar.tsv": 7.0,
            "studies/allocators/cifar/seed18.tsv": 8.0, "pretrain.tsv": 3.0}
    for rel, sec in rows.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"s\th:m:s\tmax_rss\n{sec}\t0:00:10\t300.5\n")
    (tmp_path / "final" / "notes.txt").write_text("s\n1\n")  # not a .tsv: ignored
    (tmp_path / "final" / "cifar" / "bad.tsv").write_text("x\ty\n1\t2\n")  # no ``s`` column: ignored
    bench = read_benchmarks(tmp_path).set_index("file")
    assert set(bench.index) == set(rows)
    assert bench.loc["final/dtd/pro-vpt/seed25.tsv", ["stage", "dataset", "method"]].tolist() == \
        ["final", "dtd", "pro-vpt"]
    assert bench.loc["search/cifar/vpt-deep/lr0.1.tsv", "stage"] == "search"
    # studies and pretrain: the stage only (``pro-vpt`` or ``timing`` in a path is no method)
    for rel, stage in (("studies/timing/cifar.tsv", "studies"), ("studies/allocators/cifar/seed18.tsv", "studies"),
                       ("pretrain.tsv", "pretrain")):
        assert bench.loc[rel, ["stage", "dataset", "method"]].tolist() == [stage, "", ""]
    assert bench.loc["pretrain.tsv", "s"] == 3.0 and bench.loc["pretrain.tsv", "max_rss_mb"] == 300.5
    table = benchmark_table(bench.reset_index()).set_index(["stage", "method"])
    assert table.loc[("final", "pro-vpt"), "jobs"] == 2 and table.loc[("final", "pro-vpt"), "mean_s"] == 20.0
    assert table.loc[("final", "pro-vpt"), "vs_vpt_deep"] == pytest.approx(2.0)
    assert table.loc[("search", "pro-vpt"), "vs_vpt_deep"] == pytest.approx(2.0)
    assert np.isnan(table.loc[("studies", ""), "vs_vpt_deep"]) and table.loc[("studies", ""), "jobs"] == 2


def test_write_table_formats(tmp_path):
    df = pd.DataFrame({"method": ["a|b", "vpt_deep"], "acc": [70.123, np.nan], "p": [0.01234, 0.0],
                       "cell": ["1.0 ± 0.2", None]})
    paths = write_table(df, tmp_path, "t", "Cap_tion 50%", ["first note", "second_note"])
    assert [p.name for p in paths] == ["t.csv", "t.md", "t.tex"]
    assert pd.read_csv(paths[0])["acc"].isna().iloc[1]  # CSV: the raw numbers
    md = paths[1].read_text()
    assert md.startswith("**Cap_tion 50%**\n\n| method ")
    lines = md.splitlines()
    assert re.fullmatch(r"\|[-:|]+\|", lines[3]) and re.match(r"\| a\\\|b +\| +70\.12 \| +0\.0123 \| 1\.0 ± 0\.2 +\|$", lines[4])
    assert re.match(r"\| vpt_deep +\| +\| +0\.00 \| +\|$", lines[5])  # NaN and None: empty
    assert md.endswith("\n\nNote: first note\n\nNote: second_note\n")
    tex = paths[2].read_text()
    assert tex.startswith("% generated by provpt report")
    for part in (r"\begin{table}[t]", r"\caption{Cap\_tion 50\%}", r"\label{tab:t}", r"\begin{tabular}{lrrr}",
                 r"\toprule", r"method & acc & p & cell \\", r"a|b & 70.12 & 0.0123 & 1.0 $\pm$ 0.2 \\",
                 r"vpt\_deep &  & 0.00 &  \\", r"\bottomrule", r"\par\footnotesize second\_note"):
        assert part in tex, part
    assert tex.index(r"\end{tabular}") < tex.index("first note") < tex.index(r"\end{table}")


def test_relocation_table_counts_reprunes(tmp_path):
    from provpt.report.tables import relocation_table

    moves = {"pro-vpt": [(1, 5, 0, 2), (2, 5, 2, 0), (3, 7, 1, 1), (4, 5, 0, 3), (6, 9, 3, 1)],  # (epoch, prompt, src, tgt)
             "pro-vpt-exact": [(1, 5, 0, 2), (2, 8, 1, 3), (3, 9, 2, 0)]}
    rows = []
    for method, ms in moves.items():
        d = tmp_path / "runs" / "final" / "cifar" / method / "seed18"
        d.mkdir(parents=True)
        (d / "moves.jsonl").write_text("".join(json.dumps({"epoch": e, "prompt": k, "source": s, "target": t}) + "\n"
                                               for e, k, s, t in ms))
        rows.append({"method": method, "dataset": "cifar", "seed": 18, "path": d})
    table = relocation_table(pd.DataFrame(rows)).set_index(["method", "dataset"])
    pro = table.loc[("pro-vpt", "cifar")]
    # prompt 7's move to its own block is no move; prompt 5 moves at 1, 2 (again, previous epoch), 4 (within 3)
    assert (pro["moves"], pro["distinct"]) == (4, 2)
    assert pro["reprune_prev_epoch"] == pytest.approx(1 / 4) and pro["reprune_within_3"] == pytest.approx(2 / 4)
    exact = table.loc[("pro-vpt-exact", "all")]
    assert (exact["moves"], exact["reprune_within_3"]) == (3, 0.0)


def test_compare_pools_backbones_into_triples(tmp_path):
    """Two results folders (two backbones): the pooled test pairs (backbone, task, seed) triples, and a
    backbone on which pro-vpt is shifted shows in its own row and in the pooled headline difference."""
    from provpt.cli import main as cli

    make_results(tmp_path / "b0", methods=("vpt-deep", "pro-vpt"))
    b1 = make_results(tmp_path / "b1", methods=("vpt-deep", "pro-vpt"))
    for path in (b1 / "runs" / "final").glob("*/pro-vpt/*/metrics.json"):
        m = json.loads(path.read_text())
        m["eval"]["test"]["acc"] += 1.0
        path.write_text(json.dumps(m))
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps({"groups": GROUPS}))
    assert cli(["compare", "--profile", str(profile), "--results", str(tmp_path / "b0"), str(b1),
                "--out", str(tmp_path / "out")]) == 0
    sig = pd.read_csv(tmp_path / "out" / "backbones_significance.csv").set_index(["comparison", "backbones"])
    row = sig.loc[("pro-vpt vs vpt-deep", "all backbones")]
    diffs = [acc(t, "pro-vpt", s) - acc(t, "vpt-deep", s) + shift for shift in (0.0, 1.0) for t in BASE for s in SEEDS]
    assert row["n_pairs"] == 2 * len(BASE) * len(SEEDS)
    assert row["mean_diff"] == pytest.approx(np.mean(diffs))
    assert row["wilcoxon_p"] == pytest.approx(sps.wilcoxon(diffs).pvalue)
    assert sig.loc[("pro-vpt vs vpt-deep", "b1"), "headline_diff"] == pytest.approx(
        sig.loc[("pro-vpt vs vpt-deep", "b0"), "headline_diff"] + 1.0)
    accs = pd.read_csv(tmp_path / "out" / "backbones_accuracy.csv")
    assert set(accs["backbone"]) == {"b0", "b1", "mean"}
    assert cli(["compare", "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
