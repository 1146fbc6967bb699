# provpt workflow: PRO-VPT (visual prompt tuning with prompt relocation) on timm ViTs.
#
#   snakemake --cores 2                                   # the embedded default `quick` (make run)
#   snakemake --cores 2 --config profile=mini             # the full embedded benchmark
#   snakemake --cores 8 --config profile=vtab1k source=/data/vtab-1k weights=/models/ViT-B_16.npz
#   snakemake --profile profiles/slurm --config profile=vtab1k ...
#
# This file is the entry (Snakemake finds it in the working directory) and sits at the repository
# root so that Snakemake also finds the workflow profile profiles/default/ beside it: it looks for
# profiles/default relative to the working directory and to the Snakefile, not under workflow/.
# The rules, schema, environment and report captions live in workflow/.
#
# One grid: params/<profile>.yaml (read through provpt.config, pure Python) says which datasets,
# methods, lr x wd grid, seeds and studies run; every job is one `provpt` CLI call writing one run
# folder, complete when its metrics.json / summary.json / manifest.json exists.

from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/studies.smk"
include: "workflow/rules/report.smk"


# (after the includes: workflow/rules/common.smk defines them)
envvars:
    "PATH",  # jobs call `provpt` from PATH (workflow/rules/common.smk puts this Python's bin first)
    "PROVPT_PROFILE",  # the merged profile the jobs read (workflow/rules/common.smk)


report: "workflow/report/workflow.rst"


# Seconds of pandas, or nothing: never submitted to a cluster.
localrules:
    all,
    data,
    search,
    final,
    studies,
    search_grid,
    select,
    report,


wildcard_constraints:
    dataset=r"[A-Za-z0-9_-]+",
    method=r"[A-Za-z0-9_-]+",
    seed=r"\d+",
    study="|".join(STUDIES),
    variant=r"[A-Za-z0-9_-]+",


rule all:
    default_target: True
    input:
        rules.report.output,


rule data:
    input:
        prepared_data(),


rule search:
    input:
        selection_targets(),


rule final:
    input:
        final_targets(),


rule studies:
    input:
        study_targets(),
