"""PRO-VPT's relocation: idleness scores, allocators (PPO, Thompson, random, greedy), the schedule."""

from .allocators import (GreedyAllocator, PPOAllocator, RandomAllocator, ThompsonAllocator, make_allocator,
                         policy_state)
from .idleness import block_sums, norm_scores, online_scores, reset_online, taylor_pass, true_idleness
from .ppo import PPO
from .relocator import Relocator

__all__ = ["PPO", "Relocator", "make_allocator", "policy_state", "PPOAllocator", "ThompsonAllocator",
           "RandomAllocator", "GreedyAllocator", "taylor_pass", "online_scores", "reset_online",
           "true_idleness", "norm_scores", "block_sums"]
