# Hyper-parameter search on search.train_split, evaluated on search.eval_split, one seed. One job
# per (dataset, method, lr) trains the weight-decay values one after the other, each `provpt
# train` call into its own run folder (a job of 1-4 runs keeps the vtab1k DAG at ~1500 jobs and
# its dry run fast; a run folder that is already complete is not trained again).
# Then the selection on that split only, never on test.


rule search_lr:
    input:
        RUN_INPUTS,
    output:
        expand(f"{RUNS}/search/{{{{dataset}}}}/{{{{method}}}}/lr{{{{lr}}}}_wd{{wd}}/metrics.json", wd=WDS),
    params:
        profile=PROFILE_FILE,
        cfg=DIGEST["search"],
        wds=" ".join(WDS),
        split=P["search"]["train_split"],
        eval=P["search"]["eval_split"],
        seed=P["search"]["seed"],
        extra=kv(P["search"]["overrides"]),
        dir=lambda w, output: Path(output[0]).parent.parent,
    threads: RESOURCES["train"].get("threads", 1)
    resources:
        **job_resources("train"),
    log:
        f"{LOGS}/search/{{dataset}}/{{method}}/lr{{lr}}.log",
    benchmark:
        f"{BENCH}/search/{{dataset}}/{{method}}/lr{{lr}}.tsv"
    conda:
        "../envs/provpt.yaml"
    shell:
        "(for wd in {params.wds}; do"
        " provpt train --profile {params.profile} dataset={wildcards.dataset} method={wildcards.method}"
        " seed={params.seed} lr={wildcards.lr} weight_decay=$wd train_split={params.split}"
        " eval_splits={params.eval} {params.extra} threads={threads} out={params.dir}/lr{wildcards.lr}_wd$wd"
        " || exit 1; done) > {log} 2>&1"


rule select:
    input:
        lambda w: search_runs(w.dataset, w.method),
    output:
        f"{RES}/selection/{{dataset}}/{{method}}.json",
    params:
        profile=PROFILE_FILE,
        cfg=DIGEST["search"],
        runs=lambda w, input: " ".join(str(Path(f).parent) for f in input),
    log:
        f"{LOGS}/select/{{dataset}}/{{method}}.log",
    conda:
        "../envs/provpt.yaml"
    shell:
        "provpt select --profile {params.profile} --dataset {wildcards.dataset} --method {wildcards.method}"
        " --runs {params.runs} --out {output} > {log} 2>&1"
