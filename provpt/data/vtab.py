"""VTAB-1k in the NOAH layout.

``<root>/<task>/{train800,val200,train800val200,test}.txt``, one image per line:
``images/<split>/000123.jpg <label>``, the path relative to ``<root>/<task>/``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from .errors import INT_RE, DataError, Item

GROUPS = ("natural", "specialized", "structured")
SPLITS = ("train800", "val200", "train800val200", "test")

# name -> (group, number of classes), in the order of the VTAB tables
VTAB_TASKS: "OrderedDict[str, tuple[str, int]]" = OrderedDict(
    [
        ("cifar", ("natural", 100)),
        ("caltech101", ("natural", 102)),
        ("dtd", ("natural", 47)),
        ("oxford_flowers102", ("natural", 102)),
        ("oxford_iiit_pet", ("natural", 37)),
        ("svhn", ("natural", 10)),
        ("sun397", ("natural", 397)),
        ("patch_camelyon", ("specialized", 2)),
        ("eurosat", ("specialized", 10)),
        ("resisc45", ("specialized", 45)),
        ("diabetic_retinopathy", ("specialized", 5)),
        ("clevr_count", ("structured", 8)),
        ("clevr_dist", ("structured", 6)),
        ("dmlab", ("structured", 6)),
        ("kitti", ("structured", 4)),
        ("dsprites_loc", ("structured", 16)),
        ("dsprites_ori", ("structured", 16)),
        ("smallnorb_azi", ("structured", 18)),
        ("smallnorb_ele", ("structured", 9)),
    ]
)

LAYOUT = "<root>/<task>/{" + ",".join(SPLITS) + "}.txt with lines 'images/<split>/000123.jpg <label>'"


def task_info(task: str, num_classes: int | None = None, group: str | None = None) -> tuple[str, int]:
    """``(group, num_classes)`` of a task; tasks outside :data:`VTAB_TASKS` need ``num_classes``."""
    if task in VTAB_TASKS:
        g, c = VTAB_TASKS[task]
        return group or g, int(num_classes or c)
    if num_classes is None:
        raise DataError(f"unknown VTAB task {task!r}: known tasks are {', '.join(VTAB_TASKS)} "
                        "(pass num_classes for a task of your own)")
    if int(num_classes) < 1:
        raise DataError(f"task {task!r}: num_classes must be >= 1, got {num_classes}")
    return group or "custom", int(num_classes)


def split_file(root: str | os.PathLike, task: str, split: str) -> Path:
    return Path(root) / task / f"{split}.txt"


def read_split(root: str | os.PathLike, task: str, split: str,
               num_classes: int | None = None) -> list[tuple[Path, int]]:
    """Read and check one split file; returns ``[(image path, label), ...]`` in file order.

    Every line must be ``<relative path> <integer label>`` with ``0 <= label < num_classes`` and the
    image must exist. A split need not contain every class. Blank lines are skipped.
    """
    _, num_classes = task_info(task, num_classes)
    path = split_file(root, task, split)
    if not path.is_file():
        raise DataError(f"split file not found: {path}\n  expected the NOAH VTAB-1k layout: {LAYOUT}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split file: {e}") from None
    base = path.parent
    items: list[tuple[Path, int]] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not INT_RE.fullmatch(parts[1]) or os.path.isabs(parts[0]):
            raise DataError(f"{where}: expected '<relative path> <integer label>', got {raw!r}")
        rel, label = parts[0], int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} outside [0, {num_classes}) "
                            f"(task {task!r} has {num_classes} classes)")
        image = base / rel
        if not image.is_file():
            raise DataError(f"{where}: image not found: {image}")
        items.append(Item(image, label, where))
    if not items:
        raise DataError(f"{path}: empty split (no '<relative path> <integer label>' lines)")
    return items
