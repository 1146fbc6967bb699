"""The training loop: runs of one method on one dataset, each into its own run folder.

Read top to bottom: set up (device, data, model, optimiser, relocator), resume if a checkpoint
exists, then per epoch: learning rate -> relocation (PRO-VPT) -> train -> evaluate -> checkpoint.
A run folder is complete when ``metrics.json`` exists; every file is written atomically, so a
killed run loses at most the epoch in progress and a rerun resumes from the last checkpoint.

Several runs of one task (other lr, weight decay, seed, prompts or relocation settings) can train
as one *pack* (:func:`run_pack`; :func:`run` is a pack of one): their batches are concatenated
through one shared frozen backbone (:func:`provpt.model.prompted_vit.packed_forward`; in chunks of
``pack_chunk`` runs where memory asks, a chunk halved by itself on out-of-memory), and each run
keeps its own prompts, head, optimiser, gradient clipping, data order, dropout stream, relocator,
checkpoint and run folder. A run computes the same in a pack as alone, up to the order of
floating-point sums (tested), and a killed pack resumes every run where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from .clock import NULL_CLOCK
from .config import PACKABLE, RELOCATING, RunConfig
from .data.task import TaskData
from .io import file_sha256, json_sha256, save_safetensors, save_torch, write_text
from .model.backbone import create_backbone
from .model.methods import build_model, count_parameters, trainable_parameters
from .model.prompted_vit import HeadOnly, chunked, packed_forward
from .runtime import autocast_for, dtype_for, resolve_device

CHECKPOINT = "checkpoint.pt"
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- files


def save_trainable(model, path: Path) -> None:
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}, path)


def load_trainable(model, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_trainable_state(load_file(str(path)))


# ----------------------------------------------------------------------------- set-up


def load_checkpoint(path: Path) -> dict:
    """A run checkpoint, loaded with ``weights_only=True``: tensors and plain containers only, so a
    checkpoint from a shared remote cannot run code; anything else is refused, naming the file.

    Every tensor is loaded to the CPU, whatever device saved it or will use it: the RNG states (torch's,
    the prompt dropout's, the PPO allocator's generator) must stay CPU byte tensors, the relocator's
    state lives on the CPU, and ``load_state_dict`` (model, optimiser) copies each tensor to where its
    parameter lives."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: it holds more than tensors and plain containers "
                         f"(torch.load weights_only=True: {str(e).splitlines()[0]}). Delete the file to "
                         "restart the run, or check where it came from.") from None


