# Hyper-parameter search (`provpt search`: search.train_split, evaluated on search.eval_split with
# search.seed and search.overrides). One job per (dataset, method, lr) trains that lr's weight
# decays one after the other, each into its own run folder (a job of 1-4 runs keeps the vtab1k DAG at
# ~1500 jobs and its dry run fast; a finished run folder is not trained again). Then the selection
# on that split only, never on test.


rule search_lr:
    input:
        RUN_INPUTS,
    output:
        expand(f"{RUNS}/search/{{{{dataset}}}}/{{{{method}}}}/lr{{{{lr}}}}_wd{{wd}}/metrics.json", wd=WDS),
    params:
        cfg=job_digest("search"),
        dir=lambda w, output: Path(output[0]).parent.parent,
    threads: RESOURCES["train"].get("threads", 1)
    resources:
        **job_resources("train"),
    log:
        f"{LOGS}/search/{{dataset}}/{{method}}/lr{{lr}}.log",
    benchmark:
        f"{BENCH}/search/{{dataset}}/{{method}}/lr{{lr}}.tsv"
    conda:
        conda_env
    shell:
        "provpt search --profile \"$PROVPT_PROFILE\" --lr {wildcards.lr} --out {params.dir} dataset={wildcards.dataset}"
        " method={wildcards.method} threads={threads} > {log} 2>&1"


rule select:
    input:
        lambda w: search_runs(w.dataset, w.method),
    output:
        f"{RES}/selection/{{dataset}}/{{method}}.json",
    params:
        cfg=job_digest("select"),
        runs=lambda w, input: " ".join(str(Path(f).parent) for f in input),
    log:
        f"{LOGS}/select/{{dataset}}/{{method}}.log",
    conda:
        conda_env
    shell:
        "provpt select --profile \"$PROVPT_PROFILE\" --runs {params.runs} --out {output} > {log} 2>&1"
