"""Fashion-MNIST pretraining of the embedded backbone, on a tiny ViT for a few steps."""

from __future__ import annotations

import json
import os

import pytest
import torch

from provpt.data import mini
from provpt.io import file_sha256
from provpt.model.backbone import create_backbone
from provpt.pretrain import _lr_factor, pretrain

FMNIST = os.environ.get("FMNIST_DIR", mini.DEFAULT_FMNIST_DIR)
TINY = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2})


def run(out, **kw):
    return pretrain(*TINY, out, FMNIST, **{"budget_s": None, "max_steps": 3, "batch_size": 32,
                                          "threads": 1, "progress": False, **kw})


def test_pretrain_writes_loadable_backbone_and_summary(tmp_path):
    out = tmp_path / "backbone.safetensors"
    summary = run(out)
    model = create_backbone(TINY[0], weights=out, **TINY[1])
    assert sum(p.numel() for p in model.parameters()) > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["steps"] == 3 and saved["images_seen"] == 96 and saved["seed"] == 0
    assert saved["backbone_kwargs"] == TINY[1] and 0 <= saved["upstream_test_acc"] <= 1
    assert saved["weights_sha256"] == file_sha256(out)
    assert not list(tmp_path.glob("*.tmp"))


def test_pretrain_is_deterministic_for_a_seed(tmp_path):
    a, b, c = run(tmp_path / "a.safetensors"), run(tmp_path / "b.safetensors"), run(tmp_path / "c.safetensors", seed=1)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert torch.get_num_threads() > 0


def test_pretrain_needs_fashion_mnist(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        pretrain(*TINY, tmp_path / "b.safetensors", tmp_path, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="budget_s or max_steps"):
        pretrain(*TINY, tmp_path / "b.safetensors", FMNIST, budget_s=None, progress=False)


def test_schedule_warms_up_then_decays():
    assert _lr_factor(0.0, 0.05) <= 0.01 and _lr_factor(0.05, 0.05) == pytest.approx(1.0)
    assert _lr_factor(0.5, 0.05) == pytest.approx(0.5, abs=0.05) and _lr_factor(1.0, 0.05) == pytest.approx(0.0)
