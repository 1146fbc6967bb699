"""The data layer: VTAB-1k (NOAH layout), FGVC (VPT json) and the decoded uint8 cache.

numpy + PIL only (no torch). ``vtab.read_split`` / ``fgvc.read_split`` list and check a split;
``prepare_vtab_task`` / ``prepare_fgvc`` decode it once to ``<cache root>/<dataset>/``;
``load_split`` gives the arrays back for training.
"""

from . import fgvc, vtab
from .cache import (NORMALISATION, decode_image, load_split, prepare_fgvc, prepare_split,
                    prepare_vtab_task, read_manifest)
from .errors import DataError, Item
from .fgvc import FGVC_DATASETS
from .vtab import GROUPS, SPLITS, VTAB_TASKS

__all__ = [
    "DataError", "Item", "VTAB_TASKS", "GROUPS", "SPLITS", "FGVC_DATASETS", "NORMALISATION",
    "vtab", "fgvc", "prepare_split", "prepare_vtab_task", "prepare_fgvc", "load_split",
    "read_manifest", "decode_image",
]
