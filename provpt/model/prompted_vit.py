"""A timm VisionTransformer with prompts inserted before its blocks (VPT / PRO-VPT semantics).

``PromptedViT(vit, num_classes, distribution)`` wraps the ViT's own modules (patch embedding,
position embedding, blocks, final norm) and runs them in timm's order; nothing of timm is forked
or patched. Before block i the previous block's prompt outputs are dropped and block i's prompts
are inserted right after the prefix (CLS) tokens (deep mode). In shallow mode the prompts enter
before block 0 and are carried through the depth. Zero prompts give exactly the plain ViT. With
the prompt bank's log-gates on, each block gets its prompts' attention-logit bias as timm's own
``attn_mask`` argument (``Block.forward(x, attn_mask)``), nothing patched.

Several runs can share one frozen backbone and one forward (:func:`packed_forward`): their batches
are concatenated, each sample sees its own run's prompts, and where the runs hold different numbers
of prompts in a block the shorter ones are padded with tokens whose attention logit is ``-inf``, so
no query attends to them (exact up to the order of floating-point sums) and their outputs are
dropped before the next block like every prompt output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .prompts import PromptBank, vpt_init_range


def _block_prompts(models, sizes, i: int, like: torch.Tensor):
    """Block i's prompt tokens of every run, (B, n, dim) with n the largest count, and the key bias of
    those n positions, (B, n), (1, n) for one run, or None (no run log-gated and none padded)."""
    toks = [m.prompts.tokens(i, b) for m, b in zip(models, sizes)]
    counts = [t.shape[1] for t in toks]
    n = max(counts)
    logs = [m.prompts.log_bias(i) for m in models]
    if len(toks) == 1:
        return toks[0], None if logs[0] is None else logs[0].to(like.dtype)[None]
    tokens = torch.cat([F.pad(t, (0, 0, 0, n - c)) for t, c in zip(toks, counts)])
    if all(c == n for c in counts) and all(b is None for b in logs):
        return tokens, None
    cols = []
    for b, c, log in zip(sizes, counts, logs):
        col = like.new_full((n,), float("-inf"))
        col[:c] = 0 if log is None else log.to(like.dtype)
        cols.append(col.expand(b, n))
    return tokens, torch.cat(cols)


def prompt_features(models, sizes, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of ``x``, whose rows are ``sizes[j]`` samples of run ``models[j]`` after
    another (one shared backbone: ``models[j].vit`` is the same module; one shallow/deep mode)."""
    vit, shallow = models[0].vit, models[0].shallow
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    prefix, n_prev, bias = vit.num_prefix_tokens, 0, None
    for i, blk in enumerate(vit.blocks):
        if i == 0 or not shallow:
            p, cols = _block_prompts(models, sizes, i, x)
            if p.shape[1] or n_prev:
                x = torch.cat([x[:, :prefix], p.to(x.dtype), x[:, prefix + n_prev:]], dim=1)
                n_prev = p.shape[1]
            bias = None
            if cols is not None and n_prev:
                bias = x.new_zeros(cols.shape[0], x.shape[1])
                bias[:, prefix:prefix + n_prev] = cols
                bias = bias[:, None, None, :]
        x = blk(x) if bias is None else blk(x, attn_mask=bias)
    x = vit.norm(x)
    if vit.global_pool == "avg":
        return x[:, prefix + n_prev:].mean(dim=1)
    return x[:, 0]


def packed_forward(models, x: torch.Tensor, sizes) -> list[torch.Tensor]:
    """Logits of several runs in one forward: ``x`` holds ``sizes[j]`` samples of run j after another."""
    if len(models) == 1:
        return [models[0](x)]
    if isinstance(models[0], HeadOnly):  # x holds pre-logit features already
        return [m(f) for m, f in zip(models, x.split(list(sizes)))]
    feats = prompt_features(models, sizes, x)
    return [m.classify(f) for m, f in zip(models, feats.split(list(sizes)))]


class HeadOnly(nn.Module):
    """A run's classifier on pre-logit features: the run's forward when its backbone output is cached
    (``provpt.train.feature_cache``, linear probes)."""

    def __init__(self, model: "PromptedViT"):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.classify(feats)


def uniform_distribution(num_blocks: int, per_block: int) -> list[int]:
    return [per_block] * num_blocks


def shallow_distribution(num_blocks: int, total: int) -> list[int]:
    return [total] + [0] * (num_blocks - 1)


class PromptedViT(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, distribution=None, shallow: bool = False,
                 prompt_dropout: float = 0.0, init_range: float | None = None, seed: int = 0):
        super().__init__()
        if getattr(vit, "global_pool", "token") not in ("token", "avg"):
            raise ValueError(f"global_pool={vit.global_pool!r} is not supported (token or avg)")
        self.vit = vit
        self.num_blocks = len(vit.blocks)
        dim = vit.embed_dim
        distribution = [0] * self.num_blocks if distribution is None else list(distribution)
        if len(distribution) != self.num_blocks:
            raise ValueError(f"distribution has {len(distribution)} entries, the ViT has {self.num_blocks} blocks")
        if shallow and any(distribution[1:]):
            raise ValueError(f"shallow mode puts every prompt in block 0, got {distribution}")
        if init_range is None:
            patch = vit.patch_embed.patch_size
            init_range = vpt_init_range(patch[0] if isinstance(patch, (tuple, list)) else patch, dim)
        self.shallow = shallow
        self.prompts = PromptBank(dim, distribution, init_range, prompt_dropout, seed)
        self.head = nn.Linear(dim, num_classes)

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return prompt_features([self], [x.shape[0]], x)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.head_drop(self.vit.fc_norm(feats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    # ------------------------------------------------------------------ helpers
    def distribution(self) -> list[int]:
        return self.prompts.distribution().tolist()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a run learns: trainable parameters plus the prompt bank's buffers."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        names |= {f"prompts.{b}" for b in ("block", "order", "active")}
        return {n: t for n, t in self.state_dict().items() if n in names or n.startswith("prompts.")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = [k for k in own if k.startswith(("prompts.", "head.")) and k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise KeyError(f"trainable state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in state.items():
            if own[k].shape != v.shape:
                # a relocated bank keeps N, so only a different budget gets here
                raise KeyError(f"trainable state {k}: shape {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=False)
        self.prompts.invalidate()

    def train(self, mode: bool = True):
        super().train(mode)
        if not getattr(self, "finetune_backbone", False):
            self.vit.eval()  # frozen backbone stays in eval mode; only prompt dropout trains
        return self
