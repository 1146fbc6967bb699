"""Where and how a run computes: GPU slots (each GPU job a device of its own, jobs on a one-GPU
machine taking turns, none under SLURM), the precision choices, and autocast under nesting.

The device count is faked (torch.cuda patched in each job process), the locks are real files
locked by real concurrent processes.
"""

import subprocess
import sys
import time

import pytest
import torch

from provpt.config import ConfigError, RunConfig
from provpt.runtime import Autocast, autocast_for, claim_gpu_slot, dtype_for, float32_mode, resolve_device, slurm_gave_gpu

# One "job": fake `count` visible GPUs, resolve the run's device, print it, then hold it until
# the file `release` appears (or forever, to be killed).
JOB = """
import sys, time, pathlib, torch
count, release = int(sys.argv[1]), pathlib.Path(sys.argv[2])
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: count
torch.cuda.set_device = lambda i: print("set_device", i, flush=True)
from provpt.config import RunConfig
from provpt.runtime import resolve_device
print("device", resolve_device(RunConfig(device="auto")), flush=True)
while not release.exists():
    time.sleep(0.05)
"""


def start_job(count, release, env):
    return subprocess.Popen([sys.executable, "-c", JOB, str(count), str(release)], stdout=subprocess.PIPE,
                            text=True, env=env)


def device_of(proc) -> str:
    lines = [proc.stdout.readline().strip() for _ in range(2)]
    set_line, dev_line = lines
    index = set_line.split()[-1]
    assert dev_line == f"device cuda:{index}", lines
    return dev_line.split()[-1]


@pytest.fixture
def env(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("PROVPT_GPU_LOCKS", str(tmp_path / "locks"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # a workstation, not a SLURM job
    return {**clean, "PROVPT_GPU_LOCKS": str(tmp_path / "locks")}


def test_concurrent_jobs_get_distinct_gpus_and_a_killed_job_frees_its_slot(tmp_path, env):
    release = tmp_path / "release"
    jobs = [start_job(4, release, env) for _ in range(4)]
    try:
        devices = [device_of(j) for j in jobs]
        assert sorted(devices) == [f"cuda:{i}" for i in range(4)]
        # A fifth GPU job (more jobs than GPUs) waits for a slot...
        fifth = start_job(4, release, env)
        time.sleep(1.5)
        assert fifth.poll() is None
        # ...and gets the slot of a job that is killed (the OS drops its lock).
        jobs[2].kill()
        jobs[2].wait()
        assert device_of(fifth) == devices[2]
        jobs.append(fifth)
    finally:
        release.touch()
        for j in jobs:
            j.wait(timeout=30)
            j.stdout.close()


def test_jobs_on_a_one_gpu_workstation_take_turns(tmp_path, env):
    """Two GPU jobs on a machine with one GPU (e.g. ``--cores 8`` and 4-thread jobs): the second waits
    for the first's slot instead of sharing the GPU's memory, and gets it when the first is killed."""
    release = tmp_path / "release"
    first = start_job(1, release, env)
    second = None
    try:
        assert device_of(first) == "cuda:0"
        assert (tmp_path / "locks" / "gpu0.lock").exists()
        second = start_job(1, release, env)
        time.sleep(1.5)
        assert second.poll() is None  # waiting for the slot, has not resolved a device
        first.kill()
        first.wait()
        assert device_of(second) == "cuda:0"
    finally:
        release.touch()
        for j in (first, second):
            if j is not None:
                j.wait(timeout=30)
                j.stdout.close()


def test_a_slurm_job_given_its_gpu_takes_no_lock(tmp_path, env):
    """SLURM shows a job with ``--gpus=1`` only its own GPU, exclusively: it runs on it without any slot file."""
    release = tmp_path / "release"
    release.touch()
    job = start_job(1, release, {**env, "SLURM_JOB_ID": "42", "SLURM_JOB_GPUS": "3"})
    assert device_of(job) == "cuda:0"
    job.wait(timeout=30)
    job.stdout.close()
    assert not (tmp_path / "locks").exists()


def test_slurm_gave_gpu_needs_a_job_and_a_gpu_allocation():
    assert not slurm_gave_gpu({})
    assert not slurm_gave_gpu({"SLURM_JOB_GPUS": "0"})  # a leftover variable outside any job
    assert not slurm_gave_gpu({"SLURM_JOB_ID": "7"})  # a CPU job (all of a node's GPUs may be visible)
    assert slurm_gave_gpu({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0"})
    assert slurm_gave_gpu({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "1"})
    assert slurm_gave_gpu({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "1"})


def test_slot_is_kept_per_process_and_times_out_when_all_are_taken(tmp_path):
    locks = tmp_path / "l"
    first = claim_gpu_slot(3, locks)
    assert claim_gpu_slot(3, locks) == first
    others = [subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from provpt.runtime import claim_gpu_slot;"
        f"print(claim_gpu_slot(3, {str(locks)!r}), flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        got = {int(p.stdout.readline()) for p in others}
        assert got | {first} == {0, 1, 2}
        probe = subprocess.run([sys.executable, "-c", (
            "from provpt.runtime import claim_gpu_slot;"
            f"claim_gpu_slot(3, {str(locks)!r}, poll_s=0.1, timeout_s=0.5)")], capture_output=True, text=True)
        assert probe.returncode != 0 and "all 3 GPU slots" in probe.stderr and str(locks) in probe.stderr
    finally:
        for p in others:
            p.kill()
            p.wait()
            p.stdout.close()


def test_explicit_devices_are_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(RunConfig(device="auto")).type == "cpu"
    assert resolve_device(RunConfig(device="cpu")).type == "cpu"
    with pytest.raises(RuntimeError, match="device=cuda"):
        resolve_device(RunConfig(device="cuda"))


# ----------------------------------------------------------------------------- precision and autocast

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cuda_flags():
    """The process-wide CUDA float32 flags (settable without a GPU), restored after the test."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("precision, dtype, autocast_cpu, autocast_cuda, mode_cuda", [
    ("fp32", torch.float32, False, False, "ieee"),
    ("tf32", torch.float32, False, False, "tf32"),
    ("bf16", torch.float32, True, True, "ieee"),
    ("auto", torch.float32, False, True, "ieee"),
    ("fp64", torch.float64, False, False, "ieee"),
])
def test_precision_choices_map_to_dtype_autocast_and_matmul_mode(cuda_flags, precision, dtype, autocast_cpu,
                                                                 autocast_cuda, mode_cuda):
    cfg = RunConfig(precision=precision)
    assert dtype_for(cfg) == dtype
    # on the CPU tf32 is fp32: no flag is touched, float32 stays IEEE
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert float32_mode(cfg, CPU) == "ieee"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    ctx = autocast_for(cfg, CPU)
    assert isinstance(ctx, Autocast) == autocast_cpu
    with ctx:
        assert torch.is_autocast_enabled("cpu") == autocast_cpu
    # the CUDA branch: the flags a CUDA run gets (set before any GPU work; no GPU needed to set them)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "tf32"
    ctx = autocast_for(cfg, CUDA)
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (mode_cuda == "tf32")
    assert float32_mode(cfg, CUDA) == mode_cuda
    assert isinstance(ctx, Autocast) == autocast_cuda
    if autocast_cuda:
        assert ctx.device_type == "cuda" and ctx.dtype == torch.bfloat16


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"precision='tf16'.*auto, fp32, tf32, bf16 or fp64"):
        RunConfig.from_dict({"precision": "tf16"}, "params/x.yaml")


def test_autocast_is_reentrant_and_restores_the_state_it_found():
    ctx = autocast_for(RunConfig(precision="bf16"), CPU)
    assert not torch.is_autocast_enabled("cpu")
    with ctx:
        with ctx:  # the same object again, as the oracle's lookahead inside the epoch's context
            assert torch.is_autocast_enabled("cpu")
            with torch.autocast("cpu", enabled=False):
                assert not torch.is_autocast_enabled("cpu")
            x = torch.randn(2, 2) @ torch.randn(2, 2)
        assert torch.is_autocast_enabled("cpu") and x.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with ctx:  # reusable after a full exit
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_is_off_after_an_epoch_with_the_oracles_lookahead(toy_root, tmp_path, one_thread):
    """The oracle allocator trains its trial moves inside the epoch's open autocast (bf16 on the CPU
    here); after the epoch autocast must be off again, and the trials did run."""
    from provpt.data.task import TaskData
    from provpt.train import Member, build_run, run_members

    reloc = {"idleness": "logit", "allocator": "oracle", "oracle_steps": 1, "oracle_probe": 16, "warmup_epochs": 1}
    cfg = RunConfig.from_dict(dict(
        dataset="toy", data_root=str(toy_root), backbone="vit_tiny_patch16_224", method="pro-vpt-exact",
        backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2), num_prompts=2,
        epochs=3, batch_size=16, lr=2.0, precision="bf16", device="cpu", progress=False, threads=1,
        relocation=reloc, out=str(tmp_path / "o")))
    data = TaskData(cfg, CPU)
    m = Member(cfg, *build_run(cfg, data.num_classes, CPU))
    autocast = autocast_for(cfg, CPU)
    for epoch in range(2):
        run_members([m], data, epoch, autocast)
        assert not torch.is_autocast_enabled("cpu"), f"autocast left on after epoch {epoch}"
    assert m.relocator.moves and all(len(mv["lookahead"]) == 3 for mv in m.relocator.moves)
