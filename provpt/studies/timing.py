"""Where does the time go? Per method, in one process: each epoch split into phases, peak memory, images/s.

One job = one dataset. Every method of ``study.methods`` is set up in this process (same data on
the same device), then the methods take turns epoch by epoch (round robin, so a change of machine
load hits all of them alike); the first ``study.warmup_epochs`` epochs are not counted. The epoch
is an instrumented copy of :func:`provpt.train.train_epoch` (the same operations in the same
order, so the same numbers; a test checks it) plus PRO-VPT's relocation and the evaluation:

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
forward pass (where activations peak) and at phase ends; ``mem_extra_mb`` is the growth over the
epoch's start. It is a process-wide number: the allocator may keep freed pages, so on CPU the
extra memory of a method that runs after a bigger one can read low (compare the CUDA numbers).

Methods (``study.methods``): ``linear``, ``vpt-shallow``, ``vpt-deep``, ``pro-vpt`` (online scores,
the profile's relocation settings), ``pro-vpt-pass`` (``relocation.scoring=pass``); any other
method of :data:`provpt.config.METHODS` works too.

Options (``study.<key>=``; defaults):
  methods: [linear, vpt-shallow, vpt-deep, pro-vpt, pro-vpt-pass]
  epochs: 3              timed epochs per method (3: PPO updates every 2 rewards, so one update
                         falls in them)
  warmup_epochs: 1       untimed epochs first (warm caches, and PRO-VPT moves from epoch 1)
  eval: true             time an eval pass per epoch
  max_batches: null      cap on training batches per epoch (big datasets; null: the whole split)

Writes ``<out>/epochs.csv`` (one row per method and timed epoch) and ``<out>/summary.json``.
``report`` writes tables ``timing`` (means per method over the timed epochs, so a PPO update every
other epoch is amortised; ratios to VPT-Deep) and, if Snakemake
``benchmark:`` files exist under ``results/<profile>/benchmarks/``, ``timing_benchmarks``; and the
stacked-bar figure ``timing_phases``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from . import autocast_for, dataset_summaries, parse_overrides, run_config, sync, write_csv, write_json

NAME = "timing"
DEFAULTS = {"methods": ["linear", "vpt-shallow", "vpt-deep", "pro-vpt", "pro-vpt-pass"], "epochs": 3,
            "warmup_epochs": 1, "eval": True, "max_batches": None}
VARIANTS = {"pro-vpt-pass": ("pro-vpt", {"relocation.scoring": "pass"}),
            "pro-vpt-online": ("pro-vpt", {"relocation.scoring": "online"})}
PHASES = ("data", "forward_backward", "optimizer", "scoring", "allocation", "eval", "other")
REFERENCE = "vpt-deep"


# ----------------------------------------------------------------------------- clocks


class Clock:
    """Per-phase seconds; CUDA events for the per-batch phases, host timers for the others."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host: dict[str, float] = defaultdict(float)
        self.events: dict[str, list] = defaultdict(list)

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
    """A method set up for timing: model, optimiser, relocator (instrumented), config."""

    def __init__(self, name: str, cfg, data, device):
        import torch

        from ..model.methods import build_model, count_parameters
        from ..train import make_optimizer

        self.name, self.cfg, self.data, self.device = name, cfg, data, device
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, data.num_classes).to(device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.params = count_parameters(self.model)
        self.relocator = None
        if cfg.method == "pro-vpt" and cfg.relocation.enabled:
            from ..relocation.relocator import Relocator

            self.relocator = Relocator(cfg.relocation, self.model.num_blocks, self.model.prompts.total, cfg.seed)
        self.autocast = autocast_for(cfg, device)

    def instrument(self, clock: Clock) -> None:
        """Wrap the relocator's scoring and allocator calls (on this instance only) with ``clock``."""
        r = self.relocator
        if r is None:
            return
        for obj, attr, phase in ((r, "_scores", "scoring"), (r.allocator, "act", "act"),
                                 (r.allocator, "reward", "ppo_update")):
            fn = getattr(obj, attr, None)
            if fn is None:
                continue
            orig = getattr(fn, "__wrapped_orig__", fn)

            def wrapped(*a, _orig=orig, _phase=phase, **k):
                with clock.once(_phase):
                    return _orig(*a, **k)

            wrapped.__wrapped_orig__ = orig
            setattr(obj, attr, wrapped)


def timed_epoch(m: Method, epoch: int, do_eval: bool = True, max_batches: int | None = None) -> dict:
    """One epoch of ``m`` with every phase timed; the same operations as ``train.train_epoch``."""
    import torch
    import torch.nn.functional as F

    from ..model.methods import trainable_parameters
    from ..train import evaluate, lr_at

    cfg, data, model, optimizer = m.cfg, m.data, m.model, m.optimizer
    clock, mem = Clock(m.device), Memory(m.device)
    m.instrument(clock)
    mem.begin()
    sync(m.device)
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, epoch)
    moves = []
    if m.relocator is not None:
        train_batches = lambda: data.batches(cfg.train_split, cfg.batch_size)  # noqa: E731
        with clock.once("relocation"), m.autocast:
            moves = m.relocator.start_epoch(epoch, model, train_batches, F.cross_entropy)
    mem.sample()

    model.train()
    params = [p for _, p in trainable_parameters(model)]
    split = cfg.train_split
    n = len(data.splits[split][1])
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    dev = data.mean.device
    loss_sum, correct, batches, images = torch.zeros((), device=dev), torch.zeros((), device=dev), 0, 0
    for s in range(0, n, cfg.batch_size):
        if max_batches and batches >= max_batches:
            break
        with clock.batch("data"):
            x, y = data.batch(split, order[s:s + cfg.batch_size].to(data.splits[split][1].device), True, gen)
        with clock.batch("forward_backward"):
            with m.autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            mem.sample()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with clock.batch("optimizer"):
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
        loss_sum += loss.detach()
        correct += (logits.argmax(-1) == y).sum()
        batches += 1
        images += len(y)
    loss_sum, correct = loss_sum.item(), correct.item()
    if m.relocator is not None:
        with clock.once("scoring_end"):
            m.relocator.end_epoch(epoch, model, batches, loss_sum / batches, loss_sum / cfg.batch_size)
    mem.sample()
    evals = {}
    if do_eval:
        with clock.once("eval"):
            evals = evaluate(model, data, cfg.eval_splits[0], m.autocast)
    sync(m.device)
    wall = time.perf_counter() - t0
    t = clock.totals()
    scoring = t.get("scoring", 0.0) + t.get("scoring_end", 0.0)
    allocation = max(0.0, t.get("relocation", 0.0) - t.get("scoring", 0.0))
    phases = {"data": t.get("data", 0.0), "forward_backward": t.get("forward_backward", 0.0),
              "optimizer": t.get("optimizer", 0.0), "scoring": scoring, "allocation": allocation,
              "eval": t.get("eval", 0.0)}
    phases["other"] = max(0.0, wall - sum(phases.values()))
    return {"method": m.name, "epoch": epoch, "wall_s": wall, **{f"{k}_s": v for k, v in phases.items()},
            "act_s": t.get("act", 0.0), "ppo_update_s": t.get("ppo_update", 0.0), "moves": len(moves),
            "batches": batches, "train_images": images,
            "eval_images": len(data.splits[cfg.eval_splits[0]][1]) if do_eval else 0,
            "train_loss": loss_sum / max(batches, 1), "train_acc": 100.0 * correct / max(images, 1),
            **mem.end(), **({"eval_acc": evals["acc"]} if evals else {})}