def make_optimizer(cfg: RunConfig, model) -> torch.optim.Optimizer:
    params = [p for _, p in trainable_parameters(model)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_run(cfg: RunConfig, num_classes: int, device, backbone=None) -> tuple:
    """What a run trains, built as every run builds it: (model, optimiser, relocator or None);
    ``backbone``: a frozen ViT shared with the other runs of a pack."""
    model = build_model(cfg, num_classes, backbone).to(device, dtype_for(cfg))
    return model, make_optimizer(cfg, model), make_relocator(cfg, model)


def make_relocator(cfg: RunConfig, model):
    """PRO-VPT's relocator for ``model`` (None for every other method, or with relocation off)."""
    if cfg.method not in RELOCATING or not cfg.relocation.enabled:
        return None
    from .relocation.relocator import Relocator

    return Relocator(cfg.relocation, model.num_blocks, model.prompts.total, cfg.seed, grad_clip=cfg.grad_clip,
                     epochs=cfg.epochs)


def lr_at(cfg: RunConfig, epoch: int) -> float:
    """Constant (the authors') or cosine, both with an optional linear warm-up, per epoch."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        t = (epoch - cfg.warmup_epochs) / max(1, cfg.epochs - cfg.warmup_epochs)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr


def save_epochs(cfg: RunConfig) -> set[int]:
    """Epoch indices (completed epochs, 0 = before training) at which a study keeps a checkpoint."""
    return {int(round(float(f) * cfg.epochs)) for f in cfg.save_at}


# ----------------------------------------------------------------------------- a run of a pack


@dataclass
class Member:
    """One run as the loop trains it: its configuration and everything it owns."""

    cfg: RunConfig
    model: object
    optimizer: torch.optim.Optimizer
    relocator: object = None
    forward: object = None  # the (compiled) model to call; ``model`` by default
    out: Path | None = None
    history: list = field(default_factory=list)
    wall: float = 0.0
    start: int = 0  # the first epoch still to train
    chunk: int = 0  # runs of its pack per forward/backward (cfg.pack_chunk; 0: all; halved on out-of-memory)

    def __post_init__(self):
        self.forward = self.forward or self.model
        self.chunk = self.chunk or self.cfg.pack_chunk
        self.params = [p for _, p in trainable_parameters(self.model)]


# Keys in which the runs of one pack may differ; every other key must be equal (one task, one data
# order length, one backbone, one schedule of epochs and evaluations, one device).
PACK_FREE = frozenset({"lr", "weight_decay", "seed", "out", "relocation", "num_prompts", "method", "momentum",
                       "head_init", "grad_clip", "optimizer", "schedule", "warmup_epochs", "prompt_dropout",
                       "checkpoint_every", "save_at", "progress"})


def check_pack(cfgs: list[RunConfig]) -> None:
    """Can these runs train as one pack? Raises a ValueError naming the first key they differ in."""
    if len(cfgs) < 2:
        return
    bad = [c.method for c in cfgs if c.method not in PACKABLE]
    if bad:
        raise ValueError(f"pack: method(s) {sorted(set(bad))} train backbone weights and cannot share one "
                         f"backbone; packable: {list(PACKABLE)}")
    if len({c.method == "vpt-shallow" for c in cfgs}) > 1:
        raise ValueError("pack: vpt-shallow (prompts carried through the depth) cannot pack with deep prompts")
    first = cfgs[0].to_dict()
    for c in cfgs[1:]:
        d = c.to_dict()
        for key in first:
            if key not in PACK_FREE and d[key] != first[key]:
                raise ValueError(f"pack: {key} differs between runs ({first[key]!r} in {cfgs[0].out}, "
                                 f"{d[key]!r} in {c.out}); runs of one pack may differ only in {sorted(PACK_FREE)}")


# ----------------------------------------------------------------------------- linear probes on cached features


class FeatureData(TaskData):
    """A :class:`TaskData` whose splits hold each image's pre-logit features instead of the image."""

    def __init__(self, data: TaskData, splits: dict):
        self.__dict__.update(data.__dict__)
        self.splits, self.crop = splits, None

    def batch(self, split: str, idx: torch.Tensor, train: bool, gen: torch.Generator | None = None):
        feats, labels = self.splits[split]  # already normalised and never augmented
        return feats[idx], labels[idx]


def _stochastic(module: torch.nn.Module) -> list[str]:
    """Names of the modules that draw random numbers in training mode (dropout, drop-path, patch dropout)."""
    return [n for n, mod in module.named_modules()
            if any(float(getattr(mod, a, 0) or 0) > 0 for a in ("p", "drop_prob", "prob"))
            and type(mod).__name__ in ("Dropout", "DropPath", "PatchDropout")]


def feature_cache(members: list[Member], data: TaskData, autocast, splits) -> TaskData | None:
    """Linear probes train only a head on a frozen backbone: when every run of the pack is one, the
    images are not augmented and the backbone is deterministic in training mode, each image's pre-logit
    features are computed once (``splits``, batches of 256, no gradient) and the epochs train the heads
    on them; each member's forward becomes its head (:class:`HeadOnly`). The same computation as
    running the backbone every step, up to the order of float reductions (tested in float64). None
    (nothing changed) where it does not apply or ``feature_cache`` is off."""
    cfg, model = members[0].cfg, members[0].model
    if not all(m.cfg.method == "linear" and m.cfg.feature_cache for m in members) or data.crop:
        return None
    stochastic = _stochastic(model.vit)
    if stochastic:
        log.info("feature cache off: the backbone is stochastic in training (%s)", ", ".join(stochastic[:3]))
        return None
    was = model.training
    model.eval()
    feats = {}
    with torch.no_grad(), autocast:
        for split in dict.fromkeys([cfg.train_split, *splits]):
            _, labels = data.splits[split]
            parts = [model.features(x) for x, _ in data.batches(split, 256)]
            feats[split] = (torch.cat(parts).to(data.dtype), labels)
    model.train(was)
    for m in members:
        m.forward = HeadOnly(m.model)
    return FeatureData(data, feats)


# ----------------------------------------------------------------------------- phases


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: float32 (bf16 autocast output widened), float64 kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


def train_members(members: list[Member], data: TaskData, epoch: int, autocast, clock=NULL_CLOCK,
                  max_batches: int | None = None, forward=packed_forward) -> list[dict]:
    """One pass over the training split (or its first ``max_batches`` batches) for every run: each its
    own data order; the runs' batches concatenated through one forward and backward, or through one per
    chunk of runs (:func:`pack_chunks`); each its own clipping and step once every chunk's backward is
    done. Metrics accumulate on the device (one sync at the end). ``clock`` times the phases
    (:mod:`provpt.clock`); ``forward(models, x, sizes)`` is :func:`packed_forward` (a test's stand-in)."""
    cfg = members[0].cfg
    for m in members:
        m.model.train()
    labels = data.splits[cfg.train_split][1]
    n = len(labels)
    gens = [torch.Generator().manual_seed(m.cfg.seed * 100_003 + epoch) for m in members]
    orders = [torch.randperm(n, generator=g).to(labels.device) for g in gens]  # one copy, no per-batch sync
    zero = torch.zeros((), device=labels.device, dtype=data.dtype)
    loss_sums, corrects = [zero.clone() for _ in members], [zero.clone() for _ in members]
    batches = images = 0
    for start in range(0, n, cfg.batch_size):
        if max_batches and batches >= max_batches:
            break
        with clock.batch("data"):
            parts = [data.batch(cfg.train_split, o[start:start + cfg.batch_size], True, g) for o, g in zip(orders, gens)]
        with clock.batch("forward_backward"):
            for m in members:
                m.optimizer.zero_grad(set_to_none=True)
            logits, losses = [None] * len(members), [None] * len(members)

            def step(lo: int, hi: int) -> None:
                xs, ys = [xb for xb, _ in parts[lo:hi]], [y for _, y in parts[lo:hi]]
                with autocast:
                    z = forward([m.forward for m in members[lo:hi]], xs[0] if len(xs) == 1 else torch.cat(xs),
                                [len(y) for y in ys])
                chunk = [F.cross_entropy(_wide(zj), y) for zj, y in zip(z, ys)]
                clock.mark("forward")
                (chunk[0] if len(chunk) == 1 else torch.stack(chunk).sum()).backward()
                logits[lo:hi], losses[lo:hi] = [zj.detach() for zj in z], [loss.detach() for loss in chunk]

            pack_chunks(members, step)
        with clock.batch("optimizer"):
            for m in members:
                if m.cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(m.params, m.cfg.grad_clip)
                m.optimizer.step()
        for j, (z, (_, y)) in enumerate(zip(logits, parts)):
            loss_sums[j] += losses[j]
            corrects[j] += (z.argmax(-1) == y).sum()
        batches += 1
        images += len(parts[0][1])
    return [{"train_loss": s / batches, "train_acc": 100.0 * c / images, "train_loss_faithful": s / m.cfg.batch_size,
             "batches": batches, "images": images}
            for m, s, c in zip(members, torch.stack(loss_sums).tolist(), torch.stack(corrects).tolist())]


def pack_chunks(members: list[Member], work, grads: bool = True) -> None:
    """``work(lo, hi)`` (a forward and its backward over ``members[lo:hi]``) on chunks of the pack, as
    :func:`provpt.model.prompted_vit.chunked` runs them: at most ``pack_chunk`` runs each (0: all at
    once), so that the saved activations of one chunk only are alive at a time (the runs share no
    trainable parameter: the same numbers, up to the order of float sums); on out-of-memory the chunk
    is halved and redone from where it started, and the pack keeps the smaller size from then on.
    ``grads``: ``work`` accumulates into ``.grad`` (training), which a redone chunk then puts back."""
    k = len(members)

    def split(size: int) -> None:
        log.warning("%s: out of memory with a pack of %d runs; forward/backward now %d runs at a time "
                    "(pack_chunk=%d starts there)", members[0].cfg.dataset, k, size, size)

    size = chunked([m.model for m in members], min(m.chunk or k for m in members), work, split, grads)
    for m in members:
        m.chunk = size if size < k else m.chunk


def train_epoch(model, data: TaskData, cfg: RunConfig, optimizer, epoch: int, autocast, clock=NULL_CLOCK,
                max_batches: int | None = None) -> dict:
    """One pass of one run (:func:`train_members` of a pack of one); ``model`` may be compiled."""
    plain = getattr(model, "_orig_mod", model)
    return train_members([Member(cfg, plain, optimizer, forward=model)], data, epoch, autocast, clock, max_batches)[0]


@torch.no_grad()
def evaluate_models(models: list, data: TaskData, split: str, autocast, batch_size: int = 256) -> list[dict]:
    """Accuracy and mean loss of every model on ``split``, each batch through all of them in one forward."""
    for m in models:
        m.eval()
    dev = data.mean.device
    loss_sums = torch.zeros(len(models), device=dev, dtype=data.dtype)
    corrects = torch.zeros(len(models), device=dev)
    for x, y in data.batches(split, batch_size):
        with autocast:
            xs = x if len(models) == 1 else x.repeat(len(models), *([1] * (x.dim() - 1)))
            logits = packed_forward(models, xs, [len(y)] * len(models))
        for j, z in enumerate(logits):
            z = _wide(z)
            loss_sums[j] += F.cross_entropy(z, y, reduction="sum")
            corrects[j] += (z.argmax(-1) == y).sum()
    n = len(data.splits[split][1])
    return [{"acc": 100.0 * c / n, "loss": s / n} for s, c in zip(loss_sums.tolist(), corrects.tolist())]


def evaluate(model, data: TaskData, split: str, autocast, batch_size: int = 256) -> dict:
    return evaluate_models([model], data, split, autocast, batch_size)[0]


def oracle_lookahead(m: Member, data: TaskData, epoch: int, autocast):
    """The oracle allocator's trials for run ``m`` at ``epoch``: ``lookahead(prompt)`` returns, per target
    block, the loss on ``relocation.oracle_probe`` held-out training images after moving the prompt there
    and training ``relocation.oracle_steps`` batches (the epoch's first, as training will see them) with
    a copy of the optimiser; the source block is the no-move trial. The run is left as it was
    (parameters, prompt blocks, optimiser, dropout stream, accumulated scores)."""
    import copy

    from .relocation.idleness import reset_online

    cfg, r, bank = m.cfg, m.cfg.relocation, m.model.prompts
    n = len(data.splits[cfg.train_split][1])
    if r.oracle_steps * cfg.batch_size + r.oracle_probe > n:
        raise ValueError(f"relocation.oracle_steps={r.oracle_steps} batches of {cfg.batch_size} plus "
                         f"oracle_probe={r.oracle_probe} images exceed the {n} training images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    probe = data.batch(cfg.train_split, order[n - r.oracle_probe:].to(data.mean.device), False)

    def lookahead(k: int) -> list[float]:
        snapshot = {name: t.detach().clone() for name, t in m.model.trainable_state().items()}
        state = copy.deepcopy(m.optimizer.state_dict())
        source, losses = int(bank.block[k]), []
        for target in range(bank.num_blocks):
            m.model.load_trainable_state(snapshot)
            if target != source:
                bank.move(k, target, r.scale)
            trial = Member(cfg, m.model, make_optimizer(cfg, m.model))
            trial.optimizer.load_state_dict(copy.deepcopy(state))
            with bank.fork_rng(cfg.seed * 1_000_003 + epoch):
                train_members([trial], data, epoch, autocast, max_batches=r.oracle_steps)
            m.model.eval()
            with torch.no_grad(), autocast:
                losses.append(float(F.cross_entropy(_wide(m.model(probe[0])), probe[1])))
        m.model.load_trainable_state(snapshot)
        reset_online(bank)  # the trials' gate gradients are not scores
        return losses

    return lookahead


# The scoring pass's shuffled order: a stream of its own, its seed the training order's seed
# (seed * 100_003 + epoch) with bits 18-30 flipped, so no epoch's pass (of fewer than 2**18 epochs)
# draws a training epoch's order (torch's CPU generator keeps 32 bits of a seed), and training draws
# the same order with the pass as without it.
PASS_STREAM = 0x5EEC << 16


def pass_batches(cfg: RunConfig, data: TaskData, epoch: int):
    """The batches of a run's scoring pass at ``epoch`` (``relocation.pass_order``), as a callable:
    ``fixed``, the training split in its stored order, not augmented; ``shuffled`` (the authors': their
    pass iterates the shuffled, augmented training loader), a permutation and, for FGVC, random crops
    and flips drawn like a training epoch's, from a generator of the run's seed and the epoch only
    (``PASS_STREAM``), so a resumed run draws the same and training's own order is unchanged."""
    split, size = cfg.train_split, cfg.batch_size
    if cfg.relocation.pass_order == "fixed":
        return lambda: data.batches(split, size)

    def shuffled():
        gen = torch.Generator().manual_seed((cfg.seed * 100_003 + epoch) ^ PASS_STREAM)
        order = torch.randperm(len(data.splits[split][1]), generator=gen)
        return data.batches(split, size, order, train=True, gen=gen)

    return shuffled


def scoring_pass(members: list[Member], data: TaskData, epoch: int, forward=packed_forward) -> list[tuple]:
    """The authors' scoring pass of every run of ``members`` at ``epoch`` (their relocators'
    ``needs_pass``) as one packed pass: each run its own batches (:func:`pass_batches`), one forward and
    one backward per step for the pack (in chunks as training: :func:`pack_chunks`), per-run gradients
    (:func:`provpt.relocation.relocator.scoring_passes`). Returns (scores, losses) per run, each
    equal to its pass alone."""
    from .relocation.relocator import scoring_passes

    runs = [pass_batches(m.cfg, data, epoch) for m in members]
    return scoring_passes([(m.relocator, m.forward) for m in members], lambda: zip(*[b() for b in runs]),
                          F.cross_entropy, epoch, forward, lambda work: pack_chunks(members, work, grads=False))


def run_members(members: list[Member], data: TaskData, epoch: int, autocast, eval_splits=(), clock=NULL_CLOCK,
                max_batches: int | None = None) -> list[dict]:
    """One epoch of a pack as :func:`run_pack` trains it: the scoring passes of the runs that take one,
    as one packed pass (:func:`scoring_pass`) -> learning rates -> relocation (PRO-VPT, each run on its
    own) -> train -> the relocators' bookkeeping -> evaluation of ``eval_splits``.
    Returns each run's history row (without the distribution); shared phases' seconds are split
    evenly among the runs."""
    k = len(members)
    relocation, moves = [0.0] * k, []
    passing = [j for j, m in enumerate(members) if m.relocator is not None and m.relocator.needs_pass(epoch)]
    scored = {}
    if passing:  # the authors' scoring passes of the pack, as one packed pass
        r0 = time.perf_counter()
        with clock.once("relocation"), clock.once("scoring"), autocast:
            scored = dict(zip(passing, scoring_pass([members[j] for j in passing], data, epoch)))
        for j in passing:
            relocation[j] += (time.perf_counter() - r0) / len(passing)
    for j, m in enumerate(members):
        for group in m.optimizer.param_groups:
            group["lr"] = lr_at(m.cfg, epoch)
        r0 = time.perf_counter()
        if m.relocator is not None:
            train_batches = lambda m=m: data.batches(m.cfg.train_split, m.cfg.batch_size)  # noqa: E731 (fixed order)
            oracle = oracle_lookahead(m, data, epoch, autocast) if m.cfg.relocation.allocator == "oracle" else None
            with clock.once("relocation"), autocast:
                moves.append(m.relocator.start_epoch(epoch, m.forward, train_batches, F.cross_entropy, clock, oracle,
                                                     scored.get(j)))
        else:
            moves.append([])
        relocation[j] += time.perf_counter() - r0
    t1 = time.perf_counter()
    stats = train_members(members, data, epoch, autocast, clock, max_batches)
    for m, st in zip(members, stats):
        if m.relocator is not None:
            m.relocator.end_epoch(epoch, m.model, st["batches"], st["train_loss"], st["train_loss_faithful"], clock)
    t2 = time.perf_counter()
    with clock.once("eval"):
        per_split = {s: evaluate_models([m.forward for m in members], data, s, autocast) for s in eval_splits}
    t3 = time.perf_counter()
    return [{"epoch": epoch, "lr": lr_at(m.cfg, epoch), **st, "eval": {s: v[j] for s, v in per_split.items()},
             "moves": len(moves[j]), "time_s": {"relocation": relocation[j], "train": (t2 - t1) / k, "eval": (t3 - t2) / k}}
            for j, (m, st) in enumerate(zip(members, stats))]


def run_epoch(model, data: TaskData, cfg: RunConfig, optimizer, relocator, epoch: int, autocast,
              eval_splits=(), forward_model=None, clock=NULL_CLOCK, max_batches: int | None = None) -> dict:
    """One epoch of one run (:func:`run_members` of a pack of one); ``forward_model``: the compiled
    model to call, ``model`` by default."""
    m = Member(cfg, model, optimizer, relocator, forward_model)
    return run_members([m], data, epoch, autocast, eval_splits, clock, max_batches)[0]


# ----------------------------------------------------------------------------- the runs


def run(cfg: RunConfig, on_epoch_end=None) -> dict:
    """Train ``cfg`` into ``cfg.out`` (resuming if a checkpoint is there); returns the metrics."""
    return run_pack([cfg], on_epoch_end)[0]


def _resume(m: Member) -> None:
    """Continue ``m`` from its run folder's checkpoint, if any (loaded to the CPU; the model and the
    optimiser place their tensors on the run's device)."""
    if not (m.out / CHECKPOINT).exists():
        return
    ck = load_checkpoint(m.out / CHECKPOINT)
    m.model.load_trainable_state(ck["model"])
    m.optimizer.load_state_dict(ck["optimizer"])
    if ck.get("dropout_rng") is not None:
        m.model.prompts.set_rng_state(ck["dropout_rng"])
    if m.relocator is not None:
        m.relocator.load_state_dict(ck["relocator"])
    m.start, m.history, m.wall = ck["epoch"], ck["history"], ck["wall_time_s"]


def _checkpoint(m: Member, epoch: int) -> dict:
    return {"epoch": epoch, "model": m.model.trainable_state(), "optimizer": m.optimizer.state_dict(),
            "rng": torch.get_rng_state(), "dropout_rng": m.model.prompts.rng_state(),
            "history": m.history, "wall_time_s": m.wall,
            "relocator": m.relocator.state_dict() if m.relocator is not None else None}


def _end_epoch(m: Member, row: dict, epoch: int, packed: int) -> None:
    """Book an epoch of one run: history, log line, checkpoint, logs."""
    cfg = m.cfg
    seconds = sum(row["time_s"].values())
    m.wall += seconds
    m.history.append({**row, "distribution": m.model.distribution()})
    evals = row["eval"]
    log.info("%s/%s seed %d%s epoch %d/%d: loss %.4f, train acc %.2f%%%s, %d move(s), %.1f s", cfg.dataset,
             cfg.method, cfg.seed, f" lr {cfg.lr:g} wd {cfg.weight_decay:g}" if packed > 1 else "", epoch + 1,
             cfg.epochs, row["train_loss"], row["train_acc"],
             "".join(f", {s} {v['acc']:.2f}%" for s, v in evals.items()), row["moves"], seconds)
    keep = save_epochs(cfg)
    last = epoch == cfg.epochs - 1
    if (epoch + 1) % cfg.checkpoint_every == 0 or last or epoch + 1 in keep:
        ck = _checkpoint(m, epoch + 1)
        save_torch(ck, m.out / CHECKPOINT)
        if epoch + 1 in keep:
            save_torch(ck, m.out / "checkpoints" / f"epoch{epoch + 1:03d}.pt")
    write_logs(m.out, m.history, m.relocator)


def run_pack(cfgs: list[RunConfig], on_epoch_end=None) -> list[dict]:
    """Train the runs ``cfgs`` together (:func:`check_pack`), each into its ``out`` folder; finished
    runs are read, unfinished ones resume from their checkpoints. Returns every run's metrics."""
    results = [None] * len(cfgs)
    todo = []
    for i, cfg in enumerate(cfgs):
        done = Path(cfg.out) / "metrics.json"
        if done.exists():
            results[i] = json.loads(done.read_text())
            retain(Path(cfg.out), cfg.keep)  # (what a kill between metrics.json and the clean-up left)
        else:
            todo.append(i)
    if not todo:
        return results
    cfgs_todo = [cfgs[i] for i in todo]
    check_pack(cfgs_todo)
    first = cfgs_todo[0]
    if first.threads > 0:
        torch.set_num_threads(first.threads)
    device = resolve_device(first)
    autocast = autocast_for(first, device)
    data = TaskData(first, device)  # a missing dataset fails here, before any run folder exists
    shared = None
    if len(todo) > 1:
        shared = create_backbone(first.backbone, first.weights, **first.backbone_kwargs).to(device, dtype_for(first))
    members = []
    for cfg in cfgs_todo:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        model, optimizer, relocator = build_run(cfg, data.num_classes, device, shared)
        forward = torch.compile(model) if cfg.compile and shared is None else model
        m = Member(cfg, model, optimizer, relocator, forward, out)
        _resume(m)
        if m.start == 0 and 0 in save_epochs(cfg):
            save_torch(_checkpoint(m, 0), out / "checkpoints" / "epoch000.pt")
        members.append(m)

    cached = feature_cache(members, data, autocast, first.eval_splits)
    data = cached or data
    begin = min(m.start for m in members)
    name = f"{first.dataset}/{first.method}" + (f" x{len(members)}" if len(members) > 1 else "")
    bar = tqdm(range(begin, first.epochs), initial=begin, total=first.epochs, disable=not first.progress,
               desc=name, leave=False)
    for epoch in bar:
        active = [m for m in members if m.start <= epoch]
        last = epoch == first.epochs - 1
        splits = [s for s in first.eval_splits if last or (epoch + 1) % first.eval_every == 0]
        rows = run_members(active, data, epoch, autocast, splits)
        for m, row in zip(active, rows):
            _end_epoch(m, row, epoch, len(members))
        if rows[0]["eval"]:
            bar.set_postfix(loss=f"{rows[0]['train_loss']:.3f}",
                            **{s: f"{v['acc']:.1f}" for s, v in rows[0]["eval"].items()})
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    for i, m in zip(todo, members):
        if m.cfg.keep != "metrics":
            save_trainable(m.model, m.out / "trainable.safetensors")
        metrics = final_metrics(m.cfg, m.model, data, m.history, m.wall, len(members))
        write_text(m.out / "metrics.json", json.dumps(metrics, indent=2))
        retain(m.out, m.cfg.keep)  # only now: a run killed before this point resumes from its checkpoint
        results[i] = metrics
    return results


def retain(out: Path, keep: str) -> None:
    """Apply the retention policy ``keep`` to the finished run folder ``out`` (its ``metrics.json``
    written): ``all`` keeps everything; ``weights`` deletes the resume checkpoint (trainable state,
    optimiser state, RNG); ``metrics`` also the trainable weights, leaving config.yaml, metrics.json,
    history.jsonl, distribution.csv and moves.jsonl. The copies a study reads (``checkpoints/``) stay."""
    drop = {"all": (), "weights": (CHECKPOINT,), "metrics": (CHECKPOINT, "trainable.safetensors")}[keep]
    for name in drop:
        (out / name).unlink(missing_ok=True)


def write_logs(out: Path, history: list, relocator) -> None:
    write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    L = len(history[0]["distribution"])
    rows = ["epoch," + ",".join(f"b{i}" for i in range(L))]
    rows += [f"{h['epoch']}," + ",".join(map(str, h["distribution"])) for h in history]
    write_text(out / "distribution.csv", "\n".join(rows) + "\n")
    if relocator is not None:
        write_text(out / "moves.jsonl", "".join(json.dumps(m) + "\n" for m in relocator.moves))


def final_metrics(cfg: RunConfig, model, data: TaskData, history: list, wall: float, packed: int = 1) -> dict:
    import timm

    import provpt

    last = history[-1]
    return {
        "dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed, "lr": cfg.lr,
        "weight_decay": cfg.weight_decay, "epochs": cfg.epochs, "train_split": cfg.train_split,
        "eval": last["eval"], "train_loss": last["train_loss"], "train_acc": last["train_acc"],
        **count_parameters(model), "num_prompts": model.prompts.total, "prompts_per_block": cfg.num_prompts,
        "distribution": model.distribution(), "wall_time_s": wall, "packed_runs": packed,
        "backbone": cfg.backbone, "weights_sha256": file_sha256(cfg.weights),
        "data_manifest_sha256": json_sha256(data.manifest),
        "data_variant": data.variant, "norm": cfg.norm, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "selection_rule": "last-epoch accuracy on the search eval split; ties to the smaller lr",
        "versions": {"provpt": provpt.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }
