"""benchmarks/gpu_epoch.py, the GPU check's benchmark, in its tiny mode on the CPU: it runs, its JSON has
the flat records ``provpt plan --measured`` reads, the median is a median, and packs without K = 1 work."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"method", "scoring", "prompts_per_block", "tokens", "precision", "pack", "batch_size", "images",
          "images_per_s", "epoch_s_median", "epoch_s", "relocation_s_median", "train_s_median", "warmup_epochs", "warmup_moves", "timed_moves",
          "peak_mem_gib", "packed_speedup", "device", "model"}


def bench(tmp_path, *argv) -> dict:
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_epoch.py"), "--smoke", "--json", str(out),
                           *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


def test_smoke_run_writes_flat_records_for_the_projection(tmp_path):
    from provpt.plan import read_measured

    d = bench(tmp_path, "--precisions", "bf16", "--prompts", "2")
    recs = d["records"]
    assert [(r["precision"], r["method"], r["pack"]) for r in recs] == [
        ("bf16", m, k) for m in ("vpt-deep", "pro-vpt", "pro-vpt-exact") for k in (1, 2)]
    for r in recs:
        assert set(r) == FIELDS, r
        assert r["prompts_per_block"] == 2 and r["tokens"] == 1 + 16 + 2 and r["batch_size"] == 4 and r["images"] == 8
        assert len(r["epoch_s"]) == 3 and r["epoch_s_median"] == statistics.median(r["epoch_s"])
        assert r["images_per_s"] == r["pack"] * 8 / r["epoch_s_median"]
        assert 0 < r["train_s_median"] <= max(r["epoch_s"]) and r["relocation_s_median"] >= 0
        assert r["device"] == "cpu" and r["peak_mem_gib"] is None
        assert r["packed_speedup"] is not None
        # the warm-up reaches the first scheduled relocation (relocation.warmup_epochs = 1)
        assert r["warmup_epochs"] == (1 if r["method"] == "vpt-deep" else 2)
    by = {(r["method"], r["pack"]): r for r in recs}
    assert by["pro-vpt", 1]["scoring"] == "pass" and by["pro-vpt-exact", 1]["scoring"] == "online"  # as the profile
    assert by["vpt-deep", 1]["scoring"] is None and by["vpt-deep", 1]["packed_speedup"] == 1.0
    assert [(e["precision"], e["prompts_per_block"]) for e in d["eval"]] == [("bf16", 2)]
    assert all(e["images_per_s"] > 0 and len(e["epoch_s"]) == 3 for e in d["eval"])
    assert d["not_measured"] == [] and len(read_measured(tmp_path / "g.json")) == len(recs)


def test_packs_without_a_run_alone_and_a_time_budget(tmp_path):
    d = bench(tmp_path, "--precisions", "tf32", "--prompts", "1", "--methods", "vpt-deep", "--ks", "2", "3",
              "--budget-s", "0")
    # a zero budget starts nothing: every record is listed as not measured, with the reason
    assert d["records"] == d["eval"] == []
    assert [(r["phase"], r["pack"], r["error"]) for r in d["not_measured"]] == [
        ("train", 2, "skipped: time budget"), ("train", 3, "skipped: time budget"), ("eval", 1, "skipped: time budget")]
    d = bench(tmp_path, "--precisions", "tf32", "--prompts", "1", "--methods", "vpt-deep", "--ks", "2")
    (r,) = d["records"]
    assert r["pack"] == 2 and r["packed_speedup"] is None and r["images_per_s"] > 0 and d["not_measured"] == []
