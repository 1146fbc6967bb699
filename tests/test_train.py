"""The training loop end to end on a tiny prepared task: files, determinism, resume, PRO-VPT wiring."""

import json

import pytest
import torch

from provpt.cli import main as cli
from provpt.config import METHODS, RunConfig
from provpt.train import run

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def cfg_for(root, out, **kw) -> RunConfig:
    base = dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", backbone_kwargs=KW,
                method="vpt-deep", num_prompts=2, epochs=3, batch_size=16, lr=0.5, weight_decay=1e-4,
                eval_splits=["val200", "test"], progress=False, threads=1, out=str(out))
    base.update(kw)
    return RunConfig.from_dict(base)


def strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s",)}


def test_run_writes_a_complete_run_folder(toy_root, tmp_path):
    m = run(cfg_for(toy_root, tmp_path / "r"))
    out = tmp_path / "r"
    for name in ("config.yaml", "metrics.json", "history.jsonl", "distribution.csv", "checkpoint.pt",
                 "trainable.safetensors"):
        assert (out / name).is_file(), name
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert m["eval"] == history[-1]["eval"] and set(m["eval"]) == {"val200", "test"}
    assert m["distribution"] == [2, 2, 2] and m["trainable_params"] == 6 * 32 + 32 * 3 + 3
    assert (out / "distribution.csv").read_text().splitlines()[0] == "epoch,b0,b1,b2"
    assert m["eval"]["test"]["acc"] > 50  # colour task: far above chance (33%)


def test_run_is_deterministic_and_finished_run_is_not_redone(toy_root, tmp_path):
    a = run(cfg_for(toy_root, tmp_path / "a", epochs=2))
    b = run(cfg_for(toy_root, tmp_path / "b", epochs=2))
    assert strip(a) == strip(b)
    stamp = (tmp_path / "a" / "metrics.json").stat().st_mtime_ns
    assert run(cfg_for(toy_root, tmp_path / "a", epochs=2)) == a
    assert (tmp_path / "a" / "metrics.json").stat().st_mtime_ns == stamp


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_killed_and_resumed_equals_uninterrupted(toy_root, tmp_path, method):
    kw = dict(method=method, epochs=4, relocation={"scoring": "online"})
    full = run(cfg_for(toy_root, tmp_path / "full", **kw))

    def kill(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run(cfg_for(toy_root, tmp_path / "cut", **kw), on_epoch_end=kill)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run(cfg_for(toy_root, tmp_path / "cut", **kw))
    assert strip(resumed) == strip(full)
    if method == "pro-vpt":
        assert (tmp_path / "cut" / "moves.jsonl").read_text() == (tmp_path / "full" / "moves.jsonl").read_text()


def test_pro_vpt_without_relocation_equals_vpt_deep(toy_root, tmp_path):
    deep = run(cfg_for(toy_root, tmp_path / "deep"))
    off = run(cfg_for(toy_root, tmp_path / "off", method="pro-vpt", relocation={"enabled": False}))
    assert off["eval"] == deep["eval"] and off["distribution"] == deep["distribution"]


def test_pro_vpt_relocates_keeps_budget_and_logs_moves(toy_root, tmp_path):
    m = run(cfg_for(toy_root, tmp_path / "p", method="pro-vpt", epochs=5, lr=2.0))
    out = tmp_path / "p"
    moves = [json.loads(line) for line in (out / "moves.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all(sum(h["distribution"]) == 6 and min(h["distribution"]) >= 0 for h in history)
    assert moves, "no prompt was relocated in 5 epochs"
    assert all(mv["epoch"] >= 1 for mv in moves)  # warm-up: the first epoch moves nothing
    assert {"epoch", "prompt", "source", "target", "score", "probs", "distribution"} <= set(moves[0])
    assert sum(m["distribution"]) == 6


def test_cli_train_and_clear_errors(toy_root, tmp_path, capsys):
    args = ["train", f"data_root={toy_root}", "dataset=toy", "backbone=vit_tiny_patch16_224",
            "backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}",
            "method=linear", "epochs=1", "batch_size=16", "eval_splits=[val200]", "progress=false",
            f"out={tmp_path / 'cli'}"]
    assert cli(args) == 0
    assert "val200" in capsys.readouterr().out
    assert cli(args[:-1] + ["method=prompt-magic", f"out={tmp_path / 'x'}"]) == 2
    assert "method='prompt-magic'" in capsys.readouterr().err
    assert cli(args[:-1] + ["lr=fast", f"out={tmp_path / 'x'}"]) == 2
    assert "lr='fast': expected a number" in capsys.readouterr().err
    assert cli(args[:-1] + ["dataset=nope", f"out={tmp_path / 'x'}"]) == 2
    assert "nope" in capsys.readouterr().err


class Payload:
    """An arbitrary pickled object: what a tampered checkpoint would carry."""


def test_checkpoint_with_a_pickled_object_is_refused(toy_root, tmp_path):
    cfg = cfg_for(toy_root, tmp_path / "run", epochs=2)

    def stop(epoch):
        raise Killed

    with pytest.raises(Killed):
        run(cfg, on_epoch_end=stop)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.save({**ck, "extra": Payload()}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: refused to load"):
        run(cfg)


def test_the_oracle_tries_every_target_and_leaves_the_run_as_it_was(toy_root, tmp_path):
    """The oracle's lookahead trains each trial move on a copy of the optimiser and restores the run:
    after it, parameters, blocks, optimiser state and dropout stream are unchanged; a run with the
    oracle allocator moves each pruned prompt to the target of lowest held-out loss (or keeps it)."""
    from provpt.train import Member, build_run, oracle_lookahead
    from provpt.data.task import TaskData
    from contextlib import nullcontext

    reloc = {"idleness": "logit", "allocator": "oracle", "oracle_steps": 1, "oracle_probe": 16, "count": 2}
    cfg = cfg_for(toy_root, tmp_path / "o", method="pro-vpt-exact", epochs=4, lr=2.0, relocation=reloc)
    data = TaskData(cfg, torch.device("cpu"))
    model, opt, _ = build_run(cfg, data.num_classes, torch.device("cpu"))
    m = Member(cfg, model, opt)
    from provpt.train import train_members
    train_members([m], data, 0, nullcontext())  # optimiser state to preserve
    before = {k: v.clone() for k, v in model.trainable_state().items()}
    opt_before, rng_before = json.dumps(str(opt.state_dict())), model.prompts.rng_state().clone()
    losses = oracle_lookahead(m, data, 1, nullcontext())(3)
    assert len(losses) == 3 and len(set(losses)) == 3  # three different trials
    after = model.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.dumps(str(opt.state_dict())) == opt_before and torch.equal(model.prompts.rng_state(), rng_before)

    run(cfg)
    moves = [json.loads(line) for line in (tmp_path / "o" / "moves.jsonl").read_text().splitlines()]
    assert moves and all(len(mv["lookahead"]) == 3 for mv in moves)
    for mv in moves:
        best = min(mv["lookahead"])
        assert mv["lookahead"][mv["target"]] == best
        assert mv["target"] == mv["source"] or mv["lookahead"][mv["source"]] > best
