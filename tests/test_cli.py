"""What a person following a job's log sees: `provpt train`, `provpt search` and `provpt study` run
as Snakemake runs them (a subprocess, output redirected, progress bars off) log one line per epoch
of every run through Python's logging, configured by the CLI, with the epoch, the loss and the
epoch's seconds."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

EPOCHS = 3
# provpt.train's line: "<dataset>/<method> seed <k>[ lr .. wd ..] epoch <e>/<n>: loss <x>, ..., <s> s"
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): loss (\d+\.\d+),.*, (\d+\.\d+) s$")


@pytest.fixture(scope="module")
def profile(tmp_path_factory, toy_root):
    """A tiny profile on the toy task: 16 px, 2 blocks, progress bars off, a 1 lr x 2 wd grid."""
    path = tmp_path_factory.mktemp("profile") / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "train": {"dataset": "toy", "data_root": str(toy_root), "backbone": "vit_tiny_patch16_224",
                  "backbone_kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                  "weights": None, "epochs": EPOCHS, "num_prompts": 1, "batch_size": 16, "progress": False,
                  "threads": 1},
        "search": {"train_split": "train800", "eval_split": "val200", "seed": 18, "lr": [0.01],
                   "weight_decay": [0.001, 0], "lr_base_batch": None},
        "final": {"train_split": "train800val200", "eval_split": "test"},
    }))
    return path


def provpt(cwd, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "provpt.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("command,runs", [
    (["train", "method=vpt-deep", "out=run"], 1),
    (["search", "--out", "search", "dataset=toy", "method=vpt-deep"], 2),  # one log line per epoch of each wd
    (["study", "allocators", "study.variant=thompson", "method=pro-vpt", "out=study"], 1),
], ids=["train", "search", "study"])
def test_one_log_line_per_epoch(tmp_path, profile, command, runs):
    proc = provpt(tmp_path, command[0], "--profile", str(profile), *command[1:])
    lines = [line for line in proc.stderr.splitlines() if EPOCH_LINE.search(line)]
    assert len(lines) == runs * EPOCHS, proc.stderr[-3000:]
    for k, line in enumerate(lines):
        epoch, total, loss, seconds = EPOCH_LINE.search(line).groups()
        assert (int(epoch), int(total)) == (k % EPOCHS + 1, EPOCHS), line
        assert float(loss) > 0 and float(seconds) >= 0, line  # (a toy epoch may round to 0.0 s)
        assert "provpt.train" in line and re.match(r"\d\d:\d\d:\d\d ", line), line  # logging's format
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # no progress bar in the log
