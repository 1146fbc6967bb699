"""One road from a profile to a run configuration: provpt.config.resolve, its layers and errors, the
search grid, the study jobs, and the CLI around them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from provpt import cli
from provpt.config import METHODS, STAGES, STUDIES, ConfigError, RunConfig, resolve, search_grid
from provpt.studies import parse_overrides, study_jobs

ROOT = Path(__file__).resolve().parents[1]
PROFILE = {
    "profile": "t", "seeds": [18, 25], "methods": list(METHODS),
    "train": {"epochs": 7, "lr": 0.5, "relocation": {"scoring": "pass"}},
    "train_by_method": {"linear": {"lr": 9.0, "epochs": 2}},
    "search": {"train_split": "train800", "eval_split": "val200", "seed": 18, "lr": [1, 2], "weight_decay": [0, 0.1],
               "lr_base_batch": 32, "by_method": {"full": {"lr": [0.5]}}, "overrides": {"epochs": 3}},
    "final": {"train_split": "train800val200", "eval_split": "test", "overrides": {"eval_every": 5}},
    "studies": {"correlation": {"datasets": ["a", "b"], "hparams": "vpt-deep", "points": [0, 1]},
                "allocators": {"datasets": ["a"], "variants": ["thompson", "pair"]}},
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stage", [None, *STAGES])
def test_every_method_resolves_at_every_stage(method, stage):
    cfg = resolve(PROFILE, method, stage, ["dataset=x"])
    assert cfg.method == method and cfg.dataset == "x" and cfg.relocation.scoring == "pass"
    expected = {None: ("train800", ["val200"]), "search": ("train800", ["val200"]),
                "final": ("train800val200", ["test"])}[stage]
    assert (cfg.train_split, cfg.eval_splits) == expected


def test_layers_in_order():
    assert resolve(PROFILE, "vpt-deep").epochs == 7  # train
    assert resolve(PROFILE, "linear").epochs == 2  # train_by_method
    assert resolve(PROFILE, "linear", "search").epochs == 3  # the stage's overrides win over the method's
    assert resolve(PROFILE, "vpt-deep", "search").seed == 18
    assert resolve(PROFILE, "vpt-deep", "final").eval_every == 5
    hp = {"lr": 0.03, "weight_decay": 0.2}
    assert resolve(PROFILE, "linear", "final", hparams=hp).lr == 0.03  # hparams over train_by_method
    assert resolve(PROFILE, "linear", "final", ["lr=7"], hparams=hp).lr == 7.0  # the command line last
    cfg = resolve(PROFILE, None, None, ["method=pro-vpt", "relocation.allocator=thompson"])
    assert cfg.method == "pro-vpt" and (cfg.relocation.allocator, cfg.relocation.scoring) == ("thompson", "pass")
    assert resolve(None).to_dict() == RunConfig().to_dict()  # no profile: the defaults


@pytest.mark.parametrize("profile,over,words", [
    (PROFILE, ["epoch=3"], ["command line", "'epoch'", "did you mean epochs"]),
    (PROFILE, ["relocation.scorin=pass"], ["command line", "relocation.scorin", "relocation.scoring"]),
    (PROFILE, ["epochs=many"], ["command line", "epochs='many'", "integer"]),
    (PROFILE, ["epochs=0"], ["command line", "epochs=0", ">= 1"]),
    ({**PROFILE, "train": {"epochs": "x"}}, [], ["profile t: train", "epochs='x'"]),
    ({**PROFILE, "train_by_method": {"linear": {"optimizer": "adam"}}}, ["method=linear"],
     ["train_by_method.linear", "optimizer='adam'"]),
    ({**PROFILE, "final": {"train_split": "a", "overrides": {"lrr": 1}}}, [], ["profile t: final", "'lrr'"]),
    (PROFILE, ["method=nope"], ["method='nope'", "pro-vpt"]),
])
def test_errors_name_the_layer_and_key(profile, over, words):
    with pytest.raises(ConfigError) as e:
        resolve(profile, None, "final", over)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_profile_file_is_named_in_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 0}}))
    with pytest.raises(ConfigError, match=f"{path}: train: batch_size=0"):
        resolve(path)


def test_search_grid_scales_lrs_per_method():
    assert search_grid(PROFILE, "vpt-deep") == (["2", "4"], ["0", "0.1"])  # x 64 / 32
    assert search_grid(PROFILE, "full") == (["1"], ["0", "0.1"])


def test_study_jobs_and_options():
    assert study_jobs(PROFILE, "correlation") == [{"dataset": "a"}, {"dataset": "b"}]
    assert study_jobs(PROFILE, "allocators") == [{"dataset": "a", "variant": v, "seed": 18} for v in ("thompson", "pair")]
    opts, over, hp = parse_overrides(PROFILE, ["study.top=3", "epochs=2"], "correlation")
    assert opts["points"] == [0, 1] and opts["top"] == 3 and over == {"epochs": 2} and hp == {}
    with pytest.raises(ConfigError, match="unknown option 'pointz'"):
        parse_overrides({"studies": {"correlation": {"pointz": [1]}}}, [], "correlation")
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        parse_overrides(PROFILE, ["study.variant=nope"], "allocators")
    with pytest.raises(ConfigError, match=r"variants \['nope'\]"):
        study_jobs({"seeds": [1], "studies": {"allocators": {"datasets": ["a"], "variants": ["nope"]}}}, "allocators")


def test_schema_lists_are_the_package_lists():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["methods"]["items"]["enum"] == list(METHODS)
    assert schema["properties"]["studies"]["propertyNames"]["enum"] == list(STUDIES)


# ----------------------------------------------------------------------------- the CLI


def cli_run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_config_prints_the_resolved_run(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in PROFILE.items() if k != "profile"}))
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"lr": 0.25, "weight_decay": 0.01}))
    code, out = cli_run(capsys, "config", "--profile", str(path), "--stage", "final", "--hparams", str(sel),
                        "dataset=d", "method=linear", "seed=25")
    cfg = yaml.safe_load(out)
    assert code == 0 and (cfg["lr"], cfg["seed"], cfg["train_split"], cfg["eval_every"]) == (0.25, 25, "train800val200", 5)


@pytest.mark.parametrize("argv,words", [
    (["train", "--epochs", "3"], ["provpt train", "--epochs", "epochs=..."]),
    (["train", "--hparams", "nowhere.json", "dataset=x"], ["nowhere.json", "selection file not found"]),
    (["train", "epoch=3"], ["command line", "epochs"]),
    (["study", "nope"], ["invalid choice", "correlation"]),
    (["report", "--results", "nowhere"], ["nowhere", "no runs/ folder"]),
])
def test_cli_errors_are_clear(tmp_path, argv, words):
    proc = subprocess.run([sys.executable, "-m", "provpt.cli", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr


def test_cli_version():
    from provpt import __version__

    proc = subprocess.run([sys.executable, "-m", "provpt.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"provpt {__version__}"


def test_train_on_missing_data_leaves_no_run_folder(tmp_path, capsys):
    code, out = cli_run(capsys, "train", f"data_root={tmp_path}", "dataset=nope", f"out={tmp_path / 'X'}")
    assert code == 2 and "nope" in out and not (tmp_path / "X").exists()


@pytest.mark.parametrize("profile", ["vtab1k", "fgvc"])
def test_paper_profiles_run_the_authors_pro_vpt_and_ours_beside_it(profile):
    path = ROOT / "params" / f"{profile}.yaml"
    authors = resolve(path, "pro-vpt", "final", ["dataset=x"])
    r = authors.relocation
    assert (r.scoring, r.clip_scores, r.reward, r.idleness, r.ppo_update) == ("pass", True, "faithful", "gate",
                                                                              "faithful")
    assert r.pass_order == "shuffled" and resolve(ROOT / "params" / "mini.yaml", "pro-vpt").relocation.pass_order == "fixed"
    assert (authors.precision, authors.optimizer, authors.schedule, authors.grad_clip) == ("fp32", "sgd", "constant",
                                                                                          0.25)
    assert (r.count, r.until, r.scale, r.warmup_epochs, r.allocator) == (1, 1.0, 1e-3, 1, "ppo")
    ours = resolve(path, "pro-vpt-exact", "final", ["dataset=x"]).relocation
    assert (ours.idleness, ours.verify, ours.reward, ours.ppo_update, ours.scoring) == ("logit", 8, "move", "bandit",
                                                                                      "online")
    assert resolve(path, "vpt-deep").precision == "fp32"
    assert "pro-vpt-exact" in yaml.safe_load((ROOT / "params/base.yaml").read_text())["methods"]
    assert authors.head_init == "vpt" and resolve(path, "linear", "final", ["dataset=x"]).head_init == "vpt"


# The paper profile's prompts per block per VTAB-1k task (params/vtab1k.yaml cites the sources).
VTAB_PROMPTS = {"cifar": 20, "caltech101": 10, "dtd": 10, "oxford_flowers102": 1, "oxford_iiit_pet": 1, "svhn": 50,
                "sun397": 5, "patch_camelyon": 100, "eurosat": 100, "resisc45": 10, "diabetic_retinopathy": 1,
                "clevr_count": 100, "clevr_dist": 200, "dmlab": 100, "kitti": 100, "dsprites_loc": 100,
                "dsprites_ori": 100, "smallnorb_azi": 200, "smallnorb_ele": 200}


def test_vtab1k_prompt_length_per_task_for_every_prompt_method_and_stage():
    path = ROOT / "params/vtab1k.yaml"
    assert set(VTAB_PROMPTS) == set(yaml.safe_load(path.read_text())["datasets"])
    for task, T in VTAB_PROMPTS.items():
        for method in ("vpt-shallow", "vpt-deep", "pro-vpt", "pro-vpt-exact"):
            for stage in ("search", "final"):
                assert resolve(path, method, stage, [f"dataset={task}"]).num_prompts == T, (task, method, stage)
    # A command-line value still wins over the per-task one, and fgvc keeps the common 10.
    assert resolve(path, "vpt-deep", "final", ["dataset=svhn", "num_prompts=7"]).num_prompts == 7
    assert resolve(ROOT / "params/fgvc.yaml", "pro-vpt", "final", ["dataset=cub"]).num_prompts == 10


def test_train_by_dataset_errors_name_the_layer(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("train_by_dataset: {cifar: {num_promts: 3}}\n")
    with pytest.raises(ConfigError, match="train_by_dataset.cifar.*num_promts"):
        resolve(p, "vpt-deep", None, ["dataset=cifar"])


def test_prompt_length_axis_of_the_search_reaches_selection_and_final(tmp_path):
    """search.num_prompts adds a prompts-per-block axis to the prompt methods' grid only; the selection
    records the chosen length and the final run resolves with it."""
    import json

    from provpt.config import read_selection, search_prompts
    from provpt.protocol import search_configs
    from provpt.selection import select

    prof = {**PROFILE, "search": {**PROFILE["search"], "num_prompts": [5, 20]}}
    cfgs = search_configs(prof, "a", "vpt-deep", tmp_path)
    assert len(cfgs) == 2 * 2 * 2 and {c.num_prompts for c in cfgs} == {5, 20}
    assert {Path(c.out).name for c in cfgs} >= {"lr2_wd0_T5", "lr4_wd0.1_T20"}
    assert search_prompts(prof, "linear") == [None] and len(search_configs(prof, "a", "linear", tmp_path)) == 4
    with pytest.raises(ConfigError, match="search.num_prompts"):
        search_prompts({"search": {"num_prompts": [0]}}, "vpt-deep")
    for i, c in enumerate(cfgs):  # the T = 20 run at lr 2, wd 0.1 wins
        Path(c.out).mkdir(parents=True)
        acc = 90.0 if (c.num_prompts, c.lr, c.weight_decay) == (20, 2.0, 0.1) else 50.0 + i
        Path(c.out, "metrics.json").write_text(json.dumps({"lr": c.lr, "weight_decay": c.weight_decay,
                                                           "prompts_per_block": c.num_prompts,
                                                           "eval": {"val200": {"acc": acc}}}))
    sel = select([c.out for c in cfgs], "val200", tmp_path / "sel.json")
    assert (sel["lr"], sel["weight_decay"], sel["num_prompts"]) == (2.0, 0.1, 20)
    final = resolve(PROFILE, "vpt-deep", "final", {"dataset": "a"}, read_selection(tmp_path / "sel.json"))
    assert final.num_prompts == 20
    plain = select([cfgs[0].out], "val200")  # no axis: the selection says nothing of the length
    assert "num_prompts" not in plain
