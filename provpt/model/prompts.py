"""The prompt bank: every prompt of every block in one parameter, plus a block index per prompt.

One ``(N, dim)`` tensor holds all prompt values, so moving a prompt between blocks changes only
its block index (and order): the parameter object, its optimiser state (momentum) and the
checkpoint layout stay valid. Each prompt has a gate fixed at 1 that multiplies its value in the
forward pass; ``d loss / d gate_k = g_k . p_k`` is then PRO-VPT's Taylor idleness score, and it
accumulates in ``gates.grad`` during the ordinary backward pass. Gates are never optimised.

Prompt dropout draws its masks from the bank's own generator (seeded by ``seed``, its state in
the run's checkpoint), not from torch's global one: several runs trained together in one process
(:mod:`provpt.packed`) then draw exactly the masks each would draw alone.

Each prompt also has a log-gate ``b_k`` (0, never optimised), used when ``log_gated`` is on: an
additive bias on the attention logits of prompt k's key in its block, passed to timm's blocks as
their ``attn_mask`` (:meth:`log_bias`, :func:`provpt.model.prompted_vit.prompt_features`). ``b_k = -inf`` removes the prompt exactly (no query
attends to it, and its own output is dropped before the next block), and ``d loss / d b_k`` at 0
is the first-order estimate of removing it, whatever LayerNorm's eps or the prompt's scale.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn


def vpt_init_range(patch_size: int, dim: int, in_chans: int = 3) -> float:
    """VPT's uniform init bound sqrt(6 / (in_chans * patch^2 + dim)) (0.0625 for ViT-B/16)."""
    return math.sqrt(6.0 / float(in_chans * patch_size * patch_size + dim))


class PromptBank(nn.Module):
    def __init__(self, dim: int, distribution, init_range: float = 0.0625, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        counts = [int(c) for c in distribution]
        if any(c < 0 for c in counts):
            raise ValueError(f"prompt distribution {counts}: counts must be >= 0")
        n = sum(counts)
        self.num_blocks = len(counts)
        self.values = nn.Parameter(torch.empty(n, dim).uniform_(-init_range, init_range))
        self.gates = nn.Parameter(torch.ones(n))
        self.log_gates = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.log_gated = False  # pass log_bias to the blocks (PRO-VPT with relocation.idleness=logit)
        self.register_buffer("block", torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)))
        self.register_buffer("order", torch.arange(n))
        self.register_buffer("active", torch.ones(n, dtype=torch.bool))
        self.dropout = float(dropout)
        self.seed = int(seed)
        self._gen: torch.Generator | None = None  # the dropout masks' generator, on the values' device
        self._index: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ state
    @property
    def total(self) -> int:
        return self.values.shape[0]

    def distribution(self) -> torch.Tensor:
        """Prompts per block, a (L,) long tensor summing to the budget N."""
        return torch.bincount(self.block, minlength=self.num_blocks)

    def block_indices(self, i: int) -> torch.Tensor:
        """Indices of block i's active prompts, in insertion order."""
        if self._index is None:
            key = self.block * (self.order.max().item() + 1 if self.total else 1) + self.order
            ranked = torch.argsort(key)
            blocks = self.block[ranked]
            keep = self.active[ranked]
            self._index = [ranked[(blocks == b) & keep] for b in range(self.num_blocks)]
        return self._index[i]

    def invalidate(self) -> None:
        self._index = None

    # ------------------------------------------------------------------ dropout's random stream
    def generator(self) -> torch.Generator:
        dev = self.values.device
        if self._gen is None or self._gen.device != dev:
            self._gen = torch.Generator(device=dev)
            self._gen.manual_seed(self.seed * 1_000_003 + 11)
        return self._gen

    def rng_state(self) -> torch.Tensor:
        return self.generator().get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator().set_state(state.cpu())

    @contextmanager
    def fork_rng(self, seed: int | None = None):
        """Draw dropout masks from a side stream (``seed``: a fresh one) and restore the bank's stream
        after, so that e.g. the authors' scoring pass leaves training's masks unchanged."""
        state = self.rng_state()
        if seed is not None:
            self.generator().manual_seed(int(seed))
        try:
            yield self
        finally:
            self.set_rng_state(state)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.invalidate()

    # ------------------------------------------------------------------ forward
    def tokens(self, i: int, batch: int) -> torch.Tensor:
        """Block i's prompt tokens, (batch, n_i, dim): gate * value, then per-sample dropout."""
        idx = self.block_indices(i)
        p = (self.values[idx] * self.gates[idx, None]).unsqueeze(0).expand(batch, -1, -1)
        if self.training and self.dropout > 0 and p.numel():
            keep = torch.empty(p.shape, dtype=p.dtype, device=p.device).bernoulli_(1 - self.dropout,
                                                                                   generator=self.generator())
            p = p * keep / (1 - self.dropout)
        return p

    def log_bias(self, i: int) -> torch.Tensor | None:
        """Block i's prompts' log-gates, (n_i,), in insertion order; None when log-gating is off."""
        return self.log_gates[self.block_indices(i)] if self.log_gated else None

    def score_param(self, idleness: str) -> nn.Parameter:
        """The parameter whose gradient is the first-order idleness: gates or log-gates."""
        return self.log_gates if idleness == "logit" else self.gates

    # ------------------------------------------------------------------ relocation
    @torch.no_grad()
    def move(self, k: int, target: int, scale: float = 1e-3) -> None:
        """Move prompt k to block ``target``: value scaled by ``scale``, appended after its prompts.

        The value tensor is updated in place, so optimiser state (momentum) stays attached.
        """
        if not 0 <= target < self.num_blocks:
            raise ValueError(f"target block {target} outside [0, {self.num_blocks})")
        self.values[k].mul_(scale)
        self.block[k] = target
        self.order[k] = self.order.max() + 1
        self.invalidate()

    @contextmanager
    def removed(self, *ks: int):
        """Temporarily take prompts out of their blocks' sequences (not zeroed: removed)."""
        before = self.active.clone()
        self.active[list(ks)] = False
        self.invalidate()
        try:
            yield self
        finally:
            self.active.copy_(before)
            self.invalidate()
