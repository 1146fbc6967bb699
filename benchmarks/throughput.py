"""Training throughput of the prompted ViT (VPT-Deep) against timm's plain ViT at the same token count.

One training step = forward, cross-entropy, backward, grad-norm clip 0.25, SGD step, as in
provpt.train. Prompted: ``build_model`` with method vpt-deep (T prompts per block, prompt dropout
0.1 unless --prompt-dropout, frozen backbone, gates in the graph). Plain reference: the same timm
architecture created with ``reg_tokens=T`` (timm's register tokens: T extra tokens inserted once
after CLS), its backbone frozen and only the register tokens and head trained. Both then run every
block on 1 + T + P tokens and back-propagate to the block-0 input without weight gradients, so the
ratio measures what the wrapper adds (per-block gather, dropout, concatenation, gates), not the
cost of the extra tokens. On a CPU shared with other jobs, 2-thread figures suffer from thread
barriers waiting for a descheduled core; compare ratios from the same run only.

    python benchmarks/throughput.py                                  # embedded (1 and 2 threads) + ViT-B/16
    python benchmarks/throughput.py --models embedded --repeats 3
    python benchmarks/throughput.py --models vitb --vitb-batch 64 --device cuda
"""

from __future__ import annotations

from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F

from common import MODELS, image_size, interleaved, median, paired_ratio, parser, report, setup_device, sync


def prompted_model(model: str, prompts: int, classes: int, dropout: float = 0.1):
    from provpt.config import RunConfig
    from provpt.model.methods import build_model, trainable_parameters

    name, kw = MODELS[model]
    cfg = RunConfig.from_dict(dict(backbone=name, backbone_kwargs=kw, method="vpt-deep", num_prompts=prompts,
                                 prompt_dropout=dropout))
    net = build_model(cfg, classes).train()  # prompt dropout on, backbone in eval mode
    return net, [p for _, p in trainable_parameters(net)]


def plain_model(model: str, prompts: int, classes: int, dropout: float = 0.0):  # dropout: no prompts, unused
    name, kw = MODELS[model]
    net = timm.create_model(name, pretrained=False, num_classes=classes, reg_tokens=prompts, **kw)
    for n, p in net.named_parameters():
        p.requires_grad_(n == "reg_token" or n.startswith("head."))
    return net.eval(), [p for p in net.parameters() if p.requires_grad]  # frozen backbone: eval mode


def stepper(net, params, batch: int, size: int, classes: int, steps: int, device, bf16: bool):
    """A callable running ``steps`` training steps on a fixed random batch (synchronised)."""
    net.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def run():
        for _ in range(steps):
            with autocast:
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.25)
            opt.step()
        sync(device)

    return run


def measure(model: str, batch: int, steps: int, threads: int, args, device) -> dict:
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    size, classes, bf16 = image_size(model), 100, device.type == "cuda"
    runs = {}
    for label, build in (("plain", plain_model), ("prompted", prompted_model)):
        net, params = build(model, args.prompts, classes, args.prompt_dropout)
        if args.compile:
            net = torch.compile(net)
        runs[label] = stepper(net, params, batch, size, classes, steps, device, bf16)
    t = interleaved(runs, args.repeats, warmup=1)
    images = batch * steps
    patches = (size // MODELS[model][1].get("patch_size", 16)) ** 2
    return {"model": model, "batch": batch, "threads": threads if device.type == "cpu" else None,
            "tokens": 1 + args.prompts + patches, "plain_img_s": images / median(t["plain"]),
            "prompted_img_s": images / median(t["prompted"]), "prompted/plain": paired_ratio(t["plain"], t["prompted"]),
            "best/best": min(t["plain"]) / min(t["prompted"]), "repeats": args.repeats, "steps": steps,
            "times_s": t}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=["embedded", "vitb"], choices=list(MODELS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                   help="CPU torch threads for the embedded model (ViT-B uses the largest)")
    p.add_argument("--prompts", type=int, default=10, help="T, prompts per block (default 10)")
    p.add_argument("--batch", type=int, default=64, help="embedded model's batch (default 64)")
    p.add_argument("--vitb-batch", type=int, help="ViT-B batch (default: 64 on cuda, 8 on cpu)")
    p.add_argument("--steps", type=int, help="steps per repetition (default: 10 embedded / 1 ViT-B on cpu, 20 on cuda)")
    p.add_argument("--prompt-dropout", type=float, default=0.1,
                   help="the prompted model's prompt dropout (default 0.1, as trained; 0 isolates the wrapper)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = p.parse_args(argv)
    device = setup_device(args.device)
    cuda = device.type == "cuda"
    rows = []
    for model in args.models:
        batch = args.batch if model == "embedded" else args.vitb_batch or (64 if cuda else 8)
        steps = args.steps or (20 if cuda else 10 if model == "embedded" else 1)
        threads = [0] if cuda else args.threads if model == "embedded" else [max(args.threads)]
        for th in threads:
            rows.append(measure(model, batch, steps, th, args, device))
            print({k: v for k, v in rows[-1].items() if k != "times_s"}, flush=True)
    times = [r.pop("times_s") for r in rows]
    report(args, "throughput", rows, {"times_s": times},
           title=f"Training throughput, images/s ({device}): medians of {args.repeats}; prompted/plain is the median "
                 f"of paired ratios, best/best the ratio of the fastest repetitions")


if __name__ == "__main__":
    main()
