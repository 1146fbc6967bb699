# The studies (provpt.config.STUDIES): one job per dataset of studies.<name>.datasets, per seed when
# the section lists seeds, per variant for a study with variants (provpt.studies.study_jobs).
# Each job writes its own folder, complete when summary.json exists.


rule study:
    input:
        unpack(study_inputs),
    output:
        f"{RES}/studies/{{study}}/{{dataset}}/summary.json",
    priority: 2  # the longest jobs first (workflow/rules/search.smk)
    params:
        cfg=job_digest("study"),
        extra=study_args,
    threads: RESOURCES["study"].get("threads", 1)
    resources:
        **job_resources("study"),
    log:
        f"{LOGS}/studies/{{study}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/studies/{{study}}/{{dataset}}.tsv"
    conda:
        conda_env
    shell:
        "provpt study --profile \"$PROVPT_PROFILE\" {wildcards.study} dataset={wildcards.dataset}"
        " {params.extra} threads={threads} out=$(dirname {output}) > {log} 2>&1"


use rule study as study_seed with:
    output:
        f"{RES}/studies/{{study}}/{{dataset}}/seed{{seed}}/summary.json",
    log:
        f"{LOGS}/studies/{{study}}/{{dataset}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/studies/{{study}}/{{dataset}}/seed{{seed}}.tsv"


use rule study as study_variant with:
    output:
        f"{RES}/studies/{{study}}/{{dataset}}/{{variant}}/seed{{seed}}/summary.json",
    log:
        f"{LOGS}/studies/{{study}}/{{dataset}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/studies/{{study}}/{{dataset}}/{{variant}}/seed{{seed}}.tsv"
