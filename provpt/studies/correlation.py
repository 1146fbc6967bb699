"""How well does the Taylor idleness score track the true idleness, over training? And at what cost?

One job = one dataset. It trains (or resumes) a run of ``study.method`` into ``<out>/run/`` that keeps
checkpoints at ``study.points``; then at every point, with the checkpoint's prompts and head:

- ``true``: true idleness ``loss(all prompts) - loss(prompt k removed)``
  (:func:`provpt.relocation.idleness.true_idleness`) on fixed evaluation batches, dropout off;
- ``logit``: the log-gate score ``d loss / d b_k`` (the first-order estimate of exact removal), over
  the same fixed batches as ``online``;
- ``verify``: shortlist-and-verify: the ``study.verify`` highest ``logit`` scores ranked by exact
  removal on ``study.probe_batches`` training batches (other ones, as the relocator sees them);
  its cost is ``logit``'s plus the removals;
- ``online``: the Taylor score ``d loss / d gate_k`` as the online mode gets it (gate gradients
  accumulated by ordinary backward passes, :func:`~provpt.relocation.idleness.online_scores`), here
  over the *same* fixed batches in one pass with dropout off: the pure first-order error;
- ``pass``: the authors' scoring pass (:func:`~provpt.relocation.idleness.taylor_pass`): the whole
  training split, train mode (prompt dropout on), clipped if ``relocation.clip_scores``: what
  PRO-VPT's ``scoring=pass`` ranks prompts by;
- ``run`` (PRO-VPT runs with online scoring only): the scores the run's relocator held at that
  checkpoint (accumulated over the last training epoch), i.e. what it would prune by next;
- ``zeroed`` (``study.zeroed=true``): ``loss(all) - loss(gate_k = 0)``, the exact quantity the
  Taylor score linearises (a zero token still takes part in attention; removal takes it out). It
  splits the Taylor-vs-true gap into linearisation error and removal-vs-zero difference.

Scoring runs in fp32 (no autocast): idleness values are loss differences of ~1e-3. For each point
and method vs ``true``: Pearson r, Spearman rho, Kendall tau (scipy), whether the argmax agrees,
top-5 overlap, sign agreement, whether the pruning decision (prune the argmax iff its score > 0)
agrees, the mean within-block Spearman, the Spearman of per-block sums (the allocator's state), and
the wall time of each method (cost ratio = time(true) / time(method)).

Options (``study.<key>=``; defaults):
  method: vpt-deep           the studied run's method (pro-vpt also adds the ``run`` scores)
  points: [0, 0.25, 0.5, 0.75, 1]   fractions of training (checkpoints of the run)
  split: train               split of the fixed evaluation batches (``train`` = the run's train split)
  eval_batches: 4            number of fixed batches (first of a seeded permutation)
  batch_size: null           their size (null: the run's batch_size)
  order_seed: 0              seed of that permutation
  pass: true                 compute the ``pass`` scores
  zeroed: false              compute the ``zeroed`` differences (as costly as ``true``)
  top: 5                     k of the top-k overlap
  verify: 8                  shortlist size m of ``verify``
  probe_batches: 2           training batches of ``verify``'s exact removals
  run: null                  an existing run folder (with those checkpoints) instead of ``<out>/run``

Writes ``<out>/run/`` (the run), ``<out>/scores.csv`` (one row per point and prompt),
``<out>/summary.json`` (last). Tables ``correlation``, ``correlation_summary`` and figures
``correlation_scatter_<dataset>``, ``correlation_over_training`` are made from them by
:mod:`provpt.report.correlation`.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from ..config import RELOCATING
from . import (checkpoint_path, parse_overrides, point_epochs, run_config, setup, sync,
               train_studied_run, write_csv, write_json)

NAME = "correlation"
DEFAULTS = {"method": "vpt-deep", "points": [0, 0.25, 0.5, 0.75, 1], "split": "train", "eval_batches": 4,
            "verify": 8, "probe_batches": 2,
            "batch_size": None, "order_seed": 0, "pass": True, "zeroed": False, "top": 5, "run": None}
METHODS = ("online", "pass", "logit", "verify", "run", "zeroed")


# ----------------------------------------------------------------------------- scores


def gate_gradients(model, batches, idleness: str = "gate") -> "torch.Tensor":
    """Online-style first-order scores over ``batches()`` in eval mode: gate (or log-gate) gradients
    accumulated by plain ``loss.backward()`` calls, averaged per batch (``online_scores``). Leaves no
    ``.grad`` behind and the bank's log-gating as it was."""
    import torch
    import torch.nn.functional as F

    from ..relocation.idleness import online_scores, reset_online

    bank = model.prompts
    was, gated, param = model.training, bank.log_gated, bank.score_param(idleness)
    grad_was = param.requires_grad
    model.eval()
    model.zero_grad(set_to_none=True)
    reset_online(model)
    bank.log_gated = gated or idleness == "logit"
    param.requires_grad_(True)
    n = 0
    try:
        with torch.enable_grad():
            for x, y in batches():
                F.cross_entropy(model(x).float(), y).backward()
                n += 1
        return online_scores(model, n, idleness)
    finally:
        model.zero_grad(set_to_none=True)
        reset_online(model)
        param.requires_grad_(grad_was)
        bank.log_gated = gated
        model.train(was)


