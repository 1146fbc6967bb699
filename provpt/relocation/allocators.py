"""Where does a pruned prompt go? One interface, four allocators and an oracle (the upper bound).

``act(block_scores, distribution_after_removal, source, total) -> (target, info)``:
``block_scores`` (L,) are the per-block sums of idleness scores, ``distribution_after_removal`` the
prompts per block once the pruned prompt is taken out of ``source``; ``info['probs']`` is the
distribution the target was sampled from (L floats). ``reward(r)`` rewards the oldest unrewarded
action (``None`` drops it). All randomness comes from generators kept in ``state_dict()``.

Pair action space (the authors' L^2 ablation, ``pair=True``): the allocator picks (source, target)
itself; pass the current distribution (nothing removed) and ``source=None``; ``info['source']`` is
the chosen source, ``info['probs']`` has L*L entries (index source * L + target); sources without
prompts are masked out.
"""

from __future__ import annotations

import numpy as np
import torch

from .ppo import PPO


def policy_state(block_scores, distribution, source: int | None, num_blocks: int) -> torch.Tensor:
    """PRO-VPT's state: z-normalised block scores, distribution / its sum, one-hot source.

    As in the authors' code: population std (+1e-8), and the distribution after removal divided by
    its own sum (N - 1). In pair mode (``source=None``) the one-hot part is left out (2L values).
    """
    s = torch.as_tensor(block_scores, dtype=torch.float64)
    d = torch.as_tensor(distribution, dtype=torch.float64)
    parts = [(s - s.mean()) / (s.std(unbiased=False) + 1e-8), d / max(float(d.sum()), 1.0)]
    if source is not None:
        parts.append(torch.nn.functional.one_hot(torch.tensor(source), num_blocks).double())
    return torch.cat(parts).float()


class Allocator:
    """Shared plumbing: action space (L targets or L*L pairs) and its validity mask."""

    def __init__(self, num_blocks: int, seed: int = 0, pair: bool = False):
        self.num_blocks, self.seed, self.pair = num_blocks, seed, pair
        self.num_actions = num_blocks * num_blocks if pair else num_blocks

    def mask(self, distribution) -> np.ndarray:
        if not self.pair:
            return np.ones(self.num_actions, dtype=bool)
        has = np.asarray(torch.as_tensor(distribution).tolist()) > 0
        return np.repeat(has, self.num_blocks)

    def decode(self, action: int, source, probs) -> tuple[int, dict]:
        info = {"probs": [float(p) for p in probs]}
        if self.pair:
            source, action = divmod(int(action), self.num_blocks)
        info["source"] = int(source)
        return int(action), info

    def act(self, block_scores, distribution_after_removal, source, total):
        raise NotImplementedError

    def reward(self, r: float | None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PPOAllocator(Allocator):
    """The authors' allocator: PPO over targets, updated after every ``update_every`` rewards."""

    def __init__(self, num_blocks: int, seed: int = 0, pair: bool = False, update_every: int = 2, **ppo_kwargs):
        super().__init__(num_blocks, seed, pair)
        state_dim = (2 if pair else 3) * num_blocks
        self.ppo = PPO(state_dim, self.num_actions, seed=seed, **ppo_kwargs)
        self.update_every, self.rewarded, self.last_loss = update_every, 0, None

    def act(self, block_scores, distribution_after_removal, source, total):
        state = policy_state(block_scores, distribution_after_removal, None if self.pair else source, self.num_blocks)
        action, probs = self.ppo.act(state, torch.from_numpy(self.mask(distribution_after_removal)))
        return self.decode(action, source, probs)

    def reward(self, r):
        self.ppo.reward(r)
        if r is not None:
            self.rewarded += 1
            if self.rewarded % self.update_every == 0:
                self.last_loss = self.ppo.update()

    def state_dict(self):
        return {"ppo": self.ppo.state_dict(), "rewarded": self.rewarded, "last_loss": self.last_loss}

    def load_state_dict(self, state):
        self.ppo.load_state_dict(state["ppo"])
        self.rewarded, self.last_loss = int(state["rewarded"]), state["last_loss"]


class _NumpyAllocator(Allocator):
    def __init__(self, num_blocks: int, seed: int = 0, pair: bool = False):
        super().__init__(num_blocks, seed, pair)
        self.rng = np.random.default_rng(seed)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "seed": self.seed}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.seed = state["seed"]


