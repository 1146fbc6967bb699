"""The Snakemake workflow and the DVC pipeline.

Fast tests (no torch): `snakemake --lint`, dry runs of every profile with their job counts (vtab1k
and fgvc against generated fixture roots holding every dataset's split files and a dummy weights
file), and the DAG-time errors for missing data and weights. Slow tests: the smoke profile end to
end through Snakemake on a copy of the repository (every table and figure written and
non-trivial), what reruns after re-timestamping or losing a run, the HTML report, `dvc repro`, and the
DVC round trip (push, fresh clone, `dvc repro --dry`, pull, nothing left to run).
Everything runs on a copy of the repository in tmp_path, never in the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
ENV.pop("SNAKEMAKE_PROFILE", None)

VTAB = [
    "cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele",
]
FGVC = ["cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"]

# Expected jobs. Search: one job per pack of a (dataset, method)'s lr x wd grid (packs of 8; one run
# each for full, lora and adapter, which do not pack), and search_grid gathering them per (dataset,
# method); final: one job per (dataset, method), its seeds in packs.
#   paper grids: 32 points (16 for full, lora, adapter): 5 methods x 4 packs + 3 x 16 = 68 pack jobs.
#   vtab1k: 8 methods; 3 seeds; studies: correlation 19 + timing 1 + adjustment 3 + rewards 0 per
#           dataset, allocators 19 datasets x 5 variants x 3 seeds (one run per job).
#   fgvc:   the same grid on 5 datasets; studies 5 + 1 + 1, allocators 5 x 5 x 3.
#   mini:   7 tasks, 5 methods, 3 seeds, 4 studies on one task + allocators' 6 variants (one seed),
#           pretraining.
#   quick:  mini's first task of each group (3), 1 seed, 3 of its studies (correlation, timing, adjustment).
#   smoke:  2 tasks, the same grid, 1 seed.
VARIANTS = 5  # base.yaml's studies.allocators.variants (ppo, vpt-deep, exact come from the grid)
MINI_VARIANTS = 6  # mini adds the oracle
SMOKE_VARIANTS = 2  # smoke: norm and oracle
M = 5  # mini's methods: linear, vpt-shallow, vpt-deep, pro-vpt, pro-vpt-exact
EXPECTED = {
    "vtab1k": {"prepare": 19, "search_pack": 19 * 68, "search_grid": 19 * 8, "select": 19 * 8, "final_seeds": 19 * 8,
               "study": 19 + 1 + 3, "study_variant": 19 * VARIANTS * 3, "report": 1, "all": 1},
    "fgvc": {"prepare": 5, "search_pack": 5 * 68, "search_grid": 5 * 8, "select": 5 * 8, "final_seeds": 5 * 8,
             "study": 5 + 1 + 1, "study_variant": 5 * VARIANTS * 3, "report": 1, "all": 1},
    "mini": {"prepare": 7, "pretrain": 1, "search_pack": 7 * M, "search_grid": 7 * M, "select": 7 * M, "final_seeds": 7 * M,
             "study": 4, "study_variant": MINI_VARIANTS, "report": 1, "all": 1},
    "quick": {"prepare": 3, "pretrain": 1, "search_pack": 3 * M, "search_grid": 3 * M, "select": 3 * M, "final_seeds": 3 * M,
              "study": 3, "report": 1, "all": 1},
    "smoke": {"prepare": 2, "pretrain": 1, "search_pack": 2 * M, "search_grid": 2 * M, "select": 2 * M, "final_seeds": 2 * M,
              "study": 4, "study_variant": SMOKE_VARIANTS, "report": 1, "all": 1},
}


# ----------------------------------------------------------------------------- helpers


def copy_repo(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def snakemake(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "snakemake"), *args], repo, check=check)


def job_counts(output: str) -> dict[str, int]:
    """The `Job stats` table of a dry run as {rule: count}."""
    m = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal\s+\d+", output, re.S)
    assert m, f"no job stats in:\n{output[-3000:]}"
    return {rule: int(n) for rule, n in (line.split() for line in m.group(1).strip().splitlines())}


def make_fixture_roots(root: Path) -> dict[str, Path]:
    """Empty NOAH (19 tasks) and VPT-json (5 datasets) layouts with their split files, and a dummy
    weights file: enough for the DAG."""
    for task in VTAB:
        for split in ("train800", "val200", "train800val200", "test"):
            p = root / "vtab" / task / f"{split}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"images/{split}/000000.jpg 0\n")
    for name in FGVC:
        for split in ("train", "val", "test"):
            p = root / "fgvc" / name / f"{split}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"images/0.jpg": 0}))
    (root / "ViT-B_16.npz").write_bytes(b"not a real checkpoint")
    return {"vtab": root / "vtab", "fgvc": root / "fgvc", "weights": root / "ViT-B_16.npz"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return make_fixture_roots(tmp_path_factory.mktemp("raw"))


def paths_config(profile: str, roots: dict) -> list[str]:
    if profile in ("vtab1k", "fgvc"):
        src = roots["vtab" if profile == "vtab1k" else "fgvc"]
        return [f"profile={profile}", f"source={src}", f"weights={roots['weights']}"]
    return [f"profile={profile}"]


# ----------------------------------------------------------------------------- fast: the DAG


def test_lint(repo):
    proc = snakemake(repo, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in out, out[-3000:]


def test_root_snakefile_is_the_entry_and_finds_the_default_profile(repo, tmp_path):
    """`snakemake` from the root reads the top-level Snakefile and the workflow profile
    profiles/default (also under --profile profiles/slurm, and with -s/-d from elsewhere)."""
    assert (repo / "Snakefile").is_file() and not (repo / "workflow/Snakefile").exists()
    for extra, used in (([], "workflow specific profile profiles/default"),
                        (["--profile", "profiles/slurm"], "profiles profiles/slurm and workflow specific profile profiles/default")):
        proc = snakemake(repo, "-n", "-q", "rules", *extra, "--config", "profile=smoke")
        assert f"Using {used} for" in proc.stdout + proc.stderr, proc.stderr[:1000]
    proc = run([str(BIN / "snakemake"), "-n", "-q", "rules", "-s", str(repo / "Snakefile"), "-d", str(repo),
                "--config", "profile=smoke"], tmp_path)
    assert f"workflow specific profile {repo / 'profiles/default'} for" in proc.stdout + proc.stderr, proc.stderr[:1000]


@pytest.mark.parametrize("profile", ["vtab1k", "fgvc", "mini", "quick", "smoke", None])
def test_dry_run_job_counts(repo, roots, profile):
    """Each profile's DAG; without `profile=` the workflow runs make run's default, quick."""
    t0 = time.perf_counter()
    proc = snakemake(repo, "-n", *(["--config", *paths_config(profile, roots)] if profile else []))
    profile = profile or "quick"
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts == EXPECTED[profile]
    print(f"{profile}: {sum(counts.values())} jobs, dry run with job listing {time.perf_counter() - t0:.2f} s")


# Just enough of conda for Snakemake to name the environments it would use (`--list-conda-envs`,
# dry runs with --use-conda): `conda info`, `--version`, the channel-priority check. Creates nothing.
STUB_CONDA = """#!/bin/sh
case "$*" in
  "info --json") echo '{"conda_prefix": "/nonexistent/conda", "platform": "linux-64"}' ;;
  "--version") echo "conda 24.7.1" ;;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}' ;;
  *) echo "stub conda cannot: $*" >&2; exit 1 ;;
