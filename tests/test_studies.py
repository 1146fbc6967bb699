"""The studies on a tiny ViT and a tiny prepared task, where the answers are known."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from provpt.config import ConfigError
from provpt.model.backbone import create_backbone
from provpt.model.prompted_vit import PromptedViT
from provpt.relocation.idleness import taylor_pass, true_idleness
from provpt.report import adjustment as adjustment_report
from provpt.report import allocators as allocators_report
from provpt.report import correlation as correlation_report
from provpt.report import timing as timing_report
from provpt.studies import adjustment, allocators, correlation, parse_overrides, run_config, timing

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)
@pytest.fixture
def root(toy_root) -> Path:
    return toy_root


def profile_for(root: Path, **train) -> dict:
    base = dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", backbone_kwargs=KW,
                num_prompts=2, epochs=3, batch_size=16, optimizer="sgd", lr=0.5, weight_decay=1e-4,
                progress=False, threads=1)
    return {"train": {**base, **train}, "final": {"train_split": "train800val200", "eval_split": "test"}}


def tiny_model(distribution, seed: int = 1, init_range: float | None = None) -> PromptedViT:
    torch.manual_seed(seed)
    return PromptedViT(create_backbone("vit_tiny_patch16_224", None, **KW), 3, distribution, init_range=init_range)


def random_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 3, (32,), generator=g)
    return lambda: iter([(x[:16], y[:16]), (x[16:], y[16:])])


# ----------------------------------------------------------------------------- options


def test_overrides_split_into_study_run_and_hparams(tmp_path):
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"lr": 0.02, "weight_decay": 0.001, "acc": 50}))
    profile = {"train": {"method": "vpt-deep", "epochs": 7}, "train_by_method": {"linear": {"lr": 9.0}},
               "studies": {"adjustment": {"datasets": ["a"], "seeds": [1], "budget_epochs": 3}}}
    opts, run_over, hp = parse_overrides(profile, ["study.pairs=true", "dataset=x", f"hparams={sel}", "epochs=4"],
                                         "adjustment", adjustment.DEFAULTS)
    assert opts["budget_epochs"] == 3 and opts["pairs"] is True and opts["points"] == [0.25, 0.5, 0.75]
    cfg = run_config(profile, run_over, method="vpt-deep", hparams=hp)
    assert (cfg.dataset, cfg.epochs, cfg.lr, cfg.weight_decay) == ("x", 4, 0.02, 0.001)
    assert run_config(profile, {}, method="linear").lr == 9.0  # train_by_method applies
    final = run_config({**profile, "final": {"train_split": "tv", "eval_split": "test"}}, {}, stage="final")
    assert (final.train_split, final.eval_splits) == ("tv", ["test"])
    with pytest.raises(ConfigError, match="unknown option 'budget'"):
        parse_overrides(profile, ["study.budget=1"], "adjustment", adjustment.DEFAULTS)


# ----------------------------------------------------------------------------- correlation


def test_agreement_of_a_score_with_itself_is_perfect():
    s = np.random.default_rng(0).normal(size=20)
    a = correlation.agreement(s, s, block=np.repeat(np.arange(4), 5))
    for key in ("pearson", "spearman", "kendall", "top_overlap", "sign_agreement", "spearman_within_block",
                "spearman_block_sums"):
        assert a[key] == pytest.approx(1.0), key
    assert a["argmax_agrees"] and a["decision_agrees"]
    b = correlation.agreement(s, -s)
    assert b["spearman"] == pytest.approx(-1.0) and not b["argmax_agrees"] and b["sign_agreement"] == 0


def test_prompts_of_a_block_without_attention_output_score_zero_every_way():
    """Zero a block's attention projection: its prompts reach nothing (their own outputs are dropped before
    the next block), so removing one provably changes nothing, and its gate gradient is exactly 0."""
    model = tiny_model([2, 2, 2], init_range=1.0)
    with torch.no_grad():
        model.head.weight.mul_(10)
        model.vit.blocks[1].attn.proj.weight.zero_()
        model.vit.blocks[1].attn.proj.bias.zero_()
    batches = random_batches()
    true = true_idleness(model, batches, F.cross_entropy)
    scores = {"true": true, "online": correlation.gate_gradients(model, batches),
              "pass": taylor_pass(model, batches, F.cross_entropy),
              "zeroed": correlation.zeroed_idleness(model, batches)}
    block1 = model.prompts.block == 1
    for name, s in scores.items():
        assert s[block1].abs().max() <= 1e-12, name
        assert (s[~block1].abs() > 0).all(), name  # the other prompts do matter
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients behind


@pytest.mark.parametrize("distribution", [[6, 0, 0], [3, 3, 3]])
def test_taylor_agrees_with_true_idleness_for_tiny_prompts(distribution):
    """With prompts scaled by 1e-4 the first-order expansion is accurate. Removing a (near-)zero token still
    changes attention by a per-block constant, so the ranking agrees within each block (globally when one
    block holds all prompts); against the gate-zero difference the Taylor score agrees everywhere."""
    model = tiny_model(distribution, init_range=1.0)
    with torch.no_grad():
        model.head.weight.mul_(10)
        model.prompts.values.mul_(1e-4)
    batches = random_batches()
    online = correlation.gate_gradients(model, batches).numpy()
    a = correlation.agreement(online, true_idleness(model, batches, F.cross_entropy).numpy(),
                              model.prompts.block.numpy())
    assert a["spearman_within_block"] > 0.9
    if distribution[0] == sum(distribution):
        assert a["spearman"] > 0.9
    z = correlation.agreement(online, correlation.zeroed_idleness(model, batches).numpy())
    assert z["spearman"] > 0.99 and z["pearson"] > 0.99


def test_taylor_score_of_a_deep_prompt_is_nearly_zero_under_layernorm():
    """A VPT-Deep prompt reaches the rest of the sequence only through LayerNorm(gate * p), which does not
    depend on the gate's scale except through LayerNorm's eps (1e-6), and its own output row is dropped
    after the block: by Euler's theorem d loss / d gate = g . p ~ 0. True idleness (removal) has no such
    invariance. For prompts of VPT's init scale the Taylor scores are orders of magnitude below it."""
    model = tiny_model([3, 3, 3])
    with torch.no_grad():
        model.head.weight.mul_(10)
    batches = random_batches()
    online = correlation.gate_gradients(model, batches)
    true = true_idleness(model, batches, F.cross_entropy)
    assert online.abs().max() < 1e-2 * true.abs().mean()
    for blk in model.vit.blocks:  # without LayerNorm's eps the score vanishes exactly (up to rounding)
        blk.norm1.eps = 0.0
    assert correlation.gate_gradients(model, batches).abs().max() < 1e-3 * online.abs().max()


