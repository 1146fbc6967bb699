"""Which relocation helps most, and does it depend on when it is made? (the paper's Finding 2)

One job = one dataset. It trains (or resumes) a VPT-Deep run into ``<out>/run/`` keeping checkpoints
(trainable state, optimiser state, RNG) at ``study.points``. At each point:

1. the idleness rule picks the prompt to prune: the largest Taylor score from the authors' scoring
   pass over the training split (:func:`~provpt.relocation.idleness.taylor_pass`; the rule would
   only prune it if the score is > 0: ``would_prune`` records that, the sweep moves it anyway), or
   with ``study.prune=removal`` the largest true idleness;
2. for every target block (with ``study.pairs=true``: every source block too, pruning the highest
   scored prompt of that block) one *arm*: restore the checkpoint (prompts, head, optimiser state,
   RNG), move the prompt as PRO-VPT does (``PromptBank.move``: value scaled by ``relocation.scale``,
   appended to the target, momentum kept), continue training exactly as the run would
   (``train_epoch``, the run's learning-rate schedule, the run's data order) for
   ``study.budget_epochs`` epochs, and evaluate on the eval split;
3. the *no move* arm (target = source: nothing moves) is plain continued training: it equals the
   run's own state ``budget_epochs`` later (a test checks it). Gains are paired against it:
   ``gain_loss = loss(no move) - loss(arm)`` (> 0: the move helped) and ``gain_acc``.

``immediate_loss`` is the eval loss right after the move, before any training: the cost of the
move itself. All arms share the checkpoint's RNG state and data order, so the gains are paired
differences, not seed noise; they are still one continuation each.

Options (``study.<key>=``; defaults):
  method: vpt-deep        the run the sweep starts from
  points: [0.25, 0.5, 0.75]   fractions of training
  budget_epochs: 2        epochs of continued tuning per arm
  pairs: false            all (source, target) pairs instead of the rule's prompt to every target
  split: null             eval split (null: the run's first eval split)
  prune: taylor           which prompt the rule prunes: taylor (the authors' pass) | removal (true
                          idleness on ``prune_batches`` fixed training batches, dropout off: the
                          correlation study shows the Taylor argmax is rarely the true one)
  prune_batches: 4        batches of the ``removal`` rule
  run: null               an existing run folder (with those checkpoints) instead of ``<out>/run``

Cost: (points) x (L arms, or about L^2 with pairs) x (budget_epochs training epochs + 2 evals).

Writes ``<out>/run/``, ``<out>/arms.csv`` (one row per point and arm) and ``<out>/summary.json``.
Tables ``adjustment_best`` (best move per point, and whether it changes over training),
``adjustment_arms`` and figures ``adjustment_heatmap_<dataset>`` are made from them by
:mod:`provpt.report.adjustment`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import RELOCATING
from . import (autocast_for, checkpoint_path, parse_overrides, point_epochs, run_config,
               setup, train_studied_run, write_csv, write_json)

NAME = "adjustment"
DEFAULTS = {"method": "vpt-deep", "points": [0.25, 0.5, 0.75], "budget_epochs": 2, "pairs": False, "split": None,
            "prune": "taylor", "prune_batches": 4, "run": None}


def restore(model, optimizer, ck: dict) -> None:
    """Put the model, optimiser, global RNG and prompt-dropout stream back to the checkpoint's state.

    The optimiser state is deep-copied: ``Optimizer.load_state_dict`` keeps the given tensors (e.g.
    SGD's momentum buffers) and steps update them in place, which would leak one arm into the next.
    """
    import copy

    import torch

    model.load_trainable_state(ck["model"])
    optimizer.load_state_dict(copy.deepcopy(ck["optimizer"]))
    torch.set_rng_state(ck["rng"].cpu())  # the CPU generator's state (load_checkpoint keeps it on the CPU)
    if ck.get("dropout_rng") is not None:
        model.prompts.set_rng_state(ck["dropout_rng"])
    if torch.cuda.is_available():  # run() keeps only the CPU RNG: give every arm the same CUDA stream
        torch.cuda.manual_seed_all(int(ck["epoch"]) * 1_000_003 + 7)


def continue_training(model, data, cfg, optimizer, start_epoch: int, epochs: int, autocast) -> list[dict]:
    """``epochs`` more epochs exactly as ``train.run`` would train them from ``start_epoch``; returns
    each epoch's training statistics."""
    from ..train import lr_at, train_epoch

    stats = []
    for epoch in range(start_epoch, start_epoch + epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, min(epoch, cfg.epochs - 1))
        stats.append(train_epoch(model, data, cfg, optimizer, epoch, autocast))
    return stats


def run_arm(model, data, cfg, ck: dict, prompt: int, target: int, budget: int, split: str, autocast,
            keep_state: bool = False) -> dict:
    """One arm: restore ``ck``, move ``prompt`` to ``target`` (no move if it is there), train, evaluate."""
    from ..train import evaluate, make_optimizer

    optimizer = make_optimizer(cfg, model)
    restore(model, optimizer, ck)
    source = int(model.prompts.block[prompt])
    if target != source:
        model.prompts.move(prompt, target, cfg.relocation.scale)
    immediate = evaluate(model, data, split, autocast)
    stats = continue_training(model, data, cfg, optimizer, int(ck["epoch"]), budget, autocast)
    final = evaluate(model, data, split, autocast)
    out = {"prompt": int(prompt), "source": source, "target": int(target), "moved": target != source,
           "immediate_loss": immediate["loss"], "immediate_acc": immediate["acc"],
           "loss": final["loss"], "acc": final["acc"],
           "train_loss": stats[0]["train_loss"], "train_loss_faithful": stats[0]["train_loss_faithful"]}
    if keep_state:
        out["state"] = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    return out


def candidates(scores, block, num_blocks: int, pairs: bool) -> list[tuple[int, int]]:
    """(prompt, target) arms: the rule's prompt to every block, or each block's top prompt to every block."""
    scores, block = np.asarray(scores, dtype=np.float64), np.asarray(block)
    if not pairs:
        k = int(np.argmax(scores))
        return [(k, t) for t in range(num_blocks)]
    arms = []
    for s in range(num_blocks):
        members = np.flatnonzero(block == s)
        if len(members):
            k = int(members[np.argmax(scores[members])])
            arms += [(k, t) for t in range(num_blocks)]
    return arms


def prune_scores(model, data, cfg, prune: str = "taylor", prune_batches: int = 4, seed: int = 0) -> np.ndarray:
    """Per-prompt idleness the pruning rule ranks by: the authors' Taylor pass (``taylor``), or true
    idleness on ``prune_batches`` fixed training batches, dropout off (``removal``)."""
    import torch
    import torch.nn.functional as F

    from ..relocation.idleness import taylor_pass, true_idleness
    from .correlation import fixed_batches

    device = next(model.parameters()).device
    if prune == "removal":
        fixed = fixed_batches(data, cfg.train_split, cfg.batch_size, prune_batches, seed)
        return true_idleness(model, lambda: iter(fixed), F.cross_entropy).double().numpy()
    if prune != "taylor":
        raise ValueError(f"study adjustment: study.prune={prune!r}: expected taylor or removal")
    train = lambda: data.batches(cfg.train_split, cfg.batch_size)  # noqa: E731
    clip = cfg.grad_clip if cfg.relocation.clip_scores else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), model.prompts.fork_rng(seed):
        return taylor_pass(model, train, F.cross_entropy, clip).double().numpy()


