"""A subset run of each paper profile end to end through Snakemake, on generated inputs.

vtab1k on clevr_count (its own 100 prompts per block) and fgvc on oxford_flowers, each with VPT-Deep and
PRO-VPT: prepare, search, select, final, the studies the profile lists for the subset, report. The
inputs are tests/paper_fixtures.py's: a NOAH-layout root and a VPT-json root with the real task
names and class counts, and a random-weight ViT-B/16 in Google's npz layout, so the real geometry
runs (224 px, 12 blocks of 768, the tasks' prompt lengths, fp32). Only sizes shrink, by --config
(never the params files): a few images per split, 1 search epoch and 2 final epochs (PRO-VPT moves
from epoch 1), a 1 x 1 lr x wd grid, one seed, and the studies' options. The studies are sized to
fit two CPU cores: the allocator ablation (one variant) runs in both; the correlation study (one
exact-removal forward per prompt: 120 ViT-B/16 forwards at fgvc's 10 prompts per block, 1200 at
clevr_count's 100, over two minutes on a CPU core even on one image) and the adjustment study (12
arms of continued training per point) run in neither (fgvc lists adjustment and the timing study
for cub only); the smoke profile's run covers all five studies end to end. oxford_flowers has the fewest classes of FGVC: its test split holds one image of
each (provpt checks the class count), 102 forwards per final run.
PROVPT_TEST_DEVICE (default cpu; cuda for a GPU check) is the jobs' device.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from paper_fixtures import make_fgvc_root, make_noah_root, write_vit_b16_npz
from test_workflow import copy_repo, snakemake

pytestmark = pytest.mark.slow

DEVICE = os.environ.get("PROVPT_TEST_DEVICE", "cpu")
METHODS = ["vpt-deep", "pro-vpt"]
SHRINK = [  # sizes only: the protocol, the geometry and the per-task settings are the profile's
    "methods=[vpt-deep,pro-vpt]",
    "seeds=[18]",
    "search={lr: [10], weight_decay: [0.001], overrides: {epochs: 1}}",
    "train={epochs: 2}",
    "resources={train: {threads: 1}, study: {threads: 1}}",
    f"device={DEVICE}",
]
STUDIES = {
    "vtab1k": "studies={correlation: {datasets: []}, adjustment: {datasets: []}, allocators: {variants: [norm]}}",
    "fgvc": "studies={correlation: {datasets: []}, allocators: {variants: [norm]}}",
}
DATASET = {"vtab1k": "clevr_count", "fgvc": "oxford_flowers"}  # flowers: the fewest classes (102) of FGVC
PROMPTS = {"vtab1k": 100, "fgvc": 10}  # per block: vtab1k's train_by_dataset, fgvc's default


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_vit_b16_npz(tmp_path_factory.mktemp("weights") / "ViT-B_16.npz")


def test_the_npz_loads_through_provpts_loader_to_the_same_weights(weights):
    """Google's layout, read back by timm's own npz loader (provpt.model.backbone), is the random model."""
    import torch

    from paper_fixtures import random_vit_b16
    from provpt.model.backbone import create_backbone

    loaded = create_backbone("vit_base_patch16_224.orig_in21k", weights).state_dict()
    model = random_vit_b16(0).state_dict()
    assert loaded.keys() == model.keys()
    assert all(torch.equal(loaded[k], model[k]) for k in model)


@pytest.fixture(scope="module", params=["vtab1k", "fgvc"])
def rehearsal(request, tmp_path_factory, weights):
    """A copy of the repository after `snakemake --cores 2` of the profile's subset."""
    profile = request.param
    raw = tmp_path_factory.mktemp(f"raw-{profile}")
    source = (make_noah_root(raw, [DATASET[profile]]) if profile == "vtab1k"
              else make_fgvc_root(raw, [DATASET[profile]]))
    repo = copy_repo(tmp_path_factory.mktemp(f"repo-{profile}"))
    proc = snakemake(repo, "--cores", "2", "--config", f"profile={profile}", f"source={source}", f"weights={weights}",
                     f"datasets=[{DATASET[profile]}]", *SHRINK, STUDIES[profile])
    return profile, repo, proc, weights


def test_every_output(rehearsal):
    from provpt.io import file_sha256

    profile, repo, proc, weights = rehearsal
    sha = file_sha256(weights)
    res, d = repo / "results" / profile, DATASET[profile]
    assert proc.stderr.count(f"provpt: profile {profile} on a subset:") == 1
    for m in METHODS:
        sel = json.loads((res / "selection" / d / f"{m}.json").read_text())
        assert sel["lr"] == pytest.approx(10 * 64 / 256)
        metrics = json.loads((res / "runs" / "final" / d / m / "seed18" / "metrics.json").read_text())
        assert metrics["prompts_per_block"] == PROMPTS[profile] and metrics["num_prompts"] == 12 * PROMPTS[profile]
        assert metrics["epochs"] == 2 and metrics["lr"] == sel["lr"]
        assert metrics["weights_sha256"] == sha
    tables = {p.stem for p in (res / "tables").glob("*.csv")}
    assert {"accuracy", "selection", "allocators"} <= tables, tables
    assert {p.relative_to(res / "studies").parts[0] for p in (res / "studies").rglob("summary.json")} == {"allocators"}


def test_pro_vpt_moved_prompts(rehearsal):
    profile, repo, _, _ = rehearsal
    run = repo / "results" / profile / "runs" / "final" / DATASET[profile] / "pro-vpt" / "seed18"
    moves = [json.loads(line) for line in (run / "moves.jsonl").read_text().splitlines()]
    assert moves, "PRO-VPT made no relocation in its second epoch"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.json").read_text())
    assert history[0]["distribution"] == [PROMPTS[profile]] * 12  # VPT-Deep's start, no move in epoch 0
    assert history[-1]["distribution"] == moves[-1]["distribution"] == metrics["distribution"]
    assert moves[-1]["distribution"] != [PROMPTS[profile]] * 12 and sum(moves[-1]["distribution"]) == 12 * PROMPTS[profile]
