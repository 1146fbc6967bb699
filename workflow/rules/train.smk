# Final runs: the selected lr/wd, one run per seed (`provpt train --stage final`: final.train_split,
# evaluated on final.eval_split, with final.overrides).


rule final_run:
    input:
        data=RUN_INPUTS,
        hparams=f"{RES}/selection/{{dataset}}/{{method}}.json",
    output:
        f"{RUNS}/final/{{dataset}}/{{method}}/seed{{seed}}/metrics.json",
    params:
        cfg=job_digest("final"),
    threads: RESOURCES["train"].get("threads", 1)
    resources:
        **job_resources("train"),
    log:
        f"{LOGS}/final/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/final/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    conda:
        conda_env
    shell:
        "provpt train --profile \"$PROVPT_PROFILE\" --stage final --hparams {input.hparams} dataset={wildcards.dataset}"
        " method={wildcards.method} seed={wildcards.seed} threads={threads} out=$(dirname {output}) > {log} 2>&1"