def sweep_point(model, data, cfg, ck: dict, budget: int, pairs: bool, split: str, autocast, seed: int = 0,
                prune: str = "taylor", prune_batches: int = 4) -> dict:
    """Every arm at one checkpoint; the no-move arm once (all diagonal arms are the same)."""
    model.load_trainable_state(ck["model"])
    scores = prune_scores(model, data, cfg, prune, prune_batches, seed)
    block = model.prompts.block.cpu().numpy().copy()
    rule = int(np.argmax(scores))
    arms = candidates(scores, block, model.num_blocks, pairs)
    base = run_arm(model, data, cfg, ck, rule, int(block[rule]), budget, split, autocast)
    results = []
    for k, t in arms:
        r = dict(base) if t == block[k] else run_arm(model, data, cfg, ck, k, t, budget, split, autocast)
        r.update(prompt=int(k), source=int(block[k]), target=int(t), score=float(scores[k]), rule=k == rule,
                 gain_loss=base["loss"] - r["loss"], gain_acc=r["acc"] - base["acc"],
                 immediate_gain_loss=base["immediate_loss"] - r["immediate_loss"])
        results.append(r)
    moved = [r for r in results if r["moved"]]
    best = max(moved, key=lambda r: (r["gain_loss"], -r["source"], -r["target"])) if moved else None
    return {"rule_prompt": rule, "rule_source": int(block[rule]), "rule_score": float(scores[rule]),
            "would_prune": bool(scores[rule] > 0), "no_move": {k: base[k] for k in ("loss", "acc", "immediate_loss")},
            "best": None if best is None else {k: best[k] for k in ("prompt", "source", "target", "gain_loss",
                                                                     "gain_acc", "loss", "acc")},
            "best_beats_no_move": bool(best is not None and best["gain_loss"] > 0), "arms": results,
            "distribution": model.distribution()}


