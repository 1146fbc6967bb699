"""The search/final protocol (torch-free at import; the training loop is imported when a run starts).

- ``search``: every (lr, weight decay) point of a method's grid (:func:`provpt.config.search_grid`),
  trained on ``search.train_split`` and evaluated on ``search.eval_split`` with ``search.seed``,
  each into ``<root>/lr<lr>_wd<wd>/``; a finished point is not trained again;
- ``select`` (:mod:`provpt.selection`): the best point on that split only, never on test;
- ``final``: the selected lr/wd, one run per seed, on ``final.train_split`` -> ``final.eval_split``
  (``provpt train --stage final --hparams <selection>``).
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, as_mapping, deep_merge, fmt, read_profile, resolve, search_grid


def point_dir(root, lr, wd) -> Path:
    return Path(root) / f"lr{fmt(lr)}_wd{fmt(wd)}"


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
        "dataset": dataset, "lr": float(lr), "weight_decay": float(wd), "out": str(point_dir(root, lr, wd))}))
            for lr in grid_lrs for wd in wds]


def search(profile, dataset: str, method: str, root, lrs=None, overrides=()) -> list[dict]:
    """Train the search points (resuming unfinished ones); returns their metrics."""
    from .train import run

    return [run(cfg) for cfg in search_configs(profile, dataset, method, root, lrs, overrides)]
