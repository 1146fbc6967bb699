"""Idleness of prompts: which prompt does the least (or harm) where it is.

True idleness of prompt k: ``I_k = loss(with p_k) - loss(without p_k)``; ``I_k > 0`` means the
prompt hurts. Its first-order (Taylor) estimate is ``d loss / d gate_k = g_k . p_k`` at gate 1,
read from the prompt bank's gates. Two ways to get it:

- ``taylor_pass``: the authors' extra pass over the training data at the start of an epoch (train
  mode, prompt dropout on, no optimiser step), batch-averaged gate gradients.
- ``online_scores``: the same average, accumulated in ``gates.grad`` by the ordinary training
  backward of the previous epoch (free).

All scores are returned as CPU tensors of shape (N,), one per prompt of the bank.
"""

from __future__ import annotations

import torch


def _mean_loss(losses: list[float], sizes: list[int]) -> float:
    return sum(l * n for l, n in zip(losses, sizes)) / max(sum(sizes), 1)


def taylor_pass(model, batches, loss_fn, clip: float | None = None, return_loss: bool = False,
                idleness: str = "gate"):
    """Batch-averaged ``d loss / d gate`` over ``batches()``, without touching any ``.grad``.

    ``clip`` models the authors' quirk: their scoring pass ran the training step's global
    grad-norm clipping (``clip_grad_norm_(max_norm=clip)``) before reading the gate gradients, over
    the gates plus every other trainable parameter except the prompt values (frozen during their
    pass; the head stayed trainable). So each batch's gate gradients are scaled by
    ``min(1, clip / (||grad(gates, head, ...)|| + 1e-6))``.

    With ``return_loss`` also returns the pass's training losses: ``mean`` (per-sample mean) and
    ``faithful`` (the authors' sum over batches of batch-mean loss / batch size). ``idleness``:
    ``gate`` (d loss / d gate) or ``logit`` (d loss / d log-gate, the bank must be log-gated).
    """
    bank = model.prompts
    param = bank.score_param(idleness)
    gates = (bank.gates, bank.log_gates)
    others = [p for p in model.parameters() if p.requires_grad and p is not bank.values and all(p is not g for g in gates)]
    needs_grad = not param.requires_grad
    param.requires_grad_(True)
    was_training = model.training
    model.train()
    total, count, losses, sizes, faithful = None, 0, [], [], 0.0
    try:
        for x, y in batches():
            with torch.enable_grad():
                loss = loss_fn(model(x), y)
                wrt = [param] + (others if clip is not None else [])
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            g = grads[0].detach()
            if clip is not None:
                norm = torch.sqrt(sum((t.detach().float() ** 2).sum() for t in grads if t is not None))
                g = g * torch.clamp(clip / (norm + 1e-6), max=1.0).to(g.dtype)
            total = g if total is None else total + g
            count += 1
            losses.append(float(loss.detach()))
            sizes.append(len(y))
            faithful += losses[-1] / len(y)
    finally:
        model.train(was_training)
        if needs_grad:
            param.requires_grad_(False)
    scores = (total / count).cpu() if count else torch.zeros(bank.total)
    if return_loss:
        return scores, {"mean": _mean_loss(losses, sizes), "faithful": faithful}
    return scores


def _bank(model_or_bank):
    return getattr(model_or_bank, "prompts", model_or_bank)


def online_scores(bank, num_batches: int, idleness: str = "gate") -> torch.Tensor:
    """Mean gate (or log-gate) gradient over the ``num_batches`` training steps since the last reset
    (a prompt bank, or a model holding one as ``.prompts``)."""
    bank = _bank(bank)
    grad = bank.score_param(idleness).grad
    if grad is None or num_batches < 1:
        return torch.zeros(bank.total)
    return (grad.detach() / num_batches).cpu()


def reset_online(bank) -> None:
    """Forget the accumulated gate and log-gate gradients (call at each epoch's end)."""
    bank = _bank(bank)
    bank.gates.grad = bank.log_gates.grad = None


@torch.no_grad()
def true_idleness(model, batches, loss_fn, prompts=None) -> torch.Tensor:
    """Mean loss with all prompts minus mean loss with prompt k removed, eval mode, same data; for
    the prompts listed in ``prompts`` only (the others stay 0), or all."""
    bank = model.prompts
    ks = range(bank.total) if prompts is None else [int(k) for k in prompts]
    was_training = model.training
    model.eval()
    full, without, n = 0.0, torch.zeros(bank.total, dtype=torch.float64), 0
    try:
        for x, y in batches():
            b = len(y)
            full += float(loss_fn(model(x), y)) * b
            for k in ks:
                with bank.removed(k):
                    without[k] += float(loss_fn(model(x), y)) * b
            n += b
    finally:
        model.train(was_training)
    out = torch.zeros(bank.total, dtype=torch.float64)
    out[list(ks)] = ((full - without) / max(n, 1))[list(ks)]
    return out


@torch.no_grad()
def norm_scores(bank) -> torch.Tensor:
    """The authors' prompt-norm ablation, as a score to maximise.

    They prune the prompt with the smallest L2 norm *relative to its block's total norm*:
    score_k = -||p_k|| / sum_{j in block(k)} ||p_j|| (so the max picks it; always <= 0, and it
    biases pruning towards crowded blocks). They relocate every epoch regardless of sign.
    """
    bank = _bank(bank)
    norms = bank.values.detach().float().norm(dim=1).cpu()
    sums = block_sums(norms, bank.block.cpu(), bank.num_blocks)
    return (-norms / sums[bank.block.cpu()].clamp_min(1e-12)).float()


def block_sums(scores: torch.Tensor, block: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Per-block sums of per-prompt scores (0 for an empty block): the allocator's state."""
    return torch.zeros(num_blocks, dtype=torch.float64).index_add_(0, block.cpu(), scores.double().cpu())
