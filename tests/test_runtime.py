"""GPU slots on a workstation with several GPUs: each GPU job gets a device of its own.

The device count is faked (torch.cuda patched in each job process), the locks are real files
locked by real concurrent processes.
"""

import subprocess
import sys
import time

import pytest
import torch

from provpt.config import RunConfig
from provpt.runtime import claim_gpu_slot, resolve_device

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
    return {**os.environ, "PROVPT_GPU_LOCKS": str(tmp_path / "locks")}


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


def test_one_visible_gpu_takes_no_lock(tmp_path, env):
    """Under SLURM a job sees only its own GPU: it runs on it without any slot file."""
    release = tmp_path / "release"
    release.touch()
    job = start_job(1, release, env)
    assert device_of(job) == "cuda:0"
    job.wait(timeout=30)
    job.stdout.close()
    assert not (tmp_path / "locks").exists()


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
