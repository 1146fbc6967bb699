"""The search/final protocol (torch-free at import; the training loop is imported when a run starts).

- ``search``: every (lr, weight decay[, prompts per block]) point of a method's grid
  (:func:`provpt.config.search_grid`, :func:`provpt.config.search_prompts`),
  trained on ``search.train_split`` and evaluated on ``search.eval_split`` with ``search.seed``,
  each into ``<root>/lr<lr>_wd<wd>/``; a finished point is not trained again;
- ``select`` (:mod:`provpt.selection`): the best point on that split only, never on test;
- ``final``: the selected lr/wd, one run per seed, on ``final.train_split`` -> ``final.eval_split``
  (``provpt final --hparams <selection>``, or one seed with ``provpt train --stage final``).

Runs of one stage train as packs of up to ``pack.<stage>`` runs (profile knob; 1: one by one) through
one shared backbone (:func:`provpt.train.run_pack`); methods that train backbone weights always go
one by one. Each run keeps its own folder, and a killed job resumes every run where it stopped.
``provpt search --pack i`` trains one pack of the grid (the workflow's job per pack).
"""

from __future__ import annotations

from pathlib import Path

from .config import (PACKABLE, ConfigError, as_mapping, deep_merge, fmt, read_profile, resolve, search_grid,
                     search_prompts)


def point_dir(root, lr, wd, prompts=None) -> Path:
    """``<root>/lr<lr>_wd<wd>`` (``_T<prompts per block>`` with the search's prompt-length axis)."""
    return Path(root) / (f"lr{fmt(lr)}_wd{fmt(wd)}" + (f"_T{int(prompts)}" if prompts is not None else ""))


def search_configs(profile, dataset: str, method: str, root, lrs=None, overrides=()) -> list:
    """The run configurations of a method's search on one dataset (optionally only some lrs)."""
    prof = read_profile(profile)
    grid_lrs, wds = search_grid(prof, method)
    if lrs is not None:
        wanted = [fmt(lr) for lr in lrs]
        unknown = sorted(set(wanted) - set(grid_lrs))
        if unknown:
            raise ConfigError(f"search {dataset}/{method}: lr {unknown} not in the grid {grid_lrs}")
        grid_lrs = [lr for lr in grid_lrs if lr in wanted]
    over = as_mapping(overrides, "command line")
    return [resolve(prof, method, "search", deep_merge(over, {
        "dataset": dataset, "lr": float(lr), "weight_decay": float(wd), "out": str(point_dir(root, lr, wd, t)),
        **({"num_prompts": t} if t is not None else {})}))
            for lr in grid_lrs for wd in wds for t in search_prompts(prof, method)]


def pack_size(profile, stage: str, method: str) -> int:
    """How many runs of ``stage`` train together: the profile's ``pack.<stage>`` (1 when unset, and
    for methods that train backbone weights)."""
    size = ((read_profile(profile).get("pack") or {}).get(stage)) or 1
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"pack.{stage}={size!r}: expected an integer >= 1")
    return size if method in PACKABLE else 1


def packs_of(cfgs: list, size: int) -> list[list]:
    """``cfgs`` cut into packs of ``size`` runs, in order (the last one may be smaller)."""
    return [cfgs[i:i + size] for i in range(0, len(cfgs), size)]


def train_packed(cfgs: list, size: int) -> list[dict]:
    """Train ``cfgs`` in packs of ``size`` (in order); returns every run's metrics."""
    from .train import run_pack

    return [m for pack in packs_of(cfgs, size) for m in run_pack(pack)]


def search_packs(profile, dataset: str, method: str, root, lrs=None, overrides=()) -> list[list]:
    """The search's run configurations in the packs they train in (``pack.search`` runs each, grid
    order): the workflow gives each pack its own job."""
    prof = read_profile(profile)
    cfgs = search_configs(prof, dataset, method, root, lrs, overrides)
    return packs_of(cfgs, pack_size(prof, "search", method))


def search(profile, dataset: str, method: str, root, lrs=None, overrides=(), pack: int | None = None) -> list[dict]:
    """Train the search points (resuming unfinished ones) in packs, or only pack number ``pack``
    (from 0, :func:`search_packs`); returns their metrics."""
    from .train import run_pack

    packs = search_packs(profile, dataset, method, root, lrs, overrides)
    if pack is None:
        return [m for p in packs for m in run_pack(p)]
    if not 0 <= pack < len(packs):
        raise ConfigError(f"search {dataset}/{method}: pack {pack} does not exist (the grid trains in {len(packs)} "
                          f"pack(s), 0-{len(packs) - 1})")
    return run_pack(packs[pack])


def gather_search(dataset: str, method: str, files) -> dict:
    """The grid's summary (``search.json``) from its packs' summaries (``provpt search --pack i
    --summary``), in the order given; a file of another dataset or method is refused."""
    import json

    points, packs = [], []
    for f in files:
        try:
            part = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"search --gather {f}: unreadable pack summary ({e})") from None
        if not isinstance(part, dict) or not isinstance(part.get("points"), list):
            raise ConfigError(f"search --gather {f}: not a pack summary (a mapping with a 'points' list)")
        if (part.get("dataset"), part.get("method")) != (dataset, method):
            raise ConfigError(f"search --gather {f}: a pack of {part.get('dataset')}/{part.get('method')}, "
                              f"not {dataset}/{method}")
        points += part["points"]
        packs.append(part.get("pack"))
    if None not in packs and packs != list(range(len(packs))):
        raise ConfigError(f"search --gather: the packs given are {packs}, expected each of 0-{len(packs) - 1} once, "
                          "in order")
    return {"dataset": dataset, "method": method, "points": points}


def final_configs(profile, dataset: str, method: str, root, seeds=None, hparams: dict | None = None,
                  overrides=()) -> list:
    """The final runs of a method on one dataset, one per seed (default: the profile's), each into
    ``<root>/seed<k>/``, with the selection's ``hparams``."""
    prof = read_profile(profile)
    seeds = list(prof.get("seeds") or []) if seeds is None else list(seeds)
    if not seeds:
        raise ConfigError(f"final {dataset}/{method}: no seeds (give some, or set `seeds` in the profile)")
    over = as_mapping(overrides, "command line")
    return [resolve(prof, method, "final", deep_merge(over, {"dataset": dataset, "seed": int(s),
                                                             "out": str(Path(root) / f"seed{int(s)}")}),
                    dict(hparams or {}))
            for s in seeds]


def final(profile, dataset: str, method: str, root, seeds=None, hparams: dict | None = None, overrides=()) -> list[dict]:
    """Train the final runs (resuming unfinished ones) in packs; returns their metrics."""
    prof = read_profile(profile)
    cfgs = final_configs(prof, dataset, method, root, seeds, hparams, overrides)
    return train_packed(cfgs, pack_size(prof, "final", method))
