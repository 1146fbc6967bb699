"""Idleness of prompts: which prompt does the least (or harm) where it is.

True idleness of prompt k: ``I_k = loss(with p_k) - loss(without p_k)``; ``I_k > 0`` means the
prompt hurts. Its first-order (Taylor) estimate is ``d loss / d gate_k = g_k . p_k`` at gate 1,
read from the prompt bank's gates. Two ways to get it:

- ``taylor_pass``: the authors' extra pass over the training data at the start of an epoch (train
  mode, prompt dropout on, no optimiser step), batch-averaged gate gradients; ``taylor_passes``: the
  passes of a pack's runs as one (one concatenated forward, per-run gradients).
- ``online_scores``: the same average, accumulated in ``gates.grad`` by the ordinary training
  backward of the previous epoch (free).

All scores are returned as CPU tensors of shape (N,), one per prompt of the bank.
"""

from __future__ import annotations

import torch


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
    A pass of one run of :func:`taylor_passes`.
    """
    ((scores, loss),) = taylor_passes([model], lambda: ([b] for b in batches()), loss_fn, [clip], [idleness])
    return (scores, loss) if return_loss else scores


def taylor_passes(models, batches, loss_fn, clips, idleness, forward=None, chunks=None) -> list[tuple]:
    """The scoring passes of several runs at once (a pack: one shared frozen backbone), each what
    :func:`taylor_pass` computes for that run alone: ``batches()`` yields, per step, one ``(x, y)``
    per run; each step is one concatenated forward (``forward(models, x, sizes)``, by default
    :func:`provpt.model.prompted_vit.packed_forward`) and one gradient of the runs' summed losses with
    respect to every run's score parameter (and, where ``clips[j]`` is set, its other trainable
    parameters), split per run: the runs share no trainable parameter, so each run's part is its own
    loss's gradient. ``chunks(work)`` runs ``work(lo, hi)`` over chunks of the runs (default: all at
    once; the training loop's :func:`provpt.train.pack_chunks`). ``clips``, ``idleness``: per run.
    Losses and scores accumulate on the device: one host sync at the end, none per batch. Returns,
    per run, (scores, {"mean", "faithful"})."""
    if forward is None:
        from ..model.prompted_vit import packed_forward as forward
    k = len(models)
    banks = [m.prompts for m in models]
    params = [bank.score_param(how) for bank, how in zip(banks, idleness)]
    others = [[p for p in m.parameters() if p.requires_grad and p is not bank.values
               and p is not bank.gates and p is not bank.log_gates] for m, bank in zip(models, banks)]
    needs_grad = [not p.requires_grad for p in params]
    was_training = [m.training for m in models]
    for p in params:
        p.requires_grad_(True)
    for m in models:
        m.train()
    totals, count, images = [None] * k, 0, 0
    mean_sums, faithful = [None] * k, [None] * k  # float64 on the device, in the order of the batches
    try:
        for step in batches():
            xs, ys = [x for x, _ in step], [y for _, y in step]

            def work(lo: int, hi: int) -> None:
                with torch.enable_grad():
                    z = forward(models[lo:hi], xs[lo] if hi - lo == 1 else torch.cat(xs[lo:hi]),
                                [len(y) for y in ys[lo:hi]])
                    losses = [loss_fn(zj, y) for zj, y in zip(z, ys[lo:hi])]
                    wrt, spans = [], []
                    for j in range(lo, hi):
                        own = [params[j]] + (others[j] if clips[j] is not None else [])
                        spans.append((len(wrt), len(wrt) + len(own)))
                        wrt += own
                    grads = torch.autograd.grad(losses[0] if len(losses) == 1 else torch.stack(losses).sum(), wrt,
                                                allow_unused=True)
                new = []
                for j, (a, b), loss in zip(range(lo, hi), spans, losses):
                    g = grads[a].detach()
                    if clips[j] is not None:
                        norm = torch.sqrt(sum((t.detach().float() ** 2).sum() for t in grads[a:b] if t is not None))
                        g = g * torch.clamp(clips[j] / (norm + 1e-6), max=1.0).to(g.dtype)
                    n, loss = len(ys[j]), loss.detach().double()
                    new.append((g if totals[j] is None else totals[j] + g,
                                loss * n if mean_sums[j] is None else mean_sums[j] + loss * n,
                                loss / n if faithful[j] is None else faithful[j] + loss / n))
                for j, (t, s, f) in zip(range(lo, hi), new):  # only once the whole chunk is done
                    totals[j], mean_sums[j], faithful[j] = t, s, f

            (chunks or (lambda w: w(0, k)))(work)
            count += 1
            images += len(ys[0])
    finally:
        for m, was in zip(models, was_training):
            m.train(was)
        for p, needed in zip(params, needs_grad):
            if needed:
                p.requires_grad_(False)
    out = []
    for bank, total, s, f in zip(banks, totals, mean_sums, faithful):
        scores = (total / count).cpu() if count else torch.zeros(bank.total)
        loss = {"mean": float(s) / max(images, 1), "faithful": float(f)} if count else {"mean": 0.0, "faithful": 0.0}
        out.append((scores, loss))
    return out


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
