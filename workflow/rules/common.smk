# The job environment, the profile, its validation, the paths and the grid. Pure Python (no
# torch): the DAG of the full vtab1k profile builds in seconds.

import hashlib
import json
import os
import re
import sys
from functools import cache
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(workflow.basedir)  # the directory of the Snakefile: the repository root
sys.path.insert(0, str(REPO))  # provpt.config from this checkout
# Jobs call the `provpt` of the Python that runs snakemake (a .venv need not be activated);
# with --use-conda the job's environment comes first.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
from provpt.config import (STUDIES, SUBSET_KEYS, ConfigError, deep_merge, load_profile, parse_value, profile_names,
                           resolve, restrict_profile, search_grid, search_prompts)
from provpt.plan import job_minutes
from provpt.protocol import pack_size, packs_of, search_configs
from provpt.studies import parse_overrides, study_jobs


# ----------------------------------------------------------------------------- the job environment

# With --use-conda every job runs in workflow/envs/provpt.yaml: Python and pip from conda, then
# requirements.txt (the one list of pins) and this checkout by pip. Snakemake tells environments
# apart by the content of their file (an env's folder .snakemake/conda/<hash> and the software-env
# rerun trigger both hash it), and a `-r requirements.txt` line hides a changed pin from that hash.
# So the jobs get the env file with its requirement files written out in it, stored under a name
# from its content: a changed pin is a new file, hence a new environment. `-e <path>` becomes
# absolute, so the file works from wherever Snakemake or conda copies it.
ENV_TEMPLATE = REPO / "workflow" / "envs" / "provpt.yaml"
_PIP_FILE = ("-r ", "--requirement ")
_PIP_EDITABLE = ("-e ", "--editable ")


def pip_requirements(path):
    """The lines of a pip requirements file with `-r` files expanded, comments and blanks dropped."""
    lines = []
    for line in Path(path).read_text().splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line.startswith(_PIP_FILE):
            lines += pip_requirements(Path(path).parent / line.split(None, 1)[1])
        elif line:
            lines.append(line)
    return lines


def _pip_line(item, base):
    if item.startswith(_PIP_FILE):
        return pip_requirements(base / item.split(None, 1)[1])
    if item.startswith(_PIP_EDITABLE):
        flag, path = item.split(None, 1)
        return [f"{flag} {(base / path).resolve()}"]
    return [item]


