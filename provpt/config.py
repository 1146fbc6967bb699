"""Profiles and run configurations.

A *profile* (``params/<name>.yaml``) is a base file plus small overrides (``base: base.yaml``
is deep-merged first). Its ``train`` section holds the defaults of one training run; the
workflow adds ``key=value`` overrides per job (dataset, method, lr, wd, seed, split, out).

This module imports no torch: Snakemake reads profiles through it at DAG construction time.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "pro-vpt", "pro-vpt-exact", "lora", "adapter")
RELOCATING = ("pro-vpt", "pro-vpt-exact")  # the methods whose prompts move (VPT-Deep's start)
# Methods that train only prompts and a head over a frozen backbone: their runs can share one
# backbone and one forward (provpt.train.run_pack); the others train weights inside it.
PACKABLE = ("linear", "vpt-shallow", "vpt-deep", *RELOCATING)
PROMPTED = ("vpt-shallow", "vpt-deep", *RELOCATING)  # methods with prompts: the search's optional length axis
# A method's own run keys, the first layer over RunConfig's defaults. pro-vpt is the authors' method
# as the profile configures it; pro-vpt-exact is ours: the log-gate's exact-removal idleness (online),
# a shortlist of 8 verified by exact removal on 2 probe batches, the moved prompt's own idleness
# change as reward, a PPO update that sees every reward, and its moves in the first half of
# training, 3 per epoch (a moved prompt restarts at 1e-3 of its value and needs epochs to learn
# again; docs/findings.md says why each).
METHOD_DEFAULTS = {
    "pro-vpt-exact": {"relocation": {"idleness": "logit", "verify": 8, "probe_batches": 2, "reward": "move",
                                     "ppo_update": "bandit", "count": 3, "until": 0.5}},
}
STUDIES = ("correlation", "timing", "adjustment", "allocators", "rewards")
STAGES = ("search", "final")
KEEP = ("all", "weights", "metrics")  # retention of a finished run folder (profile `keep: {<stage>: ...}`)


class ConfigError(ValueError):
    """A profile, config file or override that does not fit; the message names the key."""


# ----------------------------------------------------------------------------- profiles


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: profile/config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_profile(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a profile YAML, resolving ``base:`` (relative to the file) recursively."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back on itself")
    data = _read_yaml(path)
    name = data.get("profile", path.stem)
    base = data.pop("base", None)
    if base:
        parent = load_profile(path.parent / base, _seen + (path.resolve(),))
        data = deep_merge(parent, data)
    data["profile"] = name
    return data


# ----------------------------------------------------------------------------- subsets of a profile

SUBSET_KEYS = ("datasets", "methods", "seeds")


def profile_names(path: str | os.PathLike, _seen: tuple = ()) -> dict[str, list]:
    """The datasets, methods and seeds a profile knows: its own lists and those of its ``base:``
    chain (a profile that lists a few tasks of its base still knows the others)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back on itself")
    data = _read_yaml(path)
    names = {key: list(data.get(key) or []) if isinstance(data.get(key), list) else [] for key in SUBSET_KEYS}
    if data.get("base"):
        parent = profile_names(path.parent / data["base"], _seen + (path.resolve(),))
        names = {key: parent[key] + [n for n in names[key] if n not in parent[key]] for key in SUBSET_KEYS}
    return names


def _chosen(key: str, value, known: list) -> list:
    """A subset list as given (a single name is a list of one), checked against the known names."""
    value = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    kind = int if key == "seeds" else str
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
        raise ConfigError(f"{key}={value!r}: expected a non-empty list of {'integers' if kind is int else 'names'}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={value!r}: a name is listed twice")
    if key != "seeds" and (unknown := [v for v in value if v not in known]):
        raise ConfigError(f"{key}: {unknown} not known to the profile{_did_you_mean(unknown, known)}; known: {known}")
    return list(value)