class ThompsonAllocator(_NumpyAllocator):
    """Thompson sampling, Beta(1, 1) prior per action; success when the reward is > 0.

    ``info['probs']`` estimates P(action wins the Beta draw) by Monte Carlo with a separate
    generator, so reporting it never changes the sampled actions.
    """

    def __init__(self, num_blocks: int, seed: int = 0, pair: bool = False, mc_draws: int = 1000):
        super().__init__(num_blocks, seed, pair)
        self.successes = np.ones(self.num_actions)
        self.failures = np.ones(self.num_actions)
        self.pending: list[int] = []
        self.mc_draws, self.steps = mc_draws, 0

    def posterior_mean(self) -> np.ndarray:
        return self.successes / (self.successes + self.failures)

    def act(self, block_scores, distribution_after_removal, source, total):
        valid = self.mask(distribution_after_removal)
        draws = np.where(valid, self.rng.beta(self.successes, self.failures), -np.inf)
        action = int(np.argmax(draws))
        mc = np.random.default_rng([self.seed, self.steps]).beta(self.successes, self.failures, (self.mc_draws, self.num_actions))
        probs = np.bincount(np.argmax(np.where(valid, mc, -np.inf), axis=1), minlength=self.num_actions) / self.mc_draws
        self.pending.append(action)
        self.steps += 1
        return self.decode(action, source, probs)

    def reward(self, r):
        action = self.pending.pop(0)
        if r is None:
            return
        if r > 0:
            self.successes[action] += 1
        else:
            self.failures[action] += 1

    def state_dict(self):
        return {**super().state_dict(), "successes": self.successes.tolist(), "failures": self.failures.tolist(),
                "pending": list(self.pending), "steps": self.steps}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.successes = np.asarray(state["successes"], dtype=float)
        self.failures = np.asarray(state["failures"], dtype=float)
        self.pending, self.steps = list(state["pending"]), int(state["steps"])


class RandomAllocator(_NumpyAllocator):
    """Uniform over the valid actions (the source block included: then nothing moves)."""

    def act(self, block_scores, distribution_after_removal, source, total):
        valid = self.mask(distribution_after_removal)
        probs = valid / valid.sum()
        return self.decode(int(self.rng.choice(self.num_actions, p=probs)), source, probs)


class GreedyAllocator(Allocator):
    """To the block with the lowest idleness sum (pair mode: from the non-empty block with the highest)."""

    def act(self, block_scores, distribution_after_removal, source, total):
        s = np.asarray(torch.as_tensor(block_scores, dtype=torch.float64).tolist())
        target = int(np.argmin(s))
        if self.pair:
            has = np.asarray(torch.as_tensor(distribution_after_removal).tolist()) > 0
            source = int(np.argmax(np.where(has, s, -np.inf)))
        action = source * self.num_blocks + target if self.pair else target
        return self.decode(action, source, np.eye(self.num_actions)[action])


class OracleAllocator(Allocator):
    """The allocation upper bound (study-only): every target is tried from the same state by a short
    lookahead (:func:`provpt.relocation.relocator.relocate` gets the lookahead from the training
    loop) and the one with the lowest held-out loss wins; the source block (no move) competes too."""

    oracle = True

    def act(self, block_scores, distribution_after_removal, source, total, losses=None):
        if losses is None:
            raise ValueError("relocation.allocator=oracle needs the training loop's lookahead (study-only)")
        losses = np.asarray(losses, dtype=np.float64)
        target = int(source) if losses[source] <= losses.min() else int(np.argmin(losses))
        target, info = self.decode(target, source, np.eye(self.num_actions)[target])
        return target, {**info, "lookahead": [float(v) for v in losses]}


def make_allocator(cfg, num_blocks: int, seed: int = 0) -> Allocator:
    """The allocator of a ``RelocationConfig`` (``allocator``, ``action_space``, ``ppo_update_every``)."""
    pair = cfg.action_space == "pair"
    if cfg.allocator == "ppo":
        return PPOAllocator(num_blocks, seed, pair, update_every=cfg.ppo_update_every,
                            returns=getattr(cfg, "ppo_update", "faithful"))
    kinds = {"thompson": ThompsonAllocator, "random": RandomAllocator, "greedy": GreedyAllocator,
             "oracle": OracleAllocator}
    if cfg.allocator not in kinds:
        raise ValueError(f"relocation.allocator={cfg.allocator!r}: expected one of {['ppo', *kinds]}")
    return kinds[cfg.allocator](num_blocks, seed, pair)
