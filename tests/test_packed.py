"""Packed runs: several runs of one task through one shared backbone compute what each computes alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml

from provpt.config import RunConfig
from provpt.model.prompted_vit import PromptedViT, packed_forward
from provpt.train import check_pack, run, run_pack

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(root, out, **kw) -> RunConfig:
    base = dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", backbone_kwargs=KW,
                method="vpt-deep", num_prompts=2, epochs=4, batch_size=16, lr=0.5, weight_decay=1e-4,
                eval_splits=["val200", "test"], progress=False, threads=1, precision="fp64", out=str(out))
    base.update(kw)
    return RunConfig.from_dict(base)


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def moves(out: Path) -> list[tuple]:
    path = out / "moves.jsonl"
    if not path.is_file():
        return []
    return [(m["epoch"], m["prompt"], m["source"], m["target"]) for m in map(json.loads, path.read_text().splitlines())]


# ----------------------------------------------------------------------------- the forward


def test_padded_prompts_are_masked_exactly():
    """Runs holding different numbers of prompts per block (padded to the largest, logit -inf) and one
    log-gated run: each run's logits in the pack equal its logits alone (float64, 1e-12), and what a
    padded slot holds changes nothing."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KW).double().eval()
    dists = [[2, 2, 2], [0, 5, 1], [3, 0, 0], [0, 0, 0]]
    models = []
    for seed, dist in enumerate(dists):
        torch.manual_seed(seed)
        models.append(PromptedViT(vit, 4, dist, seed=seed).double().eval())
    models[1].prompts.log_gated = True
    with torch.no_grad():
        models[1].prompts.log_gates.copy_(torch.linspace(-1, 0.5, 6, dtype=torch.float64))
    xs = [torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + j))
          for j in range(len(models))]
    with torch.no_grad():
        alone = [m(x) for m, x in zip(models, xs)]
        packed = packed_forward(models, torch.cat(xs), [3] * len(models))
        for a, p in zip(alone, packed):
            torch.testing.assert_close(p, a, rtol=0, atol=1e-12)
        # a padded slot is a zero token; make it anything: nothing changes
        models[2].prompts.values.data[:] *= 1e6
        again = packed_forward(models, torch.cat(xs), [3] * len(models))
    for j in (0, 1, 3):
        torch.testing.assert_close(again[j], packed[j], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- training


PACKS = {
    "vpt-deep": [dict(lr=0.5, weight_decay=1e-4, seed=1), dict(lr=2.0, weight_decay=0.0, seed=2),
                 dict(lr=1.0, weight_decay=1e-3, seed=3, num_prompts=3)],
    "pro-vpt": [dict(lr=2.0, weight_decay=1e-4, seed=1), dict(lr=1.0, weight_decay=0.0, seed=2),
                dict(lr=2.0, weight_decay=1e-3, seed=3, relocation={"scoring": "pass", "allocator": "random"})],
    "pro-vpt-exact": [dict(lr=2.0, seed=1, relocation={"idleness": "logit", "verify": 3, "reward": "move",
                                                        "ppo_update": "bandit", "count": 2}),
                      dict(lr=1.0, seed=2, relocation={"idleness": "logit", "count": 2})],
    "linear": [dict(lr=0.5, weight_decay=1e-4, seed=1), dict(lr=2.0, weight_decay=0.0, seed=2)],
}


@pytest.mark.parametrize("method", list(PACKS))
def test_a_packed_run_equals_the_same_run_alone(toy_root, tmp_path, method):
    kws = PACKS[method]
    packed = run_pack([cfg_for(toy_root, tmp_path / f"p{i}", method=method, epochs=5, **kw) for i, kw in enumerate(kws)])
    for i, kw in enumerate(kws):
        alone = run(cfg_for(toy_root, tmp_path / f"a{i}", method=method, epochs=5, **kw))
        p, a = tmp_path / f"p{i}", tmp_path / f"a{i}"
        assert packed[i]["packed_runs"] == len(kws) and alone["packed_runs"] == 1
        assert packed[i]["distribution"] == alone["distribution"]
        assert moves(p) == moves(a)
        for s in alone["eval"]:
            assert packed[i]["eval"][s]["acc"] == alone["eval"][s]["acc"]
            assert packed[i]["eval"][s]["loss"] == pytest.approx(alone["eval"][s]["loss"], rel=1e-10, abs=1e-12)
        for hp, ha in zip(history(p), history(a), strict=True):
            assert hp["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-10, abs=1e-12)
            assert hp["distribution"] == ha["distribution"]
    if method in ("pro-vpt", "pro-vpt-exact"):
        assert all(moves(tmp_path / f"p{i}") for i in range(len(kws))), "a pro-vpt run made no move"
        per_epoch = zip(*[[tuple(h["distribution"]) for h in history(tmp_path / f"p{i}")] for i in range(len(kws))])
        assert any(len(set(d)) > 1 for d in per_epoch), "the runs never differed in distribution (no padding tested)"


@pytest.mark.parametrize("pack", [1, 2])
def test_linear_probes_on_cached_features_equal_probes_through_the_backbone(toy_root, tmp_path, pack, monkeypatch):
    """feature_cache (the default): the backbone runs once per image, not once per step, and the runs
    compute what they compute with it off (float64), alone and packed."""
    import provpt.model.prompted_vit as pv

    kws = PACKS["linear"][:pack]
    calls = {"n": 0}
    features = pv.prompt_features

    def counted(*a, **k):
        calls["n"] += 1
        return features(*a, **k)

    monkeypatch.setattr(pv, "prompt_features", counted)
    on = run_pack([cfg_for(toy_root, tmp_path / f"on{i}", method="linear", **kw) for i, kw in enumerate(kws)])
    cached_calls, calls["n"] = calls["n"], 0
    off = run_pack([cfg_for(toy_root, tmp_path / f"off{i}", method="linear", feature_cache=False, **kw)
                    for i, kw in enumerate(kws)])
    assert cached_calls < calls["n"] / 4, (cached_calls, calls["n"])  # batches of 256 per split, once
    for i, (a, b) in enumerate(zip(on, off)):
        for s in a["eval"]:
            assert a["eval"][s]["acc"] == b["eval"][s]["acc"]
            assert a["eval"][s]["loss"] == pytest.approx(b["eval"][s]["loss"], rel=1e-10, abs=1e-12)
        for ha, hb in zip(history(tmp_path / f"on{i}"), history(tmp_path / f"off{i}"), strict=True):
            assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-10, abs=1e-12)


def test_the_feature_cache_stays_off_where_it_would_change_the_run(toy_root, tmp_path):
    """Augmented images (FGVC's random crop) or a stochastic backbone layer: every step runs the backbone."""
    from provpt.data.task import TaskData
    from provpt.train import Member, build_run, feature_cache

    cfg = cfg_for(toy_root, tmp_path / "x", method="linear")
    data = TaskData(cfg, torch.device("cpu"))
    model, opt, _ = build_run(cfg, data.num_classes, torch.device("cpu"))
    assert feature_cache([Member(cfg, model, opt)], data, torch.autocast("cpu", enabled=False), ["test"]) is not None
    model.vit.blocks[1].drop_path = timm.layers.DropPath(0.1)
    assert feature_cache([Member(cfg, model, opt)], data, torch.autocast("cpu", enabled=False), ["test"]) is None
    fgvc = cfg_for(toy_root, tmp_path / "z", method="linear", augment="fgvc")
    model, opt, _ = build_run(fgvc, data.num_classes, torch.device("cpu"))
    cropped = TaskData(fgvc, torch.device("cpu"))
    assert cropped.crop and feature_cache([Member(fgvc, model, opt)], cropped, torch.autocast("cpu", enabled=False), ["test"]) is None
    deep = cfg_for(toy_root, tmp_path / "y", method="vpt-deep")
    model, opt, _ = build_run(deep, data.num_classes, torch.device("cpu"))
    assert feature_cache([Member(deep, model, opt)], data, torch.autocast("cpu", enabled=False), ["test"]) is None


def test_runs_that_cannot_pack_are_refused_naming_the_key(toy_root, tmp_path):
    with pytest.raises(ValueError, match=r"pack: epochs differs"):
        check_pack([cfg_for(toy_root, tmp_path / "a"), cfg_for(toy_root, tmp_path / "b", epochs=3)])
    with pytest.raises(ValueError, match=r"train backbone weights"):
        check_pack([cfg_for(toy_root, tmp_path / "a", method="lora"), cfg_for(toy_root, tmp_path / "b", method="lora")])
    with pytest.raises(ValueError, match=r"vpt-shallow"):
        check_pack([cfg_for(toy_root, tmp_path / "a"), cfg_for(toy_root, tmp_path / "b", method="vpt-shallow")])


class Killed(Exception):
    pass


def test_a_pack_killed_between_its_runs_checkpoints_resumes_each_run(toy_root, tmp_path):
    """A pack stopped after one run's checkpoint of an epoch but before the other's: on restart the runs
    start from different epochs, and each ends as if never stopped."""
    kws = PACKS["pro-vpt"][:2]
    full = run_pack([cfg_for(toy_root, tmp_path / f"f{i}", method="pro-vpt", epochs=5, **kw) for i, kw in enumerate(kws)])
    cut = [cfg_for(toy_root, tmp_path / f"c{i}", method="pro-vpt", epochs=5, **kw) for i, kw in enumerate(kws)]

    saved = tmp_path / "c1-epoch2.pt"

    def stop(epoch):
        if epoch == 1:
            saved.write_bytes((tmp_path / "c1" / "checkpoint.pt").read_bytes())
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_pack(cut, on_epoch_end=stop)
    # the second run's checkpoint one epoch behind, as a kill between the two writes leaves it
    (tmp_path / "c1" / "checkpoint.pt").write_bytes(saved.read_bytes())
    assert torch.load(tmp_path / "c0" / "checkpoint.pt", weights_only=True)["epoch"] == 3
    assert torch.load(tmp_path / "c1" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = run_pack(cut)
    for f, r in zip(full, resumed):
        assert {k: v for k, v in f.items() if k != "wall_time_s"} == {k: v for k, v in r.items() if k != "wall_time_s"}
    assert moves(tmp_path / "c0") == moves(tmp_path / "f0")


def test_kill_9_of_a_packed_search_and_rerun_gives_the_uninterrupted_metrics(toy_root, tmp_path):
    """`provpt search` packs a 2 x 2 grid; SIGKILL once a checkpoint is on disk, rerun, compare."""
    profile = {
        "search": {"train_split": "train800", "eval_split": "val200", "seed": 18, "lr": [0.5, 2.0],
                   "weight_decay": [0.0001, 0], "lr_base_batch": None, "overrides": {}},
        "pack": {"search": 4},
        "train": {"data_root": str(toy_root), "backbone": "vit_tiny_patch16_224", "backbone_kwargs": KW,
                  "num_prompts": 2, "epochs": 12, "batch_size": 16, "progress": False, "threads": 1,
                  "eval_splits": ["val200"]},
    }
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(profile))
    cli = [sys.executable, "-m", "provpt.cli", "search", "--profile", str(prof), "dataset=toy", "method=pro-vpt"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cli + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(cli + ["--out", str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck = tmp_path / "cut" / "lr0.5_wd0" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ck.is_file() and torch.load(ck, weights_only=True)["epoch"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "lr0.5_wd0" / "metrics.json").exists()
    subprocess.run(cli + ["--out", str(tmp_path / "cut")], check=True, env=env, capture_output=True, timeout=600)
    for point in ("lr0.5_wd0.0001", "lr0.5_wd0", "lr2_wd0.0001", "lr2_wd0"):
        whole = json.loads((tmp_path / "whole" / point / "metrics.json").read_text())
        cut = json.loads((tmp_path / "cut" / point / "metrics.json").read_text())
        assert whole["packed_runs"] == 4
        assert {k: v for k, v in whole.items() if k != "wall_time_s"} == {k: v for k, v in cut.items() if k != "wall_time_s"}
        assert moves(tmp_path / "whole" / point) == moves(tmp_path / "cut" / point)
