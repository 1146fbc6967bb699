"""The embedded mini benchmark: small VTAB-like tasks generated here, from installed packages only.

Seven 32x32 RGB tasks in VTAB's three groups, written in the NOAH layout
(``<root>/<task>/{train800,val200,train800val200,test}.txt``, lines ``images/<split>/000123.png <label>``)
so that the VTAB loader (:mod:`provpt.data.vtab`, :mod:`provpt.data.cache`) is what reads them.

- natural: ``digits`` (scikit-learn's 8x8 digits, enlarged, tinted), ``photos`` (which of 10
  scikit-image photographs a luminance crop comes from).
- specialized: ``textures`` (3 scikit-image texture photos and 5 procedural patterns).
- structured: ``count``, ``xpos``, ``rot``, ``size`` of items from the Fashion-MNIST *test* split
  pasted on a canvas (the backbone is pretrained on the *train* split, see :mod:`provpt.pretrain`).

Every image is drawn from a generator seeded by ``(seed, task, split)``; the same seed gives the same
bytes. Each split draws from its own sources (digits, Fashion-MNIST items) so splits never share one.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZE = 32  # output images are SIZE x SIZE RGB
SPLIT_SIZES = {"train800": 800, "val200": 200, "test": 1000}
VERSION = 1  # bump when a task's definition changes: an older folder is then regenerated

# name -> (group, number of classes), in table order
MINI_TASKS: "OrderedDict[str, tuple[str, int]]" = OrderedDict([
    ("digits", ("natural", 10)), ("photos", ("natural", 10)),
    ("textures", ("specialized", 8)),
    ("count", ("structured", 6)), ("xpos", ("structured", 8)), ("rot", ("structured", 8)), ("size", ("structured", 6)),
])
DESCRIPTIONS = {
    "digits": "scikit-learn 8x8 digit enlarged to 24-28 px, centred ±2 px, bright tint on a dark background",
    "photos": "which of 10 scikit-image photographs a luminance crop (50-90% of the shorter side, any of the 8 "
              "flips/quarter turns, random tint and contrast) is from",
    "textures": "brick, grass, gravel crops and plaid, rings, pinwheel, zigzag, blob patterns, tinted",
    "count": "number of Fashion-MNIST test items (1-6, 9-11 px) in distinct cells of a 3x3 grid, ±1 px jitter",
    "xpos": "x position (8 bins) of one Fashion-MNIST test item at a random height",
    "rot": "rotation (8 classes of 45°, ±15° jitter) of one Fashion-MNIST test item",
    "size": "size (6 classes of the item's longer side, 7-9 to 27-29 px) of one Fashion-MNIST test item",
}
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "hubble_deep_field",
          "immunohistochemistry", "motorcycle")
TEXTURE_PHOTOS = ("brick", "grass", "gravel")
FMNIST_HINT = ("install Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or set "
               "`mini.fmnist_dir` to a folder with the four IDX .gz files (train/t10k images/labels)")


# ----------------------------------------------------------------------------- sources


def load_fashion_mnist(fmnist_dir=DEFAULT_FMNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k) as ``(uint8 [N, 28, 28], int64 [N])``."""
    if split not in FMNIST_FILES:
        raise ValueError(f"Fashion-MNIST split {split!r}: expected 'train' or 'test'")
    arrays = []
    for name, kind in zip(FMNIST_FILES[split], ("images", "labels")):
        path = Path(fmnist_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file not found: {path}; {FMNIST_HINT}")
        with gzip.open(path, "rb") as f:
            data = f.read()
        magic, n = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big")
        if (kind, magic) not in (("images", 2051), ("labels", 2049)):
            raise ValueError(f"{path}: not an IDX {kind} file (magic {magic})")
        if kind == "images":
            h, w = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
            arrays.append(np.frombuffer(data, np.uint8, n * h * w, 16).reshape(n, h, w).copy())
        else:
            arrays.append(np.frombuffer(data, np.uint8, n, 8).astype(np.int64))
    if len(arrays[0]) != len(arrays[1]):
        raise ValueError(f"{fmnist_dir}: {split} images and labels differ in count")
    return arrays[0], arrays[1]


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A scikit-image bundled photograph as float luminance in [0, 1]."""
    import skimage.data
    from skimage.color import rgb2gray

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = np.asarray(img)
    return (rgb2gray(img[..., :3]) if img.ndim == 3 else img / 255.0).astype(np.float32)


# ----------------------------------------------------------------------------- drawing helpers


def _resize(a: np.ndarray, h: int, w: int | None = None) -> np.ndarray:
    """Float image resized with PIL (antialiased bilinear)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize((w or h, h), Image.BILINEAR))


