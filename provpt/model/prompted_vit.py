"""A timm VisionTransformer with prompts inserted before its blocks (VPT / PRO-VPT semantics).

``PromptedViT(vit, num_classes, distribution)`` wraps the ViT's own modules (patch embedding,
position embedding, blocks, final norm) and runs them in timm's order; nothing of timm is forked
or patched. Before block i the previous block's prompt outputs are dropped and block i's prompts
are inserted right after the prefix (CLS) tokens (deep mode). In shallow mode the prompts enter
before block 0 and are carried through the depth. Zero prompts give exactly the plain ViT. With
the prompt bank's log-gates on, each block gets its prompts' attention-logit bias as timm's own
``attn_mask`` argument (``Block.forward(x, attn_mask)``), nothing patched.
"""

from __future__ import annotations

import torch
from torch import nn

from .prompts import PromptBank, vpt_init_range


def uniform_distribution(num_blocks: int, per_block: int) -> list[int]:
    return [per_block] * num_blocks


def shallow_distribution(num_blocks: int, total: int) -> list[int]:
    return [total] + [0] * (num_blocks - 1)


class PromptedViT(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, distribution=None, shallow: bool = False,
                 prompt_dropout: float = 0.0, init_range: float | None = None):
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
        self.prompts = PromptBank(dim, distribution, init_range, prompt_dropout)
        self.head = nn.Linear(dim, num_classes)

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        prefix, batch, n_prev = vit.num_prefix_tokens, x.shape[0], 0
        bias = None
        for i, blk in enumerate(vit.blocks):
            if i == 0 or not self.shallow:
                p = self.prompts.tokens(i, batch)
                if p.shape[1] or n_prev:
                    x = torch.cat([x[:, :prefix], p.to(x.dtype), x[:, prefix + n_prev:]], dim=1)
                    n_prev = p.shape[1]
                bias = self.prompts.attn_bias(i, x.shape[1], prefix, x) if n_prev else None
            x = blk(x) if bias is None else blk(x, attn_mask=bias)
        x = vit.norm(x)
        if vit.global_pool == "avg":
            return x[:, prefix + n_prev:].mean(dim=1)
        return x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.vit.fc_norm(self.features(x))
        return self.head(self.vit.head_drop(feats))

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