def test_correlation_study_and_report(root, tmp_path):
    out = tmp_path / "results" / "p" / "studies" / "correlation" / "toy"
    s = correlation.main(profile_for(root, relocation={"warmup_epochs": 1}),
                         ["method=pro-vpt", "epochs=2", f"out={out}", "study.points=[0,0.5,1]", "study.eval_batches=1",
                          "study.zeroed=true"])
    assert [p["epoch"] for p in s["points"]] == [0, 1, 2] and s["eval_images"] == 16
    last = s["points"][-1]
    assert {"online", "pass", "zeroed", "run", "online_vs_pass"} <= set(last["methods"])  # run: pro-vpt's own
    assert set(last["times_s"]) == {"true", "online", "pass", "logit", "verify", "zeroed"} and all(t > 0 for t in last["times_s"].values())
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 3 * 6 and {"true", "online", "pass", "zeroed"} <= set(scores.columns)
    # resumable: a finished study's run is reused, the summary is rewritten identically in content
    again = correlation.main(profile_for(root), ["method=pro-vpt", "epochs=2", f"out={out}", "study.points=[0,0.5,1]",
                                                 "study.eval_batches=1", "study.zeroed=true"])
    assert again["points"][1]["methods"]["online"]["spearman"] == s["points"][1]["methods"]["online"]["spearman"]
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    written = correlation_report.report(out.parent, tables, figures)
    assert "correlation" in written and "correlation_over_training" in written
    table = pd.read_csv(tables / "correlation.csv")
    assert len(table) >= 3 * 3 and table["spearman"].notna().any()
    assert re.search(r"^\| toy +\|", (tables / "correlation_summary.md").read_text(), re.M)
    assert (tables / "correlation.tex").read_text().count(r"\\") > 5
    for stem in ("correlation_scatter_toy", "correlation_over_training"):
        assert (figures / f"{stem}.png").stat().st_size > 5000 and (figures / f"{stem}.pdf").is_file()


