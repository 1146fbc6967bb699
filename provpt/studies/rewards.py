"""Do PRO-VPT's rewards measure the move? Each reward against the move's counterfactual effect.

One job = one dataset. Like the adjustment study (:mod:`.adjustment`, whose arms it reuses), it
trains (or resumes) a VPT-Deep run keeping checkpoints at ``study.points``. At each point the prompt
with the highest log-gate idleness (the exact-removal first-order score, :mod:`provpt.relocation.
idleness`) is moved to every other block, one *arm* each, and each arm, like the no-move arm, trains
``study.budget_epochs`` epochs from the same checkpoint with the same data order and dropout stream.
Per moved arm:

- **effect** (the counterfactual): eval loss of the no-move arm minus the arm's (> 0: the move helped);
- reward **mean** / **faithful** (the authors' formula): training loss of the epoch before the move
  minus the arm's first training epoch's loss (per-sample means; the authors' sum of batch means / batch
  size), minus the largest gate score after that epoch;
- reward **move** (ours): the moved prompt's log-gate idleness before the move minus its idleness in
  the new block after that epoch.

First-order scores are read in eval mode on ``study.score_batches`` fixed training batches (the
correlation study's :func:`~.correlation.gate_gradients`), before the move and after the arm's first
epoch. The summary gives, per reward, Spearman and Pearson correlation with the effect over all moved
arms and the share of arms where the reward's sign is the effect's. A reward that tracks the training
trend correlates with the effect only through the points' different stages of training, so the
summary also gives the correlation within points (each point's rewards and effects centred first).

Options (``study.<key>=``; defaults):
  method: vpt-deep        the run the arms start from
  points: [0.2, 0.4, 0.6, 0.8]   fractions of training (with L blocks: (L - 1) moves per point; a
                          point before the first epoch's end is skipped: no loss before the move)
  budget_epochs: 1        epochs each arm trains before its effect is measured (the reward's horizon)
  split: null             eval split of the effect (null: the run's first eval split)
  score_batches: 4        fixed training batches of the first-order scores
  run: null               an existing run folder (with those checkpoints) instead of ``<out>/run``

Writes ``<out>/run/``, ``<out>/moves.csv`` (one row per moved arm) and ``<out>/summary.json``; the
table ``rewards`` and figure ``rewards_<dataset>`` are made by :mod:`provpt.report.rewards`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import (autocast_for, checkpoint_path, parse_overrides, point_epochs, run_config, setup,
               train_studied_run, write_csv, write_json)

NAME = "rewards"
DEFAULTS = {"method": "vpt-deep", "points": [0.2, 0.4, 0.6, 0.8], "budget_epochs": 1, "split": None,
            "score_batches": 4, "run": None}
REWARDS = ("mean", "faithful", "move")


def scores(model, batches) -> dict[str, np.ndarray]:
    """First-order gate and log-gate scores of every prompt on ``batches`` (eval mode)."""
    from .correlation import gate_gradients

    return {k: gate_gradients(model, lambda: iter(batches), k).double().numpy() for k in ("gate", "logit")}


def point_moves(model, data, cfg, ck: dict, budget: int, split: str, batches, autocast) -> list[dict]:
    """Every move of the highest log-gate prompt at checkpoint ``ck``: its rewards and its effect."""
    from .adjustment import run_arm

    model.load_trainable_state(ck["model"])
    before = scores(model, batches)
    k = int(np.argmax(before["logit"]))
    source = int(model.prompts.block[k])
    last = ck["history"][-1]
    stay = run_arm(model, data, cfg, ck, k, source, budget, split, autocast)
    rows = []
    for target in range(model.num_blocks):
        if target == source:
            continue
        arm = run_arm(model, data, cfg, ck, k, target, budget, split, autocast)  # leaves the arm's state
        after = scores(model, batches)
        rows.append({
            "epoch": int(ck["epoch"]), "prompt": k, "source": source, "target": target,
            "effect": stay["loss"] - arm["loss"], "effect_acc": arm["acc"] - stay["acc"],
            "mean": last["train_loss"] - arm["train_loss"] - float(after["gate"].max()),
            "faithful": last["train_loss_faithful"] - arm["train_loss_faithful"] - float(after["gate"].max()),
            "move": float(before["logit"][k] - after["logit"][k]),
            "trend": last["train_loss"] - arm["train_loss"], "max_gate_after": float(after["gate"].max()),
        })
    return rows


def correlations(rows: list[dict]) -> dict[str, dict]:
    """Per reward: Spearman, Pearson (all moves, and within points) and sign agreement with the effect."""
    from scipy import stats

    import pandas as pd

    df = pd.DataFrame(rows)
    out = {}
    centred = df.groupby("epoch")[["effect", *REWARDS, "trend"]].transform(lambda c: c - c.mean())
    for r in (*REWARDS, "trend"):
        ok = len(df) > 2 and df[r].std() > 0 and df["effect"].std() > 0
        within = len(df) > 2 and centred[r].std() > 0
        out[r] = {
            "n": int(len(df)),
            "spearman": float(stats.spearmanr(df[r], df["effect"])[0]) if ok else None,
            "pearson": float(stats.pearsonr(df[r], df["effect"])[0]) if ok else None,
            "spearman_within_points": float(stats.spearmanr(centred[r], centred["effect"])[0]) if within else None,
            "sign_agreement": float(np.mean(np.sign(df[r]) == np.sign(df["effect"]))) if len(df) else None,
        }
    return out


def main(profile: dict, overrides) -> dict:
    import pandas as pd

    from .correlation import fixed_batches
    from ..train import load_checkpoint

    opts, run_over, hparams = parse_overrides(profile, overrides, NAME, DEFAULTS)
    cfg = run_config(profile, run_over, method=opts["method"], hparams=hparams)
    if cfg.method != "vpt-deep":
        raise ValueError(f"study rewards: method {cfg.method!r}: expected vpt-deep (a run whose prompts stay put)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run_dir, cfg = train_studied_run(cfg, opts["points"], out / "run", opts["run"])
    split = opts["split"] or cfg.eval_splits[0]
    device, data, model = setup(cfg, [split])
    model.prompts.log_gated = True  # log-gates at 0 change nothing; their gradients are the scores
    autocast = autocast_for(cfg, device)
    batches = fixed_batches(data, cfg.train_split, cfg.batch_size, int(opts["score_batches"]), cfg.seed)
    rows = []
    for frac, epoch in point_epochs(opts["points"], cfg.epochs):
        if epoch < 1:  # the authors' reward needs the loss of an epoch before the move
            continue
        ck = load_checkpoint(checkpoint_path(run_dir, epoch))
        got = point_moves(model, data, cfg, ck, int(opts["budget_epochs"]), split, batches, autocast)
        rows += [{"fraction": frac, **r} for r in got]
        print(f"rewards {cfg.dataset} epoch {epoch}: {len(got)} moves, effects "
              + " ".join(f"{r['effect']:+.4f}" for r in got))
    write_csv(out / "moves.csv", pd.DataFrame(rows))
    summary = {"study": NAME, "dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed, "epochs": cfg.epochs,
               "num_blocks": model.num_blocks, "split": split, "budget_epochs": int(opts["budget_epochs"]),
               "scale": cfg.relocation.scale, "options": opts, "run_dir": str(run_dir), "moves": len(rows),
               "correlation": correlations(rows), "wall_time_s": time.perf_counter() - t_start}
    write_json(out / "summary.json", summary)
    return summary
