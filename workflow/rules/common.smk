# The profile, its validation, the paths and the grid. Pure Python (no torch): the DAG of the full
# vtab1k profile builds in seconds.

import hashlib
import json
import os
import shlex
import sys
from functools import cache
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir).parent))  # provpt.config from this checkout
# Jobs call the `provpt` of the Python that runs snakemake (a .venv need not be activated);
# with --use-conda the job's environment comes first.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
from provpt.config import ConfigError, apply_overrides, deep_merge, load_profile, parse_value


# ----------------------------------------------------------------------------- the profile

PROFILE = str(config.get("profile", "mini"))
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
SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
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
        known = ", ".join(sorted(p.stem for p in Path("params").glob("*.yaml") if p.stem not in ("base", "repro")))
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
    merged = deep_merge(prof, over)
    merged["profile"] = PROFILE
    validate(merged, SCHEMA)  # (also fills the schema's defaults)
    return merged


P = _load()
DATASETS = list(P["datasets"])
METHODS = list(P["methods"])
SEEDS = list(P["seeds"])
FORMAT = P["data"]["format"]
TRAIN = P["train"]
RESOURCES = P["resources"]

RES = f"results/{PROFILE}"
RUNS = f"{RES}/runs"
LOGS = f"{RES}/logs"
BENCH = f"{RES}/benchmarks"
DATA_ROOT = TRAIN["data_root"]
MANIFEST = f"{DATA_ROOT}/{{dataset}}/manifest.json"
# mini/smoke pretrain their backbone (an output of this workflow); vtab1k/fgvc read a local file.
BACKBONE = TRAIN["weights"] if FORMAT == "mini" else None

# Every provpt command reads the same profile: the merged one (base chain, --config overrides,
# schema defaults), written next to the results whenever its content changes. One fixed path:
# an override reruns the jobs whose `cfg` hash it changes, not every job.
PROFILE_FILE = f"{RES}/profile.yaml"
_text = f"# {PROFILE}: params/{PROFILE}.yaml merged with its base and the --config overrides (generated)\n"
_text += yaml.safe_dump(P, sort_keys=False)
if not Path(PROFILE_FILE).is_file() or Path(PROFILE_FILE).read_text() != _text:
    Path(PROFILE_FILE).parent.mkdir(parents=True, exist_ok=True)
    Path(PROFILE_FILE).write_text(_text)


# ----------------------------------------------------------------------------- the grid


def fmt(x):
    """How a number appears in a folder name: 2.5, 0.0001, 0, 50."""
    return f"{float(x):g}"


@cache
def train_cfg(method):
    """The profile's train section as `provpt train` sees it for this method."""
    return apply_overrides(TRAIN, (P.get("train_by_method") or {}).get(method, {}))


@cache
def lrs(method):
    """The lrs of a method's search as they appear in folder names: its own list (search.by_method)
    or the common one, times batch_size / lr_base_batch (the authors' lr x batch/256): the lr used."""
    s = P["search"]
    grid = (s.get("by_method") or {}).get(method, {}).get("lr", s["lr"])
    scale = train_cfg(method)["batch_size"] / s["lr_base_batch"] if s.get("lr_base_batch") else 1.0
    return [fmt(lr * scale) for lr in grid]


WDS = [fmt(wd) for wd in P["search"]["weight_decay"]]  # one list for all methods


def search_runs(dataset, method):
    return [f"{RUNS}/search/{dataset}/{method}/lr{lr}_wd{wd}/metrics.json" for lr in lrs(method) for wd in WDS]


def search_targets():
    return [f for d in DATASETS for m in METHODS for f in search_runs(d, m)]


def selection_targets():
    return [f"{RES}/selection/{d}/{m}.json" for d in DATASETS for m in METHODS]


def final_targets():
    return [f"{RUNS}/final/{d}/{m}/seed{s}/metrics.json" for d in DATASETS for m in METHODS for s in SEEDS]


def study_targets():
    out = []
    for name, s in P.get("studies", {}).items():
        for d in s.get("datasets", []):
            if s.get("seeds"):
                out += [f"{RES}/studies/{name}/{d}/seed{k}/summary.json" for k in s["seeds"]]
            else:
                out.append(f"{RES}/studies/{name}/{d}/summary.json")
    return out


def prepared_data():
    return [MANIFEST.format(dataset=d) for d in DATASETS] + ([BACKBONE] if BACKBONE else [])


