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
TOY_TRAIN = 48  # images of the toy task's train800 (conftest.TOY_SIZES)

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
                dict(lr=2.0, weight_decay=1e-3, seed=3, relocation={"scoring": "pass", "allocator": "random"}),
                dict(lr=1.0, weight_decay=1e-4, seed=4, num_prompts=3,
                     relocation={"scoring": "pass", "pass_order": "shuffled", "clip_scores": True, "allocator": "random"})],
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
    with pytest.raises(ValueError, match=r"pack: pack_chunk differs"):  # one chunk size per pack
        check_pack([cfg_for(toy_root, tmp_path / "a", pack_chunk=2), cfg_for(toy_root, tmp_path / "b")])
    with pytest.raises(ValueError, match=r"pack_chunk=-1: expected an integer >= 0"):
        cfg_for(toy_root, tmp_path / "a", pack_chunk=-1)
    with pytest.raises(ValueError, match=r"relocation.pass_order='random': expected one of \['fixed', 'shuffled'\]"):
        cfg_for(toy_root, tmp_path / "a", relocation={"pass_order": "random"})


# ----------------------------------------------------------------------------- memory: a pack in chunks of runs


def trainable(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "trainable.safetensors"))


def test_a_pack_trained_in_chunks_of_runs_equals_it_in_one_piece(toy_root, tmp_path):
    """pack_chunk=1 and 3 (one forward and backward per chunk of runs, each run's optimiser step after
    all of them; the scoring passes chunked alike): every run ends with the weights, moves and losses
    of the pack trained in one forward (float64, 1e-10)."""
    kws = PACKS["pro-vpt"]
    run_pack([cfg_for(toy_root, tmp_path / f"w{i}", method="pro-vpt", epochs=3, **kw) for i, kw in enumerate(kws)])
    for chunk in (1, 3):
        run_pack([cfg_for(toy_root, tmp_path / f"c{chunk}-{i}", method="pro-vpt", epochs=3, pack_chunk=chunk, **kw)
                  for i, kw in enumerate(kws)])
        for i in range(len(kws)):
            whole, cut = tmp_path / f"w{i}", tmp_path / f"c{chunk}-{i}"
            a, b = trainable(whole), trainable(cut)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-12)
            assert moves(cut) == moves(whole)
            for hw, hc in zip(history(whole), history(cut), strict=True):
                assert hc["train_loss"] == pytest.approx(hw["train_loss"], rel=1e-10, abs=1e-12)
    assert any(moves(tmp_path / f"w{i}") for i in (2, 3)), "no move after a scoring pass"


def pack_members(root, out: Path, kws, method="pro-vpt"):
    """Members of one pack over one shared float64 backbone, built as run_pack builds them."""
    from provpt.data.task import TaskData
    from provpt.model.backbone import create_backbone
    from provpt.train import Member, build_run

    cpu = torch.device("cpu")
    cfgs = [cfg_for(root, out / f"m{i}", method=method, **kw) for i, kw in enumerate(kws)]
    data = TaskData(cfgs[0], cpu)
    shared = create_backbone(cfgs[0].backbone, None, **cfgs[0].backbone_kwargs).to(cpu, torch.float64)
    return [Member(c, *build_run(c, data.num_classes, cpu, shared)) for c in cfgs], data


def test_out_of_memory_halves_the_chunk_and_redoes_the_batch(toy_root, tmp_path, caplog):
    """A pack whose forward/backward runs out of memory with more than 2 runs at once, raised in the
    middle of the backward (gradients of some runs already accumulated, dropout masks drawn): the
    chunk's gradients and dropout streams are put back, it is halved and the batch redone, so no step
    is half applied; the pack goes on 2 runs at a time and ends where the pack in one piece ends
    (float64, 1e-10), its online scores (gate gradients summed over the epoch) too. A run alone that
    does not fit re-raises."""
    from contextlib import nullcontext

    from provpt.train import train_members

    kws = PACKS["pro-vpt"][:2] + [dict(lr=0.5, seed=5, num_prompts=1)]
    whole, data = pack_members(toy_root, tmp_path / "whole", kws)
    split, _ = pack_members(toy_root, tmp_path / "split", kws)
    raised = []

    def small_memory(models, x, sizes):
        out = packed_forward(models, x, sizes)
        if len(models) > 2:
            def oom(grad):
                hook.remove()
                raised.append(sum(m.head.weight.grad is not None for m in models))
                raise torch.OutOfMemoryError("simulated: more than 2 runs")

            hook = models[0].prompts.values.register_hook(oom)  # reached late in the backward
        return out

    for epoch in range(2):
        a = train_members(whole, data, epoch, nullcontext())
        with caplog.at_level("WARNING", logger="provpt.train"):
            b = train_members(split, data, epoch, nullcontext(), forward=small_memory)
        for sa, sb in zip(a, b):
            assert sb["train_loss"] == pytest.approx(sa["train_loss"], rel=1e-10)
            assert sb["train_acc"] == sa["train_acc"]
    assert len(raised) == 1 and raised[0] >= 1  # once, the pack keeps the smaller chunk; mid-backward
    assert [m.chunk for m in split] == [2, 2, 2] and "out of memory" in caplog.text
    for mw, ms in zip(whole, split):
        for k, v in mw.model.trainable_state().items():
            torch.testing.assert_close(ms.model.trainable_state()[k], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ms.model.prompts.gates.grad, mw.model.prompts.gates.grad, rtol=1e-10, atol=1e-12)
        assert torch.equal(ms.model.prompts.rng_state(), mw.model.prompts.rng_state())

    def no_memory(models, x, sizes):
        raise torch.OutOfMemoryError("simulated: not even one run")

    with pytest.raises(torch.OutOfMemoryError, match="not even one"):
        train_members(split[:1], data, 2, nullcontext(), forward=no_memory)


