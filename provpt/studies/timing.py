"""Where does the time go? Per method, in one process: each epoch split into phases, peak memory, images/s.

One job = one dataset. Every method of ``study.methods`` is set up in this process (same data on
the same device), then the methods take turns epoch by epoch (round robin, so a change of machine
load hits all of them alike); the first ``study.warmup_epochs`` epochs are not counted. Each epoch
is the training loop's own :func:`provpt.train.run_epoch` (relocation, :func:`~provpt.train.train_epoch`,
the relocator's bookkeeping, evaluation) with a measuring clock passed in (:mod:`provpt.clock`):

- ``scoring``: the relocator's scores (the authors' pass, or reading the online gate gradients)
  and ``end_epoch`` (keeping them);
- ``allocation``: the rest of ``Relocator.start_epoch``: settling the reward (the PPO update runs
  here; ``ppo_update_s`` is its part), the allocator's action (``act_s``), the move;
- ``data``: indexing and normalising the batches;
- ``forward_backward``: forward, loss, ``zero_grad``, backward (online scores accumulate here);
- ``optimizer``: gradient clipping and the optimiser step;
- ``eval``: one pass over the first eval split (if ``study.eval``);
- ``other``: the epoch's wall time minus all of the above (loop and metric bookkeeping).

Clocks: on CUDA, CUDA events around the per-batch phases (no host sync inside the loop) and
host timers around the once-per-epoch phases (with a sync); on CPU, ``time.perf_counter``.
Memory: on CUDA ``torch.cuda.max_memory_allocated`` (peak stats reset at each epoch's start;
``mem_peak_mb`` is the process's peak, ``mem_extra_mb`` the part above what was allocated when the
epoch started: activations, gradients, optimiser temporaries). On CPU torch keeps no allocator
statistics, so the process's resident set size is sampled from ``/proc/self/statm`` after every
forward pass (the clock's ``forward`` mark, where activations peak) and at phase ends; ``mem_extra_mb`` is the growth over the
epoch's start. It is a process-wide number: the allocator may keep freed pages, so on CPU the
extra memory of a method that runs after a bigger one can read low (compare the CUDA numbers).

Methods (``study.methods``): ``linear``, ``vpt-shallow``, ``vpt-deep``, ``pro-vpt`` (online scores,
the profile's relocation settings), ``pro-vpt-pass`` (``relocation.scoring=pass``); any other
method of :data:`provpt.config.METHODS` works too.

Options (``study.<key>=``; defaults):
  methods: [linear, vpt-shallow, vpt-deep, pro-vpt, pro-vpt-pass, pro-vpt-exact]
  epochs: 3              timed epochs per method (3: PPO updates every 2 rewards, so one update
                         falls in them)
  warmup_epochs: 1       untimed epochs first (warm caches, and PRO-VPT moves from epoch 1)
  eval: true             time an eval pass per epoch
  max_batches: null      cap on training batches per epoch (big datasets; null: the whole split)

Writes ``<out>/epochs.csv`` (one row per method and timed epoch) and ``<out>/summary.json``.
Table ``timing`` (means per method over the timed epochs, so a PPO update every other epoch is
amortised; ratios to VPT-Deep), figure ``timing_phases`` and, from Snakemake's ``benchmark:``
files under ``results/<profile>/benchmarks/``, table ``timing_benchmarks`` are made by
:mod:`provpt.report.timing`.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from . import autocast_for, parse_overrides, run_config, sync, write_csv, write_json

NAME = "timing"
DEFAULTS = {"methods": ["linear", "vpt-shallow", "vpt-deep", "pro-vpt", "pro-vpt-pass", "pro-vpt-exact"], "epochs": 3,
            "warmup_epochs": 1, "eval": True, "max_batches": None}
ALIASES = {"pro-vpt-pass": ("pro-vpt", {"relocation.scoring": "pass"})}  # timed like a method
PHASES = ("data", "forward_backward", "optimizer", "scoring", "allocation", "eval", "other")
REFERENCE = "vpt-deep"


# ----------------------------------------------------------------------------- clocks


class Clock:
    """Per-phase seconds; CUDA events for the per-batch phases, host timers for the others. Samples
    ``memory`` at every phase end and at the ``forward`` mark."""

    def __init__(self, device, memory=None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.memory = memory
        self.host: dict[str, float] = defaultdict(float)
        self.events: dict[str, list] = defaultdict(list)

    def mark(self, event: str) -> None:
        if self.memory is not None:
            self.memory.sample()

    @contextmanager
    def batch(self, name: str):
        if not self.cuda:
            t = time.perf_counter()
            yield
            self.host[name] += time.perf_counter() - t
            return
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events[name].append((start, end))

    @contextmanager
    def once(self, name: str):
        sync(self.device)
        t = time.perf_counter()
        yield
        sync(self.device)
        self.host[name] += time.perf_counter() - t
        self.mark(name)

    def totals(self) -> dict[str, float]:
        sync(self.device)
        out = dict(self.host)
        for name, pairs in self.events.items():
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000.0
        return out


class Memory:
    """Peak memory of one epoch (MB): CUDA allocator statistics, or sampled RSS on the CPU."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start = self.peak = 0.0

    def rss(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page / 2**20
        except OSError:  # not Linux: the process's high-water mark
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def begin(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.start = self.peak = self.rss()

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, self.rss())

    def end(self) -> dict:
        if self.cuda:
            import torch

            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.sample()
        return {"mem_peak_mb": self.peak, "mem_extra_mb": max(0.0, self.peak - self.start)}


# ----------------------------------------------------------------------------- one method


class Method:
    """A method set up for timing: model, optimiser, relocator, config (as :func:`provpt.train.run`)."""

    def __init__(self, name: str, cfg, data, device):
        from ..model.methods import count_parameters
        from ..train import build_run

        self.name, self.cfg, self.data, self.device = name, cfg, data, device
        self.model, self.optimizer, self.relocator = build_run(cfg, data.num_classes, device)
        self.params = count_parameters(self.model)
        self.autocast = autocast_for(cfg, device)


def measure_epoch(m: Method, epoch: int, do_eval: bool = True, max_batches: int | None = None) -> dict:
    """One epoch of ``m`` through the training loop's ``run_epoch``, every phase timed."""
    from ..train import run_epoch

    cfg = m.cfg
    mem = Memory(m.device)
    clock = Clock(m.device, mem)
    mem.begin()
    sync(m.device)
    t0 = time.perf_counter()
    row = run_epoch(m.model, m.data, cfg, m.optimizer, m.relocator, epoch, m.autocast,
                    cfg.eval_splits[:1] if do_eval else [], clock=clock, max_batches=max_batches)
    sync(m.device)
    wall = time.perf_counter() - t0
    t = clock.totals()
    scoring = t.get("scoring", 0.0) + t.get("scoring_end", 0.0)
    allocation = max(0.0, t.get("relocation", 0.0) - t.get("scoring", 0.0))
    phases = {"data": t.get("data", 0.0), "forward_backward": t.get("forward_backward", 0.0),
              "optimizer": t.get("optimizer", 0.0), "scoring": scoring, "allocation": allocation,
              "eval": t.get("eval", 0.0)}
    phases["other"] = max(0.0, wall - sum(phases.values()))
    evals = row["eval"]
    return {"method": m.name, "epoch": epoch, "wall_s": wall, **{f"{k}_s": v for k, v in phases.items()},
            "act_s": t.get("act", 0.0), "ppo_update_s": t.get("ppo_update", 0.0), "moves": row["moves"],
            "batches": row["batches"], "train_images": row["images"],
            "eval_images": len(m.data.splits[cfg.eval_splits[0]][1]) if do_eval else 0,
            "train_loss": row["train_loss"], "train_acc": row["train_acc"],
            **mem.end(), **({"eval_acc": evals[cfg.eval_splits[0]]["acc"]} if evals else {})}


# ----------------------------------------------------------------------------- main


def method_config(profile: dict, run_over: dict, name: str, hparams: dict | None = None):
    from ..config import METHODS

    method, extra = ALIASES.get(name, (name, {}))
    if method not in METHODS:
        raise ValueError(f"study timing: unknown method {name!r}; expected one of {[*METHODS, *ALIASES]}")
    over = {k: v for k, v in run_over.items() if k != "method"}
    return run_config(profile, over, method=method, extra=extra, hparams=hparams)


def summarise(epochs: list[dict], methods: list[str]) -> list[dict]:
    import numpy as np

    rows = []
    for name in methods:
        rs = [r for r in epochs if r["method"] == name]
        if not rs:
            continue
        mean = {k: float(np.mean([r[k] for r in rs])) for k in
                ["wall_s", *(f"{p}_s" for p in PHASES), "act_s", "ppo_update_s", "mem_extra_mb"]}
        mean["mem_peak_mb"] = float(np.max([r["mem_peak_mb"] for r in rs]))
        train_s = mean["data_s"] + mean["forward_backward_s"] + mean["optimizer_s"]
        imgs = rs[0]["train_images"]
        walls = [r["wall_s"] for r in rs]
        rows.append({"method": name, "epochs": len(rs), **mean, "wall_median_s": float(np.median(walls)),
                     "wall_std_s": float(np.std(walls)),
                     "train_images_per_s": imgs / train_s if train_s > 0 else float("nan"),
                     "epoch_images_per_s": imgs / mean["wall_s"] if mean["wall_s"] > 0 else float("nan"),
                     "train_images": imgs, "moves": int(sum(r["moves"] for r in rs))})
    ref = next((r for r in rows if r["method"] == REFERENCE), None)
    for r in rows:
        r["wall_vs_vpt_deep"] = r["wall_s"] / ref["wall_s"] if ref else float("nan")
        r["train_vs_vpt_deep"] = ((r["data_s"] + r["forward_backward_s"] + r["optimizer_s"] + r["scoring_s"]
                                   + r["allocation_s"]) / (ref["data_s"] + ref["forward_backward_s"]
                                                           + ref["optimizer_s"]) if ref else float("nan"))
    return rows


def main(profile: dict, overrides) -> dict:
    import torch

    from ..data.task import TaskData
    from ..runtime import resolve_device

    opts, run_over, hparams = parse_overrides(profile, overrides, NAME, DEFAULTS)
    names = list(opts["methods"])
    cfgs = {n: method_config(profile, run_over, n, hparams) for n in names}
    base = cfgs[names[0]]
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    if base.threads > 0:
        torch.set_num_threads(base.threads)
    device = resolve_device(base)
    data = TaskData(base, device)
    methods = [Method(n, cfgs[n], data, device) for n in names]
    rows = []
    total = int(opts["warmup_epochs"]) + int(opts["epochs"])
    t_start = time.perf_counter()
    for epoch in range(total):
        for m in methods:
            r = measure_epoch(m, epoch, bool(opts["eval"]), opts["max_batches"])
            if epoch >= int(opts["warmup_epochs"]):
                rows.append(r)
            print(f"timing {base.dataset} epoch {epoch} {m.name}: {r['wall_s']:.2f} s"
                  + (" (warm-up)" if epoch < int(opts["warmup_epochs"]) else ""))
    import pandas as pd

    write_csv(out / "epochs.csv", pd.DataFrame(rows))
    per_method = summarise(rows, names)
    summary = {"study": NAME, "dataset": base.dataset, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "batch_size": base.batch_size,
               "train_split": base.train_split, "eval_split": base.eval_splits[0], "options": opts,
               "params": {m.name: m.params for m in methods}, "methods": per_method,
               "memory": "cuda max_memory_allocated" if device.type == "cuda"
               else "process RSS sampled from /proc/self/statm after each forward",
               "wall_time_s": time.perf_counter() - t_start}
    write_json(out / "summary.json", summary)
    return summary