esac
"""


def test_conda_env_has_every_pin_and_a_pin_change_is_a_new_env(tmp_path):
    """requirements.txt is the one list of pins: the env file every job gets under --use-conda has
    each of its lines written out (plus this checkout, editable), and changing a pin changes the
    environment Snakemake computes from that file (its hash names the env folder)."""
    repo = copy_repo(tmp_path / "repo")
    stub = tmp_path / "bin" / "conda"
    stub.parent.mkdir()
    stub.write_text(STUB_CONDA)
    stub.chmod(0o755)
    env = {**ENV, "PATH": f"{stub.parent}{os.pathsep}{ENV['PATH']}"}

    def used_env():
        proc = subprocess.run([str(BIN / "snakemake"), "--list-conda-envs", "--config", "profile=smoke"], cwd=repo,
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        rows = [line.split("\t") for line in lines[lines.index("environment\tcontainer\tlocation") + 1:]]
        assert len(rows) == 1, rows  # one environment for every rule
        path, _, location = rows[0]
        pip = next(d["pip"] for d in yaml.safe_load((repo / path).read_text())["dependencies"] if isinstance(d, dict))
        return pip, location

    req = repo / "requirements.txt"
    pins = [line for line in req.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(pins) > 10 and "torch==2.14.1" in pins
    pip, location = used_env()
    assert pip == [*pins, f"-e {repo.resolve()}"], pip
    req.write_text(req.read_text().replace("torch==2.14.1", "torch==2.14.0"))
    pip2, location2 = used_env()
    assert "torch==2.14.0" in pip2 and "torch==2.14.1" not in pip2 and location2 != location
    req.write_text(req.read_text().replace("torch==2.14.0", "torch==2.14.1"))
    assert used_env() == (pip, location)


def test_vtab1k_dry_run_time(repo, roots):
    """Acceptance: the full vtab1k dry run takes < 5 s. Measured and printed, not asserted (shared
    CI machines vary)."""
    t0 = time.perf_counter()
    snakemake(repo, "-n", "-q", "--config", *paths_config("vtab1k", roots))
    print(f"vtab1k dry run: {time.perf_counter() - t0:.2f} s")


def test_profiles_valid_and_run_config_loads(repo):
    """Every profile merges, and resolves to a valid run configuration for every method and stage."""
    from provpt.config import STAGES, resolve

    for name in ("mini", "mini-b1", "quick", "smoke", "vtab1k", "fgvc"):
        path = repo / "params" / f"{name}.yaml"
        for method in yaml.safe_load(path.read_text()).get("methods") or ["linear"]:
            for stage in (None, *STAGES):
                assert resolve(path, method, stage).method == method


@pytest.mark.parametrize("profile,missing,key", [
    ("vtab1k", "source", "data.source"),
    ("vtab1k", "weights", "train.weights"),
    ("fgvc", "source", "data.source"),
    ("fgvc", "weights", "train.weights"),
])
def test_missing_path_is_a_clear_error(repo, roots, tmp_path, profile, missing, key):
    cfg = [c for c in paths_config(profile, roots) if not c.startswith(f"{missing}=")]
    cfg.append(f"{missing}={tmp_path / 'nowhere'}")
    dry = snakemake(repo, "-n", "--config", *cfg)
    assert "warning" in dry.stderr and key in dry.stderr and "prepare" in dry.stdout, dry.stderr[-2000:]
    proc = snakemake(repo, "--cores", "1", "--config", *cfg, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Finished job" not in out
    assert key in out and str(tmp_path / "nowhere") in out and f"--config {missing}=" in out, out[-2000:]


def test_missing_task_folder_is_named(repo, roots, tmp_path):
    src = tmp_path / "vtab"
    shutil.copytree(roots["vtab"], src)
    shutil.rmtree(src / "dmlab")
    proc = snakemake(repo, "--cores", "1", "--config", "profile=vtab1k", f"source={src}",
                     f"weights={roots['weights']}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "data.source" in out and "dmlab/train800.txt" in out, out[-2000:]


def test_unknown_config_key_and_profile(repo):
    for cfg, words in ((["foo=1"], ["foo", "unknown"]), (["profile=nope"], ["params/nope.yaml", "not found"])):
        proc = snakemake(repo, "-n", "--config", *cfg, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and all(w in out for w in words), out[-2000:]


def test_config_override_reaches_the_commands(repo):
    """A --config override of a profile section is merged and the jobs read the merged profile, a
    file named by its content: a second dry run with other overrides leaves the first untouched."""
    profiles = repo / "results/smoke/profiles"
    shutil.rmtree(repo / "results", ignore_errors=True)
    proc = snakemake(repo, "final", "-n", "-p", "--config", "profile=smoke", "train={epochs: 3}")
    assert '--profile "$PROVPT_PROFILE"' in proc.stdout
    (first,) = profiles.glob("*.yaml")
    merged = yaml.safe_load(first.read_text())
    assert merged["train"]["epochs"] == 3 and merged["profile"] == "smoke"
    assert first.stem == hashlib.sha256(first.read_bytes()).hexdigest()[:12]
    before = first.read_bytes(), first.stat().st_mtime_ns
    snakemake(repo, "final", "-n", "--config", "profile=smoke", "train={epochs: 4}")
    (second,) = set(profiles.glob("*.yaml")) - {first}
    assert yaml.safe_load(second.read_text())["train"]["epochs"] == 4
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    shutil.rmtree(repo / "results")


@pytest.mark.parametrize("override,key", [
    ("train={epoch: 3}", "epoch"),
    ("train={relocation: {scorin: pass}}", "relocation.scorin"),
    ("train={epochs: many}", "epochs"),
    ("studies={correlation: {datasets: [count], pointz: [0]}}", "pointz"),
    ("resources={train: {gpus: 1}}", "gpus"),
    ("train_by_dataset={digitz: {num_prompts: 3}}", "digitz"),
    ("train_by_dataset={digits: {num_promts: 3}}", "num_promts"),
])
def test_typos_fail_when_the_dag_is_built(repo, override, key):
    """A bad run key or study option fails the dry run, naming the key (not when each job starts)."""
    proc = snakemake(repo, "-n", "--config", "profile=smoke", override, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and key in out, out[-2000:]


# ----------------------------------------------------------------------------- slow: end to end

TABLES = ["accuracy", "accuracy_long", "published", "significance", "selection"]
STUDY_PREFIXES = ["correlation", "timing", "adjustment", "allocators", "rewards"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """A copy of the repository where the smoke profile ran end to end through Snakemake."""
    repo = copy_repo(tmp_path_factory.mktemp("smoke"))
    t0 = time.perf_counter()
    snakemake(repo, "--cores", "2", "--config", "profile=smoke")
    print(f"smoke profile end to end: {time.perf_counter() - t0:.0f} s")
    return repo


def _nothing_to_do(repo: Path) -> bool:
    proc = snakemake(repo, "-n", "--config", "profile=smoke")
    return "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_smoke_every_table_and_figure(smoke):
    tables, figures = smoke / "results/smoke/tables", smoke / "results/smoke/figures"
    csvs = sorted(tables.glob("*.csv"))
    stems = {p.stem for p in csvs}
    assert set(TABLES) <= stems, sorted(stems)
    for prefix in STUDY_PREFIXES:
        assert any(s.startswith(prefix) for s in stems), f"no {prefix} table in {sorted(stems)}"
    for csv in csvs:
        lines = csv.read_text().strip().splitlines()
        assert len(lines) >= 2 and len(lines[0].split(",")) >= 2, f"{csv.name}: {lines[:3]}"
        for ext in (".md", ".tex") if csv.stem != "curves" else ():  # curves.csv: DVC's plot data only
            twin = csv.with_suffix(ext)
            assert twin.is_file() and twin.stat().st_size > 50, twin
    summary = json.loads((tables / "summary.json").read_text())
    assert summary["methods"], summary

    pngs = sorted(figures.glob("*.png"))
    names = {p.stem for p in pngs}
    for prefix in ["accuracy_by_method", "training_curves", "final_distributions", "distribution_over_epochs",
                   *STUDY_PREFIXES]:
        assert any(n.startswith(prefix) for n in names), f"no {prefix} figure in {sorted(names)}"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
        pdf = png.with_suffix(".pdf")
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000, pdf


@pytest.mark.slow
def test_smoke_html_report(smoke):
    snakemake(smoke, "--config", "profile=smoke", "--report", "report.html")
    html = (smoke / "report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "accuracy" in html


@pytest.mark.slow
def test_smoke_timestamps_do_not_rerun(smoke):
    """`dvc pull`/checkout re-dates files: nothing reruns (checksums of the inputs, recorded in
    Snakemake's metadata); in a workspace without that metadata (a fresh clone), after the
    documented `snakemake --touch`."""
    assert _nothing_to_do(smoke)
    files = [p for d in ("data", "results") for p in (smoke / d).rglob("*") if p.is_file()]
    rng = random.Random(0)

    def redate():  # random order of modification times, inputs newer than outputs included
        now = time.time()
        for p in files:
            t = now - rng.uniform(0, 3600)
            os.utime(p, (t, t))

    redate()
    assert _nothing_to_do(smoke)
    shutil.move(smoke / ".snakemake", smoke / "snakemake-metadata")
    try:
        redate()
        proc = snakemake(smoke, "-n", "--config", "profile=smoke")
        assert "snakemake --touch" in proc.stderr  # the hint
        snakemake(smoke, "--touch", "--cores", "1", "--config", "profile=smoke")
        assert _nothing_to_do(smoke)
    finally:
        shutil.rmtree(smoke / ".snakemake", ignore_errors=True)
        shutil.move(smoke / "snakemake-metadata", smoke / ".snakemake")


@pytest.mark.slow
def test_smoke_profile_edits_rerun_what_they_touch(smoke):
    """Editing the profile reruns the jobs it concerns and everything downstream, nothing else."""
    cases = [
        # (the allocators study trains under the final protocol: its runs rerun too)
        ("final={overrides: {eval_every: 2}}", {"final_seeds": 2 * M, "study_variant": SMOKE_VARIANTS, "report": 1,
                                                "all": 1}),
        # (smoke's search runs take their epochs from search.overrides: their configuration is unchanged)
        ("train={epochs: 3}", {"final_seeds": 2 * M, "study": 4, "study_variant": SMOKE_VARIANTS, "report": 1,
                               "all": 1}),
        ("search={overrides: {epochs: 1}}", {"search_pack": 2 * M, "search_grid": 2 * M, "select": 2 * M, "final_seeds": 2 * M,
                                             "study": 4, "study_variant": SMOKE_VARIANTS, "report": 1, "all": 1}),
    ]
    for override, expected in cases:
        proc = snakemake(smoke, "-n", "--config", "profile=smoke", override)
        assert job_counts(proc.stdout) == expected, override
    assert _nothing_to_do(smoke)


@pytest.mark.slow
def test_smoke_lost_run_is_redone_alone(smoke):
    """A finished run that lost its metrics.json is the only training job to rerun (with the
    report forced, as docs/pipeline.md says); it resumes its folder from the last checkpoint and
    ends with the same metrics."""
    victim = smoke / "results/smoke/runs/final/count/pro-vpt/seed18/metrics.json"
    before = json.loads(victim.read_text())
    victim.unlink()
    assert _nothing_to_do(smoke)  # Snakemake semantics: the report is there, nothing asks for the run
    counts = job_counts(snakemake(smoke, "-n", "--forcerun", "report", "--config", "profile=smoke").stdout)
    assert counts == {"final_seeds": 1, "report": 1, "all": 1}
    snakemake(smoke, "--cores", "2", "--forcerun", "report", "--config", "profile=smoke")
    after = json.loads(victim.read_text())
    assert after["eval"] == before["eval"] and after["distribution"] == before["distribution"]
    assert _nothing_to_do(smoke)


@pytest.mark.slow
def test_pro_vpt_on_a_24_block_backbone_through_the_workflow(tmp_path):
    """The smoke profile on one task and PRO-VPT alone, its backbone 24 blocks deep (ViT-L/16's
    depth, at toy width): pretraining, search, selection, final run and report follow the depth, and
    the distribution figures have a row per block."""
    repo = copy_repo(tmp_path / "repo")
    snakemake(repo, "--cores", "2", "--config", "profile=smoke", "datasets=[count]", "methods=[pro-vpt]",
              "train={backbone_kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 24, num_heads: 2}}",
              "studies={allocators: {datasets: []}}")
    res = repo / "results/smoke"
    metrics = json.loads((res / "runs/final/count/pro-vpt/seed18/metrics.json").read_text())
    assert len(metrics["distribution"]) == 24 and sum(metrics["distribution"]) == 24 * metrics["prompts_per_block"]
    moves = [json.loads(line) for line in (res / "runs/final/count/pro-vpt/seed18/moves.jsonl").read_text().splitlines()]
    assert moves and all(0 <= m["source"] < 24 and 0 <= m["target"] < 24 for m in moves)
    rows = (res / "runs/final/count/pro-vpt/seed18/distribution.csv").read_text().splitlines()
    assert rows[0].split(",") == ["epoch"] + [f"b{i}" for i in range(24)], rows[0]
    names = {p.stem for p in (res / "figures").glob("*.png")}
    for prefix in ("final_distributions", "distribution_over_epochs"):
        assert any(n.startswith(prefix) for n in names), sorted(names)


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
# What a DVC test could leave in the checkout if it ran DVC there by mistake (they run in copies).
DVC_LITTER = ("dvc-store", ".dvc/cache", ".dvc/tmp", ".dvc/config.local", "dvc.lock")


def git_repo(path: Path) -> Path:
    """``path`` as a git repository with everything in it committed."""
    run(["git", "init", "-q"], path)
    run([*GIT, "add", "-A"], path)
    run([*GIT, "commit", "-qm", "snapshot"], path)
    return path


def test_dvc_repro_dry_on_a_fresh_clone(tmp_path):
    """A fresh clone (no data/, no results/, no dvc.lock) shows what `dvc repro` would run."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(git_repo(copy_repo(tmp_path / "repo"))), str(clone)], tmp_path)
    assert not (clone / "data").exists()
    proc = run([str(BIN / "dvc"), "repro", "--dry"], clone)
    assert "Running stage 'pipeline'" in proc.stdout and "snakemake" in proc.stdout, proc.stdout[-2000:]
    assert not (clone / "data").exists() and not (clone / "dvc.lock").exists()


@pytest.fixture(scope="module")
def dvc_smoke(smoke) -> Path:
    """The smoke copy as a git repository with the smoke profile run through `dvc repro` (its stage
    runs Snakemake, which finds the runs done and rebuilds the report) and the outputs cached."""
    params = smoke / "params/repro.yaml"
    text, n = re.subn(r"(?m)^profile: .*$", "profile: smoke", params.read_text())
    assert n == 1, f"{params}: no `profile:` line"
    params.write_text(text)
    git_repo(smoke)
    t0 = time.perf_counter()
    first = run([str(BIN / "dvc"), "repro"], smoke)
    print(f"dvc repro of the smoke profile (Snakemake finds the jobs done): {time.perf_counter() - t0:.0f} s")
    assert "Running stage 'pipeline'" in first.stdout, first.stdout[-3000:]
    assert (smoke / "dvc.lock").is_file()
    return smoke


@pytest.mark.slow
def test_dvc_repro(dvc_smoke):
    """A second `dvc repro` does nothing; the metrics come from the report's small git-tracked copy."""
    dvc = str(BIN / "dvc")
    second = run([dvc, "repro"], dvc_smoke)
    assert "Running stage" not in second.stdout, second.stdout[-3000:]
    assert "up to date" in second.stdout.lower() or "didn't change" in second.stdout, second.stdout[-3000:]
    status = run([dvc, "status"], dvc_smoke)
    assert "up to date" in status.stdout.lower(), status.stdout
    metrics = run([dvc, "metrics", "show", "--json"], dvc_smoke)
    assert "metrics/summary.json" in metrics.stdout, metrics.stdout[-2000:]


@pytest.mark.slow
def test_dvc_push_fresh_clone_pull(dvc_smoke, tmp_path):
    """Push to the default remote (dvc-store/ in the checkout), commit, clone: the clone shows the
    metrics from git alone and its `dvc repro --dry` works without data; `dvc pull` (the remote
    pointed at the first checkout's store, as on another machine) brings data and checkpoints as
    files of their own, not links into the read-only cache; after the README's one `snakemake
    --touch`, `dvc status` is clean and Snakemake has nothing to do. Nothing lands in the checkout."""
    dvc = str(BIN / "dvc")
    litter = {p: (ROOT / p).exists() for p in DVC_LITTER}
    t0 = time.perf_counter()
    assert "dvc-store" in run([dvc, "remote", "list"], dvc_smoke).stdout
    run([dvc, "push"], dvc_smoke)
    assert (dvc_smoke / "dvc-store/files/md5").is_dir()
    run([*GIT, "add", "-A"], dvc_smoke)
    run([*GIT, "commit", "-qm", "smoke results"], dvc_smoke)
    tracked = run(["git", "ls-files", "results"], dvc_smoke).stdout.split()
    assert tracked == ["results/smoke/metrics/curves.csv", "results/smoke/metrics/summary.json"], tracked
    assert not run(["git", "ls-files", "data", "dvc-store"], dvc_smoke).stdout

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(dvc_smoke), str(clone)], tmp_path)
    assert not (clone / "results/smoke/runs").exists() and not (clone / "data").exists()
    shown = run([dvc, "metrics", "show", "--json"], clone).stdout  # no cache needed
    assert "metrics/summary.json" in shown and '"error"' not in shown, shown[-2000:]
    dry = run([dvc, "repro", "--dry"], clone)
    assert "Running stage 'pipeline'" in dry.stdout and not (clone / "data").exists(), dry.stdout[-2000:]
    run([dvc, "remote", "modify", "--local", "local", "url", str(dvc_smoke / "dvc-store")], clone)
    run([dvc, "pull"], clone)
    ckpts = list((clone / "results/smoke/runs/final").rglob("*.safetensors"))
    assert ckpts and (clone / "data/smoke").is_dir()
    for f in ckpts[:5]:
        assert f.stat().st_nlink == 1 and os.access(f, os.W_OK), f"{f} is linked into the DVC cache"
    snakemake(clone, "--touch", "--cores", "1", "--config", "profile=smoke")
    status = run([dvc, "status"], clone).stdout
    assert "up to date" in status.lower(), status
    assert _nothing_to_do(clone)
    print(f"dvc push, clone, pull, snakemake --touch, status, dry run: {time.perf_counter() - t0:.0f} s")
    assert {p: (ROOT / p).exists() for p in DVC_LITTER} == litter


