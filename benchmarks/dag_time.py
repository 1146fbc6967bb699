"""Snakemake DAG construction time of a full profile (default vtab1k): wall time of ``snakemake -n``.

Builds a fixture in a temporary folder with the workflow tests' generator (tests/test_workflow.py:
every vtab1k/fgvc dataset's split files, a dummy weights file) and a copy of ``params/``; then
runs ``snakemake -n -s Snakefile -d <tmp> --config profile=<p> source=... weights=...``
there (nothing is written into the checkout) ``--repeats`` times and reports the median wall time
and the number of jobs of the plan. Nothing is computed: every job is still to do.

    python benchmarks/dag_time.py
    python benchmarks/dag_time.py --profile fgvc --repeats 2
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, median, parser, report

from provpt.config import load_profile


def fixture(tmp: Path, profile: str) -> dict:
    """Raw-data roots and a dummy weights file (the workflow tests' generator) plus a copy of
    params/; returns the --config overrides of ``profile``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_workflow import make_fixture_roots

    roots = make_fixture_roots(tmp / "raw")
    shutil.copytree(ROOT / "params", tmp / "params")
    fmt = load_profile(ROOT / "params" / f"{profile}.yaml")["data"]["format"]
    if fmt not in roots:
        raise SystemExit(f"profile {profile}: data.format={fmt}; the fixture has vtab and fgvc roots only")
    return {"profile": profile, "source": str(roots[fmt]), "weights": str(roots["weights"])}


def dry_run(tmp: Path, config: dict, snakemake: list[str]) -> tuple[float, int, str]:
    cmd = snakemake + ["-n", "-q", "rules", "-s", str(ROOT / "Snakefile"), "-d", str(tmp),
                       "--config", *(f"{k}={v}" for k, v in config.items())]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"snakemake -n failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    text = proc.stdout + proc.stderr
    m = re.search(r"^total\s+(\d+)", text, re.M)
    return took, int(m.group(1)) if m else -1, text


def main(argv=None):
    p = parser(__doc__)
    p.set_defaults(repeats=3)
    p.add_argument("--profile", default="vtab1k", help="params/<profile>.yaml (vtab or fgvc data format)")
    p.add_argument("--snakemake", default=f"{sys.executable} -m snakemake",
                   help="how to call snakemake (default: this Python's module)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = fixture(tmp, args.profile)
        runs = [dry_run(tmp, config, args.snakemake.split()) for _ in range(args.repeats)]
    times = [t for t, _, _ in runs]
    jobs = runs[-1][1]
    rows = [{"profile": args.profile, "jobs": jobs, "dry_run_s": median(times), "min_s": min(times),
             "max_s": max(times), "repeats": args.repeats}]
    report(args, "dag_time", rows, title=f"snakemake -n, profile {args.profile}, median of {args.repeats}")


if __name__ == "__main__":
    main()
