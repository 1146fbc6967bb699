# The studies (correlation, timing, adjustment, allocators): one job per dataset listed under
# studies.<name>.datasets, one per seed when the section lists seeds. Each writes its own folder,
# complete when summary.json exists.


rule study:
    input:
        unpack(study_inputs),
    output:
        f"{RES}/studies/{{study}}/{{dataset}}/summary.json",
    params:
        profile=PROFILE_FILE,
        cfg=lambda w: DIGEST[f"study:{w.study}"],
        extra=study_args,
    threads: RESOURCES["study"].get("threads", 1)
    resources:
        **job_resources("study"),
    log:
        f"{LOGS}/studies/{{study}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/studies/{{study}}/{{dataset}}.tsv"
    conda:
        "../envs/provpt.yaml"
    shell:
        "provpt study --profile {params.profile} {wildcards.study} dataset={wildcards.dataset}"
        " {params.extra} threads={threads} out=$(dirname {output}) > {log} 2>&1"


use rule study as study_seed with:
    output:
        f"{RES}/studies/{{study}}/{{dataset}}/seed{{seed}}/summary.json",
    log:
        f"{LOGS}/studies/{{study}}/{{dataset}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/studies/{{study}}/{{dataset}}/seed{{seed}}.tsv"
