"""A small PPO actor-critic for discrete actions, with PRO-VPT's settings as defaults.

Separate actor and critic MLPs (state-64-64, tanh), a categorical policy (softmax, invalid actions
masked out), one Adam with lr 3e-4 for the actor and 1e-3 for the critic. An update uses the
rewarded transitions of the buffer, with returns by ``returns``:

- ``faithful`` (the authors'): Monte-Carlo returns (discount 1.0 by default, no terminal states),
  normalised over the buffer to zero mean and unit (unbiased) std. With the authors' two
  transitions per update the returns ``[r1 + r2, r2]`` normalise to ``[+s, -s] / sqrt(2)``,
  ``s = sign(r1)``: ``r2`` cancels and only the sign of ``r1`` is learnt (a test pins it);
- ``bandit``: each move is its own episode (a contextual bandit: a move's reward is its return),
  normalised by the running mean and std of every reward seen so far in the run (Welford), so
  each reward keeps its sign and size relative to the others, and a drifting baseline is removed.

Then advantage = return - V(s) recorded at action time, 60 full-batch epochs of the clipped
objective (0.2) + 0.5 * value MSE - 0.01 * entropy; a non-finite loss skips that step; the
rewarded transitions are then dropped.

Runs on the CPU, samples from its own ``torch.Generator`` and creates its networks inside
``torch.random.fork_rng``, so it never consumes the global RNG of the training loop.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
import torch.nn.functional as F


def mlp(dim_in: int, dim_out: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, dim_out))


def fp32(fn):
    """Run ``fn`` outside any CPU autocast of the caller (a bf16 training loop must not leak in)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapped


class PPO:
    def __init__(self, state_dim: int, num_actions: int, seed: int = 0, lr_actor: float = 3e-4,
                 lr_critic: float = 1e-3, clip: float = 0.2, epochs: int = 60, gamma: float = 1.0,
                 value_coef: float = 0.5, entropy_coef: float = 0.01, hidden: int = 64, returns: str = "faithful"):
        if returns not in ("faithful", "bandit"):
            raise ValueError(f"PPO returns={returns!r}: expected faithful or bandit")
        self.num_actions, self.clip, self.epochs, self.gamma = num_actions, clip, epochs, gamma
        self.returns_mode = returns
        self.stats = [0, 0.0, 0.0]  # running count, mean, M2 of the rewards (bandit returns)
        self.value_coef, self.entropy_coef = value_coef, entropy_coef
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = mlp(state_dim, num_actions, hidden)
            self.critic = mlp(state_dim, 1, hidden)
        self.optimizer = torch.optim.Adam([
            {"params": self.actor.parameters(), "lr": lr_actor},
            {"params": self.critic.parameters(), "lr": lr_critic},
        ])
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[dict] = []  # state, action, logprob, value, mask, reward (None until rewarded)
        self.updates = 0

    # ------------------------------------------------------------------ policy
    def _log_probs(self, states: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = self.actor(states).masked_fill(~masks, float("-inf"))
        return F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    @fp32
    def probs(self, state: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones(self.num_actions, dtype=torch.bool) if mask is None else mask
        return self._log_probs(state.float(), mask).exp()

    @torch.no_grad()
    @fp32
    def act(self, state: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Sample an action (never argmax) and remember the transition; returns (action, probs)."""
        state = state.float()
        mask = torch.ones(self.num_actions, dtype=torch.bool) if mask is None else mask.bool()
        logp = self._log_probs(state, mask)
        action = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
        self.buffer.append({"state": state, "action": action, "logprob": float(logp[action]),
                            "value": float(self.critic(state)), "mask": mask, "reward": None})
        return action, logp.exp()

    def reward(self, r: float | None) -> None:
        """Reward the oldest unrewarded action; ``None`` drops it (no reward could be measured)."""
        for i, t in enumerate(self.buffer):
            if t["reward"] is None:
                if r is None:
                    del self.buffer[i]
                else:
                    t["reward"] = float(r)
                    n, mean, m2 = self.stats
                    n, delta = n + 1, float(r) - mean
                    mean += delta / n
                    self.stats = [n, mean, m2 + delta * (float(r) - mean)]
                return
        raise RuntimeError("PPO.reward: no action is waiting for a reward")

    # ------------------------------------------------------------------ learning
    @fp32
    def update(self) -> float:
        """One PPO update on the rewarded transitions; returns the mean loss of the valid epochs."""
        batch = [t for t in self.buffer if t["reward"] is not None]
        if not batch:
            return float("nan")
        returns = self.returns([t["reward"] for t in batch])
        states = torch.stack([t["state"] for t in batch])
        masks = torch.stack([t["mask"] for t in batch])
        actions = torch.tensor([t["action"] for t in batch])
        old_logp = torch.tensor([t["logprob"] for t in batch])
        advantages = returns - torch.tensor([t["value"] for t in batch])
        total, valid = 0.0, 0
        with torch.enable_grad():
            for _ in range(self.epochs):
                logp_all = self._log_probs(states, masks)
                logp = logp_all.gather(1, actions[:, None]).squeeze(1)
                p = logp_all.exp()
                entropy = -(p * logp_all.masked_fill(~masks, 0.0)).sum(-1)
                values = self.critic(states).squeeze(-1)
                ratio = torch.exp(logp - old_logp)
                surrogate = torch.min(ratio * advantages, ratio.clamp(1 - self.clip, 1 + self.clip) * advantages)
                loss = (-surrogate + self.value_coef * F.mse_loss(values, returns)
                        - self.entropy_coef * entropy).mean()
                if torch.isfinite(loss):
                    self.optimizer.zero_grad()
                    loss.backward()
                    self.optimizer.step()
                    total, valid = total + float(loss.detach()), valid + 1
        self.buffer = [t for t in self.buffer if t["reward"] is None]
        self.updates += 1
        return total / valid if valid else float("nan")

    def returns(self, rewards: list[float]) -> torch.Tensor:
        """The normalised returns of an update's rewards (see the module doc)."""
        if self.returns_mode == "bandit":
            n, mean, m2 = self.stats
            std = (m2 / (n - 1)) ** 0.5 if n > 1 else 1.0
            return (torch.tensor(rewards, dtype=torch.float32) - mean) / (std + 1e-8)
        out, running = [], 0.0
        for r in reversed(rewards):
            running = r + self.gamma * running
            out.insert(0, running)
        out = torch.tensor(out, dtype=torch.float32)
        std = out.std() if len(out) > 1 else torch.tensor(1.0)
        return (out - out.mean()) / (std + 1e-8)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "buffer": [dict(t) for t in self.buffer], "updates": self.updates, "stats": list(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())  # a CPU generator takes only a CPU byte tensor
        self.buffer = [{**t, "state": t["state"].cpu(), "mask": t["mask"].cpu()} for t in state["buffer"]]
        self.updates = int(state["updates"])
        self.stats = list(state.get("stats", [0, 0.0, 0.0]))
