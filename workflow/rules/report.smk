# Tables (CSV, Markdown, LaTeX) and figures (PNG, PDF) of the profile, the studies' included;
# `snakemake --report report.html` collects them with the captions of workflow/report/.


rule report:
    input:
        final_targets() + selection_targets() + study_targets(),
    output:
        tables=report(
            directory(f"{RES}/tables"),
            patterns=["{name}.csv"],
            caption="../report/tables.rst",
            category="Tables",
        ),
        figures=report(
            directory(f"{RES}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
        metrics=f"{RES}/metrics/summary.json",  # copies for DVC (metrics/plots in git, not cache)
        curves=f"{RES}/metrics/curves.csv",
    params:
        cfg=job_digest("report"),
        results=lambda w, output: Path(output.tables).parent,
    log:
        f"{LOGS}/report.log",
    conda:
        conda_env
    shell:
        "provpt report --profile \"$PROVPT_PROFILE\" --results {params.results} > {log} 2>&1"
