"""`provpt plan` (provpt.plan): the FLOP model against torch's counter, the time and disk model, the
paper profiles' plans, measured records, and the search split into one job per pack."""

import json

import pytest
import yaml

from provpt.cli import main as cli
from provpt.config import RunConfig, read_profile, resolve
from provpt.plan import (EFFECTIVE_FLOPS, forward_flops, geometry, job_minutes, job_seconds, plan, read_measured,
                         run_bytes, run_flops)
from provpt.protocol import search, search_packs

VTAB1K = "params/vtab1k.yaml"


@pytest.mark.parametrize("prompts", [0, 10, 200])
def test_forward_flops_match_torch_flop_counter_on_vit_b(prompts, one_thread):
    """The analytic count (blocks' matmuls and attention, patch embedding) against
    torch.utils.flop_counter on timm's ViT-B/16 with explicit attention and ``prompts`` more tokens."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    timm.layers.set_fused_attn(False)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, class_token=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tokens = vit._pos_embed(vit.patch_embed(x))
        tokens = torch.cat([tokens, torch.zeros(1, prompts, 768)], 1)
        vit.blocks(tokens)
    timm.layers.set_fused_attn(True)
    assert forward_flops(geometry("vit_base_patch16_224"), prompts) == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_run_flops_price_the_scoring_pass_full_and_the_evaluations():
    base = dict(backbone="vit_base_patch16_224", epochs=10, eval_every=5, num_prompts=10, precision="fp32")
    deep = run_flops(RunConfig(method="vpt-deep", **base), 800, 0)
    pass_ = RunConfig.from_dict(dict(method="pro-vpt", relocation={"scoring": "pass"}, **base))
    assert run_flops(pass_, 800, 0) == pytest.approx(2 * deep, rel=1e-9)  # + a forward and backward per image and epoch
    assert run_flops(RunConfig(method="pro-vpt", **base), 800, 0) == deep  # online scoring: free
    f0 = forward_flops(geometry("vit_base_patch16_224"))
    assert run_flops(RunConfig(method="full", **base), 800, 0) == 3 * 800 * 10 * f0
    assert run_flops(RunConfig(method="vpt-deep", **base), 800, 100) - deep == pytest.approx(
        2 * 100 * forward_flops(geometry("vit_base_patch16_224"), 10))  # evaluated at epochs 5 and 10


def test_job_minutes_margin_floor_and_precision():
    cfg = RunConfig(method="vpt-deep", dataset="cifar", backbone="vit_base_patch16_224", precision="fp32",
                    device="cuda", train_split="train800", eval_splits=["val200"], data_root="nowhere")
    sec, how = job_seconds([cfg])
    assert how == "projected" and sec == pytest.approx(run_flops(cfg, 800, 200) / EFFECTIVE_FLOPS["fp32"])
    assert job_minutes([cfg] * 8, 1) == int(-(-1.5 * 8 * sec / 60 // 1)) + 10
    assert job_minutes([cfg], 10_000) == 10_000  # the profile's floor
    assert job_minutes([cfg] * 8, 1, cap=20) == 20  # a cluster's limit (resources.train.max_runtime)
    cfg.device = "cpu"
    assert job_minutes([cfg] * 8, 7) == 7  # a CPU run is not priced at GPU rates
    cfg.device, cfg.dataset = "cuda", "unknown"
    assert job_seconds([cfg]) is None and job_minutes([cfg], 7) == 7


def test_paper_plans_jobs_time_and_disk():
    """vtab1k at its own precision (fp32) against bf16; the workflow's job counts; run folders under
    the paper retention within 30 GB, keep-all about 0.4 TB (full: 1 GB per run)."""
    p = plan(VTAB1K)
    assert p["precision"] == "fp32" and p["keep"] == {"search": "metrics", "final": "weights"}
    assert p["rules"]["search_pack"]["jobs"] == 19 * (5 * 4 + 3 * 16) and p["rules"]["final_seeds"]["jobs"] == 19 * 8
    assert p["rules"]["final_seeds"]["runs"] == 19 * 8 * 3 and not p["unknown_sizes"]
    assert p["disk"]["runs"] <= 30e9 and 3.5e11 < p["disk"]["runs_keep_all"] < 4.5e11
    bf16 = plan(VTAB1K, ["train.precision=bf16"])
    assert bf16["precision"] == "bf16" and bf16["rules"]["search_pack"]["runs"] == p["rules"]["search_pack"]["runs"]
    ratio = EFFECTIVE_FLOPS["bf16"] / EFFECTIVE_FLOPS["fp32"]
    total = lambda q: sum(r["gpu_s"] for r in q["rules"].values())  # noqa: E731
    assert total(p) == pytest.approx(ratio * total(bf16), rel=1e-9)
    # pro-vpt (scoring pass) costs about twice vpt-deep; the longest vtab1k pack fits a 4 h limit
    assert p["per_method"]["pro-vpt"]["gpu_s"] > 1.7 * p["per_method"]["vpt-deep"]["gpu_s"]
    assert p["rules"]["search_pack"]["longest_s"] < 4 * 3600
    fgvc = plan("params/fgvc.yaml")
    assert fgvc["rules"]["search_pack"]["runtime_min"] > 480  # a nabirds `full` run alone outgrows 8 h


def test_plan_of_a_subset_as_the_workflow_cuts_it():
    p = plan(VTAB1K, ["datasets=[clevr_count]", "methods=[vpt-deep, full]"])
    assert (p["datasets"], p["methods"]) == (1, ["vpt-deep", "full"])
    assert p["rules"]["search_pack"]["jobs"] == 4 + 16 and p["rules"]["final_seeds"]["jobs"] == 2
    with pytest.raises(ValueError, match=r"\['clevr_cnt'\] not known to the profile \(did you mean clevr_count\?\)"):
        plan(VTAB1K, ["datasets=[clevr_cnt]"])


def test_run_bytes_per_policy_from_the_measured_table():
    full = resolve(read_profile(VTAB1K), "full", "final", {"dataset": "cifar"})
    sizes = {keep: run_bytes(full, 100, keep) for keep in ("metrics", "weights", "all")}
    assert sizes["metrics"] < 1e6 < 3.3e8 < sizes["weights"] < 3.6e8 and 1e9 < sizes["all"] < 1.1e9
    deep = resolve(read_profile(VTAB1K), "vpt-deep", "final", {"dataset": "clevr_dist"})
    assert deep.num_prompts == 200  # clevr_dist's own prompt length: 200 x 12 x 768 prompt values
    assert run_bytes(deep, 6, "weights") - run_bytes(deep, 6, "metrics") == pytest.approx(4 * (200 * 12 * 768 + 6 * 769),
                                                                                         rel=0.01)


def test_measured_records_replace_the_flops_estimate(tmp_path):
    cfg = resolve(read_profile(VTAB1K), "vpt-deep", "search", {"dataset": "cifar", "device": "cuda"})
    rec = {"method": "vpt-deep", "prompts_per_block": cfg.num_prompts, "precision": "fp32", "pack": 8,
           "batch_size": 64, "images_per_s": 500.0, "epoch_s_median": 1.6, "peak_mem_gib": 20, "device": "H200"}
    sec, how = job_seconds([cfg], [rec])
    faster, _ = job_seconds([cfg], [{**rec, "images_per_s": 1000.0}])
    assert how == "measured" and faster == pytest.approx(sec / 2)
    # training at the measured images/s; evaluation at the same FLOP rate
    assert sec == pytest.approx(800 * cfg.epochs / 500 * run_flops(cfg, 800, 200) / run_flops(cfg, 800, 0))
    assert job_seconds([cfg], [{**rec, "precision": "bf16"}])[1] == "projected"  # no record of fp32
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"records": [rec, {**rec, "pack": 16, "images_per_s": None, "error": "out of memory"}],
                                "eval": []}))
    assert read_measured(path) == [rec]
    path.write_text(json.dumps([{"method": "vpt-deep"}]))
    with pytest.raises(ValueError, match=r"record 0 lacks \['precision', 'prompts_per_block', 'images_per_s'\]"):
        read_measured(path)


def test_cli_plan(capsys, tmp_path):
    assert cli(["plan", "--profile", "params/fgvc.yaml", "train.precision=bf16"]) == 0
    out = capsys.readouterr().out
    assert "precision bf16" in out and "search_pack" in out and "(projected)" in out and "DVC cache" in out
    assert cli(["plan", "--profile", "params/fgvc.yaml", "--measured", str(tmp_path / "none.json")]) == 2
    assert "none.json: file not found" in capsys.readouterr().err


def toy_profile(root) -> dict:
    return {"profile": "toy", "pack": {"search": 3},
            "train": dict(dataset="toy", data_root=str(root), backbone="vit_tiny_patch16_224", method="vpt-deep",
                          backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2),
                          num_prompts=2, epochs=1, batch_size=16, progress=False, threads=1),
            "search": {"train_split": "train800", "eval_split": "val200", "seed": 0, "lr": [0.5, 1.0],
                       "weight_decay": [0, 0.0001]}}


def test_search_one_job_per_pack_gathers_the_whole_grid(toy_root, tmp_path, capsys, one_thread):
    """`provpt search --pack i` trains pack i only; `--gather` writes the grid's summary from the
    packs'; the points equal the whole grid trained in one call."""
    prof = toy_profile(toy_root)
    assert [len(p) for p in search_packs(prof, "toy", "vpt-deep", tmp_path)] == [3, 1]
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(prof))
    base = ["search", "--profile", str(path), "--out", str(tmp_path / "packs"), "dataset=toy", "method=vpt-deep"]
    for i in (1, 0):
        assert cli([*base, "--pack", str(i), "--summary", str(tmp_path / f"pack{i}.json")]) == 0
        assert len(json.loads((tmp_path / f"pack{i}.json").read_text())["points"]) == (3 if i == 0 else 1)
    assert len(list((tmp_path / "packs").glob("*/metrics.json"))) == 4
    assert cli(["search", "--gather", str(tmp_path / "pack0.json"), str(tmp_path / "pack1.json"), "--summary",
                str(tmp_path / "search.json"), "dataset=toy", "method=vpt-deep"]) == 0
    gathered = json.loads((tmp_path / "search.json").read_text())
    whole = search(prof, "toy", "vpt-deep", tmp_path / "whole")
    assert [(p["lr"], p["weight_decay"], p["eval"]) for p in gathered["points"]] == \
        [(m["lr"], m["weight_decay"], m["eval"]) for m in whole]
    assert cli([*base, "--pack", "2"]) == 2
    assert "pack 2 does not exist (the grid trains in 2 pack(s), 0-1)" in capsys.readouterr().err
    assert cli(["search", "--gather", str(tmp_path / "pack0.json"), "--summary", str(tmp_path / "x.json"),
                "dataset=other", "method=vpt-deep"]) == 2
    assert "a pack of toy/vpt-deep, not other/vpt-deep" in capsys.readouterr().err
    for files in (["pack0.json", "pack0.json"], ["pack1.json", "pack0.json"]):
        assert cli(["search", "--gather", *[str(tmp_path / f) for f in files], "--summary", str(tmp_path / "x.json"),
                    "dataset=toy", "method=vpt-deep"]) == 2
        assert "expected each of 0-1 once, in order" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[]")
    assert cli(["search", "--gather", str(tmp_path / "list.json"), "--summary", str(tmp_path / "x.json"),
                "dataset=toy", "method=vpt-deep"]) == 2
    assert "not a pack summary" in capsys.readouterr().err
