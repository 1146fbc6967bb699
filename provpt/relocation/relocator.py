"""PRO-VPT's outer loop: score prompts, prune the idlest, allocate it, reward the move an epoch later.

The training loop calls, per epoch::

    moves = relocator.start_epoch(epoch, model, batches, loss_fn)   # before training
    ... train (loss.backward() also fills model.prompts.gates.grad) ...
    relocator.end_epoch(epoch, model, num_batches, loss_mean, loss_faithful)

The move itself is :func:`relocate`, a pure step on a prompt bank, per-prompt scores and an
allocator (no model, no data: testable without a ViT); the :class:`Relocator` around it gets the
scores, settles rewards and keeps the state a checkpoint needs.

Scores: ``online`` (default) uses the gate gradients accumulated during the previous epoch's
training, so nothing extra runs and the global RNG is never touched; ``pass`` runs the authors'
scoring pass at the start of the epoch (under ``fork_rng``, so training's random stream is the same
as without it) and, as they do, takes the reward's losses from that pass; the training loop runs the
passes of a pack's runs as one (:func:`scoring_passes`) and hands each relocator its result.
``pruning='norm'`` is the authors' norm ablation: always move, reward without the idleness correction.

Reward of the moves made at epoch t, settled at the start of epoch t+1:
``loss_before - loss_after - max_k score_k`` (online: training losses of epochs t-1 and t;
pass: pass losses at the starts of t and t+1). ``reward='mean'`` uses per-sample mean losses,
``'faithful'`` the authors' sum of batch-mean losses / batch size.

``clock`` (optional, e.g. the timing study's): ``clock.once(phase)`` contexts around scoring
(``scoring``, ``scoring_end``), the allocator's action (``act``) and the reward/PPO update
(``ppo_update``); the default does nothing.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import torch

from ..clock import NULL_CLOCK
from .allocators import make_allocator
from .idleness import block_sums, norm_scores, online_scores, reset_online, taylor_passes, true_idleness


def allocator_state(bank, scores: torch.Tensor, pruning: str) -> torch.Tensor:
    """Per-block sums the allocator sees: idleness scores, or prompt norms for norm pruning."""
    if pruning == "norm":
        return block_sums(bank.values.detach().float().norm(dim=1), bank.block, bank.num_blocks)
    return block_sums(scores, bank.block, bank.num_blocks)


def relocate(bank, scores: torch.Tensor, allocator, cfg, epoch: int, clock=NULL_CLOCK, verify=None,
             lookahead=None) -> list[dict]:
    """Prune the highest-scoring prompt(s) and let ``allocator`` place each; returns move records.

    ``cfg``: a :class:`~provpt.config.RelocationConfig` (``count`` prompts per step, ``scale``,
    ``pruning``, ``verify``). Taylor pruning moves a prompt only if its score is > 0. A prompt
    "moved" to its own block is left untouched (as the authors do) but still recorded and rewarded.
    ``verify(prompts) -> exact idleness`` (shortlist-and-verify): the ``cfg.verify`` highest scores
    are a shortlist, and the prompt pruned is the shortlist's highest exact idleness (which must be
    > 0); the first-order scores still form the allocator's state. ``lookahead(prompt) -> held-out
    loss per target block`` (the oracle allocator's trials, made by the training loop).
    """
    records = []
    scores = scores.clone().double()
    candidates = torch.ones(bank.total, dtype=torch.bool)
    inf = float("-inf")
    for _ in range(cfg.count):
        masked = scores.masked_fill(~candidates, inf)
        exact = None
        if verify is not None and not allocator.pair:
            short = torch.topk(masked, min(cfg.verify, int(candidates.sum()))).indices
            with clock.once("verify"):
                exact = verify(short.tolist())
            k = int(short[exact[short].argmax()])
            decide = float(exact[k])
        else:
            k = int(masked.argmax())
            decide = float(masked[k])
        if cfg.pruning == "taylor" and not decide > 0:
            break
        block, dist, state = bank.block.cpu(), bank.distribution().cpu(), allocator_state(bank, scores, cfg.pruning)
        if allocator.pair:
            with clock.once("act"):
                target, info = allocator.act(state, dist, None, bank.total)
            source = info["source"]
            within = scores.masked_fill(block != source, inf)
            pick = within.masked_fill(~candidates, inf)
            k = int((pick if pick.max() > inf else within).argmax())
        else:
            source = int(block[k])
            after = dist.clone()
            after[source] -= 1
            with clock.once("act"):
                if getattr(allocator, "oracle", False):
                    target, info = allocator.act(state, after, source, bank.total, losses=lookahead(k))
                else:
                    target, info = allocator.act(state, after, source, bank.total)
        score = float(scores[k])
        if target != source:
            bank.move(k, target, cfg.scale)
            if cfg.pruning == "norm":
                scores = norm_scores(bank).double()
            else:
                scores[k] *= cfg.scale  # first-order score of the scaled prompt
        candidates[k] = False
        records.append({"epoch": epoch, "prompt": k, "source": source, "target": int(target),
                        "score": score, **({"exact": decide} if exact is not None else {}),
                        **({"lookahead": info["lookahead"]} if "lookahead" in info else {}),
                        "probs": info["probs"],
                        "distribution": bank.distribution().tolist(), "reward": None})
    return records


def scoring_passes(runs, batches, loss_fn, epoch: int, forward=None, chunks=None) -> list[tuple]:
    """The authors' scoring pass at ``epoch`` for several runs at once: ``runs``, (relocator, model)
    pairs; ``batches()`` yields per step one ``(x, y)`` per run. One packed forward and backward per
    step with per-run gradients (:func:`~provpt.relocation.idleness.taylor_passes`; ``forward`` and
    ``chunks`` as there), each run with its own clipping and idleness, its dropout masks drawn from its
    own side stream of the epoch (:meth:`Relocator.pass_seed`) and torch's global stream forked, so
    training's random streams are the same as without the pass. Returns (scores, losses) per run,
    what each run's pass alone returns."""
    dev = next(runs[0][1].parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), contextlib.ExitStack() as stack:
        for r, model in runs:
            stack.enter_context(model.prompts.fork_rng(r.pass_seed(epoch)))
        return taylor_passes([model for _, model in runs], batches, loss_fn,
                             [r.grad_clip if r.cfg.clip_scores else None for r, _ in runs],
                             [r.cfg.idleness for r, _ in runs], forward, chunks)


class Relocator:
    def __init__(self, cfg, num_blocks: int, total: int, seed: int = 0, grad_clip: float = 0.25,
                 epochs: int | None = None):
        self.cfg, self.num_blocks, self.total, self.grad_clip, self.seed = cfg, num_blocks, total, grad_clip, seed
        self.epochs = epochs  # the run's length, for relocation.until
        self.allocator = make_allocator(cfg, num_blocks, seed)
        self.moves: list[dict] = []  # every move record, rewards filled in when settled
        self.pending: list[int] = []  # indices into self.moves waiting for their reward
        self.loss_before: dict | None = None  # losses measured when the pending moves were made
        self.last_loss: dict | None = None  # last epoch's training losses (from end_epoch)
        self.collected: torch.Tensor | None = None  # online scores of the last epoch

    # ------------------------------------------------------------------ schedule
    def moves_at(self, epoch: int) -> bool:
        c = self.cfg
        if self.epochs is not None and c.until < 1 and epoch >= c.until * self.epochs:
            return False
        return c.enabled and epoch >= c.warmup_epochs and (epoch - c.warmup_epochs) % c.every == 0

    def needs_pass(self, epoch: int) -> bool:
        """Does :meth:`start_epoch` at ``epoch`` take the authors' scoring pass (to move, or to settle
        a pending reward)? The training loop runs the passes of a pack as one (:func:`scoring_passes`)."""
        c = self.cfg
        return c.enabled and c.pruning != "norm" and c.scoring == "pass" and (self.moves_at(epoch) or bool(self.pending))

    def pass_seed(self, epoch: int) -> int:
        """The seed of the side stream the scoring pass at ``epoch`` draws its dropout masks from."""
        return self.seed * 1_000_003 + 7919 * (epoch + 1)

    def _scores(self, model, batches, loss_fn, needed: bool, epoch: int = 0, scored=None):
        """(per-prompt scores, losses now); scores None when unavailable. ``scored``: the scoring pass's
        result when the caller ran it (:func:`scoring_passes`), else the pass runs here on ``batches``."""
        if self.cfg.pruning == "norm":
            return norm_scores(model.prompts), self.last_loss
        if self.cfg.scoring == "online":
            return self.collected, self.last_loss
        if not needed:
            return None, None
        if scored is not None:
            return scored
        return scoring_passes([(self, model)], lambda: ([b] for b in batches()), loss_fn, epoch)[0]

    # ------------------------------------------------------------------ per epoch
    def start_epoch(self, epoch: int, model, batches, loss_fn, clock=NULL_CLOCK, lookahead=None,
                    scored=None) -> list[dict]:
        """Settle the pending reward, then relocate if this epoch is scheduled; returns this epoch's moves.
        ``lookahead``: the oracle allocator's trial moves (:func:`relocate`). ``scored``: this epoch's
        scoring pass (scores, losses), when the caller ran it for several runs at once; otherwise the
        pass runs here over ``batches()``, which also give the verification's probe batches."""
        if not self.cfg.enabled:
            return []
        moving = self.moves_at(epoch)
        with clock.once("scoring"):
            scores, loss = self._scores(model, batches, loss_fn, needed=moving or bool(self.pending), epoch=epoch,
                                        scored=scored)
        reset_online(model.prompts)  # this epoch's training accumulates this epoch's gate gradients only
        with clock.once("ppo_update"):
            self._settle(scores, loss)
        if not moving or scores is None:
            return []
        verify = None
        if self.cfg.verify and self.cfg.pruning == "taylor":
            probe = list(itertools.islice(batches(), self.cfg.probe_batches))
            verify = lambda ks: true_idleness(model, lambda: iter(probe), loss_fn, ks)  # noqa: E731
        records = relocate(model.prompts, scores, self.allocator, self.cfg, epoch, clock, verify, lookahead)
        self.pending = list(range(len(self.moves), len(self.moves) + len(records)))
        self.moves.extend(records)
        self.loss_before = copy.deepcopy(loss)
        return records

    def _settle(self, scores, loss) -> None:
        if not self.pending:
            return
        for i in self.pending:
            r = self._reward(self.moves[i], scores, loss)
            self.moves[i]["reward"] = r
            self.allocator.reward(r)
        self.pending = []

    def _reward(self, move: dict, scores, loss) -> float | None:
        """``faithful``/``mean``: the loss drop since the move minus the largest idleness now (the
        authors'); ``move``: the moved prompt's own idleness before the move minus its idleness in
        the new block now (how much more it contributes there), free of the training trend."""
        if scores is None:
            return None
        if self.cfg.reward == "move":
            return move["score"] - float(scores[move["prompt"]])
        if loss is None or self.loss_before is None:
            return None
        key = self.cfg.reward
        r = self.loss_before[key] - loss[key]
        return r - float(scores.max()) if self.cfg.pruning == "taylor" else r

    def end_epoch(self, epoch: int, model, num_batches: int, loss_mean: float, loss_faithful: float,
                  clock=NULL_CLOCK) -> None:
        """Record the epoch's training losses; online mode keeps its gate gradients as next scores."""
        self.last_loss = {"mean": float(loss_mean), "faithful": float(loss_faithful)}
        with clock.once("scoring_end"):
            if self.cfg.enabled and self.cfg.scoring == "online" and self.cfg.pruning == "taylor":
                self.collected = online_scores(model.prompts, num_batches, self.cfg.idleness)
            reset_online(model.prompts)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"allocator": self.allocator.state_dict(), "moves": copy.deepcopy(self.moves),
                "pending": list(self.pending), "loss_before": copy.deepcopy(self.loss_before),
                "last_loss": copy.deepcopy(self.last_loss),
                "collected": None if self.collected is None else self.collected.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.allocator.load_state_dict(state["allocator"])
        self.moves = copy.deepcopy(state["moves"])
        self.pending = list(state["pending"])
        self.loss_before = copy.deepcopy(state["loss_before"])
        self.last_loss = copy.deepcopy(state["last_loss"])
        self.collected = None if state["collected"] is None else state["collected"].to("cpu", copy=True)  # as online_scores
