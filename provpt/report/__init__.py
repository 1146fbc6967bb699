"""``provpt report``: tables and figures from a profile's run folders, then the studies' own.

``make_report(profile, results)`` reads ``<results>/runs/final``, ``<results>/selection`` and
``<results>/studies`` (``results`` is the profile's folder ``results/<profile>``; the top-level
``results/`` holding ``<profile>/`` is accepted too) and writes ``<results>/tables`` and
``<results>/figures``.

Hook for studies: for each folder ``<results>/studies/<name>/``, the function
``provpt.studies.<name>.report(study_dir, tables_dir, figures_dir)`` is called if that module and
function exist; its return value (e.g. a list of written paths) is recorded under ``studies``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["make_report", "profile_root"]


def profile_root(profile: dict, results: str | Path) -> Path:
    """``results`` itself, or ``results/<profile>`` when ``results`` is the top-level folder."""
    results = Path(results)
    name = profile.get("profile")
    if name and results.name != name and (results / name).is_dir() and not (results / "runs").is_dir():
        return results / name
    return results


def run_study_reports(studies_dir: Path, tables_dir: Path, figures_dir: Path) -> tuple[dict, dict]:
    done, skipped = {}, {}
    for d in sorted(p for p in Path(studies_dir).glob("*") if p.is_dir()):
        mod_name = f"provpt.studies.{d.name}"
        if not d.name.isidentifier():
            skipped[f"study:{d.name}"] = "folder name is not a module name"
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name not in (mod_name, "provpt.studies"):
                raise  # the study module exists but one of its imports is missing
            skipped[f"study:{d.name}"] = f"no module {mod_name}"
            continue
        fn = getattr(mod, "report", None)
        if not callable(fn):
            skipped[f"study:{d.name}"] = f"{mod_name} has no report()"
            continue
        done[d.name] = fn(d, tables_dir, figures_dir)
    return done, skipped


def make_report(profile: dict, results: str | Path) -> dict:
    """Write every table and figure of one profile.

    Returns ``{"tables": {name: [paths]}, "figures": {name: [paths]}, "studies": {name: result},
    "skipped": {name: reason}}``.
    """
    from .figures import write_figures
    from .runs import collect_runs, collect_selections
    from .tables import write_tables

    root = profile_root(profile, results)
    tables_dir, figures_dir = root / "tables", root / "figures"
    split = (profile.get("final") or {}).get("eval_split", "test")
    groups = profile.get("groups") or {}
    runs = collect_runs(root, "final", split)
    tables, skipped = write_tables(runs, collect_selections(root), groups, tables_dir, split)
    figures, skipped_fig = write_figures(runs, groups, figures_dir, split)
    if not runs.empty:  # per-epoch curves of every final run: DVC's plots read this file
        from .runs import load_histories, write_text

        curves = load_histories(runs, split)
        tables["curves"] = [write_text(tables_dir / "curves.csv", curves.to_csv(index=False))]
    studies, skipped_st = run_study_reports(root / "studies", tables_dir, figures_dir)
    return {"tables": tables, "figures": figures, "studies": studies,
            "skipped": {**skipped, **skipped_fig, **skipped_st}}
