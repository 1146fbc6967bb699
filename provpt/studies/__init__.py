"""The studies: analyses the paper's claims rest on, one module each (``provpt study <name>``).

- :mod:`.correlation`: Taylor idleness vs true idleness over training (Spearman, cost ratio);
- :mod:`.timing`: time per epoch by phase and peak memory per method, in one process;
- :mod:`.adjustment`: which relocation helps most, at 25/50/75% of training (Finding 2);
- :mod:`.allocators`: PPO vs Thompson/random/greedy, norm pruning, the L^2 action space, ours and
  the oracle allocator (the upper bound);
- :mod:`.rewards`: each reward against the counterfactual effect of the move.

Each module has ``NAME``, ``DEFAULTS`` (its options) and ``main(profile, overrides) -> summary``
(one job: one dataset, and one seed or variant where that applies; it writes
``<out>/summary.json`` last, atomically). Studies compute; their tables and figures are made by
:mod:`provpt.report`. A module with ``VARIANTS`` has them expanded by the workflow, one job each.

Overrides (``key=value``, YAML values) are of three kinds:

- ``study.<key>=...``: the study's own options; their defaults are the module's ``DEFAULTS``,
  overridden first by the profile's ``studies.<name>`` section (every key but
  :data:`WORKFLOW_KEYS`, which say which jobs exist), then by the command line;
- ``hparams=<selection json>``: lr and weight decay from a ``provpt select`` file;
- everything else is a run key, resolved by :func:`provpt.config.resolve` with the profile.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

from ..config import STUDIES, ConfigError, RunConfig, as_mapping, deep_merge, read_selection, resolve

WORKFLOW_KEYS = ("datasets", "seeds", "hparams", "variants")


# ----------------------------------------------------------------------------- options


def study_module(name: str):
    """The module of study ``name`` (torch-free at import: the workflow reads its options)."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}: expected one of {list(STUDIES)}")
    return importlib.import_module(f"{__name__}.{name}")


def parse_overrides(profile: dict, overrides, name: str, defaults: dict | None = None) -> tuple[dict, dict, dict]:
    """Split overrides into (study options, run-config overrides, hparams layer)."""
    defaults = study_module(name).DEFAULTS if defaults is None else defaults
    study = copy.deepcopy(defaults)
    section = ((profile or {}).get("studies") or {}).get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"profile: studies.{name} must be a mapping")
    given = [(k, v, f"profile studies.{name}") for k, v in section.items() if k not in WORKFLOW_KEYS]
    over = as_mapping(overrides, "command line")
    hparams = read_selection(over.pop("hparams")) if over.get("hparams") not in (None, "", "null") else {}
    over.pop("hparams", None)
    given += [(k, v, "command line") for k, v in (over.pop("study", None) or {}).items()]
    for key, value, source in given:
        if key not in defaults:
            raise ConfigError(f"study {name}: unknown option {key!r} ({source}); known: {sorted(defaults)}")
        study[key] = value
    variants = getattr(study_module(name), "VARIANTS", None)
    if variants and study.get("variant") is not None and study["variant"] not in variants:
        raise ConfigError(f"study {name}: unknown variant {study['variant']!r}; expected one of {list(variants)}")
    return study, over, hparams


def study_jobs(profile: dict, name: str) -> list[dict]:
    """The jobs of one study as the workflow expands them: ``{dataset, seed?, variant?}`` each.

    One job per dataset of ``studies.<name>.datasets``; per seed when the section lists ``seeds``;
    per variant of ``variants`` (default: the module's every variant) for a study with
    ``VARIANTS``, which then also always has a seed (the profile's first unless listed)."""
    section = ((profile or {}).get("studies") or {}).get(name) or {}
    mod = study_module(name)
    variants = section.get("variants") or (list(mod.VARIANTS) if getattr(mod, "VARIANTS", None) else [None])
    bad = [v for v in variants if v is not None and v not in getattr(mod, "VARIANTS", {})]
    if bad:
        raise ConfigError(f"profile: studies.{name}.variants {bad}: expected some of {list(getattr(mod, 'VARIANTS', {}))}")
    seeds = section.get("seeds") or ([profile["seeds"][0]] if variants != [None] else [None])
    return [{"dataset": d, **({"variant": v} if v is not None else {}), **({"seed": k} if k is not None else {})}
            for d in section.get("datasets") or [] for v in variants for k in seeds]