# ----------------------------------------------------------------------------- job helpers

# Keys that change where or how fast a job runs, not what it computes: not part of the params hash.
RUNTIME_KEYS = {"threads", "device", "progress", "compile", "out", "data_root", "weights"}


def digest(*parts):
    """Short content hash of profile sections, a job's `params: cfg=`: editing the profile reruns
    the jobs whose hash covers the edit (rerun trigger `params`), and what depends on them."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _section(name, drop=()):
    return {k: v for k, v in (P.get(name) or {}).items() if k not in drop}


DIGEST = {"data": digest(_section("data", {"source"}), _section("mini", {"fmnist_dir"}),
                         _section("pretrain", {"threads", "progress"}) if BACKBONE else None,
                         {k: TRAIN.get(k) for k in ("backbone", "backbone_kwargs")})}
# (the grid's lists and the seeds say which jobs exist, not what one computes)
DIGEST["search"] = digest(DIGEST["data"], _section("train", RUNTIME_KEYS), P.get("train_by_method"),
                          _section("search", {"lr", "weight_decay", "by_method", "lr_base_batch"}))
DIGEST["final"] = digest(DIGEST["search"], P["final"])
DIGEST.update({f"study:{name}": digest(DIGEST["search"], {k: v for k, v in st.items() if k not in ("datasets", "seeds")})
               for name, st in P.get("studies", {}).items()})
DIGEST["report"] = digest(DIGEST["final"], P.get("studies"), P.get("groups"))


def kv(overrides):
    """{a: {b: 1}} -> "a.b=1", values as JSON (valid YAML for provpt), shell-quoted."""

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return " ".join(shlex.quote(f"{k}={json.dumps(v)}") for k, v in flat(overrides or {}))


# What a training or study job reads: the prepared dataset and (mini) the pretrained backbone.
RUN_INPUTS = [MANIFEST] + ([BACKBONE] if BACKBONE else [])


def study_inputs(w):
    inputs = {"data": [f.format(dataset=w.dataset) for f in RUN_INPUTS]}
    method = P["studies"][w.study].get("hparams")
    if method:
        inputs["hparams"] = f"{RES}/selection/{w.dataset}/{method}.json"
    return inputs


def study_args(w, input):
    seed = [f"seed={w.seed}"] if hasattr(w, "seed") else []
    return " ".join(seed + ([f"hparams={input.hparams}"] if "hparams" in input.keys() else []))


def job_resources(kind):
    r = RESOURCES[kind]
    return {"gpu": r.get("gpu", 0), "mem_mb": r.get("mem_mb", 4000), "runtime": r.get("runtime", 60)}


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


if groups_unknown := sorted({d for ds in (P.get("groups") or {}).values() for d in ds} - set(DATASETS)):
    raise WorkflowError(f"profile {PROFILE}: groups name datasets not in `datasets`: {groups_unknown}")
for _name, _study in P.get("studies", {}).items():
    if _bad := sorted(set(_study.get("datasets", [])) - set(DATASETS)):
        raise WorkflowError(f"profile {PROFILE}: studies.{_name}.datasets {_bad} not in `datasets`")
    if _study.get("hparams") and _study["hparams"] not in METHODS:
        raise WorkflowError(f"profile {PROFILE}: studies.{_name}.hparams={_study['hparams']!r} not in `methods`")

# Raw data and weights are needed only while something is left to compute (a DVC-pulled
# results folder builds its report without them).
RAW_FILES = {"vtab": ["train800.txt", "val200.txt", "train800val200.txt", "test.txt"],
             "fgvc": ["train.json", "val.json", "test.json"]}
if FORMAT in RAW_FILES:
    _todo = [d for d in DATASETS if not Path(MANIFEST.format(dataset=d)).is_file()]
    if _todo:
        _src = P["data"].get("source")
        if not _src or not Path(_src).is_dir():
            raise _missing("data.source", _src, f"{FORMAT} data root")
        for _d in _todo:
            for _f in RAW_FILES[FORMAT]:
                if not (Path(_src) / _d / _f).is_file():
                    raise _missing("data.source", _src, f"{_d}/{_f} under the {FORMAT} data root")
    if not TRAIN.get("weights") or not Path(TRAIN["weights"]).is_file():
        if not all(Path(f).is_file() for f in final_targets() + study_targets()):
            raise _missing("train.weights", TRAIN.get("weights"), "backbone weights file")