def test_one_merge_site_for_cli_study_and_snakemake_jobs(tmp_path_factory, toy_root):
    """A default changed in its one place (RunConfig in provpt/config.py) reaches a CLI run, a study
    run and the run configuration of a Snakemake job: they all resolve through provpt.config."""
    copy = copy_repo(tmp_path_factory.mktemp("default"))
    src = copy / "provpt/config.py"
    text = src.read_text()
    assert "    prompt_dropout: float = 0.1\n" in text
    src.write_text(text.replace("    prompt_dropout: float = 0.1\n", "    prompt_dropout: float = 0.3\n"))
    env = {**ENV, "PYTHONPATH": str(copy)}
    toy = ["dataset=toy", f"data_root={toy_root}", "backbone=vit_tiny_patch16_224", "epochs=1", "num_prompts=1",
           "backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "weights=null"]

    def provpt(*args):
        proc = subprocess.run([str(BIN / "provpt"), *args], cwd=copy, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    provpt("train", "method=vpt-deep", *toy, "out=cli")
    assert yaml.safe_load((copy / "cli/config.yaml").read_text())["prompt_dropout"] == 0.3
    provpt("study", "allocators", "study.variant=thompson", *toy, "out=study")
    assert yaml.safe_load((copy / "study/config.yaml").read_text())["prompt_dropout"] == 0.3
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--config", "profile=smoke"], cwd=copy, env=env,
                          capture_output=True, text=True)
    job = next(line[line.index("provpt final"):] for line in proc.stdout.splitlines() if "provpt final" in line)
    profile = next((copy / "results/smoke/profiles").glob("*.yaml"))
    args = job.split(" > ")[0].replace('"$PROVPT_PROFILE"', str(profile)).split()[2:]
    drop = {"--hparams", "--out"}  # (no selection yet; the folder is the job's)
    args = ["--stage", "final"] + [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]
    assert yaml.safe_load(provpt("config", *args))["prompt_dropout"] == 0.3


def test_slurm_profile_asks_each_rule_for_its_resources(repo, roots):
    """The vtab1k DAG under the slurm profile: GPU rules on the GPU partition with gpu=1 and the
    profile's memory and runtime, the rest on the CPU partition, threads from params/ (nothing in the
    workflow profile caps cores or GPUs for the whole cluster)."""
    default = yaml.safe_load((repo / "profiles/default/config.yaml").read_text())
    assert "cores" not in default and "resources" not in default
    slurm = yaml.safe_load((repo / "profiles/slurm/config.yaml").read_text())
    rules = {"search_pack", "final_seeds", "study", "study_seed", "study_variant"}
    assert set(slurm["set-resources"]) == rules and "cpus_per_task" not in slurm["default-resources"]
    proc = snakemake(repo, "-n", "-p", "--profile", "profiles/slurm", "--cores", "1000", "--config",
                     *paths_config("vtab1k", roots))
    seen = {}
    for block in proc.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        res = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", block).group(1).split(", "))
        threads = re.search(r" threads=(\d+) ", block)
        seen.setdefault(rule, (res, threads and int(threads.group(1))))
    for rule in ("search_pack", "final_seeds", "study", "study_variant"):
        res, threads = seen[rule]
        assert res["slurm_partition"] == "<gpu-partition>" and res["gpu"] == "1", (rule, res)
        runtime = "720" if rule.startswith("study") else "240"
        assert (res["mem_mb"], res["runtime"], threads) == ("32000", runtime, 4), (rule, res, threads)
    res, _ = seen["prepare"]
    assert res["slurm_partition"] == "<cpu-partition>" and res.get("gpu", "0") == "0"


def test_search_packs_and_final_jobs_ask_for_their_projected_time(repo, roots):
    """fgvc under the slurm profile: a search pack's and a final job's `runtime` is its projected work
    (provpt.plan.job_minutes) with the margin, at least resources.train.runtime (480), at most
    max_runtime; a retry asks for it once more (attempt 2 is not shown by a dry run)."""
    from provpt.config import read_profile
    from provpt.plan import job_minutes
    from provpt.protocol import search_packs

    proc = snakemake(repo, "-n", "-p", "--profile", "profiles/slurm", "--config", *paths_config("fgvc", roots),
                     "resources={train: {max_runtime: 1200}}")
    runtime = {}
    for block in proc.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        if rule in ("search_pack", "final_seeds"):
            out = re.search(r"output: (\S+)", block).group(1)
            runtime[out] = int(re.search(r"runtime=(\d+)", block).group(1))
    prof = read_profile(repo / "params/fgvc.yaml")
    expect = job_minutes(search_packs(prof, "nabirds", "vpt-deep", "x")[0], 480)  # (public split sizes)
    assert 480 < expect < 1200
    assert runtime["results/fgvc/runs/search/nabirds/vpt-deep/pack0.json"] == expect
    assert runtime["results/fgvc/runs/search/nabirds/pro-vpt/pack3.json"] == 1200  # 16 h projected: capped
    assert runtime["results/fgvc/runs/search/oxford_flowers/full/pack0.json"] == 480  # the floor
    assert len([o for o in runtime if "/search/" in o]) == 5 * 68


# ----------------------------------------------------------------------------- a real SLURM


SLURM_RESOURCES = ("resources={train: {threads: 1, gpu: 1, mem_mb: 1000, runtime: 30},"
                   " study: {threads: 1, gpu: 1, mem_mb: 1200, runtime: 20},"
                   " prepare: {threads: 1, mem_mb: 1500, runtime: 15}, pretrain: {threads: 2, mem_mb: 3000, runtime: 40}}")
# What each rule's job must have been given by SLURM under SLURM_RESOURCES and the slurm profile:
# partition, CPUs, memory, time limit, GPUs.
SLURM_EXPECTED = {
    "prepare": ("cpu", "1", "1500M", "00:15:00", None),
    "pretrain": ("cpu", "2", "3000M", "00:40:00", None),
    "search_pack": ("gpu", "1", "1000M", "00:30:00", "gres:gpu:1"),
    "final_seeds": ("gpu", "1", "1000M", "00:30:00", "gres:gpu:1"),
}


def slurm_profile_for_test(repo: Path) -> Path:
    """profiles/slurm as the README says to fill it in: the placeholders become this
    cluster's partitions, `slurm_account` goes (a cluster without accounts), and job status comes
    from squeue (no slurmdbd here). Only the first status check is made sooner."""
    text = (repo / "profiles/slurm/config.yaml").read_text()
    text = text.replace("<cpu-partition>", "cpu").replace("<gpu-partition>", "gpu")
    text = "\n".join(line for line in text.splitlines() if "slurm_account:" not in line)
    text += "\nslurm-status-command: squeue\nslurm-init-seconds-before-status-checks: 2\n"
    dest = repo / "profiles-test/slurm"
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(text)
    assert "<" not in yaml.safe_dump(yaml.safe_load(text)), text
    return dest


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurm_cluster import SlurmCluster, missing_binaries

    why = (f"{missing_binaries()} not installed" if missing_binaries() else
           "not root" if os.geteuid() != 0 else None)
    if why:
        if os.environ.get("PROVPT_REQUIRE_SLURM"):
            pytest.fail(f"PROVPT_REQUIRE_SLURM is set but a SLURM test cluster cannot start here: {why}")
        pytest.skip(f"single-node SLURM: {why} (apt-get install slurm-wlm munge, as root)")
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), mem_mb=12000, gpus=2) as cluster:
        yield cluster


