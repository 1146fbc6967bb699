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