@cache
def conda_env_file():
    """Path of ENV_TEMPLATE with its pip requirement files written out, under .snakemake/provpt/envs/
    and named by its content (written once per content; Snakemake reads it when it builds the DAG,
    with or without --use-conda, but its hash decides reruns only with --use-conda)."""
    env = yaml.safe_load(ENV_TEMPLATE.read_text())
    deps = [{"pip": [line for item in dep["pip"] for line in _pip_line(item, ENV_TEMPLATE.parent)]}
            if isinstance(dep, dict) and "pip" in dep else dep for dep in env["dependencies"]]
    text = ("# Generated from workflow/envs/provpt.yaml and requirements.txt (edit those) by\n"
            "# workflow/rules/common.smk: every pip requirement written out, so that the pins are part\n"
            "# of the content Snakemake hashes.\n")
    text += yaml.safe_dump({**env, "dependencies": deps}, sort_keys=False)
    path = Path(".snakemake", "provpt", "envs", f"provpt-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path.resolve())


def conda_env(wildcards):
    """Every rule's `conda:` (see conda_env_file)."""
    return conda_env_file()


# ----------------------------------------------------------------------------- the profile

PROFILE = str(config.get("profile", "quick"))  # make run's default (Makefile PROFILE)
# Short --config names for the paths a user points somewhere else. Any top-level profile key
# also works, merged into the profile: `--config train='{epochs: 5}'`, or a YAML file of
# overrides with `--configfile my.yaml`.
ALIASES = {
    "source": ("data", "source"),
    "vtab_root": ("data", "source"),
    "fgvc_root": ("data", "source"),
    "weights": ("train", "weights"),
    "fmnist_dir": ("mini", "fmnist_dir"),
    "device": ("train", "device"),
}
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
TOP_KEYS = set(yaml.safe_load(SCHEMA.read_text())["properties"]) - {"profile"}


def _typed(value):
    """--config values of mappings arrive as strings: read them as YAML scalars."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return parse_value(value) if isinstance(value, str) else value


def _load():
    path = Path("params") / f"{PROFILE}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Path("params").glob("*.yaml") if p.stem not in ("base", "paper", "repro")))
        raise WorkflowError(f"--config profile={PROFILE}: {path} not found (profiles: {known})")
    try:
        prof = load_profile(path)
    except ConfigError as e:
        raise WorkflowError(str(e)) from None
    unknown = sorted(k for k in config if k != "profile" and k not in ALIASES and k not in TOP_KEYS)
    if unknown:
        raise WorkflowError(
            f"--config {', '.join(unknown)}: unknown key(s); use profile=<name>, {', '.join(ALIASES)}"
            f" or a profile section ({', '.join(sorted(TOP_KEYS))})"
        )
    over = {}
    for key, value in config.items():
        if key in ALIASES:
            section, name = ALIASES[key]
            over = deep_merge(over, {section: {name: _typed(value)}})
        elif key != "profile":
            over = deep_merge(over, {key: _typed(value)})
    # datasets/methods/seeds (command line, --configfile, or a profile narrowing its base's lists)
    # cut every per-dataset and per-method section to the choice (provpt.config.restrict_profile).
    try:
        merged, notes = restrict_profile(deep_merge(prof, {k: v for k, v in over.items() if k not in SUBSET_KEYS}),
                                         **{k: over.get(k) for k in SUBSET_KEYS}, known=profile_names(path))
    except ConfigError as e:
        raise WorkflowError(f"profile {PROFILE}: {e}") from None
    if notes and workflow.is_main_process:
        print(f"provpt: profile {PROFILE} on a subset:\n  " + "\n  ".join(notes), file=sys.stderr)
    merged["profile"] = PROFILE
    validate(merged, SCHEMA)  # (also fills the schema's defaults)
    return merged


P = _load()
DATASETS = list(P["datasets"])
METHODS = list(P["methods"])
SEEDS = list(P["seeds"])
FORMAT = P["data"]["format"]
RESOURCES = P["resources"]


def _resolved(what, fn, *args, **kwargs):
    """A run configuration through provpt.config.resolve; a bad key fails the DAG, naming it."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        raise WorkflowError(f"profile {PROFILE}: {what}: {e}") from None


BASE = _resolved("train", resolve, P)  # the profile's train section, resolved (no method, no stage)
RES = f"results/{PROFILE}"
RUNS = f"{RES}/runs"
LOGS = f"{RES}/logs"
BENCH = f"{RES}/benchmarks"
DATA_ROOT = BASE.data_root
MANIFEST = f"{DATA_ROOT}/{{dataset}}/manifest.json"
# mini/smoke pretrain their backbone (an output of this workflow); vtab1k/fgvc read a local file.
BACKBONE = BASE.weights if FORMAT == "mini" else None

# Every provpt command reads the same profile: the merged one (base chain, --config overrides,
# schema defaults), written under a name that is its content hash. A dry run, --lint or another
# --config never changes a file a queued job reads. Jobs find it as $PROVPT_PROFILE (an envvar, not
# a param: a new profile reruns only the jobs whose `cfg` hash it changes); a cluster job, which
# parses this file again on its node, keeps the profile the main process submitted it with.
_text = f"# {PROFILE}: params/{PROFILE}.yaml merged with its base and the --config overrides (generated)\n"
_text += yaml.safe_dump(P, sort_keys=False)
PROFILE_FILE = f"{RES}/profiles/{hashlib.sha256(_text.encode()).hexdigest()[:12]}.yaml"
if not Path(PROFILE_FILE).is_file():
    Path(PROFILE_FILE).parent.mkdir(parents=True, exist_ok=True)
    _tmp = Path(f"{PROFILE_FILE}.{os.getpid()}.tmp")
    _tmp.write_text(_text)
    os.replace(_tmp, PROFILE_FILE)
if workflow.is_main_process or not os.environ.get("PROVPT_PROFILE"):
    os.environ["PROVPT_PROFILE"] = PROFILE_FILE


# ----------------------------------------------------------------------------- the grid


@cache
def lrs(method):
    """A method's search lrs as they appear in folder names (provpt.config.search_grid)."""
    return _resolved(f"search grid of {method}", search_grid, P, method)[0]


WDS = _resolved("search grid", search_grid, P, METHODS[0])[1]  # one list for all methods


def search_runs(dataset, method):
    lengths = _resolved(f"search.num_prompts of {method}", search_prompts, P, method)
    return [f"{RUNS}/search/{dataset}/{method}/lr{lr}_wd{wd}{'' if t is None else f'_T{t}'}/metrics.json"
            for lr in lrs(method) for wd in WDS for t in lengths]


def search_targets():
    return [f"{RUNS}/search/{d}/{m}/search.json" for d in DATASETS for m in METHODS]


def selection_targets():
    return [f"{RES}/selection/{d}/{m}.json" for d in DATASETS for m in METHODS]


def final_targets():
    return [f"{RUNS}/final/{d}/{m}/seed{s}/metrics.json" for d in DATASETS for m in METHODS for s in SEEDS]


def study_path(name, job):
    """results/<profile>/studies/<name>/<dataset>[/<variant>][/seed<k>]"""
    path = Path(RES, "studies", name, job["dataset"], job.get("variant") or "")
    return str(path / f"seed{job['seed']}" if "seed" in job else path)


STUDY_JOBS = {name: _resolved(f"studies.{name}", study_jobs, P, name) for name in P.get("studies", {})}


def study_targets():
    return [f"{study_path(name, job)}/summary.json" for name, jobs in STUDY_JOBS.items() for job in jobs]


def prepared_data():
    return [MANIFEST.format(dataset=d) for d in DATASETS] + ([BACKBONE] if BACKBONE else [])


# ----------------------------------------------------------------------------- job configurations

# Keys that change where or how fast a job runs, not what it computes: not part of the params hash.
RUNTIME_KEYS = {"threads", "device", "progress", "compile", "out", "data_root", "weights", "keep", "pack_chunk"}


def digest(*parts):
    """Short content hash, a job's `params: cfg=`: editing the profile reruns the jobs whose resolved
    configuration it changes (rerun trigger `params`), and what depends on them."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _what(cfg):
    # (cfg.to_dict() without its deep copy: the same JSON, 20x faster over the ~4,000 search runs of vtab1k)
    return {k: dict(vars(v)) if k == "relocation" else v for k, v in vars(cfg).items() if k not in RUNTIME_KEYS}


@cache
def search_cfgs(dataset, method, lr):
    root = f"{RUNS}/search/{dataset}/{method}"
    return _resolved(f"search {dataset}/{method}", search_configs, P, dataset, method, root, [float(lr)])


@cache
def final_cfg(dataset, method, seed):
    return _resolved(f"final {dataset}/{method}", resolve, P, method, "final", {"dataset": dataset, "seed": int(seed)})


def _section(name, drop=()):
    return {k: v for k, v in (P.get(name) or {}).items() if k not in drop}


DATA_DIGEST = digest(_section("data", {"source"}), _section("mini", {"fmnist_dir"}),
                     _section("pretrain", {"threads", "progress"}) if BACKBONE else None,
                     BASE.backbone, BASE.backbone_kwargs)
# Validate every job's run configuration now, not when the job starts.
for _d in DATASETS:
    for _m in METHODS:
        for _lr in lrs(_m):
            search_cfgs(_d, _m, _lr)
        for _s in SEEDS:
            final_cfg(_d, _m, _s)
STUDY_OPTIONS = {name: _resolved(f"studies.{name}", parse_overrides, P, [], name)[0] for name in STUDY_JOBS}


def job_digest(kind):
    """`params: cfg=` of a rule, from the resolved configuration of its job."""
    if kind == "search_pack":
        return lambda w: digest(DATA_DIGEST, [_what(c) for c in search_packs(w.dataset, w.method)[int(w.pack)]])
    if kind == "final":
        return lambda w: digest(DATA_DIGEST, [_what(final_cfg(w.dataset, w.method, s)) for s in SEEDS])
    if kind == "study":  # a study's runs: the train section, and the protocol stage its options name
        # (not which datasets, seeds or variants the study lists: a subset run's jobs are the full run's)
        return lambda w: digest(DATA_DIGEST, _what(BASE), P.get("train_by_method"),
                                (P.get("train_by_dataset") or {}).get(w.dataset),
                                {k: v for k, v in P["studies"][w.study].items() if k not in ("datasets", "seeds", "variants")},
                                P.get(STUDY_OPTIONS[w.study].get("stage") or "", None))
    if kind == "select":
        return digest(P["search"]["eval_split"])
    if kind == "report":
        return digest(P["final"]["eval_split"], P.get("studies"), P.get("groups"))
    return DATA_DIGEST


# What a training or study job reads: the prepared dataset and (mini) the pretrained backbone.
RUN_INPUTS = [MANIFEST] + ([BACKBONE] if BACKBONE else [])


def study_inputs(w):
    inputs = {"data": [f.format(dataset=w.dataset) for f in RUN_INPUTS]}
    method = P["studies"][w.study].get("hparams")
    if method:
        inputs["hparams"] = f"{RES}/selection/{w.dataset}/{method}.json"
    return inputs


def study_args(w, input):
    args = [f"seed={w.seed}"] if hasattr(w, "seed") else []
    args += [f"study.variant={w.variant}"] if hasattr(w, "variant") else []
    return " ".join(args + ([f"hparams={input.hparams}"] if "hparams" in input.keys() else []))


def job_resources(kind, runtime=None):
    """A rule's resources from the profile's resources.<kind>; ``runtime``: a function of the job's
    wildcards giving its minutes instead of the profile's (which is then the floor)."""
    r = RESOURCES[kind]
    return {"gpu": r.get("gpu", 0), "mem_mb": r.get("mem_mb", 4000), "runtime": runtime or r.get("runtime", 60)}


@cache
def search_packs(dataset, method):
    """A search grid's run configurations in the packs its jobs train (provpt.protocol.search_packs)."""
    cfgs = [c for lr in lrs(method) for c in search_cfgs(dataset, method, lr)]
    return packs_of(cfgs, _resolved(f"pack.search of {method}", pack_size, P, "search", method))


def search_pack_files(dataset, method):
    return [f"{RUNS}/search/{dataset}/{method}/pack{i}.json" for i in range(len(search_packs(dataset, method)))]


# A training job's time limit: its projected work (provpt.plan.job_minutes) with a margin, at least
# resources.train.runtime, at most resources.train.max_runtime (a cluster's limit); each retry
# (profiles/slurm `retries`) resumes the job's runs where they stopped and gets the limit once more.
def _train_minutes(cfgs, attempt):
    r = RESOURCES["train"]
    if not r.get("gpu"):  # (a CPU job: the projection prices GPUs)
        return attempt * r.get("runtime", 60)
    minutes = attempt * job_minutes(cfgs, r.get("runtime", 60))
    return min(minutes, r["max_runtime"]) if r.get("max_runtime") else minutes


def search_runtime(wildcards, attempt):
    return _train_minutes(search_packs(wildcards.dataset, wildcards.method)[int(wildcards.pack)], attempt)


def final_runtime(wildcards, attempt):
    return _train_minutes([final_cfg(wildcards.dataset, wildcards.method, s) for s in SEEDS], attempt)


# ----------------------------------------------------------------------------- checks at DAG time

if workflow.is_main_process and Path(RUNS).is_dir() and not Path(".snakemake/metadata").is_dir():
    print(
        f"provpt: {RUNS} exists but Snakemake has no metadata here (a fresh clone after `dvc pull`?):"
        f" run `snakemake --touch --config profile={PROFILE}` once so that re-dated files are not recomputed.",
        file=sys.stderr,
    )


def _missing(key, path, what):
    alias = next((a for a, k in ALIASES.items() if ".".join(k) == key), key)
    return WorkflowError(
        f"profile {PROFILE}: {key} = {path!r}: {what} not found.\n"
        f"  Set {key} in params/{PROFILE}.yaml or run with --config {alias}=/path/to/it"
    )


# groups, train_by_dataset and the studies' datasets and hparams name only chosen datasets and
# methods: _load (provpt.config.restrict_profile) cut them, or failed on a name the profile does not know.

# Raw data and weights are needed only while something is left to compute (a DVC-pulled
# results folder builds its report without them). Missing ones are collected, not raised: a dry
# run, --lint or --dag shows the grid with a warning, and a real run stops before its first job
# (onstart below is called only when jobs are about to run, never for -n; --touch needs no data).
RAW_FILES = {"vtab": ["train800.txt", "val200.txt", "train800val200.txt", "test.txt"],
             "fgvc": ["train.json", "val.json", "test.json"]}
MISSING = []
if FORMAT in RAW_FILES:
    _todo = [d for d in DATASETS if not Path(MANIFEST.format(dataset=d)).is_file()]
    if _todo:
        _src = P["data"].get("source")
        if not _src or not Path(_src).is_dir():
            MISSING.append(_missing("data.source", _src, f"{FORMAT} data root"))
        else:
            MISSING += [_missing("data.source", _src, f"{_d}/{_f} under the {FORMAT} data root")
                        for _d in _todo for _f in RAW_FILES[FORMAT] if not (Path(_src) / _d / _f).is_file()][:1]
    if not BASE.weights or not Path(BASE.weights).is_file():
        if not all(Path(f).is_file() for f in final_targets() + study_targets()):
            MISSING.append(_missing("train.weights", BASE.weights, "backbone weights file"))
if MISSING and workflow.is_main_process:
    print("provpt: warning: the jobs below cannot run yet (a dry run only lists them):\n"
          + "\n".join(str(e) for e in MISSING), file=sys.stderr)


onstart:
    if MISSING and not workflow.touch:
        raise MISSING[0]
