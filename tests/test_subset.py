"""Subsets of a profile's datasets, methods and seeds (provpt.config.restrict_profile).

The library function on the paper profiles and the embedded ones, then the same choices through real
Snakemake dry runs: `--config datasets=[...]`, a `--configfile`, and a profile file that extends
vtab1k with a few tasks. No torch.
"""

from __future__ import annotations

import pytest
import yaml

from provpt.config import ConfigError, load_profile, profile_names, resolve, restrict_profile
from test_workflow import ROOT, copy_repo, job_counts, make_fixture_roots, paths_config, snakemake


def restricted(name: str, **choice):
    path = ROOT / "params" / f"{name}.yaml"
    return restrict_profile(load_profile(path), **choice, known=profile_names(path))


# ----------------------------------------------------------------------------- the library


def test_vtab1k_subset_cuts_every_section_and_keeps_the_task_prompt_length():
    prof, notes = restricted("vtab1k", datasets=["dtd", "clevr_count"], methods=["vpt-deep", "pro-vpt"], seeds=[18])
    assert prof["datasets"] == ["dtd", "clevr_count"]
    assert prof["methods"] == ["vpt-deep", "pro-vpt"] and prof["seeds"] == [18]
    assert prof["groups"] == {"natural": ["dtd"], "structured": ["clevr_count"]}  # specialized: none left
    assert prof["train_by_dataset"] == {"dtd": {"num_prompts": 10}, "clevr_count": {"num_prompts": 100}}
    studies = prof["studies"]
    assert studies["correlation"]["datasets"] == ["dtd", "clevr_count"]
    assert studies["timing"]["datasets"] == []  # cifar only
    assert studies["adjustment"]["datasets"] == ["clevr_count"]
    assert studies["allocators"]["datasets"] == ["dtd", "clevr_count"] and studies["allocators"]["seeds"] == [18]
    # train_by_method stays whole: the studies run methods of their own (allocators' exact variant)
    assert prof["train_by_method"] == load_profile(ROOT / "params" / "vtab1k.yaml")["train_by_method"]
    text = "\n".join(notes)
    assert "datasets: left out ['cifar', 'caltech101', 'oxford_flowers102'" in text
    assert "methods: left out ['linear', 'full', 'vpt-shallow', 'pro-vpt-exact', 'lora', 'adapter']" in text
    assert "seeds: left out [25, 42]" in text
    assert "groups: left out ['specialized']" in text
    assert "studies.timing: no job (its datasets ['cifar'] are left out)" in text
    # the chosen task keeps its own prompt length, in search and final runs of every prompt method
    for method in ("vpt-deep", "pro-vpt"):
        for stage in ("search", "final"):
            assert resolve(prof, method, stage, {"dataset": "clevr_count"}).num_prompts == 100
            assert resolve(prof, method, stage, {"dataset": "dtd"}).num_prompts == 10


def test_a_study_whose_hparams_method_is_left_out_has_no_job():
    prof, notes = restricted("vtab1k", datasets=["cifar"], methods=["vpt-deep"])
    assert prof["studies"]["allocators"]["datasets"] == []  # hparams: pro-vpt
    assert prof["studies"]["timing"]["datasets"] == ["cifar"]  # hparams: vpt-deep
    assert "studies.allocators: no job (its hparams method pro-vpt is left out)" in notes


def test_fgvc_subset():
    prof, notes = restricted("fgvc", datasets=["cub"], methods=["vpt-deep", "pro-vpt"], seeds=[42])
    assert prof["groups"] == {"fgvc": ["cub"]}
    assert {n: s["datasets"] for n, s in prof["studies"].items()} == {
        "correlation": ["cub"], "timing": ["cub"], "adjustment": ["cub"], "allocators": ["cub"], "rewards": []}
    assert prof["studies"]["allocators"]["seeds"] == [42]
    assert notes[0].startswith("datasets: left out ['nabirds', 'oxford_flowers', 'stanford_dogs', 'stanford_cars']")


@pytest.mark.parametrize("name", ["vtab1k", "fgvc", "mini", "quick", "smoke", "mini-b1"])
def test_a_whole_profile_is_unchanged_and_says_nothing(name):
    path = ROOT / "params" / f"{name}.yaml"
    prof, notes = restricted(name)
    assert notes == [] and prof == load_profile(path)


def test_mini_and_smoke_subsets():
    prof, notes = restricted("mini", datasets=["count"], methods=["vpt-deep", "pro-vpt-exact"])
    assert prof["groups"] == {"structured": ["count"]}
    assert prof["studies"]["allocators"]["datasets"] == []  # hparams pro-vpt left out
    assert prof["studies"]["correlation"]["datasets"] == ["count"]
    prof, notes = restricted("smoke", datasets=["digits"])
    assert prof["groups"] is None  # smoke has none
    assert all(s["datasets"] == [] for s in prof["studies"].values())  # they all run on count
    assert "studies.correlation: no job (its datasets ['count'] are left out)" in notes
    # a task of the base chain (mini) is known to smoke, one of no profile is not
    assert restricted("smoke", datasets=["photos"])[0]["datasets"] == ["photos"]