def _colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """A bright random tint and a dark random background (fixed polarity)."""
    return rng.uniform(0.6, 1.0, 3), rng.uniform(0.0, 0.3, 3)


def _finish(alpha: np.ndarray, rng, noise: float, pool: int = 2) -> np.ndarray:
    """Alpha map (pool*SIZE square, [0, 1]) -> tinted, average-pooled, noisy uint8 SIZE x SIZE x 3."""
    if pool > 1:
        alpha = alpha.reshape(SIZE, pool, SIZE, pool).mean((1, 3))
    fg, bg = _colours(rng)
    img = bg + np.clip(alpha, 0, 1)[..., None] * (fg - bg) + rng.normal(0, noise, (SIZE, SIZE, 3))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _balanced(rng, n: int, k: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % k)


def _item(img28: np.ndarray, side: float, angle: float = 0.0) -> np.ndarray:
    """A Fashion-MNIST item as alpha, rotated, cropped to its box, longer side scaled to ``side`` px, and
    brightened (peak scaled to 1.5, clipped) so that dim items still stand out."""
    from PIL import Image

    a = Image.fromarray(np.pad(img28, 8))  # room to rotate without clipping
    if angle:
        a = a.rotate(angle, resample=Image.BILINEAR)
    a = np.asarray(a, dtype=np.float32) / 255.0
    ys, xs = np.nonzero(a > 0.1)
    a = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scale = side / max(a.shape)
    a = _resize(a, max(1, round(a.shape[0] * scale)), max(1, round(a.shape[1] * scale)))
    return np.clip(1.5 * a / max(float(a.max()), 1e-6), 0, 1)


def _paste(canvas: np.ndarray, a: np.ndarray, cy: float, cx: float) -> None:
    """Max-composite alpha ``a`` centred at (cy, cx), clipped to the canvas."""
    h, w = a.shape
    y0, x0 = int(round(cy - h / 2)), int(round(cx - w / 2))
    ys, xs = slice(max(y0, 0), min(y0 + h, canvas.shape[0])), slice(max(x0, 0), min(x0 + w, canvas.shape[1]))
    np.maximum(canvas[ys, xs], a[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0], out=canvas[ys, xs])


# ----------------------------------------------------------------------------- tasks
# Each task: (rng, n, ctx) -> (uint8 images [n, SIZE, SIZE, 3], labels [n], provenance dict).
# ``ctx`` holds the split's own sources (``digits``: indices; ``items``: Fashion-MNIST test indices).


def _digits(rng, n, ctx):
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = ctx["digits"][:n]
    out = np.empty((len(idx), SIZE, SIZE, 3), np.uint8)
    for j, i in enumerate(idx):
        s = int(rng.integers(24, 29))
        a = np.zeros((SIZE, SIZE), np.float32)
        digit = np.clip(_resize(d.images[i] / 16.0, s), 0, 1)
        cy = SIZE / 2 + rng.uniform(-2, 2)
        _paste(a, digit, cy, SIZE / 2 + rng.uniform(-2, 2))
        out[j] = _finish(a, rng, 0.03, pool=1)
    return out, d.target[idx].astype(np.int64), {"source": "sklearn.datasets.load_digits", "indices": idx.tolist()}


def _photos(rng, n, ctx):
    photos = [_photo(p) for p in PHOTOS]
    labels = _balanced(rng, n, len(PHOTOS))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for j, k in enumerate(labels):
        p = photos[k]
        c = int(rng.uniform(0.5, 0.9) * min(p.shape))
        y, x = rng.integers(0, p.shape[0] - c + 1), rng.integers(0, p.shape[1] - c + 1)
        a = np.rot90(_resize(p[y:y + c, x:x + c], 2 * SIZE), int(rng.integers(4)))
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = (a - a.mean()) * rng.uniform(0.7, 1.5) + rng.uniform(0.35, 0.65)
        out[j] = _finish(a, rng, 0.02)
    return out, labels, {"source": "skimage.data", "photos": list(PHOTOS)}


