"""Idleness scores: Taylor (pass and online) against finite differences, true idleness, norm."""

import pytest
import timm
import torch
import torch.nn.functional as F

from provpt.model.prompted_vit import PromptedViT
from provpt.relocation.idleness import (block_sums, norm_scores, online_scores, reset_online, taylor_pass,
                                        true_idleness)

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(dropout=0.0, dtype=torch.float32, seed=0, std=1e-3):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KW)
    vit.requires_grad_(False)
    model = PromptedViT(vit, 5, [2, 2, 2], prompt_dropout=dropout)
    with torch.no_grad():
        model.prompts.values.normal_(0, std)
    return model.to(dtype).train()


def data(n=3, b=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 5, (b,), generator=g))
            for _ in range(n)]


def mean_batch_loss(model, batches):
    return sum(F.cross_entropy(model(x), y) for x, y in batches) / len(batches)


def test_taylor_matches_finite_difference_and_value_gradient():
    model, batches = tiny(dtype=torch.float64), data(n=2, dtype=torch.float64)
    scores = taylor_pass(model, lambda: batches, F.cross_entropy)
    gates, eps = model.prompts.gates, 1e-6
    fd = scores.clone()
    with torch.no_grad():
        for k in (0, 3, 5):
            gates[k] += eps
            up = mean_batch_loss(model, batches)
            gates[k] -= 2 * eps
            down = mean_batch_loss(model, batches)
            gates[k] += eps
            fd[k] = (up - down) / (2 * eps)
    assert torch.allclose(scores, fd, rtol=1e-7, atol=0)
    assert scores.abs().min() > 1e-4
    # the same number is g . p, from the gradient w.r.t. the prompt values
    mean_batch_loss(model, batches).backward()
    gp = (model.prompts.values.grad * model.prompts.values.detach()).sum(1)
    assert torch.allclose(scores, gp, rtol=1e-9, atol=1e-12)
    assert scores.abs().min() > 0


def test_taylor_pass_leaves_grads_and_mode_alone():
    model, batches = tiny(dropout=0.2), data()
    model.eval()
    taylor_pass(model, lambda: batches, F.cross_entropy, clip=0.25)
    assert not model.training and model.prompts.gates.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_clip_quirk_rescales_each_batch_by_the_global_norm():
    model, batches = tiny(), data()
    assert torch.allclose(taylor_pass(model, lambda: batches, F.cross_entropy, clip=1e9),
                          taylor_pass(model, lambda: batches, F.cross_entropy))
    clip, expect = 0.05, torch.zeros(6)
    for x, y in batches:  # what clip_grad_norm_ over gates + head does to each batch's gate gradient
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        norm = torch.sqrt(model.prompts.gates.grad.pow(2).sum() + sum(p.grad.pow(2).sum() for p in model.head.parameters()))
        assert norm > clip  # the quirk is active in this test
        expect += model.prompts.gates.grad * min(1.0, clip / (float(norm) + 1e-6))
    got = taylor_pass(model, lambda: batches, F.cross_entropy, clip=clip)
    assert torch.allclose(got, expect / len(batches), rtol=1e-5, atol=1e-7)


def test_taylor_pass_returns_both_loss_scalings():
    model, batches = tiny(), data(b=4) + data(n=1, b=2, seed=7)
    _, loss = taylor_pass(model, lambda: batches, F.cross_entropy, return_loss=True)
    with torch.no_grad():
        per = [float(F.cross_entropy(model(x), y)) for x, y in batches]
    sizes = [len(y) for _, y in batches]
    assert loss["mean"] == pytest.approx(sum(l * n for l, n in zip(per, sizes)) / sum(sizes), rel=1e-5)
    assert loss["faithful"] == pytest.approx(sum(l / n for l, n in zip(per, sizes)), rel=1e-5)


def test_true_idleness_is_the_loss_difference_of_two_forwards():
    model, batches = tiny(dropout=0.5), data()
    got = true_idleness(model, lambda: batches, F.cross_entropy)
    assert model.training  # mode restored
    model.eval()
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    with torch.no_grad():
        full = F.cross_entropy(model(x), y)
        for k in (0, 3, 5):
            with model.prompts.removed(k):
                without = F.cross_entropy(model(x), y)
                assert model.prompts.distribution().sum() == 6  # removed from the sequence, not the bank
            assert float(got[k]) == pytest.approx(float(full - without), abs=1e-6)
    assert got.abs().min() > 0


def test_online_and_pass_agree_on_a_frozen_model():
    model, batches = tiny(), data(n=4)
    for x, y in batches:  # a training epoch without optimiser steps: gate gradients accumulate
        F.cross_entropy(model(x), y).backward()
    online = online_scores(model, len(batches))
    reset_online(model)
    assert model.prompts.gates.grad is None
    assert torch.allclose(online, taylor_pass(model, lambda: batches, F.cross_entropy), rtol=1e-5, atol=1e-8)
    assert torch.equal(online_scores(model, 4), torch.zeros(6))


def test_a_prompt_that_changes_nothing_scores_zero_both_ways():
    model, batches = tiny(), data()
    qkv = model.vit.blocks[1].attn.qkv
    with torch.no_grad():  # block 1's attention values are all zero: its prompts (2, 3) cannot matter
        qkv.weight[64:].zero_()
        qkv.bias[64:].zero_()
    taylor = taylor_pass(model, lambda: batches, F.cross_entropy)
    true = true_idleness(model, lambda: batches, F.cross_entropy)
    assert taylor[2:4].abs().max() < 1e-9 and true[2:4].abs().max() < 1e-7
    assert taylor[[0, 1, 4, 5]].abs().min() > 1e-4 and true[[0, 1, 4, 5]].abs().min() > 1e-4
    # a zero-valued prompt has zero Taylor score too (g . 0), wherever it is
    with torch.no_grad():
        model.prompts.values[0].zero_()
    assert taylor_pass(model, lambda: batches, F.cross_entropy)[0] == 0


