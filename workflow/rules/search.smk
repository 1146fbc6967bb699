# Hyper-parameter search (`provpt search`: search.train_split, evaluated on search.eval_split with
# search.seed and search.overrides). A (dataset, method)'s lr x wd grid trains in packs of
# `pack.search` runs through one shared backbone (provpt.train.run_pack), one job per pack
# (`provpt search --pack i`, pack<i>.json), each run into its own folder (a finished one is not
# trained again; a killed job resumes every run of its pack). A pack job's `runtime` is the
# projection of its work (provpt.plan.job_minutes: x1.5 + 10 min, at least resources.train.runtime,
# at most resources.train.max_runtime; a retry resumes the pack). search.json gathers the packs'
# points. Then the selection on that split only, never on test.


# Priorities (local runs; a cluster takes every ready job anyway): the studies, the longest jobs,
# start as soon as their selection exists, which the search's priority over the final runs and the
# selection's over everything (it takes a second and unlocks the rest) bring forward; the short final
# jobs then fill both cores to the end instead of one study running alone.
rule search_pack:
    input:
        RUN_INPUTS,
    output:
        f"{RUNS}/search/{{dataset}}/{{method}}/pack{{pack}}.json",
    wildcard_constraints:
        pack=r"\d+",
    priority: 1
    params:
        cfg=job_digest("search_pack"),
        dir=lambda w, output: Path(output[0]).parent,
    threads: RESOURCES["train"].get("threads", 1)
    resources:
        **job_resources("train", runtime=search_runtime),
    log:
        f"{LOGS}/search/{{dataset}}/{{method}}/pack{{pack}}.log",
    benchmark:
        f"{BENCH}/search/{{dataset}}/{{method}}/pack{{pack}}.tsv"
    conda:
        conda_env
    shell:
        "provpt search --profile \"$PROVPT_PROFILE\" --out {params.dir} --pack {wildcards.pack} --summary {output}"
        " dataset={wildcards.dataset} method={wildcards.method} threads={threads} > {log} 2>&1"


# The grid's points from its packs, in grid order (a second of JSON: runs where Snakemake runs).
rule search_grid:
    input:
        lambda w: search_pack_files(w.dataset, w.method),
    output:
        f"{RUNS}/search/{{dataset}}/{{method}}/search.json",
    priority: 2
    log:
        f"{LOGS}/search/{{dataset}}/{{method}}/gather.log",
    conda:
        conda_env
    shell:
        "provpt search --gather {input} --summary {output} dataset={wildcards.dataset} method={wildcards.method}"
        " > {log} 2>&1"


rule select:
    input:
        f"{RUNS}/search/{{dataset}}/{{method}}/search.json",
    output:
        f"{RES}/selection/{{dataset}}/{{method}}.json",
    priority: 3
    params:
        cfg=job_digest("select"),
        runs=lambda w: " ".join(str(Path(f).parent) for f in search_runs(w.dataset, w.method)),
    log:
        f"{LOGS}/select/{{dataset}}/{{method}}.log",
    conda:
        conda_env
    shell:
        "provpt select --profile \"$PROVPT_PROFILE\" --runs {params.runs} --out {output} > {log} 2>&1"
