"""The data layer's one error type, and the item record that remembers where it was listed."""

from __future__ import annotations

import re
from pathlib import Path


class DataError(ValueError):
    """A dataset folder, split file, image or cache that does not fit; the message names the file
    (and line, where there is one) and what was expected."""


class Item(tuple):
    """A ``(path, label)`` pair that also remembers where it was listed (``item.where``, e.g.
    ``'.../train800.txt:12'``), so that an image failing to decode later can name its split line.

    It is a plain 2-tuple otherwise: ``path, label = item`` and ``item == (path, label)`` work.
    """

    def __new__(cls, path: Path, label: int, where: str = ""):
        self = super().__new__(cls, (path, label))
        self.where = where
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.where)


INT_RE = re.compile(r"[+-]?\d+")


def where_of(item, fallback: str) -> str:
    return getattr(item, "where", "") or fallback