def restrict_profile(profile: dict, datasets=None, methods=None, seeds=None,
                     known: dict | None = None) -> tuple[dict, list[str]]:
    """A merged profile cut to a subset of its datasets, methods and seeds; ``(profile, notes)``.

    ``profile`` is the profile before the choice (params/<name>.yaml with its base chain, other
    overrides merged); the subset is ``datasets``/``methods``/``seeds`` where given (the command
    line's ``--config datasets=[dtd]``), else the profile's own lists (a profile that extends vtab1k
    with ``datasets: [dtd]`` and inherits its 19-task sections). Every section keyed by dataset
    follows: ``groups`` (a group left without a dataset goes), ``train_by_dataset``, each study's
    ``datasets`` and ``seeds``; a study whose ``hparams`` method is left out gets no dataset. ``train_by_method`` stays whole: the
    studies run methods of their own (the allocator variants, the timing study), configured there.
    ``known`` ({datasets, methods}: :func:`profile_names` of the profile file) is what may be chosen
    and what the sections may name; a name outside it is an error that lists the known ones.
    ``notes`` says what was left out, for the run to print once. The per-task settings of a kept
    dataset (its ``train_by_dataset`` entry, e.g. num_prompts) are untouched."""
    prof = copy.deepcopy(profile)
    known = {key: list((known or {}).get(key) or profile.get(key) or []) for key in SUBSET_KEYS}
    given = {"datasets": datasets, "methods": methods, "seeds": seeds}
    chosen = {key: _chosen(key, prof.get(key) if given[key] is None else given[key], known[key])
              for key in SUBSET_KEYS}
    prof.update(chosen)
    notes = [f"{key}: left out {dropped}" for key in SUBSET_KEYS
             if (dropped := [v for v in profile.get(key) or [] if v not in chosen[key]])]
    ds = set(chosen["datasets"])

    def named(where: str, names) -> list:
        if not isinstance(names, list):
            raise ConfigError(f"{where}={names!r}: expected a list of datasets")
        if unknown := [d for d in names if d not in known["datasets"]]:
            raise ConfigError(f"{where} names {unknown}, not datasets of the profile; known: {known['datasets']}")
        return [d for d in names if d in ds]

    if prof.get("groups"):
        if not isinstance(prof["groups"], dict):
            raise ConfigError(f"groups={prof['groups']!r}: expected a mapping group -> datasets")
        groups = {g: named(f"groups.{g}", names) for g, names in prof["groups"].items()}
        if gone := [g for g, names in groups.items() if not names]:
            notes.append(f"groups: left out {gone} (no chosen dataset)")
        prof["groups"] = {g: names for g, names in groups.items() if names} or None
    if prof.get("train_by_dataset"):
        named("train_by_dataset", list(prof["train_by_dataset"]))
        # (the ones of datasets the profile lists are in the `datasets: left out` note already)
        listed = profile.get("datasets") or []
        if gone := [d for d in prof["train_by_dataset"] if d not in ds and d not in listed]:
            notes.append(f"train_by_dataset: left out {gone}")
        prof["train_by_dataset"] = {d: v for d, v in prof["train_by_dataset"].items() if d in ds}
    for name, study in (prof.get("studies") or {}).items():
        if not isinstance(study, dict):
            continue  # the schema and the study's own checks say what is wrong
        before = study.get("datasets") or []
        study["datasets"] = named(f"studies.{name}.datasets", before)
        method = study.get("hparams")
        if method and study["datasets"] and method not in known["methods"]:
            raise ConfigError(f"studies.{name}.hparams={method!r}: not a method of the profile; "
                              f"known: {known['methods']}")
        if method and study["datasets"] and method not in chosen["methods"]:
            notes.append(f"studies.{name}: no job (its hparams method {method} is left out)")
            study["datasets"] = []
        elif before and not study["datasets"]:
            notes.append(f"studies.{name}: no job (its datasets {before} are left out)")
        if isinstance(study.get("seeds"), list) and study["seeds"]:
            # (only seeds the choice left out go: a study may list seeds of its own beyond the profile's)
            dropped = set(known["seeds"] + list(profile.get("seeds") or [])) - set(chosen["seeds"])
            kept = [s for s in study["seeds"] if s not in dropped]
            if study["datasets"] and kept != study["seeds"]:
                notes.append(f"studies.{name}.seeds: left out {[s for s in study['seeds'] if s not in kept]}")
            if kept:
                study["seeds"] = kept
            else:
                study.pop("seeds")  # the profile's first seed (provpt.studies.study_jobs)
    return prof, notes


