"""Retention (run key ``keep``, profile ``keep: {search: ..., final: ...}``): what a finished run folder
keeps, that the checkpoint goes only after metrics.json (a run killed with SIGKILL before that resumes
bitwise), and that a rerun of a finished run does nothing."""

import json
import signal
import subprocess
import sys

import pytest

from provpt.config import ConfigError, RunConfig, resolve
from provpt.train import run

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)
METRICS_FILES = {"config.yaml", "metrics.json", "history.jsonl", "distribution.csv", "moves.jsonl"}


def cfg_dict(root, out, **kw) -> dict:
    base = dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", backbone_kwargs=KW,
                method="pro-vpt", num_prompts=2, epochs=3, batch_size=16, lr=0.5, weight_decay=1e-4,
                eval_splits=["val200"], progress=False, threads=1, out=str(out),
                relocation={"scoring": "online"})
    base.update(kw)
    return base


def strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "wall_time_s"}


def files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("keep, extra", [("all", {"checkpoint.pt", "trainable.safetensors"}),
                                         ("weights", {"trainable.safetensors"}), ("metrics", set())])
def test_finished_run_folder_per_policy_and_rerun_does_nothing(toy_root, tmp_path, keep, extra):
    out = tmp_path / keep
    m = run(RunConfig.from_dict(cfg_dict(toy_root, out, keep=keep, save_at=[0.5])))
    # the copy a study reads (save_at) stays under every policy
    assert files(out) == METRICS_FILES | extra | {"checkpoints/epoch002.pt"}, files(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run(RunConfig.from_dict(cfg_dict(toy_root, out, keep=keep, save_at=[0.5]))) == m
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_keep_comes_per_stage_from_the_profile_and_is_checked():
    prof = {"profile": "p", "keep": {"search": "metrics", "final": "weights"},
            "search": {"train_split": "train800", "eval_split": "val200", "seed": 0}, "final": {}}
    assert resolve(prof, "vpt-deep", "search").keep == "metrics"
    assert resolve(prof, "vpt-deep", "final").keep == "weights"
    assert resolve(prof, "vpt-deep").keep == "all"
    assert resolve(prof, "vpt-deep", "final", ["keep=all"]).keep == "all"
    with pytest.raises(ConfigError, match=r"keep='checkpoint': expected one of \['all', 'weights', 'metrics'\]"):
        resolve({**prof, "keep": {"search": "checkpoint"}}, "vpt-deep", "search")


KILLED = """
import json, os, signal, sys
import provpt.train as train
from provpt.config import RunConfig
cfg, when = json.loads(sys.argv[1]), sys.argv[2]
kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if when == "retain":  # after metrics.json, before the clean-up
    train.retain = kill
    train.run(RunConfig.from_dict(cfg))
else:
    train.run(RunConfig.from_dict(cfg), on_epoch_end=lambda e: kill() if e == int(when) else None)
"""


@pytest.mark.parametrize("when", ["1", "2", "retain"])
def test_sigkilled_run_resumes_bitwise_and_cleans_up(toy_root, tmp_path, when):
    """SIGKILL in the middle (after epoch 2 of 3), after the last epoch's checkpoint but before
    metrics.json, and between metrics.json and the clean-up: the rerun finishes (or only cleans up)
    with the same metrics and the same weights as an uninterrupted run."""
    full = tmp_path / "full"
    ref = run(RunConfig.from_dict(cfg_dict(toy_root, full, keep="weights")))
    cut = tmp_path / "cut"
    cfg = cfg_dict(toy_root, cut, keep="weights")
    proc = subprocess.run([sys.executable, "-c", KILLED, json.dumps(cfg), when], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (cut / "checkpoint.pt").is_file()
    assert (cut / "metrics.json").is_file() == (when == "retain")
    resumed = run(RunConfig.from_dict(cfg))
    assert strip(resumed) == strip(ref)
    assert files(cut) == files(full) == METRICS_FILES | {"trainable.safetensors"}
    for name in ("trainable.safetensors", "history.jsonl", "moves.jsonl", "distribution.csv"):
        if name == "history.jsonl":  # (per-epoch seconds differ)
            strip_t = lambda p: [{k: v for k, v in json.loads(line).items() if k != "time_s"}  # noqa: E731
                                 for line in p.read_text().splitlines()]
            assert strip_t(cut / name) == strip_t(full / name)
        else:
            assert (cut / name).read_bytes() == (full / name).read_bytes(), name
