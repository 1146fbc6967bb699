"""``provpt <command>``: thin wrappers that parse, validate and call one library function each.

Every command takes ``--profile params/<name>.yaml`` and ``key=value`` overrides (YAML values;
dotted keys reach nested sections, e.g. ``relocation.allocator=thompson``). A run's configuration
always comes from :func:`provpt.config.resolve` (``provpt config`` prints it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from . import __version__
from .config import RUN_KEYS, STAGES, STUDIES, ConfigError, apply_overrides, read_profile, read_selection, resolve


def _profile(args) -> dict:
    return read_profile(args.profile) if args.profile else {}


def _run_config(args):
    hparams = read_selection(args.hparams) if getattr(args, "hparams", None) else None
    return resolve(_profile(args) or None, None, getattr(args, "stage", None), args.overrides, hparams)


# ----------------------------------------------------------------------------- commands


def cmd_config(args) -> None:
    print(yaml.safe_dump(_run_config(args).to_dict(), sort_keys=False), end="")


def cmd_train(args) -> None:
    from .train import run

    cfg = _run_config(args)
    metrics = run(cfg)
    evals = ", ".join(f"{s} {v['acc']:.2f}%" for s, v in metrics["eval"].items())
    print(f"{cfg.dataset}/{cfg.method} seed {cfg.seed}: {evals} ({metrics['wall_time_s']:.1f} s) -> {cfg.out}")


def cmd_search(args) -> None:
    from .config import as_mapping
    from .protocol import search

    over = as_mapping(args.overrides, "command line")
    if not args.out and not args.gather:
        raise ConfigError("search: give --out (the folder of the method's search runs)")
    missing = [k for k in ("dataset", "method") if k not in over]
    if missing:
        raise ConfigError(f"search: give {' and '.join(f'{k}=' for k in missing)} (the grid is per dataset and method)")
    dataset, method = over.pop("dataset"), over.pop("method")
    if args.gather:
        from .protocol import gather_search

        if not args.summary:
            raise ConfigError("search --gather: give --summary (the file to write)")
        from .io import write_text

        write_text(Path(args.summary), json.dumps(gather_search(dataset, method, args.gather), indent=2))
        return
    points = []
    for m in search(_profile(args), dataset, method, args.out, args.lr, over, args.pack):
        evals = ", ".join(f"{s} {v['acc']:.2f}%" for s, v in m["eval"].items())
        print(f"{dataset}/{method} lr {m['lr']:g} wd {m['weight_decay']:g}: {evals}")
        points.append({k: m[k] for k in ("lr", "weight_decay", "eval", "packed_runs")})
    if args.summary:
        from .io import write_text

        summary = {"dataset": dataset, "method": method, **({"pack": args.pack} if args.pack is not None else {}),
                   "points": points}
        write_text(Path(args.summary), json.dumps(summary, indent=2))


def cmd_plan(args) -> None:
    from .plan import plan, read_measured, render

    if not args.profile:
        raise ConfigError("plan: give --profile params/<name>.yaml")
    measured = read_measured(args.measured) if args.measured else None
    result = plan(args.profile, args.overrides, measured)  # (the path: its base chain is what may be chosen)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))


def cmd_final(args) -> None:
    from .config import as_mapping
    from .protocol import final

    over = as_mapping(args.overrides, "command line")
    missing = [k for k in ("dataset", "method") if k not in over]
    if missing:
        raise ConfigError(f"final: give {' and '.join(f'{k}=' for k in missing)} (the runs are per dataset and method)")
    if "seed" in over:
        raise ConfigError("final: give seeds with --seed (repeatable), not seed=")
    dataset, method = over.pop("dataset"), over.pop("method")
    hparams = read_selection(args.hparams) if args.hparams else None
    for m in final(_profile(args), dataset, method, args.out, args.seed, hparams, over):
        evals = ", ".join(f"{s} {v['acc']:.2f}%" for s, v in m["eval"].items())
        print(f"{dataset}/{method} seed {m['seed']}: {evals}")


def cmd_select(args) -> None:
    from .selection import select

    profile = _profile(args)
    split = (profile.get("search") or {}).get("eval_split", "val200")
    result = select(args.runs, split, Path(args.out))
    print(f"{args.out}: lr={result['lr']} weight_decay={result['weight_decay']} ({split} {result['acc']:.2f}%)")


def cmd_prepare(args) -> None:
    from .prepare import prepare

    profile = apply_overrides(_profile(args), args.overrides)
    for line in prepare(profile, args.dataset):
        print(line)


def cmd_pretrain(args) -> None:
    from .pretrain import pretrain

    profile = apply_overrides(_profile(args), args.overrides)
    train, opts = resolve(profile or None), dict(profile.get("pretrain") or {})
    fmnist = (profile.get("mini") or {}).get("fmnist_dir")
    if fmnist:
        opts.setdefault("fmnist_dir", fmnist)
    out = args.out or train.weights
    if not out:
        raise ConfigError("pretrain: no --out and no train.weights in the profile")
    result = pretrain(train.backbone, train.backbone_kwargs, out, **opts)
    print(json.dumps(result, indent=2))


def cmd_study(args) -> None:
    from .studies import study_module

    summary = study_module(args.name).main(_profile(args), args.overrides)
    print(json.dumps(summary, indent=2, default=str)[:2000])


def cmd_report(args) -> None:
    from .report import make_report

    profile = _profile(args)
    written = make_report(profile, Path(args.results))
    for kind, paths in written.items():
        print(f"{kind}: {paths}")


def cmd_compare(args) -> None:
    from .report.backbones import compare

    written = compare(args.results, _profile(args).get("groups"), Path(args.out))
    for name, paths in written.items():
        print(f"{name}: {[str(p) for p in paths]}")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provpt", description=__doc__)
    p.add_argument("--version", action="version", version=f"provpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = {}  # name -> its parser (a stray option is reported with that command's usage)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        p.commands[name] = sp
        sp.add_argument("--profile", "-p", help="profile YAML (params/<name>.yaml)")
        sp.set_defaults(fn=fn)
        return sp

    def run_args(sp):
        sp.add_argument("--stage", choices=STAGES, help="protocol stage: its splits, seed (search) and overrides")
        sp.add_argument("--hparams", help="selection JSON (provpt select) whose lr and weight_decay to use")
        sp.add_argument("overrides", nargs="*", help="key=value overrides of the run config (dataset=, method=, ...)")

    sp = add("prepare", cmd_prepare, "generate (embedded profiles) and cache a profile's datasets as tensors")
    sp.add_argument("--dataset", help="only this dataset (default: all of the profile's)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the profile")
    sp = add("pretrain", cmd_pretrain, "pretrain the embedded tiny ViT on Fashion-MNIST")
    sp.add_argument("--out", help="backbone file to write (default: the profile's train.weights)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the profile")
    run_args(add("config", cmd_config, "print the resolved configuration of one run (as `train` would run it)"))
    run_args(add("train", cmd_train, "one training run into one run folder (resumes an unfinished one)"))
    sp = add("search", cmd_search, "train a method's lr x wd search grid on one dataset, one folder per point")
    sp.add_argument("--out", help="folder of the method's search runs (lr<lr>_wd<wd>/ each)")
    sp.add_argument("--lr", type=float, action="append", help="only this grid lr (repeatable)")
    sp.add_argument("--summary", help="also write the grid's points and their metrics to this JSON file")
    sp.add_argument("--pack", type=int,
                    help="only this pack of the grid (from 0; packs of the profile's pack.search runs)")
    sp.add_argument("--gather", nargs="+", metavar="PACK_JSON", help="train nothing: write --summary from the "
                    "--summary files of the grid's packs (in grid order)")
    sp.add_argument("overrides", nargs="*", help="dataset=<d> method=<m> and run-config overrides")
    sp = add("plan", cmd_plan, "before a run: a profile's jobs and runs per rule, GPU-hours (projected or measured) "
             "and disk (data cache, run folders per `keep`, DVC cache)")
    sp.add_argument("--measured",
                    help="JSON of measured GPU epochs (benchmarks/gpu_epoch.py) instead of the FLOPs estimate")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the profile (e.g. train.precision=bf16)")
    sp = add("final", cmd_final, "train a method's final runs on one dataset, one folder per seed")
    sp.add_argument("--out", required=True, help="folder of the method's final runs (seed<k>/ each)")
    sp.add_argument("--hparams", help="selection JSON (provpt select) whose lr and weight_decay to use")
    sp.add_argument("--seed", type=int, action="append", help="only this seed (repeatable; default: the profile's)")
    sp.add_argument("overrides", nargs="*", help="dataset=<d> method=<m> and run-config overrides")
    sp = add("select", cmd_select, "pick lr/wd from search runs by last-epoch eval accuracy")
    sp.add_argument("--runs", nargs="+", required=True, help="search run folders")
    sp.add_argument("--out", required=True, help="selection JSON to write")
    sp = add("study", cmd_study, "run one study job (one dataset; one seed or variant where that applies)")
    sp.add_argument("name", choices=STUDIES)
    sp.add_argument("overrides", nargs="*", help="key=value overrides (study.<option>=, hparams=, run keys)")
    sp = add("report", cmd_report, "tables (CSV/Markdown/LaTeX) and figures from finished runs")
    sp.add_argument("--results", required=True, help="results/<profile> folder")
    sp = add("compare", cmd_compare, "pool the final runs of several backbones (results folders of one "
             "benchmark): accuracy per backbone and paired tests over (backbone, task, seed)")
    sp.add_argument("--results", nargs="+", required=True, help="results/<profile> folders, one per backbone")
    sp.add_argument("--out", required=True, help="folder for the tables")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options: argparse leaves the later ones over
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        hint = next((f" (run keys are key=value: {e.lstrip('-').split('=')[0]}=...)" for e in stray
                     if e.startswith("--") and e.lstrip("-").split("=")[0].replace("-", "_") in RUN_KEYS), "")
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(stray)}{hint}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    # one line per epoch (provpt.train's logger) on stderr: what `tail -f` on a job's log shows
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        if os.environ.get("PROVPT_DEBUG"):
            raise
        print(f"provpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
