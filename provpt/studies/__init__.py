"""The studies: analyses the paper's claims rest on, one module each (``provpt study <name>``).

- :mod:`.correlation`: Taylor idleness vs true idleness over training (Spearman, cost ratio);
- :mod:`.timing`: time per epoch by phase and peak memory per method, in one process;
- :mod:`.adjustment`: which relocation helps most, at 25/50/75% of training (Finding 2);
- :mod:`.allocators`: PPO vs Thompson/random/greedy, norm pruning, the L^2 action space.

Each module has ``main(profile, overrides) -> summary`` (one job: one dataset, and one seed or
variant where that applies; it writes ``<out>/summary.json`` last, atomically) and
``report(study_dir, tables_dir, figures_dir)`` (aggregates every ``<study_dir>/<dataset>/``).

Overrides (``key=value``, YAML values) are of three kinds:

- ``study.<key>=...``: the study's own options; their defaults are the module's ``DEFAULTS``,
  overridden first by the profile's ``studies.<name>`` section (every key but ``datasets``,
  ``seeds``, ``hparams``, which belong to the workflow), then by the command line;
- ``hparams=<selection json>``: take ``lr`` and ``weight_decay`` from a ``provpt select`` file;
- everything else is a :class:`~provpt.config.RunConfig` key (``dataset``, ``seed``, ``epochs``,
  ``out`` ...), applied over the profile's ``train`` section and ``train_by_method[method]``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from ..config import ConfigError, RunConfig, _split, apply_overrides

WORKFLOW_KEYS = ("datasets", "seeds", "hparams")


# ----------------------------------------------------------------------------- options


def parse_overrides(profile: dict, overrides, name: str, defaults: dict) -> tuple[dict, dict, dict]:
    """Split overrides into (study options, run-config overrides, hparams overrides)."""
    study = copy.deepcopy(defaults)
    section = ((profile or {}).get("studies") or {}).get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"profile: studies.{name} must be a mapping")
    given = [(k, v, "profile") for k, v in section.items() if k not in WORKFLOW_KEYS]
    run_over, hparams = {}, {}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        if key.startswith("study."):
            given.append((key[len("study."):], value, "override"))
        elif key == "hparams":
            hparams = read_hparams(value)
        else:
            run_over[key] = value
    for key, value, source in given:
        if key not in defaults:
            raise ConfigError(f"study {name}: unknown option {key!r} ({source}); known: {sorted(defaults)}")
        study[key] = value
    return study, run_over, hparams


def read_hparams(path) -> dict:
    if path in (None, "", "null"):
        return {}
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"hparams={path}: selection file not found")
    sel = json.loads(p.read_text())
    try:
        return {"lr": sel["lr"], "weight_decay": sel["weight_decay"]}
    except KeyError as e:
        raise ConfigError(f"hparams={path}: no {e} in the selection file") from None


def run_config(profile: dict, run_over: dict, method: str | None = None, extra: dict | None = None,
               stage: str | None = None) -> RunConfig:
    """The profile's ``train`` (+ ``train_by_method``, + ``final`` protocol if ``stage='final'``),
    then ``extra`` (study-chosen keys, hparams), then the command line's run overrides."""
    profile = profile or {}
    base = profile.get("train") or {}
    method = run_over.get("method") or method or base.get("method") or "vpt-deep"
    cfg = apply_overrides(base, (profile.get("train_by_method") or {}).get(method, {}))
    cfg = apply_overrides(cfg, {"method": method})
    if stage == "final":
        final = profile.get("final") or {}
        if final.get("train_split"):
            cfg = apply_overrides(cfg, {"train_split": final["train_split"]})
        if final.get("eval_split"):
            cfg = apply_overrides(cfg, {"eval_splits": [final["eval_split"]]})
        cfg = apply_overrides(cfg, final.get("overrides") or {})
    cfg = apply_overrides(cfg, extra or {})
    return RunConfig.from_dict(apply_overrides(cfg, run_over), "study")


# ----------------------------------------------------------------------------- files


def write_json(path: Path, obj) -> Path:
    from ..train import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(clean(obj), indent=2))
    return path


def write_csv(path: Path, df) -> Path:
    from ..train import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, df.to_csv(index=False))
    return path


def clean(obj):
    """JSON-safe: NaN/inf -> None, numpy/torch scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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
    from ..train import TaskData, resolve_device

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    extra = [s for s in splits if s and s not in (cfg.train_split, *cfg.eval_splits)]
    data = TaskData(dataclasses.replace(cfg, eval_splits=[*cfg.eval_splits, *extra]), device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes).to(device)
    return device, data, model


def autocast_for(cfg: RunConfig, device):
    """The training loop's autocast: bf16 on CUDA under precision auto, else none."""
    from contextlib import nullcontext

    import torch

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
