"""``provpt prepare``: make a profile's datasets ready for training (decode once, cache as arrays).

Profile keys read: ``data.format`` (mini | vtab | fgvc), ``data.source`` (raw root: NOAH layout for
vtab, one folder per dataset with VPT json splits for fgvc, the generated images for mini),
``data.image_size`` (cache resolution), ``datasets`` and ``train.data_root`` (the cache root),
and for mini ``mini.fmnist_dir``, ``mini.seed``, ``mini.sizes``.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError


def prepare(profile: dict, only: str | None = None) -> list[str]:
    data = profile.get("data") or {}
    fmt = data.get("format", "vtab")
    datasets = list(profile.get("datasets") or [])
    if only is not None:
        if only not in datasets:
            raise ConfigError(f"prepare: dataset {only!r} is not in the profile's datasets {datasets}")
        datasets = [only]
    cache_root = Path((profile.get("train") or {}).get("data_root", f"data/{profile.get('profile')}/cache"))
    source = data.get("source")
    size = int(data.get("image_size", 224))
    done = []
    if fmt == "mini":
        from .data import mini
        from .data.cache import prepare_vtab_task

        mini_cfg = profile.get("mini") or {}
        source = Path(source or cache_root.parent / "raw")
        mini.generate(source, fmnist_dir=mini_cfg.get("fmnist_dir", mini.DEFAULT_FMNIST_DIR),
                      seed=int(mini_cfg.get("seed", 0)), sizes=mini_cfg.get("sizes"), tasks=datasets)
        for task in datasets:
            group, classes = mini.MINI_TASKS[task]
            prepare_vtab_task(source, task, cache_root, size=size, num_classes=classes, group=group)
            done.append(f"{task}: {cache_root / task}")
    elif fmt in ("vtab", "fgvc"):
        from .data.cache import prepare_fgvc, prepare_vtab_task

        what = {"vtab": "VTAB-1k root (NOAH layout)", "fgvc": "FGVC root (one folder per dataset with "
                "train/val/test.json)"}[fmt]
        if not source or not Path(source).is_dir():
            raise ConfigError(f"data.source={source!r}: {what} not found; set it in the profile or with "
                              f"data.source=/path/to/{'vtab-1k' if fmt == 'vtab' else 'fgvc'}")
        for name in datasets:
            if fmt == "vtab":
                prepare_vtab_task(Path(source), name, cache_root, size=size)
            else:
                prepare_fgvc(Path(source) / name, name, cache_root, size=size)
            done.append(f"{name}: {cache_root / name}")
    else:
        raise ConfigError(f"data.format={fmt!r}: expected mini, vtab or fgvc")
    return done
