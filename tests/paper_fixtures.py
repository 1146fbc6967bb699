"""Generated stand-ins for the paper profiles' inputs: a NOAH-layout VTAB-1k root, a VPT-json FGVC
root and a random-weight ViT-B/16 in Google's ``.npz`` key layout.

The real task folder names and class counts (provpt.data.vtab.VTAB_TASKS, provpt.data.fgvc), images
of mixed sizes and modes (grey ones included), only fewer of them. Importable outside pytest (a GPU
check or a benchmark builds the same roots): ``python -c "from tests.paper_fixtures import ..."``
from the repository root, or with ``tests/`` on the path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VTAB_SIZES = {"train800": 4, "val200": 2, "test": 2}  # train800val200 = train800 + val200, as in NOAH
FGVC_SIZES = {"train": 4, "val": 2, "test": 2}  # + one image of every class left, in split `rest`
IMAGE_SIZES = ((32, 24), (48, 48), (20, 40), (64, 36))  # (width, height): mixed sizes and aspects
MODES = ("RGB", "L", "RGB", "RGB")  # every fourth image grey


def _write_image(path: Path, rng: np.random.Generator, k: int) -> None:
    from PIL import Image

    w, h = IMAGE_SIZES[k % len(IMAGE_SIZES)]
    mode = MODES[k % len(MODES)]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    img.save(path)


def make_noah_root(root, tasks, sizes: dict | None = None, seed: int = 0) -> Path:
    """``<root>/<task>/{train800,val200,train800val200,test}.txt`` and ``images/<split>/*.jpg`` for each
    VTAB-1k task of ``tasks`` (its real name and class count); labels cycle through the classes.
    ``train800val200`` lists the train800 and val200 images, as NOAH's files do."""
    from provpt.data.vtab import VTAB_TASKS

    root, sizes = Path(root), {**VTAB_SIZES, **(sizes or {})}
    rng = np.random.default_rng(seed)
    for task in tasks:
        classes = VTAB_TASKS[task][1]
        lines, k = {}, 0
        for split in ("train800", "val200", "test"):
            lines[split] = []
            for i in range(sizes[split]):
                rel = f"images/{split}/{i:06d}.{'png' if k % 3 == 2 else 'jpg'}"
                _write_image(root / task / rel, rng, k)
                lines[split].append(f"{rel} {(k * 7) % classes}")
                k += 1
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, rows in lines.items():
            (root / task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_fgvc_root(root, datasets, sizes: dict | None = None, seed: int = 0, rest: str = "test") -> Path:
    """``<root>/<dataset>/{train,val,test}.json`` (VPT's layout: image path -> class id, ids from 1 as
    in VPT's files) and the images under VPT's image folder of each dataset. provpt checks that the
    three files hold the dataset's every class: split ``rest`` gets one image of each class the
    others lack (test: evaluated once per final run, at its last epoch; val is evaluated by every
    search run and every epoch of a study's run)."""
    from provpt.data.fgvc import FGVC_DATASETS, FGVC_IMAGE_DIRS

    root, sizes = Path(root), {**FGVC_SIZES, **(sizes or {})}
    rng = np.random.default_rng(seed)
    for name in datasets:
        classes = FGVC_DATASETS[name]
        folder = root / name / FGVC_IMAGE_DIRS[name]
        seen, k = set(), 0
        splits = {}
        order = [s for s in ("train", "val", "test") if s != rest] + [rest]
        for split in order:
            splits[split] = {}
            labels = [(k + i) % classes for i in range(sizes[split])]
            if split == rest:
                labels += [c for c in range(classes) if c not in seen and c not in labels]
            for label in labels:
                rel = f"{label + 1:03d}.class/{split}_{k:05d}.jpg"
                _write_image(folder / rel, rng, k)
                splits[split][rel] = label + 1
                seen.add(label)
                k += 1
        for split, entries in splits.items():
            (root / name / f"{split}.json").write_text(json.dumps(entries))
    return root


# ----------------------------------------------------------------------------- ViT-B/16 in Google's npz layout


def google_npz_arrays(model) -> dict[str, np.ndarray]:
    """A timm VisionTransformer's weights under the keys and layouts of Google's original ViT
    checkpoints (``ViT-B_16.npz``): the inverse of timm's ``_load_weights`` for those files (conv
    kernels HWIO, dense kernels (in, out), attention q/k/v kernels (dim, heads, head_dim) and the
    output kernel (heads, head_dim, dim)). No classifier head (the backbone has none)."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    heads = model.blocks[0].attn.num_heads
    hd = dim // heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[mha + f"{n}/kernel"] = qkv_w[j * dim:(j + 1) * dim].T.reshape(dim, heads, hd)
            out[mha + f"{n}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, hd)
        out[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, hd).transpose(1, 2, 0)
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def random_vit_b16(seed: int = 0):
    """timm's ``vit_base_patch16_224`` without head, random weights from ``seed`` (the global RNG untouched)."""
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


def write_vit_b16_npz(path, seed: int = 0) -> Path:
    """A random-weight ViT-B/16 written as Google's ``ViT-B_16.npz`` (about 340 MB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **google_npz_arrays(random_vit_b16(seed)))
    return path
