# Decode and resize every image once into uint8 arrays (mini/smoke: generate the images first).


rule prepare:
    output:
        MANIFEST,
    params:
        cfg=job_digest("data"),
    threads: RESOURCES["prepare"].get("threads", 1)
    resources:
        **job_resources("prepare"),
    log:
        f"{LOGS}/prepare/{{dataset}}.log",
    conda:
        conda_env
    shell:
        "provpt prepare --profile \"$PROVPT_PROFILE\" --dataset {wildcards.dataset} > {log} 2>&1"
