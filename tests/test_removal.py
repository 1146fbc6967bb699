"""What the idleness scores measure, and what the PPO updates learn (the three mechanisms of
docs/findings.md): the log-gate removes a prompt exactly and its gradient is the first-order
removal estimate; the authors' gate score is LayerNorm's eps term; the authors' PPO update sees
only sign(r1); the bandit update learns where the pay is under a drifting baseline."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from provpt.config import RelocationConfig
from provpt.model.prompted_vit import PromptedViT
from provpt.relocation.allocators import make_allocator
from provpt.relocation.idleness import online_scores, taylor_pass, true_idleness
from provpt.relocation.ppo import PPO

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, std=0.3, log_gated=True):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KW)
    vit.requires_grad_(False)
    model = PromptedViT(vit, 5, [2, 3, 1]).double().eval()
    with torch.no_grad():
        model.prompts.values.normal_(0, std)
    model.prompts.log_gated = log_gated
    return model


def batch(seed=1, b=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (b,), generator=g)


@torch.no_grad()
def test_minus_inf_log_gate_is_exact_removal():
    model, (x, _) = tiny(), batch()
    bank = model.prompts
    for k in range(bank.total):
        with bank.removed(k):
            removed = model(x)
        bank.log_gates[k] = -math.inf
        gated = model(x)
        bank.log_gates[k] = 0.0
        torch.testing.assert_close(gated, removed, rtol=0, atol=1e-10)
        assert (gated - model(x)).abs().max() > 1e-6  # and the prompt did matter
    bank.log_gated = False
    plain = model(x)
    bank.log_gated = True
    torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-12)  # b = 0 is the prompt as it is


def test_log_gate_gradient_is_a_finite_difference():
    model, (x, y) = tiny(), batch()
    bank = model.prompts
    bank.log_gates.requires_grad_(True)
    scores = taylor_pass(model.eval(), lambda: [(x, y)], F.cross_entropy, idleness="logit")
    eps = 1e-6
    with torch.no_grad():
        for k in range(bank.total):
            bank.log_gates[k] = eps
            up = F.cross_entropy(model.eval()(x), y)
            bank.log_gates[k] = -eps
            down = F.cross_entropy(model.eval()(x), y)
            bank.log_gates[k] = 0.0
            assert float(scores[k]) == pytest.approx(float(up - down) / (2 * eps), rel=1e-6, abs=1e-12)
    assert bank.log_gates.grad is None  # the pass leaves no .grad behind


def test_log_gate_score_tracks_true_idleness_where_the_gate_score_is_tiny():
    """The first-order removal estimate has the magnitude of true idleness; the gate score does not."""
    model, (x, y) = tiny(std=0.02), batch(b=16)
    model.prompts.log_gates.requires_grad_(True)
    true = true_idleness(model, lambda: [(x, y)], F.cross_entropy).float()
    logit = taylor_pass(model, lambda: [(x, y)], F.cross_entropy, idleness="logit")
    gate = taylor_pass(model, lambda: [(x, y)], F.cross_entropy, idleness="gate")
    ratio_logit = (logit.abs() / true.abs()).median()
    ratio_gate = (gate.abs() / true.abs()).median()
    assert 0.2 < ratio_logit < 5 and ratio_gate < 1e-2, (ratio_logit, ratio_gate)


def test_gate_score_is_layernorm_eps_term():
    """d loss / d gate = eps / (var(p) + eps) * <dL/dz, LN(p) - beta>, z = norm1's output of the prompt
    token: the gate reaches the loss only through LayerNorm's eps (finding 1, pinned by magnitude)."""
    model, (x, y) = tiny(std=0.05, log_gated=False), batch()
    bank = model.prompts
    bank.gates.requires_grad_(True)
    seen = {}

    def keep(i):
        def hook(module, args, out):
            out.retain_grad()
            seen[i] = (args[0], out)
        return hook

    handles = [blk.norm1.register_forward_hook(keep(i)) for i, blk in enumerate(model.vit.blocks)]
    try:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    prefix = model.vit.num_prefix_tokens
    for i, blk in enumerate(model.vit.blocks):
        inp, out = seen[i]
        ln = blk.norm1
        for j, k in enumerate(bank.block_indices(i).tolist()):
            p = inp[:, prefix + j].detach()  # gate * value = value (gate 1), per sample (no dropout)
            var = p.var(-1, unbiased=False, keepdim=True)
            normed = (p - p.mean(-1, keepdim=True)) / torch.sqrt(var + ln.eps)  # LN(p) without affine
            lnp_minus_beta = normed * ln.weight  # LN(p) - beta
            dz = out.grad[:, prefix + j]
            predicted = (ln.eps / (var.squeeze(-1) + ln.eps) * (dz * lnp_minus_beta).sum(-1)).sum()
            assert float(bank.gates.grad[k]) == pytest.approx(float(predicted), rel=1e-8, abs=1e-15)


