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

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "pro-vpt", "lora", "adapter")
PROMPT_METHODS = ("vpt-shallow", "vpt-deep", "pro-vpt")


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
    """PRO-VPT's outer loop (only read for method ``pro-vpt``)."""

    enabled: bool = True
    allocator: str = "ppo"  # ppo | thompson | random | greedy
    scoring: str = "online"  # online | pass
    pruning: str = "taylor"  # taylor | norm
    clip_scores: bool = False  # authors' quirk: per-batch grad clipping also rescales the pass scores
    warmup_epochs: int = 1  # first epoch (0-indexed) at which prompts move
    every: int = 1  # relocate every k epochs
    count: int = 1  # prompts moved per relocation
    scale: float = 1e-3  # moved value multiplied by this
    reward: str = "mean"  # mean | faithful
    ppo_update_every: int = 2
    action_space: str = "target"  # target (prune-then-allocate, L actions) | pair (L^2 actions)


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
    norm: str = "vtab"  # vtab (mean=std=0.5) | imagenet
    augment: str = "none"  # none | fgvc (random crop + flip)
    # backbone
    backbone: str = "vit_base_patch16_224.orig_in21k"
    backbone_kwargs: dict = field(default_factory=dict)
    weights: str | None = None
    # method
    num_prompts: int = 10  # T, prompts per block; budget N = L * T
    prompt_dropout: float = 0.1
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
    precision: str = "auto"  # auto (bf16 on cuda) | fp32 | bf16
    compile: bool = False
    eval_every: int = 1
    checkpoint_every: int = 1  # epochs between resumable checkpoints (the last epoch always)
    save_at: list = field(default_factory=list)  # fractions of training at which to keep a checkpoint copy
    progress: bool = True
    out: str = "results/run"
    relocation: RelocationConfig = field(default_factory=RelocationConfig)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(names)}")
        reloc = d.pop("relocation", None) or {}
        if not isinstance(reloc, dict):
            raise ConfigError(f"{source}: 'relocation' must be a mapping")
        rnames = {f.name for f in dataclasses.fields(RelocationConfig)}
        bad = sorted(set(reloc) - rnames)
        if bad:
            raise ConfigError(f"{source}: unknown key(s) relocation.{bad}; known: {sorted(rnames)}")
        cfg = cls(**{k: _coerce(cls, k, v, source) for k, v in d.items()})
        cfg.relocation = RelocationConfig(
            **{k: _coerce(RelocationConfig, k, v, source, "relocation.") for k, v in reloc.items()}
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def from_profile(cls, profile: str | os.PathLike | dict | None, overrides=()) -> "RunConfig":
        """Defaults of ``profile['train']`` plus overrides (``key=value`` strings or a dict)."""
        if profile is None:
            base, src = {}, "overrides"
        elif isinstance(profile, dict):
            base, src = profile.get("train", {}), "profile"
        else:
            base, src = load_profile(profile).get("train", {}), str(profile)
        return cls.from_dict(apply_overrides(base, overrides), src)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config") -> None:
        def bad(key, value, expected):
            raise ConfigError(f"{source}: {key}={value!r}: expected {expected}")

        if self.method not in METHODS:
            bad("method", self.method, f"one of {list(METHODS)}")
        if self.optimizer not in ("sgd", "adamw"):
            bad("optimizer", self.optimizer, "sgd or adamw")
        if self.schedule not in ("constant", "cosine"):
            bad("schedule", self.schedule, "constant or cosine")
        if self.norm not in ("vtab", "imagenet"):
            bad("norm", self.norm, "vtab or imagenet")
        if self.augment not in ("none", "fgvc"):
            bad("augment", self.augment, "none or fgvc")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad("device", self.device, "auto, cpu, cuda or cuda:N")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", self.precision, "auto, fp32 or bf16")
        for key in ("epochs", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                bad(key, getattr(self, key), "an integer >= 1")
        for key in ("num_prompts", "threads", "warmup_epochs", "lora_rank", "adapter_dim"):
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
        for f in self.save_at:
            if not 0 <= float(f) <= 1:
                bad("save_at", self.save_at, "fractions in [0, 1]")
        r = self.relocation
        choices = {
            "allocator": ("ppo", "thompson", "random", "greedy"),
            "scoring": ("online", "pass"),
            "pruning": ("taylor", "norm"),
            "reward": ("mean", "faithful"),
            "action_space": ("target", "pair"),
        }
        for key, allowed in choices.items():
            if getattr(r, key) not in allowed:
                bad(f"relocation.{key}", getattr(r, key), f"one of {list(allowed)}")
        for key in ("every", "count", "ppo_update_every"):
            if getattr(r, key) < 1:
                bad(f"relocation.{key}", getattr(r, key), "an integer >= 1")
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