@pytest.mark.parametrize("choice, message", [
    ({"datasets": ["clevr_cout"]}, "datasets: ['clevr_cout'] not known to the profile (did you mean clevr_count?); "
                                   "known: ['cifar', 'caltech101'"),
    ({"methods": ["pro_vpt"]}, "methods: ['pro_vpt'] not known to the profile (did you mean pro-vpt?); "
                               "known: ['linear'"),
    ({"datasets": []}, "datasets=[]: expected a non-empty list of names"),
    ({"datasets": ["dtd", "dtd"]}, "a name is listed twice"),
    ({"seeds": ["x"]}, "seeds=['x']: expected a non-empty list of integers"),
])
def test_bad_choices_name_the_value_and_the_known_ones(choice, message):
    with pytest.raises(ConfigError) as e:
        restricted("vtab1k", **choice)
    assert message in str(e.value)


def test_a_single_name_is_a_list_of_one():
    prof, _ = restricted("vtab1k", datasets="dtd", seeds=42)
    assert prof["datasets"] == ["dtd"] and prof["seeds"] == [42]


def test_a_section_naming_an_unknown_dataset_is_an_error(tmp_path):
    (tmp_path / "base.yaml").write_text((ROOT / "params" / "base.yaml").read_text())
    (tmp_path / "p.yaml").write_text("base: base.yaml\ndatasets: [a, b]\ngroups: {g: [a, c]}\n")
    with pytest.raises(ConfigError, match=r"groups.g names \['c'\], not datasets of the profile; known: \['a', 'b'\]"):
        restrict_profile(load_profile(tmp_path / "p.yaml"), known=profile_names(tmp_path / "p.yaml"))
    (tmp_path / "p.yaml").write_text("base: base.yaml\ndatasets: [a]\nstudies: {timing: {datasets: [a], hparams: vpt}}\n")
    with pytest.raises(ConfigError, match=r"studies.timing.hparams='vpt': not a method of the profile; known: \['linear'"):
        restrict_profile(load_profile(tmp_path / "p.yaml"), known=profile_names(tmp_path / "p.yaml"))


def test_a_profile_file_extending_vtab1k_with_a_few_tasks(tmp_path):
    (tmp_path / "params").mkdir()
    for name in ("base", "paper", "vtab1k"):
        (tmp_path / "params" / f"{name}.yaml").write_text((ROOT / "params" / f"{name}.yaml").read_text())
    path = tmp_path / "params" / "first.yaml"
    path.write_text("base: vtab1k.yaml\ndatasets: [clevr_count]\nmethods: [vpt-deep, pro-vpt]\n")
    assert profile_names(path)["datasets"] == profile_names(ROOT / "params" / "vtab1k.yaml")["datasets"]
    prof, notes = restrict_profile(load_profile(path), known=profile_names(path))
    assert prof["train_by_dataset"] == {"clevr_count": {"num_prompts": 100}}
    assert prof["groups"] == {"structured": ["clevr_count"]}
    assert prof["studies"]["correlation"]["datasets"] == ["clevr_count"]
    assert resolve(prof, "pro-vpt", "final", {"dataset": "clevr_count"}).num_prompts == 100
    # its own lists are the run's: the notes name what the sections lose
    assert "groups: left out ['natural', 'specialized'] (no chosen dataset)" in notes
    assert any(n.startswith("train_by_dataset: left out ['cifar', 'caltech101'") for n in notes)
    # provpt plan reads the file the same way (its base chain is what may be chosen)
    from provpt.plan import plan

    p = plan(path)
    assert (p["datasets"], p["study_jobs"]["timing"]) == (1, 0)
    assert p["study_jobs"]["correlation"] == 1 and p["study_jobs"]["allocators"] == 15  # 5 variants x 3 seeds
    assert plan(path, ["datasets=[dtd]"])["datasets"] == 1


def test_a_studys_own_seeds_stay_unless_the_choice_leaves_them_out():
    """A study may list seeds beyond the run's: only the seeds the choice (or a profile narrowing its
    base's list, as quick narrows mini's) leaves out are cut."""
    prof = load_profile(ROOT / "params" / "quick.yaml")  # seeds: [18], of mini's [18, 25, 42]
    prof["studies"]["allocators"] = {**prof["studies"]["allocators"], "datasets": ["count"], "seeds": [18, 25, 7]}
    cut, notes = restrict_profile(prof, known=profile_names(ROOT / "params" / "quick.yaml"))
    assert cut["studies"]["allocators"]["seeds"] == [18, 7]
    assert "studies.allocators.seeds: left out [25]" in notes
    mini = load_profile(ROOT / "params" / "mini.yaml")  # seeds: [18, 25, 42]
    mini["studies"]["allocators"] = {**mini["studies"]["allocators"], "seeds": [18, 25, 7]}
    assert restrict_profile(mini, known=profile_names(ROOT / "params" / "mini.yaml"))[0]["studies"]["allocators"][
        "seeds"] == [18, 25, 7]
    cut, _ = restrict_profile(mini, seeds=[25], known=profile_names(ROOT / "params" / "mini.yaml"))
    assert cut["studies"]["allocators"]["seeds"] == [25, 7]


