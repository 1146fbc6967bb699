"""The device path of the training loop, on the CPU always and on CUDA where present: data held on the
device as uint8, autocast, relocation, resume from a checkpoint (loaded to the CPU, used on the device),
a kill -9 of a packed pair and its resume, and the studies that restart from checkpoints.

Each test takes ``device``: ``cpu``, and ``cuda`` (skipped where CUDA is absent). ``PROVPT_TEST_DEVICES``
(e.g. ``cuda``, or ``cpu cuda``) restricts the list; a device named there is never skipped, so
``PROVPT_TEST_DEVICES=cuda`` on a machine without CUDA fails (``make gpu-check`` runs them so).
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from provpt.config import RunConfig
from provpt.data.task import TaskData
from provpt.train import load_checkpoint, run, run_pack

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)
ROOT = Path(__file__).resolve().parents[1]


def _devices():
    named = os.environ.get("PROVPT_TEST_DEVICES")
    params = []
    for d in (named or "cpu cuda").replace(",", " ").split():
        absent = d == "cuda" and not torch.cuda.is_available() and not named
        params.append(pytest.param(d, id=d, marks=[pytest.mark.skip(reason="needs CUDA")] if absent else []))
    return params


@pytest.fixture(params=_devices())
def device(request, one_thread):
    return torch.device(request.param)


def cfg_for(root, out, device, **kw) -> RunConfig:
    base = dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", backbone_kwargs=KW,
                method="pro-vpt", num_prompts=2, epochs=4, batch_size=16, optimizer="adamw", lr=0.01,
                eval_splits=["val200"], device=str(device), precision="bf16", progress=False, threads=1,
                out=str(out))
    return RunConfig.from_dict({**base, **kw})


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "wall_time_s"}


def tensors(obj):
    """Every tensor in a nested checkpoint structure."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


# ----------------------------------------------------------------------------- data, autocast, relocation


def test_task_data_lives_on_the_device_as_uint8(toy_root, tmp_path, device):
    data = TaskData(cfg_for(toy_root, tmp_path, device), device)
    images, labels = data.splits["train800"]
    assert images.device.type == labels.device.type == device.type and images.dtype == torch.uint8
    x, y = next(data.batches("train800", 16, train=True))
    assert x.device.type == y.device.type == device.type
    assert x.dtype == torch.float32 and x.shape == (16, 3, 16, 16)


def test_bf16_autocast_reaches_the_model(toy_root, tmp_path, device):
    from provpt.model.methods import build_model
    from provpt.runtime import autocast_for

    cfg = cfg_for(toy_root, tmp_path, device)
    model = build_model(cfg, 3).to(device)
    with autocast_for(cfg, device):
        logits = model(torch.randn(4, 3, 16, 16, device=device))
    assert logits.dtype == torch.bfloat16 and not torch.is_autocast_enabled(device.type)
    logits.float().sum().backward()
    assert model.prompts.gates.grad is not None and torch.isfinite(model.prompts.gates.grad).all()


