"""Decode and resize once; keep every split as uint8 arrays on disk with a manifest.

``<task_dir>/<split>.images.npy`` (uint8, N x 3 x S x S, C-contiguous), ``<split>.labels.npy``
(int64, N) and ``manifest.json``: task, kind, group, num_classes, normalisation, and per split the
image count, label counts, sha256 of both arrays' bytes, image size, resize rule and file list.
Arrays are written under a temporary name and renamed; the manifest is updated (atomically, under
a file lock) only after both arrays are in place, so a killed job leaves no split that looks done
and a re-run redoes only the unfinished splits.

Resize rules: ``squash`` resizes to S x S (the VTAB protocol, ``Resize((224, 224))``); ``center``
resizes the shorter side to S and centre-crops S x S (VPT's FGVC ``Resize(256)``: its test-time
``CenterCrop(224)`` of the cached image is the same image; train-time random crops range over the
central square instead of the whole longer side). Images are decoded with PIL, converted to RGB
(grayscale, palette, RGBA, CMYK, ...) like torchvision's default loader, and resized with PIL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..io import atomic_path, file_sha256, write_text
from . import fgvc, vtab
from .errors import DataError, where_of

NORMALISATION = {
    "vtab": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP, EVA-02
}
MANIFEST = "manifest.json"
FORMAT = 1
FITS = ("squash", "center")
RESAMPLE = ("bilinear", "bicubic", "nearest", "lanczos")
CHUNK = 256  # images decoded per batch of the thread pool (bounds memory)
PREPARE_HINT = "make it with `provpt prepare` for this dataset"


# ----------------------------------------------------------------------------- files, manifest


@contextlib.contextmanager
def _locked(task_dir: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent writers assumed
        yield
        return
    with open(task_dir / ".manifest.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(task_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared dataset folder (``<cache root>/<dataset>``)."""
    path = Path(task_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no prepared data at {Path(task_dir)} ({MANIFEST} missing); {PREPARE_HINT}")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete it and rerun `provpt prepare`") from None
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict):
        raise DataError(f"{path}: not a provpt data manifest (no 'splits' mapping)")
    return m


def _update_manifest(task_dir: Path, info: dict | None = None, split: str | None = None,
                     entry: dict | None = None) -> dict:
    """Merge task-level ``info``; set (or with ``entry=None`` drop) one split's entry."""
    with _locked(task_dir):
        path = task_dir / MANIFEST
        m = read_manifest(task_dir) if path.is_file() else {"format": FORMAT, "splits": {}}
        m.update(info or {})
        splits = m.pop("splits")
        if split is not None:
            splits.pop(split, None)
            if entry is not None:
                splits[split] = entry
        m["splits"] = dict(sorted(splits.items()))
        write_text(path, json.dumps(m, indent=1) + "\n")
    return m


def _sha256_rows(arr: np.ndarray, rows_per_block: int = 256) -> str:
    h = hashlib.sha256()
    for i in range(0, len(arr), rows_per_block):
        h.update(np.ascontiguousarray(arr[i : i + rows_per_block]))
    return h.hexdigest()


# ----------------------------------------------------------------------------- decoding


def decode_image(path: str | os.PathLike, size: int, fit: str = "squash", resample: str = "bilinear") -> np.ndarray:
    """One image as uint8 (3, size, size). Raises whatever PIL raises on a bad file."""
    from PIL import Image

    method = getattr(Image.Resampling, resample.upper())
    with Image.open(path) as im:
        im.load()
        im = im.convert("RGB")
    if fit == "center":  # torchvision Resize(size) (shorter side) + CenterCrop(size)
        w, h = im.size
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        im = im.resize((nw, nh), method)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    else:
        im = im.resize((size, size), method)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def _relative(paths: list[Path], root: Path | None) -> list[str]:
    if root is None:
        root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths]))
    root = os.path.abspath(root)
    return [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in paths]


def _split_key(rels, labels, sources, size, fit, resample) -> str:
    blob = json.dumps({"format": FORMAT, "size": size, "fit": fit, "resample": resample,
                       "sources": sources, "items": [[r, int(l)] for r, l in zip(rels, labels)]})
    return hashlib.sha256(blob.encode()).hexdigest()