def test_online_log_gate_scores_come_from_the_training_backward():
    model, (x, y) = tiny(), batch()
    model.prompts.log_gates.requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    online = online_scores(model.prompts, 1, "logit")
    model.prompts.log_gates.grad = None
    assert torch.allclose(online, taylor_pass(model, lambda: [(x, y)], F.cross_entropy, idleness="logit"))


# ----------------------------------------------------------------------------- PPO updates


def actor_after_update(r1, r2, returns="faithful"):
    ppo = PPO(6, 3, seed=0, returns=returns)
    state = torch.linspace(-1, 1, 6)
    for r in (r1, r2):
        ppo.act(state)
        ppo.reward(r)
    ppo.update()
    return torch.cat([p.detach().flatten() for p in ppo.actor.parameters()])


def test_faithful_update_sees_only_the_sign_of_r1():
    """Two transitions, discount 1, returns normalised over the buffer: [r1 + r2, r2] -> [s, -s] / sqrt(2)."""
    ppo = PPO(6, 3, returns="faithful")
    for r1, r2 in ((0.3, -5.0), (7.0, 2.0), (0.05, 3.0), (-2.0, 3.0)):
        s = math.copysign(1.0, r1)
        torch.testing.assert_close(ppo.returns([r1, r2]), torch.tensor([s, -s]) / math.sqrt(2), atol=1e-4, rtol=0)
    reference = actor_after_update(0.3, -5.0)
    for r1, r2 in ((7.0, 2.0), (0.05, 3.0), (0.5, 0.49)):
        torch.testing.assert_close(actor_after_update(r1, r2), reference, rtol=0, atol=1e-6)
    assert not torch.allclose(actor_after_update(-0.3, -5.0), reference)  # the sign of r1 is all it sees


def test_bandit_update_keeps_every_reward():
    """Each move's reward is its return, normalised by the running statistics of every reward so far:
    a below-average first reward gets a negative return (the faithful update would give it +1/sqrt(2))."""
    ppo = PPO(6, 3, returns="bandit")
    for r in (1.0, 3.0, 2.0, 10.0):
        ppo.act(torch.zeros(6))
        ppo.reward(r)
    mean, std = 4.0, torch.tensor([1.0, 3.0, 2.0, 10.0]).std().item()
    torch.testing.assert_close(ppo.returns([2.0, 10.0]), torch.tensor([(2 - mean) / std, (10 - mean) / std]),
                               atol=1e-5, rtol=0)
    assert ppo.returns([2.0, 10.0])[0] < 0 < PPO(6, 3).returns([2.0, 10.0])[0]


@pytest.mark.parametrize("update,learns", [("bandit", True), ("faithful", False)])
def test_the_bandit_update_learns_where_the_pay_is_under_a_drifting_baseline(update, learns):
    """Block 2 pays 1 more than the others; every reward also carries a baseline that falls as
    training would (the trend the authors' reward tracks). The bandit update finds block 2."""
    L = 4
    alloc = make_allocator(RelocationConfig(ppo_update=update), L, seed=0)
    state = torch.zeros(L, dtype=torch.float64)
    dist = torch.full((L,), 5)
    picks = []
    for t in range(240):
        target, _ = alloc.act(state, dist, source=0, total=5 * L)
        baseline = 3.0 * math.exp(-t / 60)  # the training trend
        noise = 0.3 * math.sin(7.1 * t)
        alloc.reward(baseline + noise + (1.0 if target == 2 else 0.0))
        picks.append(target)
    late = sum(p == 2 for p in picks[-60:]) / 60
    assert (late > 0.6) if learns else (late < 0.6), late
