"""Hyper-parameter selection on the validation split only (never the test split)."""

from __future__ import annotations

import json
from pathlib import Path

from .io import write_text


def select(run_dirs, split: str, out: Path | None = None) -> dict:
    """Best (lr, weight_decay[, prompts per block]) by last-epoch ``split`` accuracy; ties to the smaller
    lr, then wd, then fewer prompts. ``num_prompts`` is part of the selection only when the search
    varied it (``search.num_prompts``)."""
    candidates = []
    for d in map(Path, run_dirs):
        path = d / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: search run not finished")
        m = json.loads(path.read_text())
        if split not in m["eval"]:
            raise KeyError(f"{path}: no accuracy on split {split!r} (has {sorted(m['eval'])})")
        candidates.append({"run": str(d), "lr": m["lr"], "weight_decay": m["weight_decay"],
                           "num_prompts": m.get("prompts_per_block"), "acc": m["eval"][split]["acc"]})
    if not candidates:
        raise ValueError("select: no search runs given")
    best = max(candidates, key=lambda c: (c["acc"], -c["lr"], -c["weight_decay"], -(c["num_prompts"] or 0)))
    result = {"lr": best["lr"], "weight_decay": best["weight_decay"], "acc": best["acc"], "split": split,
              "rule": "max last-epoch accuracy on the search eval split; ties to the smaller lr, then smaller wd, "
                      "then fewer prompts",
              "candidates": sorted(candidates, key=lambda c: (c["lr"], c["weight_decay"], c["num_prompts"] or 0))}
    if len({c["num_prompts"] for c in candidates}) > 1:  # the search had a prompt-length axis
        result["num_prompts"] = best["num_prompts"]
    if out is not None:
        write_text(out, json.dumps(result, indent=2))
    return result