def shortlist_verify(model, first_order, probe, m: int) -> "np.ndarray":
    """Shortlist-and-verify as the relocator does it: the ``m`` highest first-order scores, ranked by
    their exact removal idleness on ``probe`` batches, above every other prompt (kept in first-order
    order below them). Its argmax is the prompt the relocator would prune."""
    import torch.nn.functional as F

    from ..relocation.idleness import true_idleness

    s = np.asarray(first_order, dtype=np.float64)
    short = np.argsort(-s, kind="stable")[:m]
    exact = true_idleness(model, lambda: iter(probe), F.cross_entropy, short.tolist()).numpy()
    out = s - s.max() - 1.0 - np.ptp(exact[short])  # every non-shortlisted prompt below the shortlist
    out[short] = exact[short]
    return out


def zeroed_idleness(model, batches) -> "torch.Tensor":
    """``loss(all) - loss(gate_k = 0)`` per prompt, eval mode: what the Taylor score linearises."""
    import torch
    import torch.nn.functional as F

    bank = model.prompts
    was = model.training
    model.eval()
    full, without, n = 0.0, torch.zeros(bank.total, dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for x, y in batches():
                b = len(y)
                full += float(F.cross_entropy(model(x), y)) * b
                for k in range(bank.total):
                    g = bank.gates[k].item()
                    bank.gates[k] = 0.0
                    try:
                        without[k] += float(F.cross_entropy(model(x), y)) * b
                    finally:
                        bank.gates[k] = g
                n += b
    finally:
        model.train(was)
    return (full - without) / max(n, 1)


# ----------------------------------------------------------------------------- agreement


def _rank_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan"), float("nan")
    return (float(stats.pearsonr(a, b).statistic), float(stats.spearmanr(a, b).statistic),
            float(stats.kendalltau(a, b).statistic))


def agreement(score, truth, block=None, top: int = 5) -> dict:
    """How far ``score`` ranks prompts as ``truth`` does (both per prompt; ``block`` per prompt)."""
    from scipy import stats

    s, t = np.asarray(score, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    pearson, spearman, kendall = _rank_stats(s, t)
    k = min(int(top), len(s))
    top_s, top_t = set(np.argsort(-s, kind="stable")[:k]), set(np.argsort(-t, kind="stable")[:k])
    prune_s, prune_t = bool(s.max() > 0), bool(t.max() > 0)
    out = {"pearson": pearson, "spearman": spearman, "kendall": kendall,
           "argmax_agrees": bool(np.argmax(s) == np.argmax(t)),
           "pick_in_true_top3": bool(np.argmax(s) in set(np.argsort(-t, kind="stable")[:3])),
           "top_overlap": len(top_s & top_t) / k if k else float("nan"),
           "sign_agreement": float(np.mean(np.sign(s) == np.sign(t))),
           "magnitude_ratio": float(np.median(np.abs(s)) / np.median(np.abs(t))) if np.median(np.abs(t)) > 0
           else float("nan"),
           "decision_agrees": bool(prune_s == prune_t and (not prune_s or np.argmax(s) == np.argmax(t)))}
    if block is not None:
        block = np.asarray(block)
        within = [_rank_stats(s[block == b], t[block == b])[1] for b in np.unique(block) if (block == b).sum() >= 3]
        within = [w for w in within if np.isfinite(w)]
        out["spearman_within_block"] = float(np.mean(within)) if within else float("nan")
        blocks = np.unique(block)
        if len(blocks) >= 3:
            bs = np.array([s[block == b].sum() for b in blocks])
            bt = np.array([t[block == b].sum() for b in blocks])
            out["spearman_block_sums"] = float(stats.spearmanr(bs, bt).statistic) if np.ptp(bs) and np.ptp(bt) \
                else float("nan")
        else:
            out["spearman_block_sums"] = float("nan")
    return out


# ----------------------------------------------------------------------------- one point


def fixed_batches(data, split: str, batch_size: int, num_batches: int, seed: int = 0) -> list:
    """The first ``num_batches`` batches of a seeded permutation of ``split``, materialised once."""
    import torch

    n = len(data.splits[split][1])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(n, batch_size * num_batches)]
    dev = data.splits[split][1].device
    return [data.batch(split, order[s:s + batch_size].to(dev), train=False) for s in range(0, len(order), batch_size)]


def _timed(device, fn):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def score_point(model, data, cfg, batches: list, options: dict, seed: int = 0) -> tuple[dict, dict]:
    """All scores of the model as it is now: ``({method: (N,) array}, {method: seconds})``."""
    import torch
    import torch.nn.functional as F

    from ..relocation.idleness import taylor_pass, true_idleness

    device = next(model.parameters()).device
    fixed = lambda: iter(batches)  # noqa: E731
    scores, times = {}, {}
    scores["true"], times["true"] = _timed(device, lambda: true_idleness(model, fixed, F.cross_entropy))
    scores["online"], times["online"] = _timed(device, lambda: gate_gradients(model, fixed))
    scores["logit"], times["logit"] = _timed(device, lambda: gate_gradients(model, fixed, "logit"))
    probe = list(itertools.islice(data.batches(cfg.train_split, cfg.batch_size), int(options.get("probe_batches", 2))))
    m = int(options.get("verify", 8))
    scores["verify"], t_verify = _timed(device, lambda: shortlist_verify(model, scores["logit"], probe, m))
    times["verify"] = times["logit"] + t_verify
    if options.get("pass", True):
        train = lambda: data.batches(cfg.train_split, cfg.batch_size)  # noqa: E731
        clip = cfg.grad_clip if cfg.relocation.clip_scores else None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                model.prompts.fork_rng(seed):
            scores["pass"], times["pass"] = _timed(device, lambda: taylor_pass(model, train, F.cross_entropy, clip))
    if options.get("zeroed", False):
        scores["zeroed"], times["zeroed"] = _timed(device, lambda: zeroed_idleness(model, fixed))
    return {k: np.asarray(v.double().cpu() if hasattr(v, "cpu") else v, dtype=np.float64)
            for k, v in scores.items()}, times


# ----------------------------------------------------------------------------- main


def main(profile: dict, overrides) -> dict:
    import pandas as pd

    from ..train import load_checkpoint

    opts, run_over, hparams = parse_overrides(profile, overrides, NAME, DEFAULTS)
    cfg = run_config(profile, run_over, method=opts["method"], hparams=hparams)
    if cfg.method not in ("vpt-deep", "vpt-shallow", *RELOCATING):
        raise ValueError(f"study correlation: method {cfg.method!r} has no prompts to score")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run_dir, cfg = train_studied_run(cfg, opts["points"], out / "run", opts["run"])
    split = cfg.train_split if opts["split"] in (None, "train") else str(opts["split"])
    device, data, model = setup(cfg, [split])
    bs = int(opts["batch_size"] or cfg.batch_size)
    batches = fixed_batches(data, split, bs, int(opts["eval_batches"]), int(opts["order_seed"]))
    n_eval = sum(len(y) for _, y in batches)

    rows, points = [], []
    for frac, epoch in point_epochs(opts["points"], cfg.epochs):
        ck = load_checkpoint(checkpoint_path(run_dir, epoch))
        model.load_trainable_state(ck["model"])
        scores, times = score_point(model, data, cfg, batches, opts, seed=cfg.seed + epoch)
        reloc = ck.get("relocator") or {}
        collected = reloc.get("collected") if isinstance(reloc, dict) else None
        if collected is not None and len(collected) == model.prompts.total:
            scores["run"] = np.asarray(collected.double().cpu(), dtype=np.float64)
        block = model.prompts.block.cpu().numpy().copy()
        truth = scores["true"]
        methods = {m: agreement(scores[m], truth, block, opts["top"]) for m in METHODS if m in scores}
        if "online" in scores and "pass" in scores:
            methods["online_vs_pass"] = agreement(scores["online"], scores["pass"], block, opts["top"])
        if "zeroed" in scores:
            methods["online_vs_zeroed"] = agreement(scores["online"], scores["zeroed"], block, opts["top"])
        points.append({"fraction": frac, "epoch": epoch, "distribution": model.distribution(),
                       "times_s": times, "cost_ratio": {m: times["true"] / times[m] for m in times
                                                          if m != "true" and times[m] > 0},
                       "true_max": float(truth.max()), "true_range": float(np.ptp(truth)), "methods": methods})
        for k in range(len(truth)):
            rows.append({"fraction": frac, "epoch": epoch, "prompt": k, "block": int(block[k]),
                         **{m: float(v[k]) for m, v in scores.items()}})
        print(f"correlation {cfg.dataset} epoch {epoch}: " + ", ".join(
            f"{m} rho={v['spearman']:.3f}" for m, v in methods.items()) + f" ({times['true']:.1f} s true)")

    write_csv(out / "scores.csv", pd.DataFrame(rows))
    summary = {"study": NAME, "dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed,
               "epochs": cfg.epochs, "num_prompts": int(model.prompts.total), "num_blocks": model.num_blocks,
               "split": split, "eval_images": n_eval, "batch_size": bs, "device": str(device),
               "options": opts, "run_dir": str(run_dir), "points": points,
               "wall_time_s": time.perf_counter() - t_start}
    write_json(out / "summary.json", summary)
    return summary