def test_norm_scores_prune_the_smallest_norm_relative_to_its_block():
    model = tiny()
    with torch.no_grad():
        v = model.prompts.values
        v.zero_()
        v[:, 0] = torch.tensor([1.0, 3.0, 2.0, 2.0, 10.0, 1.5])
    s = norm_scores(model)
    assert (s <= 0).all()
    assert torch.allclose(s, -torch.tensor([1 / 4, 3 / 4, 1 / 2, 1 / 2, 10 / 11.5, 1.5 / 11.5]))
    assert int(s.argmax()) == 5  # smallest relative norm (not the smallest absolute, prompt 0)
    assert torch.equal(block_sums(torch.arange(6.0), model.prompts.block, 3), torch.tensor([1.0, 5.0, 9.0]).double())


def test_gate_score_lives_on_the_layernorm_epsilon():
    """A finding, pinned: a deep prompt reaches other tokens only through LayerNorm(gate * p), which
    is scale-invariant up to eps, so d loss / d gate = (meaningful term) * eps / (var(p) + eps).
    With eps = 0 the score vanishes; prompts with small variance (just relocated, scaled 1e-3) score
    orders of magnitude higher than trained ones of the same true idleness."""
    model, batches = tiny(dtype=torch.float64, std=0.05), data(n=2, dtype=torch.float64)
    base = taylor_pass(model, lambda: batches, F.cross_entropy)
    for blk in model.vit.blocks:
        blk.norm1.eps = 0.0
    assert taylor_pass(model, lambda: batches, F.cross_entropy).abs().max() < 1e-14 < base.abs().min()


# ----------------------------------------------------------------------------- the pass of a pack


def pack_of_runs(dtype=torch.float64):
    """Four runs over one frozen backbone: other distributions (padded in the pack), one log-gated,
    prompt dropout on, values at VPT's scale."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KW).to(dtype)
    vit.requires_grad_(False)
    models = []
    for seed, dist in enumerate([[2, 2, 2], [0, 5, 1], [3, 0, 3], [1, 1, 1]]):
        torch.manual_seed(10 + seed)
        models.append(PromptedViT(vit, 5, dist, prompt_dropout=0.1, seed=seed).to(dtype).train())
    models[1].prompts.log_gated = True
    return models


@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_a_packed_pass_equals_each_runs_pass_alone(chunk):
    """``taylor_passes`` (one concatenated forward and backward per step, per-run gradients), with and
    without the clip quirk, gate and log-gate idleness, each run its own batches: each run's scores and
    losses equal its ``taylor_pass`` alone (float64, 1e-10), in chunks of runs too; the runs' dropout
    streams advance as alone."""
    from provpt.model.prompted_vit import chunked
    from provpt.relocation.idleness import taylor_passes

    models = pack_of_runs()
    clips, how = [0.05, None, 0.25, None], ["gate", "logit", "gate", "gate"]
    runs = [data(n=3, b=4, seed=20 + j, dtype=torch.float64) for j in range(4)]
    start = [m.prompts.rng_state() for m in models]
    alone = []
    for m, b, clip, idleness, st in zip(models, runs, clips, how, start):
        m.prompts.set_rng_state(st)
        alone.append(taylor_pass(m, lambda b=b: b, F.cross_entropy, clip, True, idleness))
    after = [m.prompts.rng_state() for m in models]
    for m, st in zip(models, start):
        m.prompts.set_rng_state(st)
    packed = taylor_passes(models, lambda: zip(*runs), F.cross_entropy, clips, how,
                           chunks=lambda work: chunked(models, chunk, work, grads=False))
    for (a, la), (p, lp), m, st in zip(alone, packed, models, after):
        torch.testing.assert_close(p, a, rtol=1e-10, atol=1e-14)
        assert lp == pytest.approx(la, rel=1e-12)
        assert torch.equal(m.prompts.rng_state(), st)
        assert m.training and m.prompts.log_gates.grad is None and m.prompts.gates.grad is None
    assert all(a.abs().min() > 0 for a, _ in alone)
    assert not models[0].prompts.log_gates.requires_grad  # put back as it was


def test_a_packed_pass_split_on_out_of_memory_equals_it_whole():
    """A forward that runs out of memory on more than 2 runs at once (simulated after its dropout
    masks are drawn): the chunk is put back, halved and redone, and the scores are those of the pass
    in one piece."""
    from provpt.model.prompted_vit import chunked, packed_forward
    from provpt.relocation.idleness import taylor_passes

    models = pack_of_runs()
    runs = [data(n=2, b=4, seed=30 + j, dtype=torch.float64) for j in range(4)]
    clips, how = [0.05, None, None, 0.25], ["gate", "logit", "gate", "gate"]
    start = [m.prompts.rng_state() for m in models]
    whole = taylor_passes(models, lambda: zip(*runs), F.cross_entropy, clips, how)
    for m, st in zip(models, start):
        m.prompts.set_rng_state(st)
    calls, sizes = [], []

    def small_memory(ms, x, n):
        out = packed_forward(ms, x, n)
        calls.append(len(ms))
        if len(ms) > 2:
            raise torch.OutOfMemoryError("simulated: more than 2 runs")
        return out

    split = taylor_passes(models, lambda: zip(*runs), F.cross_entropy, clips, how, forward=small_memory,
                          chunks=lambda work: sizes.append(chunked(models, 0, work, grads=False)))
    assert calls[:3] == [4, 2, 2] and sizes == [2, 2]
    for (a, la), (b, lb) in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
        assert lb == pytest.approx(la, rel=1e-12)
