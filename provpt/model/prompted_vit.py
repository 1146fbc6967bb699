"""A timm Vision Transformer with prompts inserted before its blocks (VPT / PRO-VPT semantics).

``PromptedViT(vit, num_classes, distribution)`` wraps the ViT's own modules (patch embedding,
position embedding, blocks, final norm, pooling) and runs them in timm's order; nothing of timm is
forked or patched. Before block i the previous block's prompt outputs are dropped and block i's
prompts are inserted right after the prefix tokens (class, distillation, register tokens) (deep
mode). In shallow mode the prompts enter before block 0 and are carried through the depth. Zero
prompts give exactly the plain ViT. With the prompt bank's log-gates on, each block gets its
prompts' attention-logit bias as timm's own ``attn_mask`` argument (``Block.forward(x, attn_mask)``),
nothing patched. After the final norm the prompt tokens are dropped and timm's own ``pool`` (token,
avg, max, avgmax, ``map`` attention pooling) sees the sequence it was built for.

Families (:func:`check_backbone`; anything else is refused when the model is built):

- ``VisionTransformer`` (ViT, DeiT/DeiT-3, CLIP, SigLIP, DINOv2 with registers, ...);
- ``VisionTransformerDistilled`` (DeiT distilled): the features are timm's pre-logits, the mean of
  the class and distillation tokens, and the run's one head replaces timm's two (timm's eval logits
  are this head when ``head`` and ``head_dist`` are the same layer);
- ``Eva`` (EVA-02, timm's RoPE ViTs, DINOv3): blocks take the rotary embedding of the patch tokens
  as their ``rope`` argument and rotate the tokens after the prefix. Prompts get the identity
  rotation (sin 0, cos 1) prepended to it, so they carry no rotary position, like prefix tokens,
  and every patch keeps its own.

``Beit`` is refused: its blocks add a relative position bias sized to the patch grid and class
token inside timm's attention, which a longer sequence does not fit without forking timm.

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

SUPPORTED = ("timm's VisionTransformer (class, distillation and register tokens; token, avg, max, avgmax "
             "or map pooling) and Eva (EVA-02, RoPE ViTs)")


class UnsupportedBackbone(ValueError):
    """A timm model that prompts cannot be inserted into without forking timm."""


def _families():
    from timm.models.beit import Beit
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, VisionTransformerDistilled, Eva, Beit


def check_backbone(vit: nn.Module) -> None:
    """Raise :class:`UnsupportedBackbone` (one sentence: the model, the reason, the supported
    families) unless ``vit`` is a family and configuration :class:`PromptedViT` runs exactly."""
    VisionTransformer, Distilled, Eva, Beit = _families()
    name = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture") or type(vit).__name__
    reason = None
    if isinstance(vit, Beit):
        reason = ("Beit adds a relative position bias sized to the patch grid and class token inside timm's "
                  "attention, which a sequence with prompts does not fit without forking timm")
    elif not isinstance(vit, (VisionTransformer, Eva)):
        reason = f"it is a {type(vit).__name__}, not a ViT family provpt inserts prompts into"
    elif getattr(vit, "global_pool", "token") == "":
        reason = "global_pool='' returns every token, not one feature vector for the head"
    elif isinstance(vit, Distilled) and not isinstance(vit.fc_norm, nn.Identity):
        reason = "a distilled ViT with fc_norm: timm's distilled head reads the two tokens without it"
    if reason:
        raise UnsupportedBackbone(f"backbone {name} ({type(vit).__name__}) cannot take prompts: {reason}; "
                                  f"supported: {SUPPORTED}")


def _embed(vit, x: torch.Tensor):
    """timm's embedding steps up to the first block: tokens (B, prefix + patches, dim) and the Eva
    rotary embedding of the patches (None for VisionTransformer or an Eva without RoPE)."""
    x = vit.patch_embed(x)
    if isinstance(vit, _families()[2]):  # Eva: _pos_embed returns the rotary embedding too
        x, rope = vit._pos_embed(x)
        return vit.norm_pre(x), rope
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x), None


def rope_with_prompts(rope: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Eva's rotary embedding (``[..., tokens, sin | cos]``) with the identity rotation (sin 0, cos 1)
    for ``n`` prompts in front: timm rotates the tokens after the prefix, so the prompts, inserted
    right after it, get no rotary position and the patches keep theirs."""
    if rope is None or n == 0:
        return rope
    half = rope.shape[-1] // 2
    lead = rope.shape[:-2]
    ident = torch.cat([rope.new_zeros(*lead, n, half), rope.new_ones(*lead, n, rope.shape[-1] - half)], dim=-1)
    return torch.cat([ident, rope], dim=-2)