def _is_done(task_dir: Path, split: str, key: str) -> bool:
    try:
        entry = read_manifest(task_dir)["splits"].get(split)
    except DataError:
        return False
    if not entry or entry.get("key") != key:
        return False
    try:
        images = np.load(task_dir / entry["images"], mmap_mode="r")
        labels = np.load(task_dir / entry["labels"], mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return False
    return list(images.shape) == entry["shape"] and labels.shape == (entry["n"],)


# ----------------------------------------------------------------------------- preparing


def prepare_split(items, out_dir: str | os.PathLike, split: str, size: int, *, source=None,
                  root: str | os.PathLike | None = None, info: dict | None = None, fit: str = "squash",
                  resample: str = "bilinear", workers: int | None = None, progress: bool = True) -> dict:
    """Decode ``items`` (``[(image path, label), ...]``) into ``<out_dir>/<split>.{images,labels}.npy``.

    ``source``: the split file(s) the items came from (their sha256 goes into the manifest and the
    split's key); ``root``: the folder the manifest's relative file names start from (default: the
    first source's folder); ``info``: task-level manifest fields (task, kind, group, num_classes,
    norm). A split whose key (items, sources, size, resize rule) matches the manifest and whose
    arrays are in place is skipped. Returns the split's manifest entry.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = list(items)
    if not items:
        raise DataError(f"split {split!r} for {out_dir}: no images to prepare")
    if fit not in FITS:
        raise DataError(f"fit={fit!r}: expected one of {FITS}")
    if resample not in RESAMPLE:
        raise DataError(f"resample={resample!r}: expected one of {RESAMPLE}")
    sources = [Path(s) for s in ([] if source is None else [source] if isinstance(source, (str, os.PathLike)) else source)]
    if root is None and sources:
        root = sources[0].parent
    paths = [Path(p) for p, _ in items]
    labels = np.asarray([int(l) for _, l in items], dtype=np.int64)
    rels = _relative(paths, Path(root) if root is not None else None)
    src = [{"file": r, "sha256": file_sha256(s)} for r, s in zip(_relative(sources, root), sources)] if sources else []
    key = _split_key(rels, labels, src, size, fit, resample)
    info = dict(info or {})
    if _is_done(out_dir, split, key):
        m = read_manifest(out_dir)
        if any(m.get(k) != v for k, v in info.items()):
            m = _update_manifest(out_dir, info)
        return m["splits"][split]

    num_classes = int(info.get("num_classes") or labels.max() + 1)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"split {split!r}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    _update_manifest(out_dir, info, split, None)  # not done until the arrays are in place
    n = len(items)
    shape = (n, 3, size, size)
    final_img, final_lab = out_dir / f"{split}.images.npy", out_dir / f"{split}.labels.npy"
    for p in (final_img, final_lab):  # what a killed job left: `.<name>.<pid>.tmp` (or the older `.<name>.tmp`)
        for stale in out_dir.glob(f".{p.name}.*tmp"):
            stale.unlink(missing_ok=True)
    h = hashlib.sha256()

    def decode(i):
        try:
            return decode_image(paths[i], size, fit, resample)
        except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), DecompressionBomb...
            raise DataError(f"{where_of(items[i], f'{split} item {i}')}: cannot decode image "
                            f"{paths[i]}: {type(e).__name__}: {e}") from None

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    # labels, then images, are moved into place on success; both temporaries are removed on failure
    with atomic_path(final_img) as tmp_img, atomic_path(final_lab) as tmp_lab:
        arr = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.uint8, shape=shape)
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers > 1 else None
            bar = _progress(n, f"{info.get('task', out_dir.name)}/{split}", progress)
            for start in range(0, n, CHUNK):
                idx = range(start, min(n, start + CHUNK))
                for i, img in zip(idx, pool.map(decode, idx) if pool else map(decode, idx)):
                    arr[i] = img
                    h.update(img)
                bar.update(len(idx))
            bar.close()
        arr.flush()
        del arr
        with open(tmp_lab, "wb") as f:
            np.save(f, labels)

    entry = {
        "n": n, "shape": list(shape), "size": size, "fit": fit, "resample": resample,
        "images": final_img.name, "labels": final_lab.name,
        "images_sha256": h.hexdigest(), "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "label_counts": np.bincount(labels, minlength=num_classes).tolist(),
        "key": key, "sources": src, "files": rels,
    }
    return _update_manifest(out_dir, info, split, entry)["splits"][split]


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="img", mininterval=2.0)


def _norm_info(norm: str) -> dict:
    mean, std = NORMALISATION[norm]
    return {"norm": norm, "mean": list(mean), "std": list(std)}


def prepare_vtab_task(src_root: str | os.PathLike, task: str, out_root: str | os.PathLike, size: int = 224,
                      num_classes: int | None = None, group: str | None = None, splits=vtab.SPLITS, *,
                      fit: str = "squash", resample: str = "bilinear", workers: int | None = None,
                      progress: bool = True) -> Path:
    """Cache the VTAB-1k splits of ``<src_root>/<task>`` into ``<out_root>/<task>``; returns that folder.

    Every split file is read and checked before any image is decoded.
    """
    group, num_classes = vtab.task_info(task, num_classes, group)
    lists = {s: vtab.read_split(src_root, task, s, num_classes) for s in splits}
    out = Path(out_root) / task
    info = {"task": task, "kind": "vtab", "group": group, "num_classes": num_classes, **_norm_info("vtab")}
    for s, items in lists.items():
        prepare_split(items, out, s, size, source=vtab.split_file(src_root, task, s), info=info,
                      fit=fit, resample=resample, workers=workers, progress=progress)
    return out


def prepare_fgvc(src_root: str | os.PathLike, name: str, out_root: str | os.PathLike, size: int = 256,
                 splits=fgvc.SPLITS, *, image_dir: str | None = None, fit: str = "center",
                 resample: str = "bilinear", workers: int | None = None, progress: bool = True) -> Path:
    """Cache an FGVC dataset (VPT json splits) into ``<out_root>/<name>``; returns that folder.

    ``trainval`` is stored as a reference to ``train`` + ``val`` (no second copy of the images);
    :func:`load_split` concatenates them.
    """
    src_root = Path(src_root)
    if not splits:
        raise DataError("prepare_fgvc: no splits requested")
    known = name if name in fgvc.FGVC_DATASETS else None
    files = [s for s in fgvc.FILES if s in splits or (s in ("train", "val") and "trainval" in splits)]
    unknown = sorted(set(splits) - set(fgvc.SPLITS))
    if unknown:
        raise DataError(f"unknown FGVC split(s) {unknown}: expected some of {', '.join(fgvc.SPLITS)}")
    lists = {s: fgvc.read_split(src_root, s, known, image_dir) for s in files}
    cmap = next(iter(lists.values()))[1]
    out = Path(out_root) / name
    info = {"task": name, "kind": "fgvc", "group": "fgvc", "num_classes": len(cmap),
            "classes": sorted(cmap), **_norm_info("imagenet")}
    sources = [src_root / f"{f}.json" for f in fgvc.FILES]  # the class map depends on all three
    for s, (items, _) in lists.items():
        prepare_split(items, out, s, size, source=sources, info=info, fit=fit, resample=resample,
                      workers=workers, progress=progress)
    if "trainval" in splits:
        parts = [read_manifest(out)["splits"][s] for s in ("train", "val")]
        entry = {"concat": ["train", "val"], "n": sum(p["n"] for p in parts),
                 "shape": [sum(p["n"] for p in parts)] + parts[0]["shape"][1:], "size": size,
                 "label_counts": np.add(parts[0]["label_counts"], parts[1]["label_counts"]).tolist(),
                 "key": hashlib.sha256((parts[0]["key"] + parts[1]["key"]).encode()).hexdigest()}
        _update_manifest(out, info, "trainval", entry)
    return out


# ----------------------------------------------------------------------------- loading


def load_split(task_dir: str | os.PathLike, split: str, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 3, S, S], labels int64 [N])`` of a prepared split.

    Images are memory-mapped read-only (a ``concat`` split such as FGVC ``trainval`` is read into
    memory); ``verify=True`` recomputes both sha256 and compares them with the manifest.
    """
    task_dir = Path(task_dir)
    m = read_manifest(task_dir)
    entry = m["splits"].get(split)
    if entry is None:
        raise DataError(f"{task_dir}: split {split!r} is not prepared (prepared: "
                        f"{', '.join(m['splits']) or 'none'}); {PREPARE_HINT}")
    if "concat" in entry:
        parts = [load_split(task_dir, s, verify) for s in entry["concat"]]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    arrays = []
    for kind in ("images", "labels"):
        path = task_dir / entry[kind]
        try:
            arrays.append(np.load(path, mmap_mode="r" if kind == "images" else None))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot load the {split!r} {kind} ({e}); {PREPARE_HINT}") from None
    images, labels = arrays
    if images.dtype != np.uint8 or list(images.shape) != entry["shape"]:
        raise DataError(f"{task_dir / entry['images']}: {images.dtype} {list(images.shape)} does not match the "
                        f"manifest's uint8 {entry['shape']}; {PREPARE_HINT}")
    if labels.dtype != np.int64 or labels.shape != (entry["n"],):
        raise DataError(f"{task_dir / entry['labels']}: {labels.dtype} {list(labels.shape)} does not match the "
                        f"manifest's int64 [{entry['n']}]; {PREPARE_HINT}")
    if verify:
        for kind, arr in (("images", images), ("labels", labels)):
            got = _sha256_rows(arr)
            if got != entry[f"{kind}_sha256"]:
                raise DataError(f"{task_dir / entry[kind]}: sha256 {got} differs from the manifest's "
                                f"{entry[f'{kind}_sha256']}: the cache was modified; delete the split's files and "
                                f"rerun `provpt prepare`")
    return images, labels
