"""Collect finished run folders into pandas tables.

Layout (written by ``provpt train``; ``root`` is one profile's results folder ``results/<profile>``)::

    root/runs/<stage>/<dataset>/<method>/<run>/   metrics.json  history.jsonl  distribution.csv
    root/selection/<dataset>/<method>.json

A run folder counts only once its ``metrics.json`` exists (it is written last, atomically);
folders without it are skipped with a warning. A corrupt file is an error that names it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

from ..io import atomic_path, write_text  # noqa: F401 (re-exported: report.figures/tables write with them)


class ReportError(ValueError):
    """A results file that cannot be read; the message names the file."""


# ----------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: corrupt JSON ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{i}: corrupt JSON line ({e})") from None
    return rows


def study_summaries(study_dir: Path, pattern: str = "*/summary.json") -> list[tuple[Path, dict]]:
    """``(folder, summary)`` for every finished study job under ``study_dir`` (sorted by path)."""
    return [(p.parent, read_json(p)) for p in sorted(Path(study_dir).glob(pattern))]


# ----------------------------------------------------------------------------- runs


def run_dirs(root: Path, stage: str = "final") -> list[Path]:
    """Finished run folders ``root/runs/<stage>/<dataset>/<method>/<run>``; unfinished ones warn."""
    found = []
    for d in sorted(Path(root, "runs", stage).glob("*/*/*")):
        if not d.is_dir():
            continue
        if (d / "metrics.json").is_file():
            found.append(d)
        else:
            warnings.warn(f"{d}: no metrics.json (unfinished run), skipped", stacklevel=2)
    return found


def _eval(split: str, metrics: dict, path: Path) -> dict:
    ev = metrics.get("eval") or {}
    if split not in ev:
        raise ReportError(f"{path}: no '{split}' evaluation (has {sorted(ev)})")
    return ev[split]


def collect_runs(root: Path, stage: str = "final", split: str = "test") -> pd.DataFrame:
    """One row per finished run: dataset, method, run, seed, acc (on ``split``), loss, lr, ..."""
    rows = []
    for d in run_dirs(root, stage):
        path = d / "metrics.json"
        m = read_json(path)
        dataset, method = d.parent.parent.name, d.parent.name
        if (m.get("dataset", dataset), m.get("method", method)) != (dataset, method):
            warnings.warn(f"{path}: says {m.get('dataset')}/{m.get('method')}, folder says "
                          f"{dataset}/{method}; using the folder", stacklevel=2)
        ev = _eval(split, m, path)
        seed = m.get("seed", d.name.removeprefix("seed"))
        rows.append({
            "dataset": dataset, "method": method, "run": d.name,
            "seed": int(seed) if str(seed).lstrip("-").isdigit() else seed,
            "acc": float(ev["acc"]), "loss": ev.get("loss"),
            "lr": m.get("lr"), "weight_decay": m.get("weight_decay"), "epochs": m.get("epochs"),
            "trainable_params": m.get("trainable_params"), "total_params": m.get("total_params"),
            "wall_time_s": m.get("wall_time_s"), "distribution": m.get("distribution"),
            "data_variant": m.get("data_variant"), "norm": m.get("norm"), "train_split": m.get("train_split"),
            "path": d,
        })
    cols = ["dataset", "method", "run", "seed", "acc", "loss", "lr", "weight_decay", "epochs",
            "trainable_params", "total_params", "wall_time_s", "distribution", "data_variant", "norm",
            "train_split", "path"]
    df = pd.DataFrame(rows, columns=cols)
    num = ["acc", "loss", "lr", "weight_decay", "epochs", "trainable_params", "total_params", "wall_time_s"]
    df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    return df


def load_histories(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per-epoch eval accuracy of every run (``split`` if logged, else the first logged split)."""
    rows = []
    for r in runs.itertuples():
        path = Path(r.path) / "history.jsonl"
        if not path.is_file():
            continue
        for h in read_jsonl(path):
            ev = h.get("eval") or {}
            name = split if split in ev else next(iter(ev), None)
            if name is None or "epoch" not in h:
                continue
            rows.append({"dataset": r.dataset, "method": r.method, "seed": r.seed, "epoch": h["epoch"],
                         "split": name, "acc": float(ev[name]["acc"]), "train_loss": h.get("train_loss")})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "epoch", "split", "acc", "train_loss"])


def load_distributions(runs: pd.DataFrame) -> pd.DataFrame:
    """Prompt count per block and epoch (long: dataset, seed, epoch, block, count).

    Read from ``distribution.csv`` (header ``epoch,b0..``), else from ``history.jsonl``.
    """
    frames = []
    for r in runs.itertuples():
        d = Path(r.path)
        if (d / "distribution.csv").is_file():
            try:
                wide = pd.read_csv(d / "distribution.csv")
            except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
                raise ReportError(f"{d / 'distribution.csv'}: unreadable ({e})") from None
        elif (d / "history.jsonl").is_file():
            hist = [h for h in read_jsonl(d / "history.jsonl") if h.get("distribution")]
            wide = pd.DataFrame([{"epoch": h["epoch"], **{f"b{i}": c for i, c in enumerate(h["distribution"])}}
                                 for h in hist])
        else:
            continue
        if wide.empty or "epoch" not in wide:
            continue
        long = wide.melt(id_vars="epoch", var_name="block", value_name="count")
        long["block"] = long["block"].str.lstrip("b").astype(int)
        frames.append(long.assign(dataset=r.dataset, method=r.method, seed=r.seed))
    cols = ["dataset", "method", "seed", "epoch", "block", "count"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def collect_selections(root: Path) -> pd.DataFrame:
    """The chosen lr/wd per dataset and method (``root/selection/<dataset>/<method>.json``)."""
    rows = []
    for path in sorted(Path(root, "selection").glob("*/*.json")):
        s = read_json(path)
        rows.append({"dataset": path.parent.name, "method": path.stem, "lr": s.get("lr"),
                     "weight_decay": s.get("weight_decay"), "val_acc": s.get("acc"),
                     "candidates": len(s.get("candidates") or [])})
    return pd.DataFrame(rows, columns=["dataset", "method", "lr", "weight_decay", "val_acc", "candidates"])