def _texture(k: int, rng, photos) -> np.ndarray:
    """Texture class ``k`` as a (2*SIZE)^2 map in [0, 1]."""
    m = 2 * SIZE
    if k < len(photos):
        p = photos[k]
        c = int(rng.integers(64, 129))
        y, x = rng.integers(0, p.shape[0] - c + 1), rng.integers(0, p.shape[1] - c + 1)
        a = np.rot90(_resize(p[y:y + c, x:x + c], m), int(rng.integers(4)))
    else:
        yy, xx = np.mgrid[-1:1:m * 1j, -1:1:m * 1j]
        t = rng.uniform(0, np.pi)
        u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        r, th = np.hypot(yy - cy, xx - cx), np.arctan2(yy - cy, xx - cx)
        f, ph = rng.uniform(3, 5) * np.pi, rng.uniform(0, 2 * np.pi)
        kind = k - len(photos)
        if kind == 0:  # plaid
            a = np.sin(f * u + ph) + np.sin(f * v + rng.uniform(0, 2 * np.pi))
        elif kind == 1:  # concentric rings
            a = np.sin(2 * f * r + ph)
        elif kind == 2:  # pinwheel
            a = np.sin(int(rng.integers(5, 9)) * th + ph)
        elif kind == 3:  # zigzag
            g = rng.uniform(2, 4) * np.pi
            a = np.sin(f * (v + 0.25 * np.abs(((u * g / np.pi) % 2) - 1)) * 2 + ph)
        else:  # gaussian blobs
            a = np.zeros((m, m))
            for _ in range(int(rng.integers(6, 12))):
                by, bx = rng.uniform(-1, 1, 2)
                a += np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * rng.uniform(0.08, 0.2) ** 2))
    lo, hi = np.percentile(a, (2, 98))
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def _textures(rng, n, ctx):
    photos = [_photo(p) for p in TEXTURE_PHOTOS]
    labels = _balanced(rng, n, MINI_TASKS["textures"][1])
    out = np.stack([_finish(_texture(int(k), rng, photos), rng, 0.02) for k in labels]).astype(np.uint8)
    return out, labels, {"source": "skimage.data + procedural", "photos": list(TEXTURE_PHOTOS)}


def _canvas(rng, ctx, placements) -> tuple[np.ndarray, list[int]]:
    """Random items of the split's pool placed as ``(side, centre y, centre x, angle)`` (output pixels,
    degrees), drawn at twice the size and average-pooled."""
    a = np.zeros((2 * SIZE, 2 * SIZE), np.float32)
    used = []
    for side, cy, cx, angle in placements:
        i = int(ctx["items"][rng.integers(len(ctx["items"]))])
        used.append(i)
        _paste(a, _item(ctx["fmnist"][i], 2 * side, angle), 2 * cy, 2 * cx)
    return _finish(a, rng, 0.02), used


def _structured(draw, name: str):
    """Wrap ``draw(rng, label) -> placements`` into the task ``name`` of Fashion-MNIST test items."""

    def task(rng, n, ctx):
        labels = _balanced(rng, n, MINI_TASKS[name][1])
        out = np.empty((n, SIZE, SIZE, 3), np.uint8)
        used = set()
        for j, k in enumerate(labels):
            out[j], items = _canvas(rng, ctx, draw(rng, int(k)))
            used.update(items)
        return out, labels, {"source": "fashion-mnist t10k (test split)", "items": sorted(used)}

    return task


def _count(rng, k):
    cell = SIZE / 3
    cells = rng.choice(9, k + 1, replace=False)
    return [(rng.uniform(9, 11), cell * (c // 3 + 0.5) + rng.uniform(-1, 1),
             cell * (c % 3 + 0.5) + rng.uniform(-1, 1), 0) for c in cells]


def _xpos(rng, k):
    side = rng.uniform(10, 13)
    lo, hi = side / 2, SIZE - side / 2
    return [(side, rng.uniform(lo, hi), lo + (hi - lo) * (k + rng.random()) / 8, 0)]


def _rot(rng, k):
    return [(rng.uniform(20, 24), SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-2, 2),
             45 * k + rng.uniform(-15, 15))]


def _size(rng, k):
    side = 7 + 4 * k + rng.uniform(0, 2)
    return [(side, rng.uniform(side / 2, SIZE - side / 2), rng.uniform(side / 2, SIZE - side / 2), 0)]