def _pool(vit, x: torch.Tensor) -> torch.Tensor:
    """timm's pooling of the final tokens (prompts already dropped): the pre-logit features."""
    if isinstance(vit, _families()[1]):  # distilled: timm's forward_head(pre_logits=True)
        return (x[:, 0] + x[:, 1]) / 2
    return vit.pool(x)


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
    x, rope = _embed(vit, x)
    per_block = getattr(vit, "rope_mixed", False) and rope is not None  # Eva's mixed RoPE: one per block
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
        kw = {} if bias is None else {"attn_mask": bias}
        if rope is not None:
            kw["rope"] = rope_with_prompts(rope[i] if per_block else rope, n_prev)
        x = blk(x, **kw)
    x = vit.norm(x)
    if n_prev:
        x = torch.cat([x[:, :prefix], x[:, prefix + n_prev:]], dim=1)
    return _pool(vit, x)


def packed_forward(models, x: torch.Tensor, sizes) -> list[torch.Tensor]:
    """Logits of several runs in one forward: ``x`` holds ``sizes[j]`` samples of run j after another."""
    if len(models) == 1:
        return [models[0](x)]
    if isinstance(models[0], HeadOnly):  # x holds pre-logit features already
        return [m(f) for m, f in zip(models, x.split(list(sizes)))]
    feats = prompt_features(models, sizes, x)
    return [m.classify(f) for m, f in zip(models, feats.split(list(sizes)))]


def chunked(models, size: int, work, on_split=None, grads: bool = True) -> int:
    """Call ``work(lo, hi)`` on consecutive chunks ``models[lo:hi]`` of at most ``size`` runs (0: all
    at once), one after another, so that the saved activations of only one chunk's forward are alive
    at a time (each ``work`` ends with its chunk's backward). The runs share no trainable parameter,
    so chunks compute what one forward over all of them computes. On ``torch.OutOfMemoryError`` the
    chunk's prompt-dropout streams and gradients are put back as they were before it, the chunk is
    halved and redone (a chunk of one run re-raises); ``on_split(new_size)`` is told. ``work`` must
    keep its results only once its backward has returned; ``grads=False``: it leaves ``.grad`` alone
    (``torch.autograd.grad``), so none is saved. Returns the chunk size that fitted, for the next calls
    to start from."""
    k = len(models)
    size = k if size <= 0 else min(size, k)
    lo = 0
    while lo < k:
        hi = min(lo + size, k)
        saved = _chunk_state(models[lo:hi], grads) if hi - lo > 1 else None
        try:
            work(lo, hi)
        except torch.OutOfMemoryError:
            if saved is None:
                raise
            failed = True
        else:
            failed = False
        if failed:  # outside the except block: the failed chunk's tensors are freed with its traceback
            _restore_chunk(saved)
            size = (hi - lo + 1) // 2
            if on_split is not None:
                on_split(size)
            continue
        lo = hi
    return size


def _model_of(m):
    return getattr(m, "model", None) if isinstance(m, HeadOnly) else getattr(m, "_orig_mod", m)


def _chunk_state(models, grads: bool) -> list:
    """What a chunk's forward and backward change in its runs: dropout streams and ``.grad`` tensors."""
    state = []
    for m in map(_model_of, models):
        saved = [(p, None if p.grad is None else p.grad.clone()) for p in m.parameters() if p.requires_grad and grads]
        state.append((m, m.prompts.rng_state(), saved))
    return state


def _restore_chunk(state) -> None:
    for m, rng, grads in state:
        m.prompts.set_rng_state(rng)
        for p, g in grads:
            p.grad = g


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
        check_backbone(vit)
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
