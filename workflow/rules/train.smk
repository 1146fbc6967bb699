# Final runs: the selected lr/wd, one run per seed, on final.train_split, evaluated on final.eval_split.


rule final_run:
    input:
        data=RUN_INPUTS,
        hparams=f"{RES}/selection/{{dataset}}/{{method}}.json",
    output:
        f"{RUNS}/final/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
    params:
        profile=PROFILE_FILE,
        cfg=DIGEST["final"],
        split=P["final"]["train_split"],
        eval=P["final"]["eval_split"],
        extra=kv(P["final"]["overrides"]),
    threads: RESOURCES["train"].get("threads", 1)
    resources:
        **job_resources("train"),
    log:
        f"{LOGS}/final/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/final/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    conda:
        "../envs/provpt.yaml"
    shell:
        "provpt train --profile {params.profile} --hparams {input.hparams} dataset={wildcards.dataset}"
        " method={wildcards.method} seed={wildcards.seed} train_split={params.split}"
        " eval_splits={params.eval} {params.extra} threads={threads} out=$(dirname {output}) > {log} 2>&1"
