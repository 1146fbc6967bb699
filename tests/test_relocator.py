"""The relocation schedule on a tiny prompted ViT driven by a miniature training loop."""

import io

import pytest
import timm
import torch
import torch.nn.functional as F

from provpt.config import RelocationConfig
from provpt.model.prompted_vit import PromptedViT
from provpt.relocation.relocator import Relocator

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)
G = torch.Generator().manual_seed(0)
X = torch.randn(32, 3, 16, 16, generator=G)
Y = (X[:, 0].mean((1, 2)) > 0).long() + 2 * (X[:, 1].mean((1, 2)) > 0).long()


pytestmark = pytest.mark.usefixtures("one_thread")


def batches():
    return [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 32, 8)]


def build(seed=0):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KW)
    vit.requires_grad_(False)
    model = PromptedViT(vit, 4, [2, 2, 2], prompt_dropout=0.1)
    params = [model.prompts.values, *model.head.parameters()]  # never the gates
    return model, params, torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-4)


def train_epoch(model, params, opt):
    model.train()
    losses = []
    for x, y in batches():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        opt.step()
        losses.append(float(loss.detach()))
    return len(losses), sum(losses) / len(losses), sum(l / 8 for l in losses)


def checkpoint(epoch, model, opt, reloc):
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                "reloc": reloc.state_dict(), "rng": torch.get_rng_state(),
                "dropout_rng": model.prompts.rng_state()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def run(cfg, epochs=6, seed=0, stop_after=None, resume=None, relocate=True, check_rng=False):
    """A miniature of train.py; returns (model, relocator, history) or a checkpoint at ``stop_after``."""
    model, params, opt = build(seed + (resume is not None))  # a resumed run starts from other weights
    reloc = Relocator(cfg, 3, 6, seed=seed)
    start, history = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        reloc.load_state_dict(resume["reloc"])
        torch.set_rng_state(resume["rng"])
        model.prompts.set_rng_state(resume["dropout_rng"])
        start = resume["epoch"] + 1
    for epoch in range(start, epochs):
        before, block = torch.get_rng_state(), model.prompts.block.clone()
        dropout_before = model.prompts.rng_state()
        moves = reloc.start_epoch(epoch, model, batches, F.cross_entropy) if relocate else []
        if check_rng:  # neither the global stream nor the prompts' dropout stream is touched
            assert torch.equal(torch.get_rng_state(), before)
            assert torch.equal(model.prompts.rng_state(), dropout_before)
        n, mean, faithful = train_epoch(model, params, opt)
        if relocate:
            before = torch.get_rng_state()
            reloc.end_epoch(epoch, model, n, mean, faithful)
            if check_rng:
                assert torch.equal(torch.get_rng_state(), before)
        history.append({"moves": moves, "mean": mean, "faithful": faithful, "block": block, "scores": reloc.collected,
                        "max": None if reloc.collected is None else float(reloc.collected.max())})
        if epoch == stop_after:
            return checkpoint(epoch, model, opt, reloc)
    return model, reloc, history


def check_log(model, reloc, epochs):
    assert reloc.moves, "no move at all"
    for rec in reloc.moves:
        assert set(rec) == {"epoch", "prompt", "source", "target", "score", "probs", "distribution", "reward"}
        assert sum(rec["distribution"]) == 6 and min(rec["distribution"]) >= 0
        assert len(rec["probs"]) == 3 and abs(sum(rec["probs"]) - 1) < 1e-3
        settled = rec["epoch"] < epochs - 1
        assert isinstance(rec["reward"], float) == settled
    assert reloc.moves[-1]["distribution"] == model.distribution()


def test_online_ppo_run_relocates_keeps_the_budget_and_logs_rewards():
    model, reloc, history = run(RelocationConfig(), epochs=7, check_rng=True)
    check_log(model, reloc, 7)
    assert model.distribution() != [2, 2, 2] and sum(model.distribution()) == 6
    assert all(not h["moves"] for h in history[:1])  # warm-up epoch 0
    assert any(r["source"] != r["target"] for r in reloc.moves)
    for rec in reloc.moves[:-1]:  # r = loss(epoch t-1) - loss(epoch t) - max idleness of epoch t
        t = rec["epoch"]
        expect = history[t - 1]["mean"] - history[t]["mean"] - history[t]["max"]
        assert rec["reward"] == pytest.approx(expect, rel=1e-6, abs=1e-9)
    assert reloc.allocator.ppo.updates == (len(reloc.moves) - 1) // 2


def test_faithful_reward_uses_the_authors_loss_scaling():
    _, reloc, history = run(RelocationConfig(reward="faithful", allocator="random"), epochs=4)
    rec = reloc.moves[0]
    t = rec["epoch"]
    assert rec["reward"] == pytest.approx(history[t - 1]["faithful"] - history[t]["faithful"] - history[t]["max"])


def test_pass_mode_with_clipped_scores_relocates_without_disturbing_training_randomness():
    cfg = RelocationConfig(scoring="pass", clip_scores=True, allocator="greedy")
    model, reloc, _ = run(cfg, epochs=5, check_rng=True)
    check_log(model, reloc, 5)
    assert reloc.moves[0]["epoch"] == 1 and reloc.moves[0]["score"] > 0


def test_norm_pruning_always_moves_and_rewards_the_plain_loss_change():
    model, reloc, history = run(RelocationConfig(pruning="norm", allocator="random"), epochs=5)
    check_log(model, reloc, 5)
    assert [r["epoch"] for r in reloc.moves] == [1, 2, 3, 4]
    for rec in reloc.moves[:-1]:
        t = rec["epoch"]
        assert rec["reward"] == pytest.approx(history[t - 1]["mean"] - history[t]["mean"])