def parse_value(text: str) -> Any:
    """``key=value`` override values are YAML scalars/lists (``lr=0.1``, ``seeds=[1,2]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: dict, overrides: list[str] | dict) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (returns a new dict)."""
    cfg = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return cfg


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    k, v = item.split("=", 1)
    if not k:
        raise ConfigError(f"override '{item}': empty key")
    return k.strip(), parse_value(v)


# ----------------------------------------------------------------------------- run config


@dataclass
class RelocationConfig:
    """PRO-VPT's outer loop (only read for the methods of ``RELOCATING``)."""

    enabled: bool = True
    allocator: str = "ppo"  # ppo | thompson | random | greedy | oracle (study-only: every target tried by lookahead)
    scoring: str = "online"  # online | pass
    pass_order: str = "fixed"  # the pass's batches: fixed (stored order) | shuffled (per epoch, augmented, like training)
    pruning: str = "taylor"  # taylor | norm
    clip_scores: bool = False  # authors' quirk: per-batch grad clipping also rescales the pass scores
    warmup_epochs: int = 1  # first epoch (0-indexed) at which prompts move
    every: int = 1  # relocate every k epochs
    until: float = 1.0  # no move after this fraction of the epochs (1.0: to the end, as the authors)
    count: int = 1  # prompts moved per relocation
    scale: float = 1e-3  # moved value multiplied by this
    reward: str = "mean"  # mean | faithful | move (the moved prompt's own idleness, before - after)
    idleness: str = "gate"  # gate (the authors': d loss / d gate on the prompt's value) | logit (exact-removal log-gate)
    verify: int = 0  # shortlist-and-verify: exact removal of the top-m first-order candidates (0: off)
    probe_batches: int = 2  # training batches (fixed order) the verification's exact removals use
    ppo_update: str = "faithful"  # faithful (the authors': Monte-Carlo returns over 2 moves) | bandit
    ppo_update_every: int = 2
    action_space: str = "target"  # target (prune-then-allocate, L actions) | pair (L^2 actions)
    oracle_steps: int = 4  # oracle: training batches of lookahead after a trial move (the epoch's first ones)
    oracle_probe: int = 256  # oracle: training images held out of the lookahead that judge each target


