"""One model builder for every method: which prompts, which adapters, which parameters train."""

from __future__ import annotations

import torch
from torch import nn

from ..config import PACKABLE, RELOCATING
from .backbone import create_backbone
from .prompted_vit import PromptedViT, shallow_distribution, uniform_distribution


class Adapter(nn.Module):
    """Bottleneck adapter on a block's output: x + up(gelu(down(x))), zero-initialised (identity)."""

    def __init__(self, block: nn.Module, dim: int, bottleneck: int):
        super().__init__()
        self.block = block
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, *args, **kwargs):
        x = self.block(x, *args, **kwargs)
        return x + self.up(nn.functional.gelu(self.down(x)))


def add_lora(vit: nn.Module, rank: int) -> None:
    """LoRA on the attention projections through Hugging Face peft (injected in place): the fused
    ``qkv`` or, in Eva (EVA-02), the separate ``q_proj``/``k_proj``/``v_proj``, and ``proj``."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                     target_modules=r"blocks\.\d+\.attn\.(qkv|q_proj|k_proj|v_proj|proj)")
    inject_adapter_in_model(cfg, vit)


GATES = ("prompts.gates", "prompts.log_gates")  # in the graph for their gradients, never optimised


def vpt_head_init(head: nn.Linear) -> None:
    """VPT's classifier initialisation (also the PRO-VPT authors'): kaiming-normal weights with
    fan-out mode and every bias at -log((1 - 0.01) / 0.01), a 1% prior per class."""
    import math

    nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))


def build_model(cfg, num_classes: int, backbone: nn.Module | None = None) -> PromptedViT:
    """The network of ``cfg.method`` with the right parameters trainable (gates never are).

    ``backbone``: a frozen ViT shared with other runs (methods in :data:`PACKABLE` only); by
    default a new one. What the run learns (prompts, head, LoRA, adapters) is initialised from
    ``cfg.seed`` after the backbone exists, so it does not depend on how the backbone was made."""
    if backbone is not None and cfg.method not in PACKABLE:
        raise ValueError(f"method {cfg.method} trains backbone weights: it cannot share a backbone")
    vit = backbone if backbone is not None else create_backbone(cfg.backbone, cfg.weights, **cfg.backbone_kwargs)
    torch.manual_seed(cfg.seed)
    L = len(vit.blocks)
    method = cfg.method
    if method in ("vpt-deep", *RELOCATING):
        dist, shallow = uniform_distribution(L, cfg.num_prompts), False
    elif method == "vpt-shallow":
        dist, shallow = shallow_distribution(L, cfg.num_prompts), True
    else:
        dist, shallow = None, False
    for p in vit.parameters():
        p.requires_grad_(method == "full")
    if method == "lora":
        add_lora(vit, cfg.lora_rank)  # peft leaves only lora_* trainable
        for n, p in vit.named_parameters():
            p.requires_grad_("lora_" in n)
    elif method == "adapter":
        for i, blk in enumerate(vit.blocks):
            vit.blocks[i] = Adapter(blk, vit.embed_dim, cfg.adapter_dim)
    model = PromptedViT(vit, num_classes, dist, shallow=shallow,
                        prompt_dropout=cfg.prompt_dropout if dist else 0.0, seed=cfg.seed)
    if cfg.head_init == "vpt":
        vpt_head_init(model.head)
    model.finetune_backbone = method == "full"
    logit = method in RELOCATING and cfg.relocation.idleness == "logit"
    model.prompts.log_gated = logit
    model.prompts.gates.requires_grad_(bool(dist) and not logit)
    model.prompts.log_gates.requires_grad_(bool(dist) and logit)
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters the optimiser updates: everything with requires_grad except the (log-)gates."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in GATES]


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    total = sum(p.numel() for n, p in model.named_parameters() if n not in GATES)
    head = sum(p.numel() for p in model.head.parameters())
    return {"trainable_params": trainable, "trainable_params_no_head": trainable - head, "total_params": total}