@pytest.mark.parametrize("reloc", [{}, {"scoring": "pass"}, {"pruning": "norm"}], ids=["online", "pass", "norm"])
def test_bf16_pro_vpt_run(toy_root, tmp_path, device, reloc):
    cfg = cfg_for(toy_root, tmp_path / "run", device, relocation=reloc)
    m = run(cfg)
    out = tmp_path / "run"
    hist = history(out)
    moves = [json.loads(line) for line in (out / "moves.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["train_loss"]) for h in hist)
    assert math.isfinite(m["eval"]["val200"]["loss"]) and 0 <= m["eval"]["val200"]["acc"] <= 100
    # bookkeeping: every epoch's distribution keeps the budget, and replaying the logged moves on the
    # uniform start gives the final distribution
    dist = [cfg.num_prompts] * 3
    for h in hist:
        assert sum(h["distribution"]) == 3 * cfg.num_prompts and min(h["distribution"]) >= 0
    assert sum(h["moves"] for h in hist) == len(moves)
    for mv in moves:
        if mv["target"] != mv["source"]:
            dist[mv["source"]] -= 1
            dist[mv["target"]] += 1
        assert mv["distribution"] == dist
    assert m["distribution"] == dist == hist[-1]["distribution"]
    if reloc.get("pruning") == "norm":  # norm pruning always picks a prompt from epoch 1 on
        assert len(moves) == cfg.epochs - cfg.relocation.warmup_epochs


# ----------------------------------------------------------------------------- checkpoints across devices


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["pro-vpt", "pro-vpt-exact"])
def test_a_checkpoint_loads_to_the_cpu_and_resumes_on_the_device(toy_root, tmp_path, device, method):
    """A checkpoint holds CPU RNG states (torch's, the dropout stream's, the PPO allocator's generator)
    and the relocator's CPU state; load_checkpoint keeps every tensor on the CPU, whatever the run's
    device, and a resumed run on the device equals an uninterrupted one."""
    from provpt.train import build_run

    kw = dict(method=method, epochs=5, precision="fp32")
    full = run(cfg_for(toy_root, tmp_path / "full", device, **kw))

    def kill(epoch):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run(cfg_for(toy_root, tmp_path / "cut", device, **kw), on_epoch_end=kill)
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ck["epoch"] == 3
    assert {t.device.type for t in tensors(ck)} == {"cpu"}
    ppo = ck["relocator"]["allocator"].get("ppo")
    rngs = [ck["rng"], ck["dropout_rng"]] + ([ppo["generator"]] if ppo else [])
    assert all(r.dtype == torch.uint8 for r in rngs)
    if method == "pro-vpt":
        assert ppo["buffer"] and ck["relocator"]["collected"] is not None  # the state that used to follow the device
    # the state loads into a run built on the device
    cfg = cfg_for(toy_root, tmp_path / "cut", device, **kw)
    model, optimizer, relocator = build_run(cfg, 3, device)
    relocator.load_state_dict(ck["relocator"])
    model.load_trainable_state(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    assert next(iter(optimizer.state.values()))["exp_avg"].device.type == device.type
    resumed = run(cfg)
    if device.type == "cpu":
        assert strip(resumed) == strip(full)
        assert (tmp_path / "cut" / "moves.jsonl").read_text() == (tmp_path / "full" / "moves.jsonl").read_text()
    else:
        close(history(tmp_path / "cut"), history(tmp_path / "full"), "fp32")


def close(a: list[dict], b: list[dict], precision: str) -> None:
    """Two histories agree per epoch: exactly where computed bit for bit (the CPU), else training and
    eval losses within the precision's tolerance (CUDA's atomic-add reductions are not bitwise stable)."""
    rtol = {"fp32": 1e-3, "bf16": 5e-2}[precision]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=rtol), (x["epoch"], x["train_loss"], y["train_loss"])
        for s in x["eval"]:
            assert x["eval"][s]["loss"] == pytest.approx(y["eval"][s]["loss"], rel=rtol), (x["epoch"], s)


PACK = """
import json, os, signal, sys
from provpt.config import RunConfig
from provpt.train import run_pack
cfgs = [RunConfig.from_dict(c) for c in json.loads(sys.argv[1])]
kill_at = int(sys.argv[2])

def kill(epoch):  # kill -9 once every run of the pack has checkpointed this epoch
    if epoch == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

run_pack(cfgs, on_epoch_end=kill)
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kill_9_of_a_packed_pro_vpt_pair_resumes_as_the_runs_alone(toy_root, tmp_path, device, precision):
    """`pro-vpt` and `pro-vpt-exact` trained as one pack, killed with SIGKILL after epoch 2 and rerun:
    each run ends as the uninterrupted pack's (bit for bit on the CPU) and as the same run trained alone
    (the first epoch's loss to the order of float sums; later epochs may drift apart in bf16)."""
    kw = dict(epochs=5, precision=precision, lr=0.05)
    methods = ["pro-vpt", "pro-vpt-exact"]
    alone = [run(cfg_for(toy_root, tmp_path / f"alone{i}", device, method=m, **kw)) for i, m in enumerate(methods)]
    whole = run_pack([cfg_for(toy_root, tmp_path / f"whole{i}", device, method=m, **kw) for i, m in enumerate(methods)])
    cut = [cfg_for(toy_root, tmp_path / f"cut{i}", device, method=m, **kw) for i, m in enumerate(methods)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PACK, json.dumps([c.to_dict() for c in cut]), "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert all(load_checkpoint(Path(c.out) / "checkpoint.pt")["epoch"] == 3 for c in cut)
    assert not any((Path(c.out) / "metrics.json").exists() for c in cut)
    resumed = run_pack(cut)
    for i, (w, r, a) in enumerate(zip(whole, resumed, alone)):
        assert w["packed_runs"] == 2 and a["packed_runs"] == 1
        if device.type == "cpu":
            assert strip(r) == strip(w)
            assert (tmp_path / f"cut{i}" / "moves.jsonl").read_text() == (tmp_path / f"whole{i}" / "moves.jsonl").read_text()
        else:
            close(history(tmp_path / f"cut{i}"), history(tmp_path / f"whole{i}"), precision)
        first_packed, first_alone = history(tmp_path / f"cut{i}")[0], history(tmp_path / f"alone{i}")[0]
        rtol = {"fp32": 1e-4, "bf16": 5e-2}[precision]
        assert first_packed["train_loss"] == pytest.approx(first_alone["train_loss"], rel=rtol)
        assert all(math.isfinite(h["train_loss"]) for h in history(tmp_path / f"cut{i}"))


# ----------------------------------------------------------------------------- studies restarting from checkpoints


def study_profile(root, device) -> dict:
    return {"train": dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", backbone_kwargs=KW,
                          num_prompts=2, epochs=4, batch_size=16, optimizer="sgd", lr=0.5, weight_decay=1e-4,
                          progress=False, threads=1, device=str(device)),
            "final": {"train_split": "train800val200", "eval_split": "test"}}


def test_the_adjustment_and_rewards_studies_restore_checkpoints_on_the_device(toy_root, tmp_path, device):
    """Both studies restart every arm from a checkpoint: the global RNG and the dropout stream come back
    as CPU byte tensors, and an arm run twice from one checkpoint gives the same result."""
    from provpt.studies import adjustment, checkpoint_path, rewards, setup, train_studied_run
    from provpt.studies import run_config

    cfg = run_config(study_profile(toy_root, device), {"out": str(tmp_path / "x")}, method="vpt-deep")
    run_dir, cfg = train_studied_run(cfg, [0.5], tmp_path / "run")
    dev, data, model = setup(cfg)
    assert dev.type == device.type
    ck = load_checkpoint(checkpoint_path(run_dir, 2))
    assert ck["rng"].dtype == ck["dropout_rng"].dtype == torch.uint8
    from provpt.train import make_optimizer

    adjustment.restore(model, make_optimizer(cfg, model), ck)
    assert torch.equal(torch.get_rng_state(), ck["rng"])
    assert torch.equal(model.prompts.rng_state().cpu(), ck["dropout_rng"])
    autocast = adjustment.autocast_for(cfg, dev)
    one = adjustment.run_arm(model, data, cfg, ck, 0, 1, 1, "val200", autocast)
    two = adjustment.run_arm(model, data, cfg, ck, 0, 1, 1, "val200", autocast)
    assert one["loss"] == two["loss"] and math.isfinite(one["loss"])
    s = adjustment.main(study_profile(toy_root, device), [f"out={tmp_path / 'adj'}", "study.points=[0.5]",
                                                          "study.budget_epochs=1", f"study.run={run_dir}"])
    assert [p["epoch"] for p in s["points"]] == [2]
    r = rewards.main(study_profile(toy_root, device), [f"out={tmp_path / 'rew'}", "study.points=[0.5]",
                                                       "study.budget_epochs=1", f"study.run={run_dir}"])
    assert r["moves"] == 2  # the top prompt moved to each of the 2 other blocks


@pytest.mark.slow
def test_compiled_vpt_deep_run(toy_root, tmp_path, device):
    if device.type == "cpu":
        pytest.skip("torch.compile on the CPU builds C++ for minutes; the CUDA run is the one that matters")
    m = run(cfg_for(toy_root, tmp_path / "c", device, method="vpt-deep", epochs=2, compile=True))
    assert math.isfinite(m["train_loss"]) and m["distribution"] == [2, 2, 2]
