# Final runs: the selected lr/wd, one run per seed (`provpt final`: final.train_split, evaluated on
# final.eval_split, with final.overrides). One job per (dataset, method) trains its seeds in packs of
# `pack.final` runs through one shared backbone, each seed into its own folder. Its `runtime`: the
# projection of its seeds' work (provpt.plan.job_minutes, as the search packs').


rule final_seeds:
    input:
        data=RUN_INPUTS,
        hparams=f"{RES}/selection/{{dataset}}/{{method}}.json",
    output:
        expand(f"{RUNS}/final/{{{{dataset}}}}/{{{{method}}}}/seed{{seed}}/metrics.json", seed=SEEDS),
    params:
        cfg=job_digest("final"),
        dir=lambda w, output: Path(output[0]).parent.parent,
    threads: RESOURCES["train"].get("threads", 1)
    resources:
        **job_resources("train", runtime=final_runtime),
    log:
        f"{LOGS}/final/{{dataset}}/{{method}}.log",
    benchmark:
        f"{BENCH}/final/{{dataset}}/{{method}}/seeds.tsv"
    conda:
        conda_env
    shell:
        "provpt final --profile \"$PROVPT_PROFILE\" --hparams {input.hparams} --out {params.dir}"
        " dataset={wildcards.dataset} method={wildcards.method} threads={threads} > {log} 2>&1"