# ----------------------------------------------------------------------------- main


def method_config(profile: dict, run_over: dict, name: str):
    from ..config import METHODS

    method, extra = VARIANTS.get(name, (name, {}))
    if method not in METHODS:
        raise ValueError(f"study timing: unknown method {name!r}; expected one of {[*METHODS, *VARIANTS]}")
    over = {k: v for k, v in run_over.items() if k != "method"}
    return run_config(profile, over, method=method, extra=extra)


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

    from ..train import TaskData, resolve_device

    opts, run_over, hparams = parse_overrides(profile, overrides, NAME, DEFAULTS)
    names = list(opts["methods"])
    cfgs = {n: method_config(profile, {**hparams, **run_over}, n) for n in names}
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
            r = timed_epoch(m, epoch, bool(opts["eval"]), opts["max_batches"])
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


# ----------------------------------------------------------------------------- report


def read_benchmarks(root: Path) -> "pd.DataFrame":
    """Snakemake ``benchmark:`` files (TSV with an ``s`` column) under ``root``, one row per file;
    method and stage are read off the path's components (``/``, ``_`` and ``.`` separated)."""
    import re

    import pandas as pd

    from ..config import METHODS

    stages = ("search", "final", "prepare", "pretrain", "study", "studies", "select", "report", "train")
    rows = []
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            df = pd.read_csv(p, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue
        if "s" not in df.columns or df.empty:
            continue
        tokens = [t for part in p.relative_to(root).with_suffix("").parts for t in re.split(r"[_.]", part)]
        tokens += list(p.relative_to(root).with_suffix("").parts)
        method = next((t for t in tokens if t in METHODS), "")
        stage = next((t for t in tokens if t in stages), "")
        rows.append({"file": p.relative_to(root).as_posix(), "stage": stage, "method": method,
                     "s": float(pd.to_numeric(df["s"], errors="coerce").mean()),
                     "max_rss_mb": float(pd.to_numeric(df["max_rss"], errors="coerce").mean())
                     if "max_rss" in df.columns else float("nan")})
    return pd.DataFrame(rows)


def benchmark_table(bench: "pd.DataFrame") -> "pd.DataFrame":
    agg = (bench.groupby(["stage", "method"], dropna=False)
           .agg(jobs=("s", "size"), mean_s=("s", "mean"), median_s=("s", "median"), total_s=("s", "sum"),
                max_rss_mb=("max_rss_mb", "mean")).reset_index())
    ref = agg[(agg["method"] == REFERENCE)].set_index("stage")["mean_s"]
    agg["vs_vpt_deep"] = [r.mean_s / ref[r.stage] if r.stage in ref.index and ref[r.stage] > 0 else float("nan")
                          for r in agg.itertuples()]
    return agg


def report(study_dir, tables_dir, figures_dir) -> dict:
    import numpy as np
    import pandas as pd
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from ..report.figures import save
    from ..report.tables import write_table

    study_dir = Path(study_dir)
    summaries = dataset_summaries(study_dir)
    written = {}
    if summaries:
        rows = []
        for _, s in summaries:
            for r in s["methods"]:
                rows.append({"dataset": s["dataset"], "device": s["device"], **r,
                             "trainable_params": s["params"].get(r["method"], {}).get("trainable_params")})
        df = pd.DataFrame(rows)
        cols = ["dataset", "method", "wall_s", "wall_median_s", "wall_vs_vpt_deep", "train_vs_vpt_deep",
                *(f"{p}_s" for p in PHASES),
                "ppo_update_s", "train_images_per_s", "epoch_images_per_s", "mem_peak_mb", "mem_extra_mb",
                "trainable_params", "epochs"]
        notes = [f"{s['dataset']}: {s['device_name']}, {s['threads']} threads, batch {s['batch_size']}, "
                 f"{s['methods'][0]['train_images']} training images per epoch, means over "
                 f"{s['options']['epochs']} timed epochs (after {s['options']['warmup_epochs']} untimed), "
                 f"memory: {s['memory']}" for _, s in summaries]
        notes.append("wall_vs_vpt_deep: epoch wall time / VPT-Deep's in the same process; train_vs_vpt_deep: "
                     "(data + forward/backward + optimiser + scoring + allocation) / VPT-Deep's training phases")
        written["timing"] = write_table(df[[c for c in cols if c in df]], tables_dir, "timing",
                                        "Time per epoch by phase (s), ratios to VPT-Deep, memory (MB)", notes)
        datasets = list(dict.fromkeys(df["dataset"]))
        fig = Figure(figsize=(max(4.5, 1.0 + 1.3 * df["method"].nunique()) * len(datasets) ** 0.5 + 1, 3.8),
                     layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(datasets), squeeze=False)[0])
        colors = colormaps["tab10"]
        for ax, ds in zip(axes, datasets):
            d = df[df["dataset"] == ds]
            bottom = np.zeros(len(d))
            for i, p in enumerate(PHASES):
                v = d[f"{p}_s"].to_numpy(dtype=float)
                ax.bar(d["method"], v, bottom=bottom, label=p.replace("_", "+") if p == "forward_backward" else p,
                       color=colors(i))
                bottom += v
            for x, (tot, ratio) in enumerate(zip(bottom, d["wall_vs_vpt_deep"])):
                ax.text(x, tot, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=7)
            ax.set_title(ds)
            ax.set_ylabel("seconds per epoch")
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle("Time per epoch by phase (label: ratio to VPT-Deep)")
        written["timing_phases"] = save(fig, figures_dir, "timing_phases")
    bench_root = study_dir.parent.parent / "benchmarks"
    if bench_root.is_dir():
        bench = read_benchmarks(bench_root)
        if not bench.empty:
            written["timing_benchmarks"] = write_table(
                benchmark_table(bench), tables_dir, "timing_benchmarks",
                "Snakemake benchmark files: wall seconds per job by stage and method",
                [f"{len(bench)} files under {bench_root.name}/; vs_vpt_deep: mean job time / VPT-Deep's in the "
                 "same stage (jobs may have shared the machine)"])
    if not written:
        return {"skipped": f"{study_dir}: no */summary.json and no benchmark files"}
    return written
