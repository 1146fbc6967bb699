"""``provpt report``: tables and figures from a profile's run folders, then the studies' own.

``make_report(profile, results)`` reads ``<results>/runs/final``, ``<results>/selection`` and
``<results>/studies`` (``results`` is the profile's folder ``results/<profile>``; the top-level
``results/`` holding ``<profile>/`` is accepted too) and writes ``<results>/tables`` and
``<results>/figures``.

Studies compute, the report presents: a study (:mod:`provpt.studies`) writes numbers (CSV, JSON)
into ``<results>/studies/<name>/``; its tables and figures are made here, by
``STUDY_REPORTS[name](study_dir, tables_dir, figures_dir)`` (modules :mod:`.correlation`,
:mod:`.timing`, :mod:`.adjustment`, :mod:`.allocators`, :mod:`.rewards`). The studies reported are those named in
the profile's ``studies`` section whose folder exists; other folders are ignored. Each report's
return value (e.g. the written paths) is recorded under ``studies``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from . import adjustment, allocators, correlation, rewards, timing

__all__ = ["STUDY_REPORTS", "make_report", "profile_root"]

STUDY_REPORTS = {
    "correlation": correlation.report,
    "timing": timing.report,
    "adjustment": adjustment.report,
    "allocators": allocators.report,
    "rewards": rewards.report,
}


def profile_root(profile: dict, results: str | Path) -> Path:
    """``results`` itself, or ``results/<profile>`` when ``results`` is the top-level folder."""
    results = Path(results)
    name = profile.get("profile")
    if name and results.name != name and (results / name).is_dir() and not (results / "runs").is_dir():
        return results / name
    return results


def profile_studies(profile: dict) -> list[str]:
    """The studies the profile names (keys of its ``studies`` section); each must have a report."""
    names = list(profile.get("studies") or {})
    unknown = [n for n in names if n not in STUDY_REPORTS]
    if unknown:
        raise ConfigError(f"studies {unknown} of the profile have no report function; "
                          f"expected one of {list(STUDY_REPORTS)}")
    return names


def run_study_reports(names, studies_dir: Path, tables_dir: Path, figures_dir: Path) -> tuple[dict, dict]:
    """Call the report of each study in ``names`` whose folder ``studies_dir/<name>`` exists."""
    done, skipped = {}, {}
    for name in names:
        d = Path(studies_dir) / name
        if d.is_dir():
            done[name] = STUDY_REPORTS[name](d, tables_dir, figures_dir)
        else:
            skipped[f"study:{name}"] = f"no folder {d}"
    return done, skipped


def write_metrics(tables_dir: Path, metrics_dir: Path) -> list[Path]:
    """``metrics/summary.json`` and ``metrics/curves.csv``: copies of the two tables DVC shows as
    metrics and plots, outside the cached tables folder so that they can be small ``cache: false``
    files in git (``dvc metrics diff`` and ``dvc plots`` then need no cache). Written even when a
    table is missing (``{}``, an empty CSV), so the workflow always has both."""
    from .runs import write_text

    out = []
    for name, empty in (("summary.json", "{}\n"), ("curves.csv", "")):
        src = Path(tables_dir) / name
        out.append(write_text(Path(metrics_dir) / name, src.read_text() if src.is_file() else empty))
    return out


def make_report(profile: dict, results: str | Path) -> dict:
    """Write every table and figure of one profile.

    Returns ``{"tables": {name: [paths]}, "figures": {name: [paths]}, "studies": {name: result},
    "skipped": {name: reason}}``.
    """
    from .figures import write_figures
    from .runs import collect_runs, collect_selections
    from .tables import write_tables

    studies = profile_studies(profile)  # before writing anything: a study without a report is an error
    root = profile_root(profile, results)
    if not (root / "runs").is_dir():
        from .runs import ReportError

        raise ReportError(f"{root}: no runs/ folder here (expected results/<profile> with runs/final/...)")
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
    done, skipped_st = run_study_reports(studies, root / "studies", tables_dir, figures_dir)
    tables["metrics"] = write_metrics(tables_dir, root / "metrics")
    return {"tables": tables, "figures": figures, "studies": done,
            "skipped": {**skipped, **skipped_fig, **skipped_st}}
