# mini/smoke only: pretrain the tiny ViT on Fashion-MNIST within a wall-clock budget.

if BACKBONE:

    rule pretrain:
        output:
            BACKBONE,
        params:
            cfg=job_digest("data"),
        threads: RESOURCES["pretrain"].get("threads", 2)
        resources:
            **job_resources("pretrain"),
        log:
            f"{LOGS}/pretrain.log",
        benchmark:
            f"{BENCH}/pretrain.tsv"
        conda:
            conda_env
        shell:
            "provpt pretrain --profile \"$PROVPT_PROFILE\" --out {output} pretrain.threads={threads}"
            " > {log} 2>&1"