def test_schedule_warmup_every_count():
    cfg = RelocationConfig(warmup_epochs=2, every=2, count=2, allocator="random", pruning="norm")
    model, reloc, _ = run(cfg, epochs=7)
    assert [r["epoch"] for r in reloc.moves] == [2, 2, 4, 4, 6, 6]
    for e in (2, 4, 6):
        a, b = [r for r in reloc.moves if r["epoch"] == e]
        assert a["prompt"] != b["prompt"] and a["reward"] == b["reward"]
    check_log(model, reloc, 7)


def test_pair_action_space_prunes_the_best_prompt_of_the_chosen_source():
    model, reloc, history = run(RelocationConfig(action_space="pair"), epochs=5)
    assert reloc.moves
    for rec in reloc.moves:
        assert len(rec["probs"]) == 9 and rec["probs"][rec["source"] * 3 + rec["target"]] > 0
        scores, block = history[rec["epoch"] - 1]["scores"], history[rec["epoch"]]["block"]
        assert block[rec["prompt"]] == rec["source"]
        assert rec["score"] == pytest.approx(float(scores[block == rec["source"]].max()))
    assert sum(model.distribution()) == 6


@pytest.mark.parametrize("cfg", [RelocationConfig(), RelocationConfig(scoring="pass", allocator="thompson", count=2)],
                         ids=["online-ppo", "pass-thompson"])
def test_killed_and_resumed_equals_uninterrupted(cfg):
    model, reloc, _ = run(cfg, epochs=7)
    ckpt = run(cfg, epochs=7, stop_after=3)
    model2, reloc2, _ = run(cfg, epochs=7, resume=ckpt)
    assert reloc2.moves == reloc.moves
    assert model2.distribution() == model.distribution()
    assert torch.equal(model2.prompts.values, model.prompts.values)
    assert torch.equal(model2.head.weight, model.head.weight)


def test_relocation_off_or_before_warmup_is_exactly_vpt_deep():
    ref, _, _ = run(RelocationConfig(), epochs=3, relocate=False)
    for cfg in (RelocationConfig(enabled=False), RelocationConfig(warmup_epochs=10)):
        model, reloc, _ = run(cfg, epochs=3, check_rng=True)
        assert not reloc.moves
        assert torch.equal(model.prompts.values, ref.prompts.values)
        assert torch.equal(model.head.weight, ref.head.weight)


# ----------------------------------------------------------------------------- the pure step


class FixedTarget:
    """An allocator that always answers ``target`` and records what it was shown."""

    pair = False

    def __init__(self, target):
        self.target, self.seen = target, []

    def act(self, state, after, source, total):
        self.seen.append((state.clone(), after.clone(), source, total))
        return self.target, {"probs": [1.0]}


def test_relocate_is_a_step_on_a_bank_and_scores():
    """No ViT, no data: a prompt bank, per-prompt scores and an allocator."""
    from provpt.model.prompts import PromptBank
    from provpt.relocation.relocator import relocate

    torch.manual_seed(0)
    bank = PromptBank(4, [2, 2, 2])
    before = bank.values.detach().clone()
    scores = torch.tensor([0.1, -1.0, 0.5, 0.2, 0.0, 0.3])
    alloc = FixedTarget(0)
    moves = relocate(bank, scores, alloc, RelocationConfig(count=2, scale=1e-3), epoch=3)
    assert [(m["prompt"], m["source"], m["target"]) for m in moves] == [(2, 1, 0), (5, 2, 0)]
    assert bank.distribution().tolist() == [4, 1, 1] and bank.total == 6
    state, after, source, total = alloc.seen[0]
    assert state.tolist() == pytest.approx([-0.9, 0.7, 0.3]) and after.tolist() == [2, 1, 2] and total == 6
    torch.testing.assert_close(bank.values.detach()[2], before[2] * 1e-3)
    torch.testing.assert_close(bank.values.detach()[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    assert bank.block_indices(0).tolist() == [0, 1, 2, 5]  # appended after the block's prompts
    # Taylor pruning moves nothing when no score is positive; a move to its own block changes nothing
    assert relocate(bank, -scores.abs() - 1, alloc, RelocationConfig(), epoch=4) == []
    stay = FixedTarget(None)
    stay.act = lambda state, after, source, total: (source, {"probs": [1.0]})
    (move,) = relocate(bank, scores, stay, RelocationConfig(), epoch=5)
    assert move["source"] == move["target"] == 0 and bank.distribution().tolist() == [4, 1, 1]


def test_relocation_stops_at_until():
    r = Relocator(RelocationConfig(until=0.5), 3, 6, epochs=10)
    assert [e for e in range(10) if r.moves_at(e)] == [1, 2, 3, 4]
    assert [e for e in range(10) if Relocator(RelocationConfig(), 3, 6, epochs=10).moves_at(e)] == list(range(1, 10))


def test_needs_pass_says_when_start_epoch_takes_the_scoring_pass():
    """The training loop runs the scoring passes of a pack's runs as one, for the relocators that
    would take one: pass scoring with Taylor pruning, at a moving epoch or with a reward to settle."""
    r = Relocator(RelocationConfig(scoring="pass", warmup_epochs=2, every=2), 3, 6, epochs=10)
    assert [e for e in range(6) if r.needs_pass(e)] == [2, 4]
    r.pending = [0]
    assert r.needs_pass(3)
    for cfg in (RelocationConfig(), RelocationConfig(scoring="pass", pruning="norm"),
                RelocationConfig(scoring="pass", enabled=False)):
        assert not any(Relocator(cfg, 3, 6, epochs=10).needs_pass(e) for e in range(6))
