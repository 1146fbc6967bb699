"""Activation memory of a pack: saved-tensor bytes per training sample of a prompted ViT-B/16.

What a training step keeps alive between its forward and its backward is what autograd saves for the
backward (activations; the frozen weights are shared and counted once). This script counts it on the
CPU, device-free: `torch.autograd.graph.saved_tensors_hooks` sees every tensor saved during the
forward and loss of a prompted ViT (timm `vit_base_patch16_224`, random weights, frozen; VPT-Deep
prompts, prompt dropout 0.1, train mode, as a `vpt-deep` / `pro-vpt` run trains), unique storages
summed, at two batch sizes; bytes per sample = the difference / the difference in batch size (the
shared weights cancel). Rows per prompts per block (--prompts, default 10 100 200: the per-task
lengths of the vtab1k profile), at --precision (default fp32, the paper profiles'; bf16: fp32 weights
under bf16 autocast, as the training loop runs bf16).

From that, per row: GiB for one run's batch of --batch (64) and for a pack of --runs (8), and how
many runs of a pack fit in each of --budgets GiB of activations (default 64 and 112: 80% of an 80 GB
and a 141 GB card, the rest left to weights, data and the backward's temporaries): the `pack_chunk`
to set (runs per forward/backward; the training loop also halves a chunk that runs out of memory by
itself). The scoring pass (`relocation.scoring: pass`) saves the same per sample.
A pack whose runs hold different numbers of prompts in a block pads them to the widest run.

Attention goes through torch's `scaled_dot_product_attention` as timm calls it; CPU and CUDA's fused
kernels both save the output and the log-sum-exp, not the attention matrix, so the figure carries
over to a GPU up to the kernels' own workspace (`--device cuda` counts it there). Nothing here is
asserted by a test.
"""

from __future__ import annotations

import math

import torch

from common import parser, report, setup_device


def saved_bytes(model, batch: int, size: int, autocast, num_classes: int, device) -> int:
    """Bytes of the unique storages autograd saves in one forward + loss of ``batch`` images."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.type)] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
    y = (torch.arange(batch) % num_classes).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    del loss
    return sum(seen.values())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, nargs="+", default=[10, 100, 200], help="prompts per block (default: 10 100 200)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast (default: fp32)")
    p.add_argument("--batch", type=int, default=64, help="images per run and step (default: 64, the paper's)")
    p.add_argument("--runs", type=int, default=8, help="runs of a pack (default: 8, the vtab1k search packs)")
    p.add_argument("--budgets", type=float, nargs="+", default=[64.0, 112.0], help="GiB for activations (default: 64 112)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    from provpt.model.prompted_vit import PromptedViT

    device = setup_device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).to(device)
    vit.requires_grad_(False)
    size, classes = 224, 100
    patches = (size // 16) ** 2
    rows = []
    for t in args.prompts:
        model = PromptedViT(vit, classes, [t] * len(vit.blocks), prompt_dropout=0.1, seed=0).to(device).train()
        small, large = (saved_bytes(model, b, size, autocast, classes, device) for b in (1, 3))
        per = (large - small) / 2
        run = per * args.batch / 2**30
        row = {"prompts_per_block": t, "tokens": 1 + patches + t, "MiB_per_sample": round(per / 2**20, 1),
               f"GiB_per_run_b{args.batch}": round(run, 2), f"GiB_pack_of_{args.runs}": round(run * args.runs, 1)}
        for budget in args.budgets:
            row[f"runs_in_{budget:g}GiB"] = math.floor(budget / run)
        rows.append(row)
    report(args, "pack_memory", rows, title=f"saved activations per sample, ViT-B/16 at {size}, {args.precision}, {device}")


if __name__ == "__main__":
    main()