# ----------------------------------------------------------------------------- the scoring pass's order


def test_the_scoring_pass_order_is_drawn_per_epoch_from_the_seed_alone(toy_root, tmp_path):
    """relocation.pass_order=shuffled: each epoch its own permutation of the training split, apart from
    the training order of that epoch, the same whenever it is drawn again (a resumed run); fixed: the
    stored order, every epoch."""
    from provpt.data.task import TaskData
    from provpt.train import pass_batches

    cfg = cfg_for(toy_root, tmp_path / "x", relocation={"scoring": "pass", "pass_order": "shuffled"})
    data = TaskData(cfg, torch.device("cpu"))
    images = data.batch(cfg.train_split, torch.arange(TOY_TRAIN), False)[0]

    def order(c, epoch):
        x = torch.cat([xb for xb, _ in pass_batches(c, data, epoch)()])
        match = (x[:, None] == images[None]).flatten(2).all(-1)  # row i is image j
        assert match.sum(1).eq(1).all() and match.sum(0).eq(1).all()  # a permutation of the split
        return match.float().argmax(1).tolist()

    first = [order(cfg, e) for e in range(3)]
    assert len({tuple(o) for o in first}) == 3 and first[0] != list(range(TOY_TRAIN))
    again = cfg_for(toy_root, tmp_path / "x", relocation={"scoring": "pass", "pass_order": "shuffled"})
    assert [order(again, e) for e in (2, 0, 1)] == [first[2], first[0], first[1]]
    training = [torch.randperm(TOY_TRAIN, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + e)).tolist()
                for e in range(3)]
    assert not any(o == t for o in first for t in training)
    fixed = cfg_for(toy_root, tmp_path / "x", relocation={"scoring": "pass"})
    assert order(fixed, 0) == order(fixed, 1) == list(range(TOY_TRAIN))
    other = cfg_for(toy_root, tmp_path / "x", seed=7, relocation={"scoring": "pass", "pass_order": "shuffled"})
    assert order(other, 0) != first[0]


def test_the_shuffled_scoring_pass_augments_fgvc_like_a_training_epoch(tmp_path):
    """FGVC (augment: fgvc): the shuffled pass draws random crops and flips (training's ``train=True``),
    again the same for the same seed and epoch; the fixed pass sees the centre crops."""
    from provpt.data.task import TaskData
    from provpt.train import pass_batches

    g = torch.Generator().manual_seed(0)
    splits = {"train800": (torch.randint(0, 256, (24, 3, 24, 24), generator=g, dtype=torch.uint8),
                           torch.arange(24) % 3)}
    cfg = cfg_for(tmp_path, tmp_path / "x", augment="fgvc", eval_splits=["train800"],
                  relocation={"scoring": "pass", "pass_order": "shuffled"})
    data = TaskData(cfg, torch.device("cpu"), splits=splits, num_classes=3)
    centre = data.batch("train800", torch.arange(24), False)[0]
    assert centre.shape[-1] == 16

    def seen(c, epoch):
        xs, ys = zip(*pass_batches(c, data, epoch)())
        return torch.cat(xs), torch.cat(ys)

    x0, y0 = seen(cfg, 0)
    x0b, y0b = seen(cfg, 0)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b) and not torch.equal(seen(cfg, 1)[0], x0)
    rows = (x0[:, None] == centre[None]).flatten(2).all(-1).any(1)
    assert rows.float().mean() < 0.5  # most images cropped off-centre or flipped
    fixed = cfg_for(tmp_path, tmp_path / "x", augment="fgvc", eval_splits=["train800"], relocation={"scoring": "pass"})
    assert torch.equal(seen(fixed, 3)[0], centre)


class Killed(Exception):
    pass


def test_a_pack_killed_between_its_runs_checkpoints_resumes_each_run(toy_root, tmp_path):
    """A pack stopped after one run's checkpoint of an epoch but before the other's: on restart the runs
    start from different epochs, and each ends as if never stopped."""
    kws = [PACKS["pro-vpt"][0], PACKS["pro-vpt"][3]]  # online scores; the pass in a shuffled order
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
    assert moves(tmp_path / "c0") == moves(tmp_path / "f0") and moves(tmp_path / "c1") == moves(tmp_path / "f1")


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
