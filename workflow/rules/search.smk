# Hyper-parameter search (`provpt search`: search.train_split, evaluated on search.eval_split with
# search.seed and search.overrides). One job per (dataset, method) trains the method's whole lr x wd
# grid in packs of `pack.search` runs through one shared backbone (provpt.train.run_pack), each run
# into its own folder (a finished one is not trained again; a killed job resumes every run), and
# lists the grid in search.json. Then the selection on that split only, never on test.


# Priorities (local runs; a cluster takes every ready job anyway): the studies, the longest jobs,
# start as soon as their selection exists, which the search's priority over the final runs and the
# selection's over everything (it takes a second and unlocks the rest) bring forward; the short final
# jobs then fill both cores to the end instead of one study running alone.
rule search_grid:
    input:
        RUN_INPUTS,
    output:
        f"{RUNS}/search/{{dataset}}/{{method}}/search.json",
    priority: 1
    params:
        cfg=job_digest("search"),
        dir=lambda w, output: Path(output[0]).parent,
    threads: RESOURCES["train"].get("threads", 1)
    resources:
        **job_resources("train"),
    log:
        f"{LOGS}/search/{{dataset}}/{{method}}.log",
    benchmark:
        f"{BENCH}/search/{{dataset}}/{{method}}/grid.tsv"
    conda:
        conda_env
    shell:
        "provpt search --profile \"$PROVPT_PROFILE\" --out {params.dir} --summary {output} dataset={wildcards.dataset}"
        " method={wildcards.method} threads={threads} > {log} 2>&1"


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