def run_config(profile: dict, run_over: dict, method: str | None = None, extra: dict | None = None,
               stage: str | None = None, hparams: dict | None = None) -> RunConfig:
    """A study's run: :func:`provpt.config.resolve` with the study-chosen keys (``extra``, e.g. a
    variant's relocation settings) under the command line's overrides, and ``hparams`` (a selection)."""
    over = as_mapping(run_over, "command line")
    method = over.pop("method", None) or method
    return resolve(profile, method, stage, deep_merge(as_mapping(extra, "study"), over), hparams=hparams)


# ----------------------------------------------------------------------------- files


from ..io import json_safe as clean, write_csv, write_json  # noqa: E402,F401 (re-exported for the studies)


def dataset_summaries(study_dir: Path, pattern: str = "*/summary.json") -> list[tuple[Path, dict]]:
    """``(folder, summary)`` for every finished job under ``study_dir`` (sorted by path)."""
    out = []
    for p in sorted(Path(study_dir).glob(pattern)):
        try:
            out.append((p.parent, json.loads(p.read_text())))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: corrupt JSON ({e})") from None
    return out


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the studied run


def point_epochs(points, epochs: int) -> list[tuple[float, int]]:
    """``(fraction, epoch)`` per training point, epoch = completed epochs as ``run`` saves them."""
    seen, out = set(), []
    for f in points:
        e = int(round(float(f) * epochs))
        if e not in seen:
            seen.add(e)
            out.append((float(f), e))
    return sorted(out, key=lambda t: t[1])


def train_studied_run(cfg: RunConfig, points, run_dir: Path, given: str | None = None) -> tuple[Path, RunConfig]:
    """Train (or resume, or reuse ``given``) the run whose checkpoints a study reads.

    The run keeps ``checkpoints/epochNNN.pt`` at the ``points`` (fractions of training); a finished
    run folder is reused as is, so the study job can be killed and rerun at any time. With ``given``
    (an existing run folder) nothing is trained and that run's ``config.yaml`` is returned, with the
    study's device/threads/precision. Returns ``(run folder, its config)``.
    """
    import yaml

    from ..train import run

    cfg = copy.deepcopy(cfg)
    if given:
        run_dir = Path(given)
        path = run_dir / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"study.run={given}: no config.yaml (not a run folder)")
        own = RunConfig.from_dict(yaml.safe_load(path.read_text()), str(path))
        for key in ("device", "threads", "precision", "progress", "compile"):
            setattr(own, key, getattr(cfg, key))
        cfg = own
    else:
        run_dir = Path(run_dir)
        cfg.save_at = sorted({float(f) for f in [*cfg.save_at, *points]})
        cfg.out = str(run_dir)
        run(cfg)
    missing = [e for _, e in point_epochs(points, cfg.epochs) if not checkpoint_path(run_dir, e).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no checkpoints for epochs {missing} (train it with save_at "
                                "covering the study's points)")
    return run_dir, cfg


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch{epoch:03d}.pt"


def setup(cfg: RunConfig, splits=()):
    """(device, TaskData with ``splits`` loaded too, model built as ``cfg.method``) for a study."""
    import dataclasses

    import torch

    from ..model.methods import build_model
    from ..data.task import TaskData
    from ..runtime import resolve_device

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    extra = [s for s in splits if s and s not in (cfg.train_split, *cfg.eval_splits)]
    data = TaskData(dataclasses.replace(cfg, eval_splits=[*cfg.eval_splits, *extra]), device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes).to(device)
    return device, data, model


from ..runtime import autocast_for  # noqa: E402,F401 (re-exported: the training loop's autocast)