def test_slurm_job_output_stays_in_the_cluster_folder(slurm, tmp_path):
    """sbatch without --output writes slurm-<id>.out where it was called from, which in a test is
    easily the checkout: the test cluster sends such output to its own folder (SBATCH_OUTPUT)."""
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run(["sbatch", "--parsable", "--wrap", "echo $SLURM_JOB_ID $SLURM_PROCID"], cwd=work,
                         env=slurm.env, capture_output=True, text=True, check=True).stdout
    job_id = out.strip().split(";")[0]
    log = slurm.job_output / f"slurm-{job_id}.out"
    t0 = time.monotonic()
    while not (log.is_file() and log.read_text().strip()) and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    assert log.read_text().split() == [job_id, "0"]
    assert not list(work.iterdir()), list(work.iterdir())


def test_smoke_final_runs_through_a_real_slurm(smoke, slurm, tmp_path):
    """The smoke profile's final runs of one task (and every job they need) submitted through the
    executor plugin to a single-node SLURM: each job ran as a SLURM job on its rule's partition with
    its CPUs, memory, time limit and GPUs, and the results equal the local run's."""
    repo = copy_repo(tmp_path / "repo")
    profile = slurm_profile_for_test(repo)
    methods = yaml.safe_load((repo / "params/mini.yaml").read_text())["methods"]
    targets = [f"results/smoke/runs/final/digits/{m}/seed18/metrics.json" for m in methods]
    env = {**ENV, **{k: v for k, v in slurm.env.items() if k in ("SLURM_CONF", "SBATCH_OUTPUT")}}
    stray = set(ROOT.glob("slurm-*.out"))
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "snakemake"), "--profile", str(profile), *targets, "--config", "profile=smoke",
                           SLURM_RESOURCES], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    print(f"smoke final runs of one task through SLURM: {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not list(repo.glob("slurm-*.out")) and set(ROOT.glob("slurm-*.out")) == stray

    jobs = [j for j in slurm.jobs() if j.get("WorkDir") == str(repo)]
    by_rule = {}
    for job in jobs:
        rule = re.match(r"rule_(.+?)(_wildcards_.*)?$", job["Comment"]).group(1)
        by_rule.setdefault(rule, []).append(job)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job
        partition, cpus, mem, limit, gres = SLURM_EXPECTED[rule]
        got = (job["Partition"], job["NumCPUs"], job["MinMemoryNode"], job["TimeLimit"], job.get("TresPerJob"))
        assert got == (partition, cpus, mem, limit, gres), (rule, got)
    counts = {rule: len(js) for rule, js in by_rule.items()}
    assert counts == {"prepare": 1, "pretrain": 1, "search_pack": len(methods), "final_seeds": len(methods)}, counts

    for target in targets:
        here, local = (json.loads((root / target).read_text()) for root in (repo, smoke))
        for key in ("lr", "weight_decay", "weights_sha256", "data_manifest_sha256", "eval", "train_loss", "distribution"):
            assert here[key] == local[key], (target, key, here[key], local[key])