@dataclass
class RunConfig:
    # what
    dataset: str = "digits"
    method: str = "vpt-deep"
    seed: int = 0
    # data
    data_root: str = "data/mini/cache"  # prepared cache root: <data_root>/<dataset>/
    train_split: str = "train800"
    eval_splits: list = field(default_factory=lambda: ["val200"])
    norm: str = "vtab"  # vtab (mean=std=0.5) | imagenet | clip (OpenAI CLIP's, EVA-02's)
    augment: str = "none"  # none | fgvc (random crop + flip)
    # backbone
    backbone: str = "vit_base_patch16_224.orig_in21k"
    backbone_kwargs: dict = field(default_factory=dict)
    weights: str | None = None
    # method
    num_prompts: int = 10  # T, prompts per block; budget N = L * T
    prompt_dropout: float = 0.1
    head_init: str = "default"  # default (torch nn.Linear) | vpt (kaiming-normal fan-out, bias -log(99), as VPT)
    lora_rank: int = 8
    adapter_dim: int = 8
    # optimisation (authors' protocol by default)
    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "constant"  # constant | cosine
    warmup_epochs: int = 0
    grad_clip: float = 0.25
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0: leave torch's default
    precision: str = "auto"  # auto (bf16 on cuda) | fp32 | tf32 (fp32 on TF32 tensor cores) | bf16 | fp64 (exactness checks)
    compile: bool = False
    feature_cache: bool = True  # linear probes: the frozen backbone's features computed once per split (provpt.train)
    pack_chunk: int = 0  # runs of a pack per forward/backward (0: all at once); halved on out-of-memory (provpt.train)
    eval_every: int = 1
    checkpoint_every: int = 1  # epochs between resumable checkpoints (the last epoch always)
    save_at: list = field(default_factory=list)  # fractions of training at which to keep a checkpoint copy
    keep: str = "all"  # what a finished run keeps: all | weights (no resume checkpoint) | metrics (no weights either)
    progress: bool = True
    out: str = "results/run"
    relocation: RelocationConfig = field(default_factory=RelocationConfig)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        """A complete run configuration from one mapping (e.g. a run folder's ``config.yaml``)."""
        layer = _checked(d, source)
        return _build(layer, {k: source for k in _flat_keys(layer)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str | dict = "config") -> None:
        """Ranges and choices; ``source`` names where the values came from (or maps key -> source)."""

        def bad(key, value, expected):
            where = source.get(key, "defaults") if isinstance(source, dict) else source
            raise ConfigError(f"{where}: {key}={value!r}: expected {expected}")

        if self.method not in METHODS:
            bad("method", self.method, f"one of {list(METHODS)}")
        if self.optimizer not in ("sgd", "adamw"):
            bad("optimizer", self.optimizer, "sgd or adamw")
        if self.schedule not in ("constant", "cosine"):
            bad("schedule", self.schedule, "constant or cosine")
        if self.norm not in ("vtab", "imagenet", "clip"):
            bad("norm", self.norm, "vtab, imagenet or clip")
        if self.head_init not in ("default", "vpt"):
            bad("head_init", self.head_init, "default or vpt")
        if self.augment not in ("none", "fgvc"):
            bad("augment", self.augment, "none or fgvc")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad("device", self.device, "auto, cpu, cuda or cuda:N")
        if self.precision not in ("auto", "fp32", "tf32", "bf16", "fp64"):
            bad("precision", self.precision, "auto, fp32, tf32, bf16 or fp64")
        for key in ("epochs", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                bad(key, getattr(self, key), "an integer >= 1")
        for key in ("num_prompts", "threads", "warmup_epochs", "lora_rank", "adapter_dim", "pack_chunk"):
            if getattr(self, key) < 0:
                bad(key, getattr(self, key), "an integer >= 0")
        for key in ("lr", "weight_decay", "grad_clip", "momentum"):
            if getattr(self, key) < 0:
                bad(key, getattr(self, key), "a number >= 0")
        if not 0 <= self.prompt_dropout < 1:
            bad("prompt_dropout", self.prompt_dropout, "a number in [0, 1)")
        if isinstance(self.eval_splits, str):
            self.eval_splits = [self.eval_splits]
        if not self.eval_splits:
            bad("eval_splits", self.eval_splits, "at least one split name")
        if self.keep not in KEEP:
            bad("keep", self.keep, f"one of {list(KEEP)}")
        for f in self.save_at:
            if not 0 <= float(f) <= 1:
                bad("save_at", self.save_at, "fractions in [0, 1]")
        r = self.relocation
        choices = {
            "allocator": ("ppo", "thompson", "random", "greedy", "oracle"),
            "scoring": ("online", "pass"),
            "pass_order": ("fixed", "shuffled"),
            "pruning": ("taylor", "norm"),
            "reward": ("mean", "faithful", "move"),
            "idleness": ("gate", "logit"),
            "ppo_update": ("faithful", "bandit"),
            "action_space": ("target", "pair"),
        }
        for key, allowed in choices.items():
            if getattr(r, key) not in allowed:
                bad(f"relocation.{key}", getattr(r, key), f"one of {list(allowed)}")
        if r.allocator == "oracle" and r.action_space == "pair":
            bad("relocation.allocator", r.allocator, "an allocator of target actions (oracle tries every target)")
        if r.verify < 0:
            bad("relocation.verify", r.verify, "an integer >= 0 (0: off)")
        for key in ("every", "count", "ppo_update_every", "probe_batches", "oracle_steps", "oracle_probe"):
            if getattr(r, key) < 1:
                bad(f"relocation.{key}", getattr(r, key), "an integer >= 1")
        if not 0 < r.until <= 1:
            bad("relocation.until", r.until, "a fraction in (0, 1]")
        if r.warmup_epochs < 0:
            bad("relocation.warmup_epochs", r.warmup_epochs, "an integer >= 0")


def _coerce(cls, key: str, value: Any, source: str, prefix: str = "") -> Any:
    """Check a value against the dataclass field's default type (int/float/bool/str/list/dict)."""
    default = next(f for f in dataclasses.fields(cls) if f.name == key)
    proto = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    if value is None:
        if proto is None or key in ("weights",):
            return None
        raise ConfigError(f"{source}: {prefix}{key} is empty; expected a {type(proto).__name__}")
    if isinstance(proto, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {prefix}{key}={value!r}: expected true or false")
    if isinstance(proto, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{source}: {prefix}{key}={value!r}: expected an integer")
        return int(value)
    if isinstance(proto, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {prefix}{key}={value!r}: expected a number")
        return float(value)
    if isinstance(proto, list):
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {prefix}{key}={value!r}: expected a list")
        return value
    if isinstance(proto, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {prefix}{key}={value!r}: expected a mapping")
        return value
    if isinstance(proto, str) or proto is None:
        return str(value)
    return value


# ----------------------------------------------------------------------------- resolve: the one road

_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
RUN_KEYS = frozenset(_RUN_FIELDS)
_RELOC_FIELDS = {f.name for f in dataclasses.fields(RelocationConfig)}


def as_mapping(overrides, source: str = "overrides") -> dict:
    """``key=value`` strings (YAML values, dotted keys) or a mapping (nested or dotted) -> nested dict."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif isinstance(overrides, str):
        raise ConfigError(f"{source}: expected a list of key=value strings, got the string {overrides!r}")
    else:
        items = [_split(o) for o in overrides]
    return apply_overrides({}, dict(items))


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if k == "relocation" and isinstance(v, dict) and not prefix:
            out += _flat_keys(v, "relocation.")
        else:
            out.append(prefix + k)
    return out


def _did_you_mean(unknown, known, prefix: str = "") -> str:
    import difflib

    close = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1)]
    return f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""


def _checked(layer: dict, source: str) -> dict:
    """One layer of run keys, unknown keys rejected and every value coerced to its field's type."""
    layer = dict(layer or {})
    unknown = sorted(set(layer) - _RUN_FIELDS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}{_did_you_mean(unknown, _RUN_FIELDS)}; "
                          f"known keys: {sorted(_RUN_FIELDS)}")
    out = {k: _coerce(RunConfig, k, v, source) for k, v in layer.items() if k != "relocation"}
    if "relocation" in layer:
        reloc = layer["relocation"] or {}
        if not isinstance(reloc, dict):
            raise ConfigError(f"{source}: 'relocation' must be a mapping, got {reloc!r}")
        bad = sorted(set(reloc) - _RELOC_FIELDS)
        if bad:
            raise ConfigError(f"{source}: unknown key(s) {['relocation.' + b for b in bad]}"
                              f"{_did_you_mean(bad, _RELOC_FIELDS, 'relocation.')}; "
                              f"known: {sorted('relocation.' + k for k in _RELOC_FIELDS)}")
        out["relocation"] = {k: _coerce(RelocationConfig, k, v, source, "relocation.") for k, v in reloc.items()}
    return out


def _build(merged: dict, origins: dict) -> RunConfig:
    merged = dict(merged)
    reloc = merged.pop("relocation", {}) or {}
    cfg = RunConfig(**merged)
    cfg.relocation = RelocationConfig(**reloc)
    cfg.validate(origins)
    return cfg


def profile_source(profile) -> str:
    if profile is None:
        return "defaults"
    if isinstance(profile, dict):
        return profile.get("_source") or f"profile {profile.get('profile', '?')}"
    return str(profile)


def read_profile(profile) -> dict:
    """A profile given as a path (its ``base:`` chain merged) or as an already merged mapping."""
    if profile is None:
        return {}
    if isinstance(profile, dict):
        return profile
    merged = load_profile(profile)
    merged["_source"] = str(profile)
    return merged


def stage_layer(profile: dict, stage: str | None) -> dict:
    """The run keys a stage of the protocol sets: search (train on search.train_split, evaluate on
    search.eval_split, seed search.seed, then search.overrides) or final (final.train_split ->
    final.eval_split, then final.overrides); both keep what the profile's ``keep.<stage>`` says."""
    if stage is None:
        return {}
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r}: expected one of {list(STAGES)}")
    sec = profile.get(stage) or {}
    layer = {}
    if sec.get("train_split"):
        layer["train_split"] = sec["train_split"]
    if sec.get("eval_split"):
        layer["eval_splits"] = [sec["eval_split"]]
    if stage == "search" and sec.get("seed") is not None:
        layer["seed"] = sec["seed"]
    keep = (profile.get("keep") or {}).get(stage)
    if keep is not None:
        layer["keep"] = keep
    return deep_merge(layer, sec.get("overrides") or {})


def resolve(profile=None, method: str | None = None, stage: str | None = None, overrides=(),
            hparams: dict | None = None) -> RunConfig:
    """The run configuration of one run; every consumer (CLI, studies, Snakemake, DVC) comes here.

    Layers, later ones win: :class:`RunConfig`'s defaults, the profile's ``train`` section, its
    ``train_by_dataset[dataset]`` (the dataset of the overrides, else of ``train``), its
    ``train_by_method[method]``, the ``stage`` protocol (:func:`stage_layer`), ``hparams`` (lr and
    weight decay of a selection) and ``overrides`` (``key=value`` strings or a mapping). The method
    is ``method``, else the overrides', else the profile's. An error names the layer a key came from.
    """
    prof = read_profile(profile)
    src = profile_source(profile)
    over = as_mapping(overrides, "command line")
    hparams = dict(hparams or {})
    train = prof.get("train") or {}
    method = method or over.get("method") or train.get("method") or RunConfig.method
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: expected one of {list(METHODS)}")
    dataset = over.get("dataset") or train.get("dataset") or RunConfig.dataset
    layers = [
        (f"method defaults of {method}", METHOD_DEFAULTS.get(method, {})),
        (f"{src}: train", train),
        (f"{src}: train_by_dataset.{dataset}", ((prof.get("train_by_dataset") or {}).get(dataset) or {})),
        (f"{src}: train_by_method.{method}", ((prof.get("train_by_method") or {}).get(method) or {})),
        ("method", {"method": method}),
        (f"{src}: {stage}", stage_layer(prof, stage)),
        (hparams.pop("_source", "hparams"), hparams),
        ("command line", over),
    ]
    merged, origins = {}, {}
    for name, layer in layers:
        if not isinstance(layer, dict):
            raise ConfigError(f"{name}: expected a mapping of run keys, got {layer!r}")
        checked = _checked(layer, name)
        merged = deep_merge(merged, checked)
        origins.update({k: name for k in _flat_keys(checked)})
    return _build(merged, origins)


def fmt(x) -> str:
    """How a number appears in a folder name: 2.5, 0.0001, 0, 50."""
    return f"{float(x):g}"


def search_grid(profile, method: str) -> tuple[list[str], list[str]]:
    """A method's search points as they appear in folder names: (lrs, weight decays). The lrs are the
    method's own list (search.by_method) or the common one, times batch_size / lr_base_batch (the
    authors' lr x batch/256), i.e. the lr each run uses."""
    prof = read_profile(profile)
    s = prof.get("search") or {}
    grid = ((s.get("by_method") or {}).get(method) or {}).get("lr", s.get("lr") or [])
    scale = resolve(prof, method, "search").batch_size / s["lr_base_batch"] if s.get("lr_base_batch") else 1.0
    return [fmt(lr * scale) for lr in grid], [fmt(wd) for wd in s.get("weight_decay") or []]


def search_prompts(profile, method: str) -> list:
    """The search's prompt-length axis for ``method``: ``search.num_prompts`` (prompts per block) for the
    methods with prompts, else ``[None]`` (no axis: the resolved ``num_prompts`` of the run)."""
    lengths = ((read_profile(profile).get("search") or {}).get("num_prompts")) or []
    if method not in PROMPTED or not lengths:
        return [None]
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in lengths):
        raise ConfigError(f"search.num_prompts={lengths!r}: expected a list of integers >= 1")
    return [int(t) for t in lengths]


def read_selection(path) -> dict:
    """lr, weight decay (and prompts per block, when the search had that axis) of a ``provpt select``
    file, as an ``hparams`` layer for :func:`resolve`."""
    import json

    p = Path(str(path))
    if not p.is_file():
        raise ConfigError(f"hparams {path}: selection file not found (made by `provpt select`)")
    try:
        sel = json.loads(p.read_text())
        layer = {"lr": sel["lr"], "weight_decay": sel["weight_decay"], "_source": str(p)}
        if sel.get("num_prompts") is not None:
            layer["num_prompts"] = sel["num_prompts"]
        return layer
    except json.JSONDecodeError as e:
        raise ConfigError(f"hparams {path}: not valid JSON ({e})") from None
    except KeyError as e:
        raise ConfigError(f"hparams {path}: no {e} in the selection file") from None
