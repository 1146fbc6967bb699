"""The CUDA path of the training loop: data held on the device as uint8, bf16 autocast, relocation.

Skipped (and listed as skipped in the summary) where CUDA is not available.
"""

import json
import math

import numpy as np
import pytest
import torch

from provpt.config import RunConfig
from provpt.data.cache import prepare_split
from provpt.data.task import TaskData
from provpt.train import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)
SIZES = {"train800": 64, "val200": 32}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A 3-class colour task (class = dominant channel), prepared into the uint8 cache."""
    from PIL import Image

    src, cache = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    info = {"task": "toy", "num_classes": 3, "norm": "vtab"}
    for split, n in SIZES.items():
        items = []
        for i in range(n):
            img = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
            img[..., i % 3] += 100
            path = src / split / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            items.append((path, i % 3))
        prepare_split(items, cache / "toy", split, 16, info=info, progress=False)
    return cache


def cfg_for(root, out, **kw) -> RunConfig:
    base = dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", backbone_kwargs=KW,
                method="pro-vpt", num_prompts=2, epochs=4, batch_size=16, optimizer="adamw", lr=0.01,
                eval_splits=["val200"], device="cuda", precision="bf16", progress=False, out=str(out))
    return RunConfig.from_profile({"train": base}, kw)  # kw may hold dotted keys (relocation.scoring)


def test_task_data_lives_on_the_device_as_uint8(cache_root, tmp_path):
    data = TaskData(cfg_for(cache_root, tmp_path), torch.device("cuda"))
    images, labels = data.splits["train800"]
    assert images.is_cuda and images.dtype == torch.uint8 and labels.is_cuda
    x, y = next(data.batches("train800", 16, train=True))
    assert x.is_cuda and x.dtype == torch.float32 and x.shape == (16, 3, 16, 16) and y.is_cuda


@pytest.mark.parametrize("reloc", [{}, {"relocation.scoring": "pass"}, {"relocation.pruning": "norm"}],
                         ids=["online", "pass", "norm"])
def test_bf16_pro_vpt_run_on_cuda(cache_root, tmp_path, reloc):
    cfg = cfg_for(cache_root, tmp_path / "run", **reloc)
    m = run(cfg)
    out = tmp_path / "run"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    moves = [json.loads(line) for line in (out / "moves.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert math.isfinite(m["eval"]["val200"]["loss"]) and 0 <= m["eval"]["val200"]["acc"] <= 100
    total = 3 * cfg.num_prompts
    # bookkeeping: every epoch's distribution keeps the budget, and replaying the logged moves on the
    # uniform start gives the final distribution
    dist = [cfg.num_prompts] * 3
    for h in history:
        assert sum(h["distribution"]) == total and min(h["distribution"]) >= 0
    assert sum(h["moves"] for h in history) == len(moves)
    for mv in moves:
        if mv["target"] != mv["source"]:
            dist[mv["source"]] -= 1
            dist[mv["target"]] += 1
        assert mv["distribution"] == dist
    assert m["distribution"] == dist == history[-1]["distribution"]
    if reloc.get("relocation.pruning") == "norm":  # norm pruning always picks a prompt from epoch 1 on
        assert len(moves) == cfg.epochs - cfg.relocation.warmup_epochs


def test_bf16_autocast_reaches_the_model(cache_root, tmp_path):
    from provpt.model.methods import build_model

    model = build_model(cfg_for(cache_root, tmp_path), 3).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 16, 16, device="cuda"))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.prompts.gates.grad is not None and torch.isfinite(model.prompts.gates.grad).all()


@pytest.mark.slow
def test_compiled_vpt_deep_run_on_cuda(cache_root, tmp_path):
    m = run(cfg_for(cache_root, tmp_path / "c", method="vpt-deep", epochs=2, compile=True))
    assert math.isfinite(m["train_loss"]) and m["distribution"] == [2, 2, 2]