TASKS = {"digits": _digits, "photos": _photos, "textures": _textures, "count": _structured(_count, "count"),
         "xpos": _structured(_xpos, "xpos"), "rot": _structured(_rot, "rot"), "size": _structured(_size, "size")}
STRUCTURED = ("count", "xpos", "rot", "size")


# ----------------------------------------------------------------------------- writing


def _spec(task: str, seed: int, sizes: dict) -> dict:
    group, num_classes = MINI_TASKS[task]
    return {"task": task, "group": group, "num_classes": num_classes, "description": DESCRIPTIONS[task],
            "seed": seed, "sizes": sizes, "version": VERSION, "image_size": SIZE}


def _is_complete(folder: Path, spec: dict) -> bool:
    try:
        info = json.loads((folder / "mini.json").read_text())
    except (OSError, ValueError):
        return False
    return ({k: info.get(k) for k in spec} == spec
            and all((folder / f"{s}.txt").is_file() for s in (*SPLIT_SIZES, "train800val200")))


def _sources(task: str, seed: int, sizes: dict, fmnist) -> dict:
    """Disjoint sources per split: digit indices, or Fashion-MNIST test item indices."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), 1 << 20])
    if task == "digits":
        from sklearn.datasets import load_digits

        perm, start, out = rng.permutation(len(load_digits().target)), 0, {}
        for s, n in sizes.items():
            out[s] = {"digits": perm[start:start + n]}
            start += len(out[s]["digits"])
        return out
    if task in STRUCTURED:
        perm = rng.permutation(len(fmnist))  # 60% / 15% / 25% of the 10k test items
        cuts = np.cumsum([0, 6000, 1500, 2500]) * len(fmnist) // 10000
        return {s: {"items": perm[cuts[i]:cuts[i + 1]], "fmnist": fmnist} for i, s in enumerate(SPLIT_SIZES)}
    return {s: {} for s in sizes}


def generate(out_root, fmnist_dir=DEFAULT_FMNIST_DIR, seed: int = 0, sizes: dict | None = None,
             tasks=None) -> list[str]:
    """Write the mini tasks in the NOAH layout under ``out_root``; returns the task names.

    ``sizes`` overrides the image counts of ``train800``, ``val200`` and ``test`` (``train800val200``
    is always their union; digits' test holds at most the 797 digits left). A task folder whose
    split files are complete for the same seed, sizes and version is left alone; otherwise it is
    written to a temporary folder and renamed into place.
    """
    out_root = Path(out_root)
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLIT_SIZES)
    if unknown:
        raise ValueError(f"mini sizes: unknown split(s) {sorted(unknown)}; expected {list(SPLIT_SIZES)}")
    tasks = list(MINI_TASKS) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    bad = [t for t in tasks if t not in MINI_TASKS]
    if bad:
        raise ValueError(f"unknown mini task(s) {bad}: known tasks are {', '.join(MINI_TASKS)}")
    fmnist = None
    for task in tasks:
        spec = _spec(task, seed, {s: int(n) for s, n in sizes.items()})
        folder = out_root / task
        if _is_complete(folder, spec):
            continue
        if task in STRUCTURED and fmnist is None:
            fmnist = load_fashion_mnist(fmnist_dir, "test")[0]
        tmp = out_root / f".{task}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        provenance, lines = {}, {}
        for i, (split, ctx) in enumerate(_sources(task, seed, sizes, fmnist).items()):
            rng = np.random.default_rng([seed, zlib.crc32(task.encode()), i])
            images, labels, provenance[split] = TASKS[task](rng, sizes[split], ctx)
            (tmp / "images" / split).mkdir(parents=True)
            lines[split] = []
            for j, (img, label) in enumerate(zip(images, labels)):
                rel = f"images/{split}/{j:06d}.png"
                _save_png(img, tmp / rel)
                lines[split].append(f"{rel} {int(label)}\n")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, ls in lines.items():
            (tmp / f"{split}.txt").write_text("".join(ls))
        (tmp / "mini.json").write_text(json.dumps({**spec, "provenance": provenance}) + "\n")
        if folder.exists():  # stale (other seed, sizes or version): swap it out
            old = out_root / f".{task}.{os.getpid()}.old"
            os.replace(folder, old)
            shutil.rmtree(old)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same task first
            if not _is_complete(folder, spec):
                raise
            shutil.rmtree(tmp)
    return tasks


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG", optimize=False, compress_level=6)