def main(profile: dict, overrides) -> dict:
    import pandas as pd

    from ..train import load_checkpoint

    opts, run_over, hparams = parse_overrides(profile, overrides, NAME, DEFAULTS)
    cfg = run_config(profile, run_over, method=opts["method"], hparams=hparams)
    if cfg.method not in ("vpt-deep", *RELOCATING):
        raise ValueError(f"study adjustment: method {cfg.method!r}: expected vpt-deep (or pro-vpt)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run_dir, cfg = train_studied_run(cfg, opts["points"], out / "run", opts["run"])
    split = opts["split"] or cfg.eval_splits[0]
    device, data, model = setup(cfg, [split])
    autocast = autocast_for(cfg, device)
    budget = int(opts["budget_epochs"])
    points, rows = [], []
    for frac, epoch in point_epochs(opts["points"], cfg.epochs):
        ck = load_checkpoint(checkpoint_path(run_dir, epoch))
        t0 = time.perf_counter()
        res = sweep_point(model, data, cfg, ck, budget, bool(opts["pairs"]), split, autocast, seed=cfg.seed + epoch,
                          prune=str(opts["prune"]), prune_batches=int(opts["prune_batches"]))
        res.update(fraction=frac, epoch=epoch, wall_time_s=time.perf_counter() - t0)
        for r in res["arms"]:
            rows.append({"fraction": frac, "epoch": epoch, **r})
        points.append({k: v for k, v in res.items() if k != "arms"})
        b = res["best"]
        print(f"adjustment {cfg.dataset} epoch {epoch}: no move loss {res['no_move']['loss']:.4f}; best "
              + (f"{b['source']}->{b['target']} gain {b['gain_loss']:+.4f} loss, {b['gain_acc']:+.1f} pp" if b else "-")
              + f" ({res['wall_time_s']:.1f} s)")
    write_csv(out / "arms.csv", pd.DataFrame(rows))
    bests = [(p["best"]["source"], p["best"]["target"]) for p in points if p["best"]]
    summary = {"study": NAME, "dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed, "epochs": cfg.epochs,
               "num_blocks": model.num_blocks, "num_prompts": int(model.prompts.total), "split": split,
               "budget_epochs": budget, "pairs": bool(opts["pairs"]), "prune": opts["prune"],
               "scale": cfg.relocation.scale,
               "options": opts, "run_dir": str(run_dir), "points": points,
               "best_moves": [list(b) for b in bests], "best_changes": len(set(bests)) > 1,
               "best_target_changes": len({t for _, t in bests}) > 1,
               "wall_time_s": time.perf_counter() - t_start}
    write_json(out / "summary.json", summary)
    return summary
