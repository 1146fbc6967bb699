"""Allocators: PPO and Thompson learn a paying block, greedy/random, pair masking, state, RNG hygiene."""

import io

import numpy as np
import pytest
import torch

from provpt.config import RelocationConfig
from provpt.relocation.allocators import (GreedyAllocator, PPOAllocator, RandomAllocator, ThompsonAllocator,
                                          make_allocator, policy_state)
from provpt.relocation.ppo import PPO

L = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def situations(seed, n):
    """Random states the relocator could present: block scores, distribution after removal, source."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        dist = torch.tensor(rng.integers(0, 5, size=L))
        yield torch.tensor(rng.normal(size=L)), dist, int(rng.integers(L)), int(dist.sum()) + 1


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_policy_state_is_the_authors():
    s = policy_state(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([2, 0, 3, 4]), 1, L)
    z = np.array([1.0, 2, 3, 6])
    assert s.shape == (3 * L,)
    assert np.allclose(s[:L], (z - z.mean()) / (z.std() + 1e-8), atol=1e-6)  # population std
    assert np.allclose(s[L:2 * L], [2 / 9, 0, 3 / 9, 4 / 9])  # after removal, over its own sum
    assert s[2 * L:].tolist() == [0, 1, 0, 0]
    assert policy_state(torch.ones(L), torch.ones(L), None, L).shape == (2 * L,)


def test_ppo_learns_the_paying_block_within_bounded_updates():
    alloc, good = PPOAllocator(L, seed=2), 2
    for step, (scores, dist, src, total) in enumerate(situations(0, 80)):  # <= 40 updates
        target, info = alloc.act(scores, dist, src, total)
        assert len(info["probs"]) == L and abs(sum(info["probs"]) - 1) < 1e-5
        if info["probs"][good] > 0.8:
            break
        alloc.reward(1.0 if target == good else -1.0)
    else:
        pytest.fail(f"P(good) still {info['probs'][good]:.2f} after {alloc.ppo.updates} updates")
    assert alloc.ppo.updates >= 1


def test_ppo_update_is_the_authors_two_sample_monte_carlo():
    """Faithful quirk: discount 1 and normalised returns over a 2-move buffer give returns
    (+-0.71, -+0.71) set by the sign of the first reward alone; the second reward is ignored."""
    def updated(r2):
        ppo = PPO(3 * L, L, seed=0)
        for _ in range(2):
            ppo.act(torch.randn(3 * L, generator=torch.Generator().manual_seed(1)))
        ppo.reward(0.3)
        ppo.reward(r2)
        ppo.update()
        assert ppo.buffer == []
        return torch.cat([p.flatten() for p in ppo.actor.parameters()])

    assert torch.equal(updated(5.0), updated(-2.0))


def test_ppo_is_seeded_and_leaves_the_global_rng_alone():
    rng_before = torch.get_rng_state()
    runs = []
    for _ in range(2):
        alloc, targets = PPOAllocator(L, seed=7), []
        for scores, dist, src, total in situations(1, 6):
            targets.append(alloc.act(scores, dist, src, total)[0])
            alloc.reward(float(targets[-1] == 1))
        runs.append((targets, alloc.ppo.probs(torch.zeros(3 * L)).tolist()))
    assert runs[0] == runs[1] and alloc.ppo.updates == 3
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert PPOAllocator(L, seed=8).ppo.probs(torch.zeros(3 * L)).tolist() != runs[0][1]


@pytest.mark.parametrize("kind", ["ppo", "thompson", "random"])
def test_state_dict_roundtrip_mid_run_continues_identically(kind):
    cfg = RelocationConfig(allocator=kind)
    steps = list(situations(3, 9))

    def play(alloc, part):
        out = []
        for scores, dist, src, total in part:
            t, info = alloc.act(scores, dist, src, total)
            out.append((t, info["probs"]))
            alloc.reward(1.0 if t == 0 else -0.5)
        return out

    a = make_allocator(cfg, L, seed=5)
    whole = play(a, steps)
    b = make_allocator(cfg, L, seed=5)
    first = play(b, steps[:3])  # odd: a PPO update is due mid-pair
    b.act(*steps[3])  # and an action waits for its reward
    c = make_allocator(cfg, L, seed=99)
    c.load_state_dict(roundtrip(b.state_dict()))
    c.reward(1.0 if whole[3][0] == 0 else -0.5)
    assert first + whole[3:4] + play(c, steps[4:]) == whole


def test_thompson_learns_the_paying_block():
    alloc, good = ThompsonAllocator(L, seed=0), 3
    for scores, dist, src, total in situations(2, 150):
        target, info = alloc.act(scores, dist, src, total)
        alloc.reward(1.0 if target == good else -1.0)
    assert int(np.argmax(alloc.posterior_mean())) == good
    assert info["probs"][good] > 0.8
    assert alloc.successes.sum() + alloc.failures.sum() == 2 * L + 150


def test_thompson_success_is_a_positive_reward_and_none_drops():
    alloc = ThompsonAllocator(L, seed=0)
    t0, _, t2 = [alloc.act(torch.zeros(L), torch.ones(L), 0, L + 1)[0] for _ in range(3)]
    alloc.reward(0.0)  # t0: not a success
    alloc.reward(None)  # t1: no reward measured, forgotten
    alloc.reward(0.1)  # t2: success
    assert alloc.failures.tolist() == (np.ones(L) + np.eye(L)[t0]).tolist()
    assert alloc.successes.tolist() == (np.ones(L) + np.eye(L)[t2]).tolist()
    assert not alloc.pending


def test_greedy_picks_the_lowest_idleness_sum():
    alloc = GreedyAllocator(L)
    target, info = alloc.act(torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([3, 3, 3, 2]), 0, 12)
    assert target == 1 and info["probs"] == [0.0, 1.0, 0.0, 0.0] and info["source"] == 0


def test_random_is_uniform_and_seeded():
    draws = [RandomAllocator(L, seed=s).act(torch.zeros(L), torch.ones(L), 0, 5) for s in range(40)]
    assert all(info["probs"] == [0.25] * L for _, info in draws)
    assert {t for t, _ in draws} == set(range(L))
    assert RandomAllocator(L, seed=3).act(torch.zeros(L), torch.ones(L), 0, 5)[0] == draws[3][0]


@pytest.mark.parametrize("kind", ["ppo", "thompson", "random", "greedy"])
def test_pair_action_space_masks_empty_sources(kind):
    alloc = make_allocator(RelocationConfig(allocator=kind, action_space="pair"), L, seed=1)
    dist = torch.tensor([0, 5, 0, 3])
    for _ in range(20):
        target, info = alloc.act(torch.tensor([0.5, 2.0, -1.0, 0.1]), dist, None, 8)
        probs = np.array(info["probs"]).reshape(L, L)
        assert probs.shape == (L, L) and abs(probs.sum() - 1) < 1e-5
        assert probs[[0, 2]].sum() == 0 and info["source"] in (1, 3) and 0 <= target < L
        alloc.reward(0.1)
    if kind == "greedy":
        assert (info["source"], target) == (1, 2)


def test_make_allocator_kinds():
    from provpt.relocation.allocators import OracleAllocator

    kinds = {"ppo": PPOAllocator, "thompson": ThompsonAllocator, "random": RandomAllocator, "greedy": GreedyAllocator,
             "oracle": OracleAllocator}
    for name, cls in kinds.items():
        alloc = make_allocator(RelocationConfig(allocator=name), 12, seed=0)
        assert type(alloc) is cls and alloc.num_actions == 12
    assert make_allocator(RelocationConfig(ppo_update_every=3), 12).update_every == 3
    with pytest.raises(ValueError, match="allocator"):
        make_allocator(RelocationConfig(allocator="oracle-of-delphi"), 12)
    with pytest.raises(ValueError, match="lookahead"):  # the oracle needs the training loop's trials
        make_allocator(RelocationConfig(allocator="oracle"), 12).act([0.0] * 12, [1] * 12, 0, 12)