# ----------------------------------------------------------------------------- timing


@pytest.mark.parametrize("method", ["vpt-deep", "pro-vpt", "pro-vpt-pass", "pro-vpt-exact"])
def test_timing_measures_the_training_loops_own_epochs(root, tmp_path, method):
    """The timing study measures train.run's own epochs: same losses, same moves, same prompts."""
    from provpt.data.task import TaskData
    from provpt.train import run

    name, extra = timing.ALIASES.get(method, (method, {}))
    extra = {**extra, "relocation.until": 1.0}  # (3 epochs: let pro-vpt-exact move in every one)
    cfg = run_config(profile_for(root), {"out": str(tmp_path / "run"), "eval_every": 99}, method=name, extra=extra)
    run(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    m = timing.Method(method, cfg, TaskData(cfg, torch.device("cpu")), torch.device("cpu"))
    rows = [timing.measure_epoch(m, e, do_eval=False) for e in range(cfg.epochs)]
    assert [r["train_loss"] for r in rows] == [h["train_loss"] for h in history]
    assert [r["moves"] for r in rows] == [h["moves"] for h in history]
    assert m.model.distribution() == history[-1]["distribution"]
    if method != "vpt-deep":
        assert sum(r["moves"] for r in rows) > 0 and m.relocator.grad_clip == cfg.grad_clip


def test_timing_study_phases_add_up_and_report(root, tmp_path):
    out = tmp_path / "results" / "p" / "studies" / "timing" / "toy"
    s = timing.main(profile_for(root), [f"out={out}", "study.epochs=3", "study.warmup_epochs=1"])
    rows = {r["method"]: r for r in s["methods"]}
    assert list(rows) == timing.DEFAULTS["methods"]
    epochs = pd.read_csv(out / "epochs.csv")
    assert len(epochs) == len(rows) * 3
    phases = [f"{p}_s" for p in timing.PHASES]
    assert (epochs[phases] >= 0).all().all()
    measured = epochs[[p for p in phases if p != "other_s"]].sum(axis=1)
    assert (measured <= epochs["wall_s"] * 1.02 + 1e-3).all()  # the phases never claim more than the epoch
    assert np.allclose(epochs[phases].sum(axis=1), epochs["wall_s"], rtol=0.02, atol=1e-3)
    assert (epochs["forward_backward_s"] > 0).all() and (epochs["train_images"] == 48).all()
    assert rows["vpt-deep"]["wall_vs_vpt_deep"] == pytest.approx(1.0)
    assert rows["pro-vpt-pass"]["scoring_s"] > 0 and rows["pro-vpt"]["allocation_s"] > 0
    assert rows["pro-vpt"]["ppo_update_s"] > 0  # 3 timed epochs hold one PPO update
    assert rows["linear"]["scoring_s"] == 0 and rows["linear"]["moves"] == 0 and rows["pro-vpt"]["moves"] > 0
    assert all(r["mem_peak_mb"] > 0 for r in rows.values())
    bench = tmp_path / "results" / "p" / "benchmarks" / "final" / "toy"  # <stage>/<dataset>/<method>/<file>.tsv
    for method, sec in (("vpt-deep", 10.0), ("pro-vpt", 15.0)):
        (bench / method).mkdir(parents=True)
        (bench / method / "seed18.tsv").write_text(f"s\th:m:s\tmax_rss\n{sec}\t0:00:10\t300.5\n")
    written = timing_report.report(out.parent, tmp_path / "tables", tmp_path / "figures")
    assert {"timing", "timing_phases", "timing_benchmarks"} <= set(written)
    bench_table = pd.read_csv(tmp_path / "tables" / "timing_benchmarks.csv")
    assert bench_table.set_index("method").loc["pro-vpt", "vs_vpt_deep"] == pytest.approx(1.5)
    assert len(pd.read_csv(tmp_path / "tables" / "timing.csv")) == len(rows)
    assert (tmp_path / "figures" / "timing_phases.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- adjustment


def test_no_move_arm_equals_continued_training(root, tmp_path):
    from provpt.studies import checkpoint_path, setup, train_studied_run

    cfg = run_config(profile_for(root), {"out": str(tmp_path / "x")}, method="vpt-deep")
    run_dir, cfg = train_studied_run(cfg, [1 / 3, 2 / 3], tmp_path / "run")
    device, data, model = setup(cfg)
    ck1 = torch.load(checkpoint_path(run_dir, 1), weights_only=False)
    ck2 = torch.load(checkpoint_path(run_dir, 2), weights_only=False)
    k = 0
    source = int(model.prompts.block[k])
    no_move = adjustment.run_arm(model, data, cfg, ck1, k, source, 1, "val200", adjustment.autocast_for(cfg, device),
                                 keep_state=True)
    assert not no_move["moved"]
    for name, v in ck2["model"].items():
        assert torch.equal(no_move["state"][name], v), name
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert no_move["loss"] == history[1]["eval"]["val200"]["loss"]
    # arms do not leak into each other (optimiser state is copied), and a move changes the outcome
    moved = adjustment.run_arm(model, data, cfg, ck1, k, (source + 1) % 3, 1, "val200",
                               adjustment.autocast_for(cfg, device), keep_state=True)
    again = adjustment.run_arm(model, data, cfg, ck1, k, source, 1, "val200", adjustment.autocast_for(cfg, device),
                               keep_state=True)
    assert moved["moved"] and moved["loss"] != no_move["loss"]
    assert again["loss"] == no_move["loss"]
    assert moved["state"]["prompts.block"][k] == (source + 1) % 3


def test_adjustment_study_and_report(root, tmp_path):
    out = tmp_path / "studies" / "adjustment" / "toy"
    s = adjustment.main(profile_for(root), [f"out={out}", "epochs=4", "study.budget_epochs=1", "study.pairs=true"])
    assert [p["epoch"] for p in s["points"]] == [1, 2, 3]
    arms = pd.read_csv(out / "arms.csv")
    assert len(arms) == 3 * 3 * 3  # points x sources x targets
    diag = arms[arms["source"] == arms["target"]]
    assert not diag["moved"].any() and (diag["gain_loss"] == 0).all()
    assert arms[arms["moved"]]["gain_loss"].abs().max() > 0
    for p in s["points"]:
        assert p["best"]["source"] != p["best"]["target"]
    assert isinstance(s["best_changes"], bool)
    written = adjustment_report.report(out.parent, tmp_path / "tables", tmp_path / "figures")
    best = pd.read_csv(tmp_path / "tables" / "adjustment_best.csv")
    assert len(best) == 3 and set(best["best_target"]) <= {0, 1, 2}
    assert (tmp_path / "figures" / "adjustment_heatmap_toy.png").stat().st_size > 5000
    assert "adjustment_arms" in written
    # the true-idleness rule, on the same run (reused, not retrained)
    t = adjustment.main(profile_for(root), [f"out={tmp_path / 'true'}", "epochs=4", "study.budget_epochs=1",
                                            "study.points=[0.5]", "study.prune=removal", "study.prune_batches=1",
                                            f"study.run={out / 'run'}"])
    assert t["prune"] == "removal" and t["points"][0]["rule_score"] == pytest.approx(
        max(pd.read_csv(tmp_path / "true" / "arms.csv")["score"]))
    assert not (tmp_path / "true" / "run").exists()
    assert len(pd.read_csv(tmp_path / "true" / "arms.csv")) == 3


# ----------------------------------------------------------------------------- rewards


def test_reward_study_pairs_each_move_with_its_counterfactual_and_reports(root, tmp_path):
    from provpt.report import rewards as rewards_report
    from provpt.studies import rewards

    out = tmp_path / "studies" / "rewards" / "toy"
    s = rewards.main(profile_for(root), [f"out={out}", "epochs=4", "study.points=[0.25, 0.75]",
                                         "study.score_batches=1"])
    moves = pd.read_csv(out / "moves.csv")
    assert len(moves) == 2 * 2 and s["moves"] == 4  # points x (blocks - 1)
    assert (moves["source"] != moves["target"]).all() and moves["effect"].abs().max() > 0
    # the authors' reward is the loss drop (the trend) minus the largest gate score after the move
    assert np.allclose(moves["mean"], moves["trend"] - moves["max_gate_after"], rtol=0, atol=1e-12)
    assert set(s["correlation"]) == {"mean", "faithful", "move", "trend"}
    assert s["correlation"]["move"]["n"] == 4 and -1 <= s["correlation"]["move"]["spearman"] <= 1
    # the effect is paired: the same checkpoint, data and dropout, so the no-move arm is reproducible
    again = rewards.main(profile_for(root), [f"out={tmp_path / 'again'}", "epochs=4", "study.points=[0.25]",
                                             "study.score_batches=1", f"study.run={out / 'run'}"])
    first = pd.read_csv(tmp_path / "again" / "moves.csv")
    assert np.allclose(first["effect"], moves[moves["epoch"] == first["epoch"][0]]["effect"])
    assert again["moves"] == 2
    rewards_report.report(out.parent, tmp_path / "tables", tmp_path / "figures")
    table = pd.read_csv(tmp_path / "tables" / "rewards.csv")
    assert len(table) == 4 and set(table["moves"]) == {4}
    assert (tmp_path / "figures" / "rewards_toy.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- allocators


def test_settling_statistics():
    dists = [[2, 2, 2], [3, 1, 2], [4, 0, 2], [4, 1, 1], [4, 0, 2], [4, 0, 2]]
    moves = [{"epoch": e, "source": 0, "target": 0 if e == 5 else 1} for e in range(1, 6)]
    s = allocators.settling(dists, moves, initial=[2, 2, 2], tol=1, window=2)
    assert s["settle_epoch"] == 1  # from epoch 1 on every block stays within 1 prompt of [3, 1, 2]
    assert s["settled"] and s["moves_to_settle"] == 1 and s["moves"] == 4 and s["attempts"] == 5
    assert s["last_change_epoch"] == 4 and s["displacement"] == 2.0
    assert allocators.settling(dists, moves, [2, 2, 2], tol=0, window=2)["settle_epoch"] == 4
    still = allocators.settling([[2, 2]] * 4, [], [2, 2])
    assert still["settle_epoch"] == 0 and still["moves"] == 0 and still["last_change_epoch"] is None


def test_allocator_variants_and_report(root, tmp_path):
    results = tmp_path / "results" / "p"
    study = results / "studies" / "allocators" / "toy"
    profile = profile_for(root, epochs=3)
    for variant in ("thompson", "pair"):
        s = allocators.main(profile, [f"study.variant={variant}", "seed=1", f"out={study / variant / 'seed1'}"])
        assert s["variant"] == variant and s["method"] == "pro-vpt" and "test" in s["eval"]  # final protocol
        assert s["relocation"]["allocator" if variant == "thompson" else "action_space"] == variant
    # the main grid's final runs stand in for ppo and vpt-deep
    from provpt.train import run

    for method in ("pro-vpt", "vpt-deep"):
        run(run_config(profile, {"seed": 1, "out": str(results / "runs" / "final" / "toy" / method / "seed1")},
                       method=method, stage="final"))
    written = allocators_report.report(results / "studies" / "allocators", tmp_path / "tables",
                                       tmp_path / "figures")
    table = pd.read_csv(tmp_path / "tables" / "allocators.csv")
    assert list(table["variant"]) == ["vpt-deep", "ppo", "thompson", "pair"]
    assert table["toy"].notna().all()
    settle = pd.read_csv(tmp_path / "tables" / "allocators_settling.csv")
    assert set(settle["variant"]) == {"ppo", "thompson", "pair"} and (settle["moves"] >= 0).all()
    assert "grid" in (tmp_path / "tables" / "allocators.md").read_text()
    assert {"allocators_accuracy", "allocators_distance"} <= set(written)
    with pytest.raises(ValueError, match="unknown variant"):
        allocators.main(profile, ["study.variant=nope", f"out={tmp_path / 'n'}"])