# ----------------------------------------------------------------------------- through Snakemake


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return make_fixture_roots(tmp_path_factory.mktemp("raw"))


def counts(proc) -> dict:
    """The dry run's jobs per rule, the search's rules left out (one job per (dataset, method) or per
    pack of its grid: the subset does not change how a grid is cut)."""
    return {rule: n for rule, n in job_counts(proc.stdout).items() if not rule.startswith("search")}


def dry_run(repo, *config, configfile=None, check=True):
    extra = ["--configfile", str(configfile)] if configfile else []
    return snakemake(repo, "-n", "-p", *extra, "--config", *config, check=check)


def test_vtab1k_subset_dry_run(repo, roots):
    proc = dry_run(repo, *paths_config("vtab1k", roots), "datasets=[dtd,clevr_count]", "methods=[vpt-deep,pro-vpt]",
                   "seeds=[18]")
    # search and final per (dataset, method); correlation on both, adjustment on clevr_count,
    # allocators' 5 variants on both with seed 18; timing (cifar) and rewards (none) go
    assert counts(proc) == {"prepare": 2, "select": 4, "final_seeds": 4,
                                       "study": 3, "study_variant": 10, "report": 1, "all": 1}
    assert proc.stderr.count("provpt: profile vtab1k on a subset:") == 1
    assert "studies.timing: no job (its datasets ['cifar'] are left out)" in proc.stderr
    # the jobs read the restricted profile, in which clevr_count keeps its 100 prompts per block
    path = next(p for p in (repo / "results/vtab1k/profiles").glob("*.yaml")
                if yaml.safe_load(p.read_text())["datasets"] == ["dtd", "clevr_count"])
    profile = yaml.safe_load(path.read_text())
    assert resolve(profile, "pro-vpt", "final", {"dataset": "clevr_count"}).num_prompts == 100
    assert profile["train_by_dataset"] == {"dtd": {"num_prompts": 10}, "clevr_count": {"num_prompts": 100}}


def test_fgvc_subset_dry_run_from_a_configfile(repo, roots, tmp_path):
    configfile = tmp_path / "subset.yaml"
    configfile.write_text("datasets: [cub]\nmethods: [vpt-deep, pro-vpt]\nseeds: [18]\n")
    proc = dry_run(repo, *paths_config("fgvc", roots), configfile=configfile)
    assert counts(proc) == {"prepare": 1, "select": 2, "final_seeds": 2,
                                       "study": 3, "study_variant": 5, "report": 1, "all": 1}


@pytest.mark.parametrize("profile, config, expected", [
    ("mini", ["datasets=[count]", "methods=[vpt-deep,pro-vpt]"],
     {"prepare": 1, "pretrain": 1, "select": 2, "final_seeds": 2, "study": 4, "study_variant": 6,
      "report": 1, "all": 1}),
    ("smoke", ["datasets=[digits]"],
     {"prepare": 1, "pretrain": 1, "select": 5, "final_seeds": 5, "report": 1, "all": 1}),
])
def test_embedded_subset_dry_runs(repo, profile, config, expected):
    assert counts(dry_run(repo, f"profile={profile}", *config)) == expected


def test_misspelt_task_fails_when_the_dag_is_built(repo, roots):
    proc = dry_run(repo, *paths_config("vtab1k", roots), "datasets=[dtd,clevr_cout]", check=False)
    assert proc.returncode != 0
    assert ("profile vtab1k: datasets: ['clevr_cout'] not known to the profile (did you mean clevr_count?); "
            "known: ['cifar', 'caltech101', 'dtd'") in proc.stdout + proc.stderr


def test_subset_profile_file_dry_run(repo, roots):
    (repo / "params" / "first.yaml").write_text("base: vtab1k.yaml\ndatasets: [clevr_count]\n"
                                                "methods: [vpt-deep, pro-vpt]\nseeds: [18]\n")
    try:
        proc = dry_run(repo, *paths_config("vtab1k", roots)[1:], "profile=first")
    finally:
        (repo / "params" / "first.yaml").unlink()
    assert counts(proc) == {"prepare": 1, "select": 2, "final_seeds": 2,
                                       "study": 2, "study_variant": 5, "report": 1, "all": 1}
    assert "groups: left out ['natural', 'specialized'] (no chosen dataset)" in proc.stderr
