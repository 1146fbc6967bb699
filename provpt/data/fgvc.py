"""FGVC with VPT's json splits.

``<root>/{train,val,test}.json``, each a JSON object ``{"<relative image path>": <class id>}``.
Class ids are remapped to ``0..C-1`` through the sorted union of the ids of all three files, so
every split shares one mapping (VPT maps per file, which breaks when a split lacks a class).
Image paths are relative to ``<root>/<image dir>``, VPT's folder for each dataset (``images`` for
CUB and NABirds, ``Images`` for Stanford Dogs, the root itself for Cars and Flowers); a file whose
first path exists only relative to ``<root>`` is read relative to ``<root>`` instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError, Item

FGVC_DATASETS = {"cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120, "stanford_cars": 196}
FGVC_IMAGE_DIRS = {"cub": "images", "nabirds": "images", "stanford_dogs": "Images",
                   "oxford_flowers": "", "stanford_cars": ""}
FILES = ("train", "val", "test")
SPLITS = FILES + ("trainval",)  # trainval = train + val
LAYOUT = "<root>/{train,val,test}.json, each a JSON object {\"<relative image path>\": <class id>}"


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise DataError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def _line_of(text: str, key: str) -> int | None:
    for enc in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
        i = text.find(enc)
        if i >= 0:
            return text.count("\n", 0, i) + 1
    return None


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line else f"{path} (entry {key!r})"


def read_json(path: str | os.PathLike) -> tuple[dict[str, int], str]:
    """One split file checked to be a non-empty JSON object of str -> int; also returns its text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}\n  expected the VPT FGVC layout: {LAYOUT}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split file: {e}") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}:1: expected a JSON object mapping image path -> class id, "
                        f"got a {type(data).__name__}")
    for k, v in data.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise DataError(f"{_where(path, text, k)}: expected an integer class id for {k!r}, got {v!r}")
        if os.path.isabs(k) or not k.strip():
            raise DataError(f"{_where(path, text, k)}: expected a relative image path, got {k!r}")
    if not data:
        raise DataError(f"{path}: empty split (no image entries)")
    return data, text


def class_map(root: str | os.PathLike) -> dict[int, int]:
    """Original class id -> contiguous id, from the sorted union over train, val and test."""
    ids = set()
    for f in FILES:
        ids.update(read_json(Path(root) / f"{f}.json")[0].values())
    return {c: i for i, c in enumerate(sorted(ids))}


def read_split(root: str | os.PathLike, split: str, name: str | None = None,
               image_dir: str | None = None) -> tuple[list[tuple[Path, int]], dict[int, int]]:
    """Read one split (``train``, ``val``, ``test`` or ``trainval``) of an FGVC dataset.

    Returns ``([(image path, contiguous label), ...], {original id: contiguous id})``. ``name`` (a
    key of :data:`FGVC_DATASETS`) picks VPT's image folder and checks the class count.
    """
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"unknown FGVC split {split!r}: expected one of {', '.join(SPLITS)}")
    if name is not None and name not in FGVC_DATASETS:
        raise DataError(f"unknown FGVC dataset {name!r}: known datasets are {', '.join(FGVC_DATASETS)}")
    if image_dir is None:
        image_dir = FGVC_IMAGE_DIRS.get(name, "")
    cmap = class_map(root)
    if name is not None and len(cmap) != FGVC_DATASETS[name]:
        raise DataError(f"{root}: {name} has {FGVC_DATASETS[name]} classes, but train/val/test.json "
                        f"hold {len(cmap)} distinct class ids")
    items: list[tuple[Path, int]] = []
    for f in (("train", "val") if split == "trainval" else (split,)):
        path = root / f"{f}.json"
        data, text = read_json(path)
        base = root / image_dir
        first = next(iter(data))
        if image_dir and not (base / first).is_file() and (root / first).is_file():
            base = root  # paths written relative to <root> (e.g. 'images/...')
        for rel, cid in data.items():
            image = base / rel
            where = _where(path, text, rel)
            if not image.is_file():
                raise DataError(f"{where}: image not found: {image}")
            items.append(Item(image, cmap[cid], where))
    return items, cmap
